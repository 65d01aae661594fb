"""Benchmark the recycling job m_t + (m′_s − m_s) on synthetic bf16 Llama-shaped checkpoints.

Side by side, each in a fresh subprocess (wall time and peak RSS from wait4), inputs page-cached:
  floor      read the three inputs and write one output with plain file I/O (the physical floor)
  recycler   `recycler recycle` (one streaming pass, Δ not stored)
  diff+apply `recycler diff` then `recycler apply` (Δ stored as a float32 artifact)
  naive      load the three state dicts fully, compute in float32, save
  mergekit   task_arithmetic with base m_s, models m_t and m′_s at weight 1 (when installed)
Every output is compared with the exact result bf16(float32(m_t) + float32(m′_s) − float32(m_s)).

    python bench/bench_delta.py                    # 1 GB and 2 GB checkpoints
    python bench/bench_delta.py --sizes 4 --skip naive
Set MERGEKIT_YAML to the `mergekit-yaml` executable (default: /work/bench-env/bin/mergekit-yaml or PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from recycler.toy.tiny import build_synthetic_checkpoint, llama_shapes, tiny_llama_config

HIDDEN, INTER, VOCAB = 2048, 5632, 32000

FLOOR = r"""
import sys, shutil
from pathlib import Path
ms, ft, mt, out = map(Path, sys.argv[1:5])
out.mkdir()
for d in (ms, ft):
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(16 << 20):
                pass
for f in sorted(mt.glob("*.safetensors")):
    shutil.copyfile(f, out / f.name)
"""

NAIVE = r"""
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
ms, ft, mt, out = map(Path, sys.argv[1:5])
def load(d):
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(f))
    return state
b, f, t = load(ms), load(ft), load(mt)
res = {k: (v.float() + (f[k].float() - b[k].float())).to(v.dtype) for k, v in t.items()}
out.mkdir()
wm = json.loads((mt / "model.safetensors.index.json").read_text())["weight_map"]
for shard in sorted(set(wm.values())):
    save_file({k: res[k] for k, s in wm.items() if s == shard}, str(out / shard), metadata={"format": "pt"})
(out / "model.safetensors.index.json").write_text((mt / "model.safetensors.index.json").read_text())
"""


def build(root: Path, size_gb: float) -> dict[str, Path]:
    """Three checkpoints of ≈ size_gb each (cached across runs)."""
    per_layer = (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 4 + 3 * HIDDEN * INTER) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * VOCAB * HIDDEN * 2) / per_layer))
    shapes = llama_shapes(HIDDEN, INTER, layers, VOCAB)
    config = tiny_llama_config(VOCAB, hidden=HIDDEN, layers=layers).to_dict()
    config |= {
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": INTER,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "torch_dtype": "bfloat16",
    }
    folder = root / f"{size_gb:g}gb"
    paths = {k: folder / k for k in ("ms", "ft", "mt")}
    if not all((p / "config.json").exists() for p in paths.values()):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"building three {size_gb:g} GB checkpoints ({layers} layers) in {folder} …", flush=True)
        build_synthetic_checkpoint(paths["ms"], shapes, seed=0, config=config)
        build_synthetic_checkpoint(
            paths["ft"],
            shapes,
            seed=1,
            like=paths["ms"],
            noise=2e-3,
            config=config,
            max_shard_bytes=384 << 20,
        )
        build_synthetic_checkpoint(
            paths["mt"],
            shapes,
            seed=2,
            like=paths["ms"],
            noise=5e-3,
            config=config,
            max_shard_bytes=640 << 20,
        )
    for p in paths.values():  # configs are cheap to refresh; the weights are cached
        (p / "config.json").write_text(json.dumps(config, indent=1))
    return paths


# A small launcher measures the command: a child forked straight from this (large) process would
# report our own resident memory as its peak, since Linux counts the pre-exec image in ru_maxrss.
LAUNCH = (
    "import os, sys, time; t = time.perf_counter(); pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ);"
    " _, st, ru = os.wait4(pid, 0);"
    " print('MEASURED', time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(st), file=sys.stderr)"
)


def run(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one command, measured by a minimal launcher process.

    Dirty pages left by the previous method are flushed first: recycler fsyncs its output and would
    otherwise also pay for writing back whatever ran before it (30 s instead of 5 s, seen here).
    """
    os.sync()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("MEASURED")]
    if not line or line[-1].split()[3] != "0":
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    _, wall, rss_kb, _ = line[-1].split()
    return {"wall_s": float(wall), "peak_rss_gb": int(rss_kb) * 1024 / 1e9}


def mergekit_cmd(paths: dict[str, Path], out: Path, work: Path, exact: bool) -> list[str] | None:
    """mergekit 0.1.5 task_arithmetic: base m_s, models m_t and m′_s at weight 1, no normalisation.

    `exact=False` is the usual `dtype: bfloat16` (computes in bf16, rounding after each operation);
    `exact=True` computes in float32 and writes bf16 (`out_dtype`), which is exact but slower.
    """
    default = Path("/work/bench-env/bin/mergekit-yaml")
    exe = os.environ.get("MERGEKIT_YAML") or (
        str(default) if default.exists() else shutil.which("mergekit-yaml")
    )
    if not exe:
        return None
    dtypes = "dtype: float32\nout_dtype: bfloat16\n" if exact else "dtype: bfloat16\n"
    cfg = work / f"mergekit-{'fp32' if exact else 'bf16'}.yml"
    cfg.write_text(
        f"merge_method: task_arithmetic\nbase_model: {paths['ms']}\nmodels:\n"
        f"  - model: {paths['mt']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {paths['ft']}\n    parameters: {{weight: 1.0}}\n"
        f"parameters: {{normalize: false}}\n{dtypes}"
    )
    return [
        "env",
        "HF_HUB_OFFLINE=1",
        exe,
        str(cfg),
        str(out),
        "--no-cuda",
        "--device",
        "cpu",
        "--out-shard-size",
        "5B",
        "--quiet",
    ]


def mismatches(out: Path, paths: dict[str, Path]) -> tuple[int, int]:
    """(elements differing from the exact result, total elements), streamed tensor by tensor."""

    def index(d: Path) -> dict[str, Path]:
        wm = (
            json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
            if (d / "model.safetensors.index.json").exists()
            else None
        )
        if wm is None:
            files = sorted(d.glob("*.safetensors"))
            wm = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    wm |= dict.fromkeys(h.keys(), f.name)
        return {k: d / v for k, v in wm.items()}

    ims, ift, imt, iout = index(paths["ms"]), index(paths["ft"]), index(paths["mt"]), index(out)
    bad = total = 0
    for name in imt:

        def get(ix, n=name):
            with safe_open(str(ix[n]), "pt") as h:
                return h.get_tensor(n)

        t = get(imt)
        want = (t.float() + (get(ift).float() - get(ims).float())).to(t.dtype)
        got = get(iout)
        bad += int((got != want).sum())
        total += want.numel()
    return bad, total


def bytes_of(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2", help="checkpoint sizes in GB, comma separated")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated methods to skip (floor,recycler,diff+apply,naive,mergekit)",
    )
    ap.add_argument("--no-check", action="store_true", help="skip the exactness comparison")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    recycler = [py, "-m", "recycler.cli.app"]
    results = []
    for size in [float(s) for s in args.sizes.split(",")]:
        paths = build(args.workdir, size)
        work = args.workdir / f"{size:g}gb" / "runs"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for p in paths.values():  # page-cache the inputs, as every method reads them hot
            run([py, "-c", FLOOR, str(p), str(p), str(p), str(work / "warm")])
            shutil.rmtree(work / "warm")
        gb = bytes_of(paths["mt"]) / 1e9
        moved = (bytes_of(paths["ms"]) + bytes_of(paths["ft"]) + 2 * bytes_of(paths["mt"])) / 1e9
        methods: dict[str, list[list[str]] | None] = {
            "floor": [[py, "-c", FLOOR, *map(str, paths.values()), str(work / "floor")]],
            "recycler": [
                [
                    *recycler,
                    "recycle",
                    *map(str, (paths["ms"], paths["ft"], paths["mt"])),
                    "-o",
                    str(work / "recycler"),
                    "-q",
                ]
            ],
            "diff+apply": [
                [*recycler, "diff", str(paths["ms"]), str(paths["ft"]), "-o", str(work / "delta"), "-q"],
                [
                    *recycler,
                    "apply",
                    str(paths["mt"]),
                    str(work / "delta"),
                    "-o",
                    str(work / "diff+apply"),
                    "-q",
                ],
            ],
            "naive": [[py, "-c", NAIVE, *map(str, paths.values()), str(work / "naive")]],
            "mergekit": (lambda c: [c] if c else None)(
                mergekit_cmd(paths, work / "mergekit", work, exact=False)
            ),
            "mergekit-fp32": (lambda c: [c] if c else None)(
                mergekit_cmd(paths, work / "mergekit-fp32", work, exact=True)
            ),
        }
        for name, cmds in methods.items():
            if name in skip or cmds is None:
                continue
            parts = [run(c) for c in cmds]
            r = {
                "size_gb": round(gb, 2),
                "method": name,
                "wall_s": sum(p["wall_s"] for p in parts),
                "peak_rss_gb": max(p["peak_rss_gb"] for p in parts),
                "steps": [round(p["wall_s"], 2) for p in parts],
            }
            r["gb_per_s"] = moved / r["wall_s"]
            if name != "floor" and not args.no_check:
                bad, total = mismatches(work / name, paths)
                r["mismatch_pct"] = 100 * bad / total
            results.append(r)
            print(json.dumps(r), flush=True)
            if name not in ("diff+apply",):
                shutil.rmtree(work / name, ignore_errors=True)
    report(results)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


def report(results: list[dict]) -> None:
    print(
        "\n| size | method | wall s | GB/s moved | peak RSS GB | speed × mergekit | wall × floor | RSS ÷ mergekit | elements ≠ exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = [x for x in results if x["size_gb"] == r["size_gb"]]
        mk = next((x for x in same if x["method"] == "mergekit"), None)
        fl = next((x for x in same if x["method"] == "floor"), None)
        speed = f"{mk['wall_s'] / r['wall_s']:.1f}×" if mk else "–"
        floor = f"{r['wall_s'] / fl['wall_s']:.1f}×" if fl else "–"
        rss = f"{r['peak_rss_gb'] / mk['peak_rss_gb']:.2f}" if mk else "–"
        mm = f"{r['mismatch_pct']:.3f}%" if "mismatch_pct" in r else "–"
        print(
            f"| {r['size_gb']} GB | {r['method']} | {r['wall_s']:.2f} | {r['gb_per_s']:.2f} | {r['peak_rss_gb']:.2f} | {speed} | {floor} | {rss} | {mm} |"
        )


if __name__ == "__main__":
    main()
