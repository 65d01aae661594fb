"""Benchmark the recycling job m_t + (m′_s − m_s) on synthetic bf16 Llama-shaped checkpoints.

Side by side, in one run, each method a fresh subprocess (wall time, CPU time and peak RSS from wait4),
inputs page-cached where they fit in memory:
  floor          read the three inputs and write one output with plain buffered file I/O (no fsync)
  floor-direct   the same, the output written with O_DIRECT (what the disk itself allows here)
  recycler       `recycler recycle` (one streaming pass, Δ not stored)
  diff+apply     `recycler diff` then `recycler apply`: the release cycle's path through a stored Δ
                 (default storage: bf16 + residual); diff+apply-f32 stores Δ in float32 instead
  naive          load the three state dicts fully, compute in float32, save (not at scale: 40 GB RAM)
  mergekit       task_arithmetic, base m_s, models m_t and m′_s at weight 1 (bf16; -fp32: exact)
  … (before)     with --before SRC: the same recycler commands run from another checkout (the old engine)
  … (numpy)      with --numpy: the same recycler commands on the numpy reference kernels (at the
                 last thread count given)
                 (RECYCLER_KERNELS=numpy: the engine before the fused kernels, same bytes)
  … [N threads]  with --threads 1,2: the recycler commands once per thread count (--threads N);
                 without it they use the engine's default (one per core, up to 4)
Every output is compared with the exact result (bench_data.mismatches, the README's formula with α).

    python bench/bench_delta.py                       # 1 GB and 2 GB, 3 repetitions (medians)
    python bench/bench_delta.py --threads 1,2 --numpy # thread scaling, and today's kernels beside
    python bench/bench_delta.py --sizes 13.5          # the 7B-shaped scale run (cleans up after itself)
    python bench/bench_delta.py --sizes 13.5 --cold --keep   # … every method from a cold page cache
    python bench/bench_delta.py --before /tmp/engine-before --repeat 1
Set MERGEKIT_YAML to `mergekit-yaml` (default: /work/bench-env/bin/mergekit-yaml or PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench_data import build, bytes_of, folder_bytes, mismatches, summary

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

FLOOR_DIRECT = r"""
import mmap, os, sys
from pathlib import Path
ms, ft, mt, out = map(Path, sys.argv[1:5])
out.mkdir()
buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT wants
for d in (ms, ft):
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass
for f in sorted(mt.glob("*.safetensors")):
    size = f.stat().st_size
    with open(f, "rb", buffering=0) as h:
        fd = os.open(out / f.name, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        while n := h.readinto(buf):
            os.write(fd, memoryview(buf)[: -(-n // 4096) * 4096])
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
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

# A minimal launcher measures each command: a child forked straight from this (large) process would
# report our own resident memory as its peak, since Linux counts the pre-exec image in ru_maxrss.
LAUNCH = (
    "import os, sys, time; t = time.perf_counter(); pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ);"
    " _, st, ru = os.wait4(pid, 0);"
    " print('MEASURED', time.perf_counter() - t, ru.ru_maxrss, os.waitstatus_to_exitcode(st),"
    " ru.ru_utime + ru.ru_stime, file=sys.stderr)"
)


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time (user + system) and peak RSS of one command, after flushing dirty pages
    (recycler fsyncs its output and would otherwise also pay for what ran before it)."""
    os.sync()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCH, *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = [x for x in proc.stderr.splitlines() if x.startswith("MEASURED")]
    if not line or line[-1].split()[3] != "0":
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stderr[-3000:]}")
    _, wall, rss_kb, _, cpu = line[-1].split()
    return {"wall_s": float(wall), "cpu_s": float(cpu), "peak_rss_gb": int(rss_kb) * 1024 / 1e9}


def mergekit_cmd(
    paths: dict[str, Path], out: Path, work: Path, exact: bool, alpha: float = 1.0
) -> list[str] | None:
    """mergekit task_arithmetic: base m_s, models m_t and m′_s at weight 1, no normalisation.

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
        f"  - model: {paths['ft']}\n    parameters: {{weight: {alpha}}}\n"
        f"parameters: {{normalize: false}}\n{dtypes}"
    )
    flags = ["--no-cuda", "--device", "cpu", "--out-shard-size", "5B", "--quiet"]
    return ["env", "HF_HUB_OFFLINE=1", exe, str(cfg), str(out), *flags]


def methods(paths: dict[str, Path], work: Path, args) -> dict[str, tuple[list[list[str]], dict | None]]:
    """name → (commands run in sequence, environment). The output is work/<name>."""
    py = sys.executable
    app = [py, "-P", "-m", "recycler.cli.app"]  # -P: PYTHONPATH (--before) wins over the working directory
    ms, ft, mt = (str(paths[k]) for k in ("ms", "ft", "mt"))
    out = {name: str(work / name) for name in ("floor", "floor-direct", "naive")}

    alpha = ["-a", str(args.alpha)] if args.alpha != 1.0 else []

    def recycle(name: str, env: dict | None = None, threads: tuple[str, ...] = ()) -> tuple:
        return [[*app, "recycle", ms, ft, mt, "-o", str(work / slug(name)), "-q", *alpha, *threads]], env

    def diff_apply(
        name: str, env: dict | None = None, extra: tuple[str, ...] = (), threads: tuple[str, ...] = ()
    ) -> tuple:
        d = str(work / f"delta-{slug(name)}")
        diff = [*app, "diff", ms, ft, "-o", d, "-q", *extra, *threads]
        return [diff, [*app, "apply", mt, d, "-o", str(work / slug(name)), "-q", *alpha, *threads]], env

    rows = {
        "floor": ([[py, "-c", FLOOR, ms, ft, mt, out["floor"]]], None),
        "floor-direct": ([[py, "-c", FLOOR_DIRECT, ms, ft, mt, out["floor-direct"]]], None),
    }
    numpy_env = {**os.environ, "RECYCLER_KERNELS": "numpy"}
    for t in args.threads or [None]:
        tag = f" [{t} thread{'s' if t > 1 else ''}]" if t else ""
        threads = ("--threads", str(t)) if t else ()
        rows[f"recycler{tag}"] = recycle(f"recycler{tag}", threads=threads)
        rows[f"diff+apply{tag}"] = diff_apply(f"diff+apply{tag}", threads=threads)
        if args.numpy and t == (args.threads or [None])[-1]:  # today's kernels: at the most threads
            rows[f"recycler (numpy){tag}"] = recycle(f"recycler (numpy){tag}", numpy_env, threads)
            rows[f"diff+apply (numpy){tag}"] = diff_apply(
                f"diff+apply (numpy){tag}", numpy_env, threads=threads
            )
    rows["diff+apply-f32"] = diff_apply("diff+apply-f32", extra=("--dtype", "float32"))
    rows["naive"] = ([[py, "-c", NAIVE, ms, ft, mt, out["naive"]]], None)
    if args.before:
        env = {**os.environ, "PYTHONPATH": str(Path(args.before).resolve())}
        rows |= {"recycler (before)": recycle("recycler (before)", env)}
        rows |= {"diff+apply (before)": diff_apply("diff+apply (before)", env)}
    for name, exact in (("mergekit", False), ("mergekit-fp32", True)):
        cmd = mergekit_cmd(paths, work / name, work, exact, args.alpha)
        if cmd:
            rows[name] = ([cmd], None)
    return {k: v for k, v in rows.items() if k not in args.skip}


def slug(method: str) -> str:
    for a, b in (
        (" (before)", "-before"),
        (" (numpy)", "-numpy"),
        (" [", "-"),
        (" threads]", "t"),
        (" thread]", "t"),
    ):
        method = method.replace(a, b)
    return method


def measure(
    name: str, cmds: list[list[str]], env: dict | None, work: Path, paths, check: bool, alpha: float
) -> dict:
    parts = [run(c, env) for c in cmds]
    r = {
        "method": name,
        "wall_s": sum(p["wall_s"] for p in parts),
        "cpu_s": sum(p["cpu_s"] for p in parts),
        "peak_rss_gb": max(p["peak_rss_gb"] for p in parts),
        "steps": [round(p["wall_s"], 2) for p in parts],
    }
    out = work / slug(name)
    if check and not name.startswith("floor"):
        r["mismatch"], r["formula_mismatch"], r["elements"] = mismatches(out, paths, alpha)
    delta = work / f"delta-{slug(name)}"
    if name.startswith("diff+apply") and (delta / "manifest.json").exists():
        m = json.loads((delta / "manifest.json").read_text())
        r["delta_gb"] = folder_bytes(delta) / 1e9
        r["residual"] = (
            {k: m["residual"][k] for k in ("exceptions", "roundtrip_fixes", "exception_rate")}
            if "residual" in m
            else None
        )
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(delta, ignore_errors=True)
    return r


def bench_size(size: float, args) -> list[dict]:
    paths = build(args.workdir, size, args.ft_noise)
    work = paths["ms"].parent / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = methods(paths, work, args)
    moved = (bytes_of(paths["ms"]) + bytes_of(paths["ft"]) + 2 * bytes_of(paths["mt"])) / 1e9
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for rep in range(args.repeat):
        for p in paths.values() if size < 10 else ():  # page-cache the inputs: every method reads them hot
            run([sys.executable, "-c", FLOOR, str(p), str(p), str(p), str(work / "warm")])
            shutil.rmtree(work / "warm")
        for name, (cmds, env) in rows.items():
            if args.cold:  # every method starts from disk, whatever the previous one left cached
                subprocess.run(["sync"], check=True)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")  # needs root
            r = measure(name, cmds, env, work, paths, rep == 0 and not args.no_check, args.alpha)
            runs[name].append(r)
            print(json.dumps({"size": size, "rep": rep, **r}), flush=True)
    out = []
    for rs in runs.values():
        first = rs[0]
        r = first | {k: summary([x[k] for x in rs]) for k in ("wall_s", "cpu_s", "peak_rss_gb")}
        out.append(
            r
            | {
                "size_gb": round(bytes_of(paths["mt"]) / 1e9, 2),
                "gb_per_s": moved / r["wall_s"],
                "reps": len(rs),
            }
        )
    if size >= 10 and not args.keep:
        shutil.rmtree(paths["ms"].parent, ignore_errors=True)  # 40 GB of inputs
    return out


def report(results: list[dict]) -> None:
    print(
        "\n| size | method | wall s | CPU s | GB/s | peak RSS GB | × mergekit | wall ÷ floor | wall ÷ floor-direct | elements ≠ exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = {x["method"]: x for x in results if x["size_gb"] == r["size_gb"]}
        mk, fl, fd = same.get("mergekit"), same.get("floor"), same.get("floor-direct")
        ratio = lambda a, b: f"{a:.1f}×" if b else "–"  # noqa: E731
        mm = f"{r['mismatch']:,} ({100 * r['mismatch'] / r['elements']:.3f}%)" if "mismatch" in r else "–"
        print(
            f"| {r['size_gb']} GB | {r['method']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['gb_per_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {ratio(mk['wall_s'] / r['wall_s'], mk) if mk else '–'} | "
            f"{ratio(r['wall_s'] / fl['wall_s'], fl) if fl else '–'} | {ratio(r['wall_s'] / fd['wall_s'], fd) if fd else '–'} | {mm} |"
        )
    for r in results:
        if r.get("formula_mismatch") != r.get("mismatch"):
            print(
                f"{r['size_gb']} GB {r['method']}: {r['formula_mismatch']:,} elements ≠ the plain float32 formula"
            )
    for r in results:
        if r.get("delta_gb"):
            res = r.get("residual")
            rate = (
                f", {res['exceptions']:,} exceptions ({100 * res['exception_rate']:.2f}%), {res['roundtrip_fixes']} round-trip fixes"
                if res
                else ""
            )
            print(f"{r['size_gb']} GB {r['method']}: Δ {r['delta_gb']:.2f} GB{rate}; steps {r['steps']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default="1,2", help="checkpoint sizes in GB; 13.5 (or --scale) is the 7B-shaped run"
    )
    ap.add_argument("--scale", action="store_true", help="add the 13.5 GB 7B-shaped run")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per method (medians reported)")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument(
        "--skip", type=lambda s: set(filter(None, s.split(","))), default=set(), help="methods to skip"
    )
    ap.add_argument("--before", type=Path, help="a checkout of the old engine, run beside the new one")
    ap.add_argument("--keep", action="store_true", help="keep the 13.5 GB checkpoints afterwards")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every method (root)")
    ap.add_argument(
        "--ft-noise", type=float, default=2e-3, help="fine-tune noise (2e-4: a gentler fine-tune)"
    )
    ap.add_argument("--no-check", action="store_true", help="skip the exactness comparison")
    ap.add_argument(
        "--threads",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        help="thread counts for the recycler rows, e.g. 1,2 (default: the engine's own)",
    )
    ap.add_argument("--numpy", action="store_true", help="add the recycler rows on the numpy kernels")
    ap.add_argument("--alpha", type=float, default=1.0, help="α of the recycling (mergekit: the Δ's weight)")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")] + ([13.5] if args.scale else [])
    results = []
    for size in sizes:
        if size >= 10:
            args.skip |= {"naive", "mergekit-fp32", "diff+apply-f32"}  # 40 GB RAM / once is enough
        results += bench_size(size, args)
    report(results)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
