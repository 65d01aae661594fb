"""The Δ kernels alone, in memory: nanoseconds per element of the numpy reference and the fused kernels.

No I/O, no hashing, no start-up: chunks of 1M bf16 elements drawn like bench_data's checkpoints
(m ~ N(0, 0.02), m′ = m + N(0, 2e-3), m_t = m + N(0, 5e-3): 5.4% exceptions), each kernel run on
`--threads` threads at once (each thread its own chunks, as the engine does), medians of `--repeat`.
Both kernels' outputs are compared bit for bit on the way.

    python bench/bench_kernels.py --threads 1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from recycler.delta import fast
from recycler.delta.bits import round_sparse
from recycler.delta.kernels import PairBlocks, Scratch, StoredBlocks

N = 1 << 20


def data(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    m = g.standard_normal(N) * 0.02
    return {
        "m": round_sparse(m.astype(np.float32), "BF16"),
        "mp": round_sparse((m + g.standard_normal(N) * 2e-3).astype(np.float32), "BF16"),
        "mt": round_sparse((m + g.standard_normal(N) * 5e-3).astype(np.float32), "BF16"),
    }


def ops(k, d: dict, sc: Scratch) -> dict:
    out = np.empty(N, np.uint16)
    stored = np.empty(N, np.uint16)
    res = fast.Reference().diff_chunk(d["m"], "BF16", d["mp"], "BF16", stored, "BF16", Scratch()).residual
    sb, pb = StoredBlocks(stored, "BF16", res), PairBlocks(d["m"], "BF16", d["mp"], "BF16")
    return {
        "diff": lambda: (k.diff_chunk(d["m"], "BF16", d["mp"], "BF16", out, "BF16", sc), out)[1],
        "apply": lambda: (k.apply_chunk(d["mt"], "BF16", out, sb, 1.0, sc, exact_roundtrip=True), out)[1],
        "apply α=0.7": lambda: (k.apply_chunk(d["mt"], "BF16", out, sb, 0.7, sc, exact_roundtrip=False), out)[
            1
        ],
        "recycle": lambda: (k.apply_chunk(d["mt"], "BF16", out, pb, 1.0, sc, exact_roundtrip=True), out)[1],
    }


def run(kernels, threads: int, chunks: int, repeat: int) -> dict[str, float]:
    """ns per element, all threads together (elements done / wall time)."""
    datas = [data(i) for i in range(threads)]
    result = {}
    for name in ops(kernels, datas[0], Scratch()):
        fns = [ops(kernels, d, Scratch())[name] for d in datas]
        for f in fns:
            f()  # warm (and compile/load)
        times = []
        for _ in range(repeat):
            ts = [threading.Thread(target=lambda f=f: [f() for _ in range(chunks)]) for f in fns]
            t = time.perf_counter()
            for x in ts:
                x.start()
            for x in ts:
                x.join()
            times.append(time.perf_counter() - t)
        result[name] = statistics.median(times) / (chunks * N * threads) * 1e9
    return result


def check() -> None:
    d = data(7)
    for name in ops(fast.Reference(), d, Scratch()):
        a = ops(fast.Reference(), d, Scratch())[name]().copy()
        b = ops(fast.Fused(fast.NATIVE), d, Scratch())[name]().copy()
        assert np.array_equal(a, b), name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per thread per measurement")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    check()
    print("| kernel | threads | " + " | ".join(["diff", "apply", "apply α=0.7", "recycle"]) + " |")
    print("|---|---|---|---|---|---|")
    for t in (int(x) for x in args.threads.split(",")):
        for k in (fast.Reference(), fast.Fused(fast.NATIVE)):
            r = run(k, t, args.chunks, args.repeat)
            print(f"| {k.name} | {t} | " + " | ".join(f"{v:.2f} ns" for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
