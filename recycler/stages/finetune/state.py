"""Training checkpoints without pickle, and resume selection that trusts only what we wrote ourselves.

Layout of `OUT/.checkpoints/step-N/`:
  model.safetensors          weights (shared/tied tensors stored once)
  optimizer.safetensors      optimizer tensors, keyed `state.<param index>.<name>`
  optimizer.json             param groups and non-tensor optimizer state
  scheduler.json             LR scheduler state (plain numbers)
  rng-<rank>.safetensors     torch CPU/CUDA generator states of each process
  rng-<rank>.json            python `random` and numpy states of each process
  trainer_state.json         step, data position, loss history, curve, counters, run fingerprint
  COMPLETE                   JSON {step, files: {name: {sha256, size}}}, written last

Why not `Accelerator.save_state` or Trainer checkpoints: both write in place with no completeness
marker, and both unpickle on load (RELIABILITY.md §0.10, CVE-2026-1839). Here everything is safetensors
or JSON, a checkpoint counts only if its COMPLETE marker lists exactly the files present with matching
sha256, and anything else is moved to `.checkpoints/.quarantine/` instead of being loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from recycler.io.atomic import fsync_dir, fsync_file
from recycler.io.manifest import sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = ".checkpoints"
QUARANTINE = ".quarantine"
MARKER = "COMPLETE"
MARKER_FORMAT = "recycler-train-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def step_dir(out: Path, step: int) -> Path:
    return checkpoint_root(out) / f"step-{step}"


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- writing ----------------------------------------------------------------------------------------


def save_weights(folder: Path, model: torch.nn.Module) -> None:
    """`save_model` stores tied tensors once (plain `save_file` refuses shared storage)."""
    save_model(model, str(folder / "model.safetensors"))


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, object]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def save_scheduler(folder: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    _write_json(folder / "scheduler.json", scheduler.state_dict())


def save_rng(folder: Path, rank: int) -> None:
    """Each process saves its own generators; ranks write disjoint files, so no locking is needed."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    _write_json(
        folder / f"rng-{rank}.json",
        {
            "python": [py_version, list(py_state), py_gauss],
            "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        },
    )


def save_trainer_state(folder: Path, state: dict) -> None:
    _write_json(folder / "trainer_state.json", state)


def write_marker(folder: Path, step: int) -> dict:
    """Hash every file, fsync them, then publish the marker with tmp + rename: the commit point."""
    files = sorted(p for p in folder.iterdir() if p.name != MARKER)
    listing = {}
    for p in files:
        fsync_file(p)
        listing[p.name] = {"sha256": sha256_file(p).sha256, "size": p.stat().st_size}
    marker = {"format": MARKER_FORMAT, "step": step, "files": listing}
    tmp = folder / f".{MARKER}.tmp-{uuid.uuid4().hex[:8]}"
    _write_json(tmp, marker)
    fsync_file(tmp)
    os.replace(tmp, folder / MARKER)
    fsync_dir(folder)
    return marker


# ---- validation and selection -------------------------------------------------------------------------


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a trustworthy checkpoint, or None if its marker matches every file."""
    match = _STEP_DIR.match(folder.name)
    marker_path = folder / MARKER
    if not match or not folder.is_dir():
        return "not a step-N folder"
    if not marker_path.is_file():
        return "no COMPLETE marker (interrupted while saving)"
    try:
        marker = _read_json(marker_path)
        listed = marker["files"]
        if marker.get("format") != MARKER_FORMAT or marker.get("step") != int(match.group(1)):
            return "marker format or step does not match the folder"
    except (ValueError, KeyError, TypeError):
        return "COMPLETE marker is not valid JSON of the expected shape"
    present = {p.name for p in folder.iterdir() if p.name != MARKER}
    if present != set(listed):
        return f"files differ from the marker (unlisted: {sorted(present - set(listed))}, missing: {sorted(set(listed) - present)})"
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            return f"{name}: size differs from the marker"
        if sha256_file(path).sha256 != expected.get("sha256"):
            return f"{name}: sha256 differs from the marker"
    return None


def quarantine(folder: Path, reason: str) -> Path:
    """Move a bad checkpoint aside (kept for forensics, never loaded) with the reason next to it."""
    dest_root = folder.parent / QUARANTINE
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / f"{folder.name}.{uuid.uuid4().hex[:8]}"
    os.replace(folder, dest)
    (dest_root / f"{dest.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
    log.warning("quarantined checkpoint %s -> %s: %s", folder, dest, reason)
    return dest


def select_resume_checkpoint(out: Path) -> tuple[Path | None, list[dict]]:
    """Highest step-N whose marker verifies; every invalid step-N folder is quarantined.

    Returns (checkpoint or None, [{"checkpoint", "moved_to", "reason"}] for the quarantined ones).
    """
    root = checkpoint_root(out)
    candidates = sorted(
        (int(m.group(1)), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name))
    )
    chosen: Path | None = None
    quarantined = []
    for _step, folder in reversed(candidates):
        problem = checkpoint_problem(folder)
        if problem is None and chosen is None:
            chosen = folder
        elif problem is not None:
            moved = quarantine(folder, problem)
            quarantined.append({"checkpoint": folder.name, "moved_to": str(moved), "reason": problem})
    return chosen, quarantined


def prune_checkpoints(out: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (only ever after a newer one exists)."""
    if keep_last is None:
        return
    root = checkpoint_root(out)
    complete = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()
    )
    for _step, folder in complete[: max(len(complete) - keep_last, 0)]:
        shutil.rmtree(folder)


# ---- loading (only from folders that passed `checkpoint_problem`) -------------------------------------


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    load_model(model, str(folder / "model.safetensors"), strict=True)  # raises on missing/extra names


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    meta = _read_json(folder / "optimizer.json")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, object]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    # JSON turned tuples (AdamW betas) into lists; restore the types the live optimizer uses.
    live = optimizer.state_dict()["param_groups"]
    if len(live) != len(meta["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(meta['param_groups'])} param groups, optimizer has {len(live)}"
        )
    groups = [
        {k: tuple(v) if isinstance(ref.get(k), tuple) else v for k, v in saved.items()}
        for saved, ref in zip(meta["param_groups"], live, strict=True)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_scheduler(folder: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    scheduler.load_state_dict(_read_json(folder / "scheduler.json"))


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's generators; False if the checkpoint has no file for this rank."""
    if not (folder / f"rng-{rank}.json").is_file():
        return False
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    meta = _read_json(folder / f"rng-{rank}.json")
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


def load_trainer_state(folder: Path) -> dict:
    return _read_json(folder / "trainer_state.json")
