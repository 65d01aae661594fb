"""Where the Δ commands spend their time: py-spy samples summarised by kind of work.

    python bench/profile_delta.py --size 1                # profile diff, apply, recycle at 1 GB
    python bench/profile_delta.py --summarise prof.txt   # summarise an existing `py-spy --format raw` file
    python bench/profile_delta.py --size 1 --src /tmp/engine-before   # the same for another checkout

Each command runs under `py-spy record --threads --format raw`. Samples of threads blocked on a lock or
queue are counted apart ("waiting"); the rest ("busy": running, or runnable and waiting for a core) is
time of Python threads including C calls made from them: sha256, pread, numpy. Every
sample is classified by the innermost frame that belongs to recycler (or the standard library's
hashing/file calls), using the text of that source line: `sha256`, `write`, `fsync`, `read`, `compute`
(numpy kernels, or the fused compiled ones: native frames show as the Python line that calls them),
`kernel load` (numba's import and set-up, in checkouts from before the C kernels: `--src`), `import`, `start-up` (everything
before the first chunk: CLI, validation, planning) and `other`. RECYCLER_KERNELS and RECYCLER_THREADS
pass through to the commands. Needs py-spy (`pip install py-spy`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
RULES = (  # (category, pattern on the source line of the innermost classified frame)
    ("sha256", re.compile(r"sha256|hasher\.update|\.update\(|_hash")),
    ("fsync", re.compile(r"fsync")),
    ("write", re.compile(r"\.write\(|pwrite|writev|copy_into_file|_write")),
    ("read", re.compile(r"preadv|pread|\.read\(|_read\b|readinto")),
)
STARTUP = re.compile(r"open_checkpoint|read_header|load_vocab|plan_transfer|fingerprint|compare_tensor_sets")


WAIT = re.compile(
    r"^(Condition\.wait|Queue\.get|Event\.wait|Thread\.join|_worker \(concurrent/futures/thread\.py:\d+\)$|Future\.result|_wait_for_tstate_lock|select|poll)"
)


def classify(stack: list[str], src: Path) -> str:
    """Category of one sampled stack (outermost frame first)."""
    if any("_load_fused" in f for f in stack):
        return "kernel load"  # numba's import and compiler context (engines before the C kernels)
    if any("_find_and_load" in f for f in stack):
        return "import"
    if stack and WAIT.match(stack[-1]):
        return "waiting"  # blocked on a lock or queue: py-spy samples it when it cannot tell it is idle
    frames = [m.groupdict() for f in stack if (m := FRAME.match(f))]
    for fr in reversed(frames):
        text = _line(src, fr["file"], int(fr["line"])) + " " + fr["fn"]
        for name, pattern in RULES:
            if pattern.search(text):
                return name
        if (
            fr["file"].startswith(("recycler/delta", "recycler/stages", "recycler/io/reader"))
            or "numpy" in (fr["file"])
        ):
            if STARTUP.search(" ".join(f["fn"] for f in frames)):
                return "start-up"
            return "compute"
    if any(STARTUP.search(f) for f in stack) or any("typer" in f or "click" in f for f in stack[-3:]):
        return "start-up"
    return "other"


_LINES: dict[tuple[str, int], str] = {}


def _line(src: Path, file: str, line: int) -> str:
    key = (file, line)
    if key not in _LINES:
        text = ""
        for root in (
            src,
            Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}",
        ):
            p = root / file
            if p.is_file():
                lines = p.read_text(errors="replace").splitlines()
                text = lines[line - 1] if 0 < line <= len(lines) else ""
                break
        _LINES[key] = text
    return _LINES[key]


def summarise(raw: Path, src: Path, rate: int) -> dict:
    """CPU seconds per category and per thread kind from a `py-spy --format raw --threads` file."""
    cats: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for row in raw.read_text().splitlines():
        stack_text, _, count = row.rpartition(" ")
        frames = stack_text.split(";")
        thread = frames[0]
        cats[classify(frames[1:], src)] += int(count)
        kind = (
            "writer" if any("_run" in f and "writer" in f for f in frames) or "shard" in thread else "other"
        )
        if any("ordered_map" in f for f in frames):
            kind = "main"
        if any("compute" in f and "futures/thread" in stack_text for f in frames):
            kind = "chunk worker"
        threads[kind] += int(count)
    waiting = cats.pop("waiting", 0)
    total = sum(cats.values())
    return {
        "busy_s": round(total / rate, 2),
        "waiting_s": round(waiting / rate, 2),
        "by_kind": {k: round(v / rate, 2) for k, v in cats.most_common()},
        "share": {k: f"{100 * v / total:.0f}%" for k, v in cats.most_common()},
        "by_thread": {k: round(v / rate, 2) for k, v in threads.most_common()},
    }


def profile(cmd: list[str], out: Path, rate: int, env: dict) -> float:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    os.sync()
    t = subprocess.run(
        [spy, "record", "-r", str(rate), "--threads", "--format", "raw", "-o", str(out), "--", *cmd],
        env=env,
        capture_output=True,
        text=True,
    )
    if t.returncode != 0:
        raise RuntimeError(t.stderr[-2000:])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB (built by bench_delta)")
    ap.add_argument("--workdir", type=Path, default=Path("bench/out"))
    ap.add_argument("--src", type=Path, default=Path.cwd(), help="checkout whose recycler is profiled")
    ap.add_argument("--rate", type=int, default=250, help="samples per second")
    ap.add_argument("--summarise", type=Path, nargs="*", help="only summarise these raw files")
    args = ap.parse_args()
    if args.summarise:
        for f in args.summarise:
            print(f.name, json.dumps(summarise(f, args.src, args.rate)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_delta import build

    paths = build(args.workdir, args.size)
    work = args.workdir / f"{args.size:g}gb" / "profile"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    app = [sys.executable, "-m", "recycler.cli.app"]
    cmds = {
        "diff": [*app, "diff", str(paths["ms"]), str(paths["ft"]), "-o", str(work / "delta"), "-q"],
        "apply": [*app, "apply", str(paths["mt"]), str(work / "delta"), "-o", str(work / "applied"), "-q"],
        "recycle": [
            *app,
            "recycle",
            *(str(paths[k]) for k in ("ms", "ft", "mt")),
            "-o",
            str(work / "r"),
            "-q",
        ],
    }
    for name, cmd in cmds.items():
        raw = work / f"{name}.txt"
        profile(cmd, raw, args.rate, env)
        print(name, json.dumps(summarise(raw, args.src, args.rate)), flush=True)
    shutil.rmtree(work / "applied", ignore_errors=True)
    shutil.rmtree(work / "r", ignore_errors=True)
    shutil.rmtree(work / "delta", ignore_errors=True)


if __name__ == "__main__":
    main()
