"""A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) read as a Δ source.

An adapter is a fine-tune stored as factors: per target module Δ = scale·B·A (`recycler.delta.lora`),
plus `modules_to_save`, whole tensors that replace the base's (their Δ is saved − base, computed like
any fine-tune's). Everything is validated before any arithmetic; variants whose Δ is not scale·B·A
(DoRA, LoHa, LoKr, IA³, …) are refused by name rather than approximated. Tensors are read by byte
range when a chunk needs them: memory is a few rows of B (or columns of A), never the adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recycler.delta.kernels import DenseBlocks
from recycler.delta.lora import lora_rows, lora_scale
from recycler.errors import IncompatibleCheckpoints, InvalidCheckpoint
from recycler.io.reader import ChunkReader, PairDelta
from recycler.io.safetensors import TensorEntry, read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ROW_BLOCK = 1 << 16  # Δ elements computed per float64 product
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
)
# PEFT types with another Δ than scale·B·A, by the names their users know them by.
_OTHER_TYPES = {
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA³",
    "ADALORA": "AdaLoRA",
    "BOFT": "BOFT",
    "OFT": "OFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "HRA": "HRA",
    "VBLORA": "VB-LoRA",
    "LN_TUNING": "LayerNorm tuning",
    "PROMPT_TUNING": "prompt tuning",
    "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "P-tuning",
}
# LoraConfig options whose Δ is not scale·B·A per weight (value: the name of the variant).
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


def is_adapter(path: Path) -> bool:
    """A folder holding a PEFT adapter (and, by PEFT's layout, no full model weights of its own)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: `weight` is the base tensor it changes, of shape `shape`."""

    weight: str
    a: TensorEntry
    b: TensorEntry
    rank: int
    alpha: float
    scale: float
    transposed: bool  # Δ = (scale·B·A)ᵀ: fan_in_fan_out (Conv1D) and embedding layers
    shape: tuple[int, int]


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]  # base tensor name → its factors
    saved: dict[str, TensorEntry]  # base tensor name → the full tensor of a module in modules_to_save
    # base tensor name → the adapted layer's own weight, saved with the factors when PEFT adapts
    # embeddings (save_embedding_layers): the adapter's weight is that plus scale·B·A
    base_layers: dict[str, TensorEntry]

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def revision(self) -> str | None:
        return self.config.get("revision")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            **{n: m.shape for n, m in self.modules.items()},
            **{n: e.shape for n, e in self.saved.items()},
        }

    def summary(self) -> dict:
        """What a manifest records about the adapter (content, never its path)."""
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({m.scale for m in self.modules.values()})
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.base_name,
            "revision": self.revision,
            "ranks": ranks,
            "scales": scales,
            "use_rslora": bool(self.config.get("use_rslora")),
            "lora_modules": len(self.modules),
            "modules_to_save": sorted(self.saved),
            "saved_layers": sorted(self.base_layers),
        }


def open_adapter(path: Path) -> Adapter:
    """Validate an adapter folder and index its factors. Raises InvalidCheckpoint naming the problem."""
    path = Path(path)
    cfg = _config(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        bins = [p.name for p in path.glob("adapter_model.bin")]
        hint = " (only a pickle adapter_model.bin: re-save it with safe_serialization=True)" if bins else ""
        raise InvalidCheckpoint(f"{path}: {ADAPTER_WEIGHTS} is missing{hint}")
    entries, _ = read_header(weights)
    factors: dict[str, dict[str, TensorEntry]] = {}
    saved: dict[str, TensorEntry] = {}
    layers: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".base_layer.weight"):
            layers[name.removesuffix(".base_layer.weight") + ".weight"] = entry
        elif m := _LORA_KEY.match(name):
            factors.setdefault(m["module"], {})[m["part"]] = entry
        elif ".lora_" in name or "lora_magnitude_vector" in name:
            raise InvalidCheckpoint(
                f"{weights}: tensor {key!r} is not a LoRA factor recycler understands (DoRA magnitudes and "
                "LoRA biases change Δ beyond scale·B·A); refusing rather than approximating"
            )
        else:
            if not entry.is_float:
                raise InvalidCheckpoint(f"{weights}: tensor {key!r} has non-float dtype {entry.dtype}")
            saved[name] = entry
    modules = {f"{mod}.weight": _module(weights, cfg, mod, parts) for mod, parts in sorted(factors.items())}
    both = sorted(set(modules) & set(saved))
    if both:
        raise InvalidCheckpoint(f"{weights}: {both[:5]} both LoRA-adapted and saved whole")
    if not modules and not saved:
        raise InvalidCheckpoint(f"{weights}: no LoRA factors and no saved modules: an empty adapter")
    stray = sorted(set(layers) - set(modules))
    if stray:
        raise InvalidCheckpoint(f"{weights}: base_layer weights {stray[:5]} saved without LoRA factors")
    return Adapter(path, cfg, modules, saved, layers)


def _config(path: Path) -> dict:
    f = path / ADAPTER_CONFIG
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidCheckpoint(f"{f}: unreadable or invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise InvalidCheckpoint(f"{f}: must be a JSON object")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        name = _OTHER_TYPES.get(kind, kind or "none given")
        raise InvalidCheckpoint(
            f"{f}: adapter type {name} (peft_type {cfg.get('peft_type')!r}) is not supported; recycler reads "
            "LoRA adapters (peft_type LORA, including rsLoRA), whose Δ is scale·B·A"
        )
    bad = [label for key, label in _UNSUPPORTED_OPTIONS.items() if cfg.get(key)]
    if bad:
        raise InvalidCheckpoint(f"{f}: unsupported LoRA variant: {', '.join(bad)}; Δ would not be scale·B·A")
    return cfg


def _pattern_value(patterns: Mapping[str, object] | None, module: str, default: object) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module(weights: Path, cfg: dict, module: str, parts: dict[str, TensorEntry]) -> LoraModule:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    ka, kb = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    if ka not in parts or kb not in parts:
        raise InvalidCheckpoint(f"{weights}: module {module!r} has {sorted(parts)}, needs both {ka} and {kb}")
    a, b = parts[ka], parts[kb]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InvalidCheckpoint(
            f"{weights}: module {module!r}: LoRA factors of shapes {list(a.shape)}, {list(b.shape)} "
            "(convolution LoRA is not supported; only Linear, Conv1D and Embedding layers)"
        )
    if not (a.is_float and b.is_float) or a.shape[0] != b.shape[1]:
        raise InvalidCheckpoint(
            f"{weights}: module {module!r}: lora_A {a.dtype}{list(a.shape)} and lora_B {b.dtype}{list(b.shape)} "
            "do not factor a weight (need float A (r, in) and B (out, r))"
        )
    rank = a.shape[0]
    declared = int(_pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", rank)))
    if declared != rank:
        raise InvalidCheckpoint(
            f"{weights}: module {module!r}: factors of rank {rank} but adapter_config.json says r = {declared}"
        )
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
    transposed = embedding or bool(cfg.get("fan_in_fan_out"))
    shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    scale = lora_scale(alpha, rank, bool(cfg.get("use_rslora")))
    return LoraModule(f"{module}.weight", a, b, rank, alpha, scale, transposed, shape)


# ---- checks against a base --------------------------------------------------------------------------


def shape_problems(adapter: Adapter, base: Mapping[str, TensorEntry]) -> list[str]:
    """Every adapted or saved tensor must exist in the base with the adapter's shape."""
    problems = [
        f"{name}: the adapter saves this layer with shape {list(e.shape)} (was the vocabulary resized?), "
        f"base tensor {list(base[name].shape)}"
        for name, e in adapter.base_layers.items()
        if name in base and tuple(base[name].shape) != tuple(e.shape)
    ]
    for name, shape in adapter.shapes().items():
        entry = base.get(name)
        if entry is None:
            problems.append(f"{name}: adapted by the adapter but absent from the base")
        elif tuple(entry.shape) != tuple(shape):
            problems.append(f"{name}: adapter's Δ has shape {list(shape)}, base tensor {list(entry.shape)}")
    return problems


def base_identity_problem(adapter: Adapter, base_path: Path, base_config: dict | None) -> str | None:
    """A reason to believe `base_path` is not the base the adapter records, or None.

    The adapter records a hub id or a path (`base_model_name_or_path`) and maybe a revision. A local
    folder is known by its own name, the `_name_or_path` in its config and, in a hub cache, the
    snapshot it sits in; the names must agree on their last component (`org/Model-7B` ≈ `…/Model-7B`).
    Nothing recorded, or nothing to compare with, is no evidence either way.
    """
    recorded = adapter.base_name
    base_path = Path(base_path).resolve()
    known = {base_path.name, str((base_config or {}).get("_name_or_path") or "")}
    if "snapshots" in base_path.parts:  # …/models--org--Name/snapshots/<revision>
        i = base_path.parts.index("snapshots")
        known.add(base_path.parts[i - 1].split("--")[-1])
        snapshot = base_path.parts[i + 1] if i + 1 < len(base_path.parts) else None
        if adapter.revision and snapshot and adapter.revision != snapshot:
            return f"the adapter records revision {adapter.revision!r}, the base is snapshot {snapshot!r}"
    if not recorded:
        return None
    last = _last(recorded)
    if any(_last(k) == last for k in known if k):
        return None
    return (
        f"the adapter records base {recorded!r}, the given base is {base_path.name!r} "
        f"(config _name_or_path {(base_config or {}).get('_name_or_path')!r})"
    )


def _last(name: str) -> str:
    return name.rstrip("/").split("/")[-1].lower()


# ---- the Δ source -----------------------------------------------------------------------------------


def _f64(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)


class LoraDelta:
    """The Δ of one adapted weight, chunk by chunk: rows [r0, r1) of scale·B·A computed from the rows of
    B (or the columns of A, transposed) they need. Thread-safe: reads go to fresh arrays."""

    def __init__(self, chunks: ChunkReader, module: LoraModule):
        self.chunks, self.m = chunks, module
        self.numel = math.prod(module.shape)
        self.cols = module.shape[1]

    def blocks(self, start: int, count: int) -> LoraBlocks:
        return LoraBlocks(self, start, self._factors(start, count))

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        self._rows_into(self._factors(start, count), start, start + count, out[:count])

    def _factors(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, int]:
        """float64 A and B restricted to what Δ rows [r0, r1) of this chunk need, and r0."""
        m, r = self.m, self.m.rank
        r0, r1 = start // self.cols, -(-(start + count) // self.cols)
        if m.transposed:  # Δ rows are columns of A: one read of r1 − r0 elements per row of A
            inner = m.a.shape[1]
            a = np.stack([_f64(self.chunks.array(m.a, k * inner + r0, r1 - r0), m.a.dtype) for k in range(r)])
            b = _f64(self.chunks.array(m.b, 0, m.b.numel), m.b.dtype).reshape(m.b.shape)
        else:
            a = _f64(self.chunks.array(m.a, 0, m.a.numel), m.a.dtype).reshape(m.a.shape)
            b = _f64(self.chunks.array(m.b, r0 * r, (r1 - r0) * r), m.b.dtype).reshape(r1 - r0, r)
        return a, b, r0

    def _rows_into(
        self, factors: tuple[np.ndarray, np.ndarray, int], lo: int, hi: int, out: np.ndarray
    ) -> None:
        """Δ elements [lo, hi) into `out`, a few rows at a time (a ~512 KiB float64 product)."""
        a, b, r0 = factors
        cols, step = self.cols, max(1, ROW_BLOCK // self.cols)
        q = lo // cols
        while q * cols < hi:
            q1 = min(q + step, -(-hi // cols))
            rows = lora_rows(a, b, self.m.scale, self.m.transposed, q - r0, q1 - r0).reshape(-1)
            s, e = max(lo, q * cols), min(hi, q1 * cols)
            out[s - lo : e - lo] = rows[s - q * cols : e - q * cols]
            q = q1


class LoraBlocks:
    """The kernels' block provider for one chunk of a LoRA Δ: each block computed when asked for."""

    def __init__(self, source: LoraDelta, start: int, factors: tuple[np.ndarray, np.ndarray, int]):
        self.source, self.start, self.factors = source, start, factors

    def fill(self, s: int, e: int, w: np.ndarray, sc) -> np.ndarray:
        self.source._rows_into(self.factors, self.start + s, self.start + e, w[: e - s])
        return w[: e - s]

    def fix_roundtrip(self, target: np.ndarray, dtype: str, out: np.ndarray, sc) -> None:
        return None  # no base bits to restore: Δ is a product, not m′ − m


def adapter_source(chunks: ChunkReader, adapter: Adapter, base: Mapping[str, TensorEntry], name: str):
    """The Δ source of one tensor the adapter changes (`saved` tensors need the base: saved − base)."""
    whole = adapter.saved.get(name) or adapter.base_layers.get(name)
    if whole is not None and name not in base:
        raise IncompatibleCheckpoints(
            f"{adapter.path}: {name} is saved whole (modules_to_save or an embedding layer); its Δ needs "
            "the adapter's base"
        )
    if name not in adapter.modules:
        return PairDelta(chunks, base[name], whole)
    lora = LoraDelta(chunks, adapter.modules[name])
    return lora if whole is None else SumDelta(PairDelta(chunks, base[name], whole), lora, chunks)


class SumDelta:
    """(saved layer − base) + scale·B·A: an embedding layer PEFT saved alongside its factors."""

    def __init__(self, first, second, chunks: ChunkReader):
        self.first, self.second, self.chunks, self.numel = first, second, chunks, first.numel

    def blocks(self, start: int, count: int) -> DenseBlocks:
        out = self.chunks.scratch("lora-sum", count)
        self.read_f32(start, count, out)
        return DenseBlocks(out)

    def read_f32(self, start: int, count: int, out: np.ndarray) -> None:
        tmp = self.chunks.scratch("lora-sum-part", count)
        self.first.read_f32(start, count, out)
        self.second.read_f32(start, count, tmp)
        np.add(out[:count], tmp, out=out[:count])
