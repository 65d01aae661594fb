"""The fused compiled kernels (the C extension recycler.delta._native) against the numpy reference
kernels, bit for bit.

Every bf16 pattern (as base, fine-tune and target), random blocks of every dtype mixing the hard
values (±0, subnormals, ±max, values 17+ binades apart, sign flips, NaN/Inf), α ≠ 1, every Δ source
(stored + residual, a (base, fine-tune) pair, a decoded float32 Δ) and every store dtype. Refusals
(NaN/Inf, overflow) must be the same refusal. Then the engine: the same bytes whatever the kernels
and the number of threads.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recycler.delta import fast
from recycler.delta import kernels as ref
from recycler.delta.bits import OVERFLOW_AT, bits, carrier, round_sparse, to_float32
from recycler.delta.fp8 import NarrowOverflow, narrow_fp8
from recycler.delta.kernels import DenseBlocks, NonFiniteChunk, PairBlocks, Scratch, StoredBlocks
from recycler.delta.residual import ChunkResidual

if fast.NATIVE is None:  # the project's own build product: `make setup` builds it (needs a C compiler)
    pytest.fail(
        "recycler.delta._native is not built: install a C compiler and rerun `make setup`", pytrace=False
    )
FUSED = fast.Fused(fast.NATIVE)
DTYPES = ["BF16", "F16", "F32"]
ALPHAS = [1.0, -1.0, 0.7, 0.3, 2.5, 0.0]
WIDTH = {"BF16": 16, "F16": 16, "F32": 32}


def from_f64(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once to `dtype` (its carrier)."""
    if dtype == "BF16":
        return round_sparse(x.astype(np.float32), "BF16")  # float32 then bf16: good enough for data
    with np.errstate(over="ignore"):
        return x.astype(carrier(dtype))


def hard_values(dtype: str) -> np.ndarray:
    tiny = {"BF16": 1e-39, "F16": 3e-7, "F32": 1e-44}[dtype]
    big = {"BF16": 1e37, "F16": 3e4, "F32": 1e37}[dtype]
    v = [0.0, -0.0, tiny, -tiny, 3 * tiny, 1e-3, -1e-3, 1.0, -2.0, 2.0**-30, 3.0, big, -big, 0.25, 7.0]
    return np.array(v)


def random_block(dtype: str, n: int, seed: int, *, raw_bits: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(m, m′) of `dtype`: a fine-tune drawn in float64, hard values mixed in, optionally random
    bit patterns (any finite value, so also differences that overflow)."""
    g = np.random.default_rng(seed)
    scale = 0.02 * np.exp(g.uniform(-6, 6, n))
    m = g.standard_normal(n) * scale
    mp = m + g.standard_normal(n) * scale * g.choice([1e-3, 0.1, 3.0], n)
    h = hard_values(dtype)
    k = n // 4
    m[:k] = g.choice(h, k)
    mp[k // 2 : k + k // 2] = g.choice(h, k)
    a, b = from_f64(m, dtype), from_f64(mp, dtype)
    if raw_bits:  # a slice of arbitrary finite patterns
        width = WIDTH[dtype]
        for arr in (a, b):
            u = bits(arr)
            r = g.integers(0, 2**width, k, dtype=np.uint64).astype(u.dtype)
            u[-k:] = r
        for arr in (a, b):  # keep them finite: NaN/Inf are tested on their own
            bad = ~np.isfinite(to_float32(arr, dtype))
            bits(arr)[bad] = 0
    return a, b


def diff_both(base, bdt, tuned, tdt, store):
    outs, results = [], []
    for k in (fast.Reference(), FUSED):
        out = np.empty(len(base), carrier(store))
        try:
            results.append(k.diff_chunk(base, bdt, tuned, tdt, out, store, Scratch()))
        except NonFiniteChunk as e:
            results.append((e.role, e.count))
        outs.append(out)
    return outs, results


def assert_same_diff(base, bdt, tuned, tdt, store):
    before = FUSED.fallbacks
    (o1, o2), (r1, r2) = diff_both(base, bdt, tuned, tdt, store)
    if isinstance(r1, tuple) or isinstance(r2, tuple):
        assert r1 == r2  # the same refusal
        return None
    assert FUSED.fallbacks == before  # the fused kernel computed it
    assert np.array_equal(bits(o1), bits(o2))
    a, b = r1.residual, r2.residual
    assert np.array_equal(a.exc_idx, b.exc_idx)
    assert np.array_equal(bits(a.exc_val), bits(b.exc_val))
    assert np.array_equal(a.rt_idx, b.rt_idx)
    assert np.array_equal(bits(a.rt_base), bits(b.rt_base)) and a.rt_base.dtype == b.rt_base.dtype
    assert np.array_equal(bits(a.rt_tuned), bits(b.rt_tuned)) and a.rt_tuned.dtype == b.rt_tuned.dtype
    assert r2.sumsq_delta == pytest.approx(r1.sumsq_delta, rel=1e-5, abs=1e-30)
    assert r2.sumsq_base == pytest.approx(r1.sumsq_base, rel=1e-5, abs=1e-30)
    return o1, a


def apply_both(target, dtype, blocks, alpha, exact):
    outs = []
    for k in (fast.Reference(), FUSED):
        out = np.empty_like(target)
        try:
            k.apply_chunk(target, dtype, out, blocks, alpha, Scratch(), exact_roundtrip=exact)
            outs.append(out)
        except NonFiniteChunk as e:
            outs.append((e.role, e.count))
        except NarrowOverflow as e:  # FP8's refusal
            outs.append((e.dtype, e.value))
    return outs


def assert_same_apply(target, dtype, blocks, alpha, exact):
    before = FUSED.fallbacks
    a, b = apply_both(target, dtype, blocks, alpha, exact)
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
    else:
        assert np.array_equal(bits(a), bits(b))
        assert FUSED.fallbacks == before  # the fused kernel computed it


# ---- the bit helpers ---------------------------------------------------------------------------------


def test_float16_widening_of_every_finite_pattern_is_numpy_s():
    """Through the diff kernel: Δ = float32(0) − widen(h), stored in float32, is exact."""
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    out = np.empty(len(h), np.float32)
    before = FUSED.fallbacks
    FUSED.diff_chunk(h, "F16", np.zeros(len(h), np.float32), "F32", out, "F32", Scratch())
    assert FUSED.fallbacks == before
    want = np.float32(0) - h.astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


def test_float16_narrowing_rounds_as_numpy():
    """Through the apply kernel: float16 target +0, a float32 Δ u, α = 1: out = round_F16(u)."""
    g = np.random.default_rng(0)
    u = g.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    edges = np.float32([65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-14])
    near = (h := np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    mids = near.view(np.uint32)[None, :] + np.array([[0], [1], [0xFFF], [0x1000], [0x1001]], np.uint32)
    u = np.concatenate([u, edges.view(np.uint32), -edges.view(np.uint32), mids.ravel()])
    d = u.view(np.float32)
    d = d[np.isfinite(d) & (np.abs(d) < 65520)]  # beyond that the result overflows: refused (below)
    want = (np.float32(0) + d).astype(np.float16).view(np.uint16)
    got = np.empty(len(d), np.float16)
    before = FUSED.fallbacks
    FUSED.apply_chunk(
        np.zeros(len(d), np.float16), "F16", got, DenseBlocks(d), 1.0, Scratch(), exact_roundtrip=False
    )
    assert FUSED.fallbacks == before
    got = got.view(np.uint16)
    assert np.array_equal(got, want), (d[got != want][:5], got[got != want][:5], want[got != want][:5])
    del h


# ---- diff --------------------------------------------------------------------------------------------


def all_finite_bf16() -> np.ndarray:
    p = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    return p[(p & 0x7F80) != 0x7F80]


def keep_finite(m: np.ndarray, mp: np.ndarray) -> None:
    """m′ := m where m′ − m overflows float32 (refusals are tested on their own)."""
    d = to_float32(mp, "BF16").astype(np.float64) - to_float32(m, "BF16").astype(np.float64)
    over = np.abs(d) >= float(np.finfo(np.float32).max)
    mp[over] = m[over]


@pytest.mark.parametrize("store", DTYPES)
def test_diff_on_every_bf16_pattern(store):
    p = all_finite_bf16()
    g = np.random.default_rng(1)
    for tuned in (np.roll(p, 1), np.roll(p, 4099), g.permutation(p), p[::-1].copy(), p ^ 0x8000, p.copy()):
        keep_finite(p, tuned)
        assert assert_same_diff(p, "BF16", tuned, "BF16", store) is not None  # compared, not refused


def test_diff_refuses_every_nonfinite_bf16_pattern_like_the_reference():
    p = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    nonfinite = p[(p & 0x7F80) == 0x7F80]
    base = np.full(20_001, 0x3F80, np.uint16)
    for role in ("base", "tuned"):
        for v in nonfinite.tolist():  # all 256 NaN/Inf patterns
            b, t = base.copy(), base.copy()
            (b if role == "base" else t)[12345] = v
            (_, _), (r1, r2) = diff_both(b, "BF16", t, "BF16", "BF16")
            assert isinstance(r1, tuple) and r1 == r2


@pytest.mark.parametrize("bdt", DTYPES)
@pytest.mark.parametrize("tdt", DTYPES)
@pytest.mark.parametrize("store", DTYPES)
def test_diff_on_random_blocks_of_every_dtype(bdt, tdt, store):
    for seed, raw in ((0, False), (1, True)):
        m, _ = random_block(bdt, 70_001, seed, raw_bits=raw)
        _, mp = random_block(tdt, 70_001, seed, raw_bits=raw)
        assert_same_diff(m, bdt, mp, tdt, store)


def test_diff_refuses_nonfinite_inputs_and_overflow_like_the_reference():
    for dtype in DTYPES:
        m, mp = random_block(dtype, 9_000, 3)
        for arr, v in ((m, np.inf), (mp, np.nan), (mp, -np.inf)):
            a = arr.copy()
            a[4321] = from_f64(np.array([v]), dtype)[0]
            b, t = (a, mp) if arr is m else (m, a)
            (_, _), (r1, r2) = diff_both(b, dtype, t, dtype, dtype)
            assert isinstance(r1, tuple) and r1 == r2
    m, mp = np.float32([3e38, 1.0]), np.float32([-3e38, 1.0])  # d32 overflows float32
    (_, _), (r1, r2) = diff_both(m, "F32", mp, "F32", "F32")
    assert isinstance(r1, tuple) and r1 == r2


# ---- apply -------------------------------------------------------------------------------------------


def sources(m, mp, dtype, store):
    stored, res = np.empty(len(m), carrier(store)), None
    res = ref.diff_chunk(m, dtype, mp, dtype, stored, store, Scratch()).residual
    d32 = np.empty(len(m), np.float32)
    from recycler.io.reader import decode_into

    decode_into(StoredBlocks(stored, store, res), d32, Scratch())
    return {
        "stored": StoredBlocks(stored, store, res),
        "pair": PairBlocks(m, dtype, mp, dtype),
        "dense": DenseBlocks(d32),
    }


@pytest.mark.parametrize("alpha", ALPHAS)
def test_apply_on_every_bf16_pattern(alpha):
    p = all_finite_bf16()
    g = np.random.default_rng(2)
    m = g.permutation(p)
    mp = np.roll(m, 7)
    keep_finite(m, mp)
    target = p.copy()
    target[::5] = m[::5]  # the target equals the base there: the round-trip rule
    for store in DTYPES:
        for blocks in sources(m, mp, "BF16", store).values():
            assert_same_apply(target, "BF16", blocks, alpha, alpha == 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_apply_on_random_blocks_of_every_dtype(dtype, alpha):
    for seed, raw in ((4, False), (5, True)):
        m, mp = random_block(dtype, 70_001, seed, raw_bits=raw)
        t, _ = random_block(dtype, 70_001, seed + 10, raw_bits=raw)
        t[::3] = m[::3]
        try:
            srcs = sources(m, mp, dtype, dtype)
        except NonFiniteChunk:  # raw patterns whose difference overflows: only the pair can carry them
            srcs = {"pair": PairBlocks(m, dtype, mp, dtype)}
        for blocks in srcs.values():
            for exact in {alpha == 1.0, False}:
                assert_same_apply(t, dtype, blocks, alpha, exact)


def test_apply_with_mixed_dtypes_and_other_store_dtypes():
    m, mp = random_block("BF16", 30_000, 6)
    t, _ = random_block("F32", 30_000, 7)
    for store in DTYPES:
        for blocks in sources(m, mp, "BF16", store).values():
            for alpha in (1.0, 0.7):
                assert_same_apply(t, "F32", blocks, alpha, False)
                assert_same_apply(
                    from_f64(to_float32(t, "F32").astype(np.float64), "F16"), "F16", blocks, alpha, False
                )
    m16, mp32 = random_block("F16", 30_000, 8)[0], random_block("F32", 30_000, 8)[1]
    assert_same_apply(t, "F32", PairBlocks(m16, "F16", mp32, "F32"), 1.0, True)


def test_apply_refusals_are_the_reference_s():
    m, mp = random_block("BF16", 9_000, 9)
    blocks = sources(m, mp, "BF16", "BF16")
    t = m.copy()
    t[100] = 0x7F7F  # bf16 max: + a positive Δ overflows
    bits(mp)[100] = 0x3F80
    bits(m)[100] = 0x0000
    for b in list(sources(m, mp, "BF16", "BF16").values()) + list(blocks.values()):
        assert_same_apply(t, "BF16", b, 1.0, True)
    t16 = from_f64(np.full(100, 65000.0), "F16")
    a, b = apply_both(t16, "F16", DenseBlocks(np.full(100, 600.0, np.float32)), 1.0, False)
    assert isinstance(a, tuple) and a == b  # 65600 overflows float16
    a, b = apply_both(t16, "F16", DenseBlocks(np.full(100, 30.0, np.float32)), 1.0, False)
    assert not isinstance(a, tuple) and np.array_equal(bits(a), bits(b))  # 65030 does not
    for v in (np.inf, np.nan):
        tt = m.copy()
        tt[7] = from_f64(np.array([v]), "BF16")[0]
        assert_same_apply(tt, "BF16", blocks["pair"], 0.7, False)


# ---- the README's apply formula (item 9 of issue 19) ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.7, 1 / 3, -2.5])
def test_apply_is_the_readme_formula_in_float64(dtype, alpha):
    """round_T(float32(m_t) + α₃₂·d32) with α₃₂ = float32(α) and each step an IEEE float32 operation,
    computed here in float64 (exact for a float32 product; a float64 sum rounded to float32 is the
    correctly rounded float32 sum), independently of both kernels."""
    m, mp = random_block(dtype, 50_000, 11)
    t, _ = random_block(dtype, 50_000, 12)
    d32 = to_float32(mp, dtype).astype(np.float64) - to_float32(m, dtype).astype(np.float64)
    d32 = d32.astype(np.float32)  # float32(m′) − float32(m), correctly rounded
    a32 = float(np.float32(alpha))
    with np.errstate(over="ignore"):
        prod = (a32 * d32.astype(np.float64)).astype(np.float32)
        r = (to_float32(t, dtype).astype(np.float64) + prod.astype(np.float64)).astype(np.float32)
    ok = np.isfinite(r) & (np.abs(r) < OVERFLOW_AT[dtype])
    want = round_sparse(r[ok], dtype)
    blocks = sources(m[ok], mp[ok], dtype, dtype)
    for k in (fast.Reference(), FUSED):
        for b in blocks.values():
            out = np.empty(int(ok.sum()), carrier(dtype))
            k.apply_chunk(t[ok], dtype, out, b, alpha, Scratch(), exact_roundtrip=False)
            assert np.array_equal(bits(out), bits(want))


# ---- the engine ----------------------------------------------------------------------------------------


def folder_digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_engine_bytes_do_not_depend_on_kernels_or_threads(models, tmp_path, monkeypatch):
    from recycler.stages.apply import apply_diff, recycle
    from recycler.stages.extract import diff_checkpoints

    seen = {}
    for kernels, threads in (("numpy", "2"), ("fused", "1"), ("fused", "2"), ("fused", "3")):
        monkeypatch.setenv(fast.ENV, kernels)
        monkeypatch.setenv("RECYCLER_THREADS", threads)
        tag = f"{kernels}-{threads}"
        d = diff_checkpoints(models["base"], models["tuned"], tmp_path / f"d-{tag}", max_shard_bytes=1 << 20)
        a = apply_diff(models["target"], d.path, tmp_path / f"a-{tag}")
        r = recycle(models["base"], models["tuned"], models["target"], tmp_path / f"r-{tag}")
        seen[tag] = (folder_digest(d.path), folder_digest(a.path), folder_digest(r.path))
        assert d.manifest["residual"]["exceptions"] > 0
    first = next(iter(seen.values()))
    assert all(v == first for v in seen.values())


def test_the_extension_is_a_stable_abi_build_and_every_run_uses_it(monkeypatch):
    """One wheel per platform serves every Python ≥ 3.11; nothing is compiled at run time."""
    assert fast.NATIVE.__file__.endswith(".abi3.so")
    monkeypatch.delenv(fast.ENV, raising=False)
    assert fast.choose().name == "fused"
    monkeypatch.setenv(fast.ENV, "numpy")
    assert fast.choose().name == "numpy"
    monkeypatch.setenv(fast.ENV, "fast")
    with pytest.raises(ValueError, match="RECYCLER_KERNELS"):
        fast.choose()


def test_without_the_extension_the_numpy_kernels_compute_and_forcing_fused_says_how_to_fix(models, tmp_path):
    """A source install without a C compiler (the extension is optional) still diffs, on numpy."""
    probe = (
        "import sys; sys.modules['recycler.delta._native'] = None\n"
        "from recycler.delta import fast; from recycler.stages.extract import diff_checkpoints\n"
        f"diff_checkpoints({str(models['base'])!r}, {str(models['tuned'])!r}, sys.argv[1])\n"
        "print(fast.choose().name, fast.available())"
    )
    env = {k: v for k, v in os.environ.items() if k != fast.ENV}
    run = [sys.executable, "-c", probe]
    out = subprocess.run([*run, tmp_path / "d"], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["numpy", "False"]
    assert (tmp_path / "d" / "manifest.json").exists()
    env[fast.ENV] = "fused"
    bad = subprocess.run([*run, tmp_path / "e"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "_native is not built" in bad.stderr


def test_threads_option_of_the_commands(models, tmp_path):
    """`--threads N` reaches the engine (RECYCLER_THREADS) and leaves the bytes alone."""
    app = [sys.executable, "-m", "recycler.cli.app"]
    env = {k: v for k, v in os.environ.items() if k != "RECYCLER_THREADS"} | {fast.ENV: "fused"}
    outs = []
    for threads in ("1", "2"):
        d = tmp_path / f"d{threads}"
        subprocess.run([*app, "diff", models["base"], models["tuned"], "-o", d, "-q", "--threads", threads],
                       check=True, env=env)  # fmt: skip
        a = tmp_path / f"a{threads}"
        subprocess.run([*app, "apply", models["target"], d, "-o", a, "-q", "-a", "0.7", "--threads", threads],
                       check=True, env=env)  # fmt: skip
        outs.append((folder_digest(d), folder_digest(a)))
    assert outs[0] == outs[1]
    bad = subprocess.run([*app, "diff", models["base"], models["tuned"], "-o", tmp_path / "x", "--threads", "0"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode != 0 and "--threads" in bad.stderr


def test_recycle_measures_relatedness_in_the_fused_pass(models, tmp_path, monkeypatch):
    """The fused pair kernel sums Σd32², Σbase² of each chunk as it computes it (recycle's relatedness
    check), as the numpy blocks do, so nothing is read a second time to measure it."""
    from recycler.stages import pair_checks
    from recycler.stages.apply import recycle

    g = np.random.default_rng(13)  # weights as they come (the hard values overflow numpy's float32 dot)
    m = from_f64(g.standard_normal(70_001) * 0.02, "BF16")
    mp = from_f64(to_float32(m, "BF16") + g.standard_normal(70_001) * 2e-3, "BF16")
    t = from_f64(to_float32(m, "BF16") + g.standard_normal(70_001) * 5e-3, "BF16")
    tallies = []
    for k in (fast.Reference(), FUSED):
        tally: dict = {}
        blocks = pair_checks.MeasuredBlocks(m, "BF16", mp, "BF16", "w", 0, tally)
        k.apply_chunk(t, "BF16", np.empty_like(t), blocks, 1.0, Scratch(), exact_roundtrip=True)
        tallies.append([sum(v[i] for v in tally.values()) for i in range(3)])
    (n1, d1, b1), (n2, d2, b2) = tallies
    assert n1 == n2 == len(m) and d2 == pytest.approx(d1, rel=1e-5) and b2 == pytest.approx(b1, rel=1e-5)

    def second_pass(*a, **k):
        raise AssertionError("a tensor was read again to measure it")

    monkeypatch.setattr(pair_checks, "_measure", second_pass)
    monkeypatch.setenv(fast.ENV, "fused")
    recycle(models["base"], models["tuned"], models["target"], tmp_path / "r")
    monkeypatch.setenv(fast.ENV, "numpy")
    recycle(models["base"], models["tuned"], models["target"], tmp_path / "r2")


def test_the_baseline_build_computes_the_same_bytes_as_the_one_this_machine_runs(tmp_path):
    """On x86-64 each kernel exists twice (SSE2 baseline, AVX2) and the loader picks one; the other
    tests exercise the one this CPU gets. Here the baseline alone (-DRECYCLER_BASELINE, compiled as
    the package's build compiles it) must give the same outputs, sparse entries and status."""
    import importlib.util
    import shutil
    import sysconfig

    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (`make setup` installs gcc)"
    src = Path(fast.__file__).with_name("_native.c")
    so = tmp_path / "_native.abi3.so"
    import tomllib

    pyproject = tomllib.loads((Path(fast.__file__).parents[2] / "pyproject.toml").read_text())
    (ext,) = pyproject["tool"]["setuptools"]["ext-modules"]
    flags = [*ext["extra-compile-args"], "-fPIC", "-shared"]  # the package's own build flags
    include = sysconfig.get_paths()["include"]
    subprocess.run([cc, *flags, "-DRECYCLER_BASELINE", f"-I{include}", str(src), "-o", str(so)], check=True)
    spec = importlib.util.spec_from_file_location("_native", so)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    base_k, before = fast.Fused(baseline), FUSED.fallbacks
    for bdt in DTYPES:
        for store in DTYPES:
            m, mp = random_block(bdt, 20_001, 21, raw_bits=True)
            outs = []
            for k in (FUSED, base_k):
                out = np.empty(len(m), carrier(store))
                r = k.diff_chunk(m, bdt, mp, bdt, out, store, Scratch())
                outs.append((bits(out).tobytes(), r.residual.exc_idx.tobytes(), r.residual.rt_idx.tobytes()))
            assert outs[0] == outs[1], (bdt, store)
        m, mp = random_block(bdt, 20_001, 22)
        t, _ = random_block(bdt, 20_001, 23)
        t[::3] = m[::3]
        for blocks in sources(m, mp, bdt, bdt).values():
            for alpha in (1.0, 0.7):
                got = []
                for k in (FUSED, base_k):
                    out = np.empty_like(t)
                    k.apply_chunk(t, bdt, out, blocks, alpha, Scratch(), exact_roundtrip=alpha == 1.0)
                    got.append(bits(out).tobytes())
                assert got[0] == got[1], (bdt, type(blocks).__name__, alpha)
    for dtype in FP8:  # FP8 weights, Δ in float32
        m, mp = fp8_codes(dtype, 20_001, 24)
        t, _ = fp8_codes(dtype, 20_001, 25)
        for blocks in sources(m, mp, dtype, "F32").values():
            got = []
            for k in (FUSED, base_k):
                out = np.empty_like(t)
                try:
                    k.apply_chunk(t, dtype, out, blocks, 1.0, Scratch(), exact_roundtrip=False)
                    got.append(out.tobytes())
                except NarrowOverflow as e:  # the same refusal from both
                    got.append(e.value)
            assert got[0] == got[1], (dtype, type(blocks).__name__)
    assert base_k.fallbacks == FUSED.fallbacks - before  # both handed the same chunks to the reference


def test_residual_arrays_of_another_dtype_go_to_the_reference():
    """The C kernel reads int64 indices and float32 values; anything else (a residual whose arrays
    were forged or widened) is computed by the reference, never misread."""
    m, mp = random_block("BF16", 9_000, 31)
    t, _ = random_block("BF16", 9_000, 32)
    blocks = sources(m, mp, "BF16", "BF16")["stored"]
    res = blocks.res
    assert len(res.exc_idx) > 0
    odd = StoredBlocks(
        blocks.stored, "BF16", ChunkResidual(res.exc_idx.astype(np.int32), res.exc_val.astype(np.float64))
    )
    before = FUSED.fallbacks
    a, b = apply_both(t, "BF16", odd, 0.7, False)
    assert FUSED.fallbacks == before + 1 and np.array_equal(bits(a), bits(b))
    want = apply_both(
        t, "BF16", StoredBlocks(blocks.stored, "BF16", ChunkResidual(res.exc_idx, res.exc_val)), 0.7, False
    )
    assert np.array_equal(bits(a), bits(want[0]))


# ---- FP8 (F8_E4M3 = float8_e4m3fn, F8_E5M2): weights in FP8, the Δ in float32 -------------------------

FP8 = ["F8_E4M3", "F8_E5M2"]


def fp8_codes(dtype: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(m, m′) as FP8 codes: every finite code, and fine-tunes a few codes away (finite both)."""
    from recycler.delta.fp8 import WIDEN

    finite = np.flatnonzero(np.isfinite(WIDEN[dtype])).astype(np.uint8)
    g = np.random.default_rng(seed)
    m = g.choice(finite, n)
    step = g.integers(-3, 4, n)
    mag = np.clip((m & 0x7F).astype(np.int64) + step, 0, int((finite & 0x7F).max()))
    mp = (mag | (m & 0x80)).astype(np.uint8)
    mp[~np.isfinite(WIDEN[dtype][mp])] = m[~np.isfinite(WIDEN[dtype][mp])]
    return m, mp


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_every_finite_code_survives_widening_and_narrowing(dtype):
    """Recycle onto +0 from base +0: out = round(widen(code)) must be the code itself."""
    from recycler.delta.fp8 import WIDEN

    codes = np.flatnonzero(np.isfinite(WIDEN[dtype])).astype(np.uint8)
    codes = codes[codes != 0x80]  # −0: +0 + (−0 − +0) is +0
    zeros, out = np.zeros(len(codes), np.uint8), np.empty(len(codes), np.uint8)
    before = FUSED.fallbacks
    FUSED.apply_chunk(
        zeros, dtype, out, PairBlocks(zeros, dtype, codes, dtype), 1.0, Scratch(), exact_roundtrip=False
    )
    assert FUSED.fallbacks == before and np.array_equal(out, codes)


def test_fp8_diffs_are_the_reference_s():
    """FP8 Δs go to the numpy kernels by design (faster there: see _native.c)."""
    m, mp = fp8_codes("F8_E4M3", 5_000, 40)
    before = FUSED.fallbacks
    (o1, o2), _ = diff_both(m, "F8_E4M3", mp, "F8_E4M3", "F32")
    assert FUSED.fallbacks == before + 1 and np.array_equal(o1, o2)


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_narrowing_rounds_to_nearest_even_and_refuses_overflow_as_the_reference(dtype):
    """Target +0, a float32 Δ u: out = round_FP8(u), against `narrow_fp8` (exact float64 midpoints),
    on every midpoint between neighbouring codes ± 1 ulp, the overflow edges and random values."""
    from recycler.delta.fp8 import OVERFLOW_AT, WIDEN

    pos = np.unique(np.abs(WIDEN[dtype][np.isfinite(WIDEN[dtype])]).astype(np.float64))
    mids = ((pos[:-1] + pos[1:]) / 2).astype(np.float32)
    near = np.concatenate([mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), pos.astype(np.float32)])
    edge = np.float32(OVERFLOW_AT[dtype])
    edges = np.array(
        [edge, np.nextafter(edge, 0), np.nextafter(edge, np.inf), 464.0, 59392.0, 57344.0], np.float32
    )
    g = np.random.default_rng(5)
    rand = (g.standard_normal(50_000) * 10.0 ** g.uniform(-8, 4, 50_000)).astype(np.float32)
    d = np.concatenate([near, -near, edges, -edges, rand])
    target = np.zeros(len(d), np.uint8)
    for chunk in np.array_split(d, 50):  # a chunk with an overflow is refused whole, as the reference does
        assert_same_apply(target[: len(chunk)], dtype, DenseBlocks(np.ascontiguousarray(chunk)), 1.0, False)
    ok = d[np.abs(d.astype(np.float64)) < OVERFLOW_AT[dtype]]
    out = np.empty(len(ok), np.uint8)
    before = FUSED.fallbacks
    FUSED.apply_chunk(
        np.zeros(len(ok), np.uint8), dtype, out, DenseBlocks(ok), 1.0, Scratch(), exact_roundtrip=False
    )
    assert FUSED.fallbacks == before  # computed by the C kernel, not handed back
    want = np.empty(len(ok), np.uint8)
    narrow_fp8(np.float32(0) + ok, dtype, want)
    assert np.array_equal(out, want), (ok[out != want][:5], out[out != want][:5], want[out != want][:5])


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("alpha", [1.0, 0.7, -1.0])
def test_fp8_diff_and_apply_on_random_blocks(dtype, alpha):
    m, mp = fp8_codes(dtype, 70_001, 41)
    t, _ = fp8_codes(dtype, 70_001, 42)
    t[::3] = m[::3]
    for blocks in sources(m, mp, dtype, "F32").values():
        for exact in {alpha == 1.0, False}:
            assert_same_apply(t, dtype, blocks, alpha, exact)
