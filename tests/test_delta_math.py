"""The Δ arithmetic, bit for bit against the eager torch definition (the engine before this change).

Test data is drawn in float64 and rounded once to the checkpoint dtype, as training produces it: with
data made by adding noise in the checkpoint dtype (`perturb_model`), m′ − m is always exact and the
float32 round trip cannot fail, which hides exactly the cases the residual exists for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recycler.delta import math as dm
from recycler.delta.bits import bits
from recycler.delta.kernels import NonFiniteChunk
from recycler.delta.math import tensor_family
from recycler.delta.vocab import align_by_prefix, align_by_tokens, row_runs

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPES = list(TORCH)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def th(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def finetune_pair(dtype: str, n: int = 300_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, m′): a fine-tune drawn in float64 and rounded once, plus the hard cases appended."""
    g = np.random.default_rng(seed)
    scale = 0.02 * np.exp(g.uniform(-4, 4, n))
    m = g.standard_normal(n) * scale
    mp = m + g.standard_normal(n) * scale * 0.1  # ‖Δ‖/‖m‖ ≈ 0.1: many sign flips near zero
    tiny = {"BF16": 1e-39, "F16": 3e-7, "F32": 1e-44}[dtype]  # subnormal in that dtype
    big = {"BF16": 1e30, "F16": 2e4, "F32": 1e30}[dtype]  # apply with α = −1 stays in range
    edge = [  # (m, m′)
        (1.0, -0.5),
        (0.3, 0.9),
        (0.3, 0.1),
        (-2.0, 7.0),  # sign flip, > 2× up and down
        (tiny, 3 * tiny),
        (tiny, -tiny),
        (0.5 * tiny, 1e-3),
        (1e-3, tiny),  # subnormals
        (0.0, -0.0),
        (-0.0, 0.0),
        (-0.0, -0.0),
        (0.25, -0.0),
        (-0.0, 0.25),
        (0.0, 1e-3),  # signed zeros
        (1.0, 2.0**-30),
        (2.0**-30, 1.0),
        (big, -big / 3),
        (3.0, 3.0 + 2.0**-20),  # far apart, tiny change
    ]
    m = np.concatenate([m, [a for a, _ in edge]])
    mp = np.concatenate([mp, [b for _, b in edge]])
    return torch.from_numpy(m).to(TORCH[dtype]), torch.from_numpy(mp).to(TORCH[dtype])


def oracle_d32(m: torch.Tensor, mp: torch.Tensor) -> torch.Tensor:
    return mp.float() - m.float()


def oracle_apply(t: torch.Tensor, m: torch.Tensor, mp: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The README's result: round_T(float32(t) + α₃₂·d32), α₃₂ = float32(α), each step a float32
    operation (a float32 tensor times a float32 scalar); where t is m bit for bit (α = 1), m′."""
    d = oracle_d32(m, mp)
    out = (t.float() + torch.tensor(alpha, dtype=torch.float32) * d).to(t.dtype)
    if alpha == 1.0 and t.dtype == m.dtype == mp.dtype:
        same = np_(t).view(bits(np_(t)).dtype) == np_(m).view(bits(np_(m)).dtype)
        out[torch.from_numpy(same)] = mp[torch.from_numpy(same)]
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and np.array_equal(bits(np_(a)), bits(np_(b)))


def diff_of(m: torch.Tensor, mp: torch.Tensor, dtype: str):
    return dm.diff(np_(m), dtype, np_(mp), dtype, dtype)


def test_hand_computed_values():
    m, mp = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([1.5, 4.0, -3.0])
    stored, res = diff_of(m, mp, "F32")
    assert dm.decode(stored, "F32", res).tolist() == [0.5, 2.0, 0.0]
    assert dm.apply(np_(m), "F32", stored, "F32", res).tolist() == [1.5, 4.0, -3.0]
    assert dm.apply(np.float32([10, 10, 10]), "F32", stored, "F32", res, alpha=0.5).tolist() == [
        10.25,
        11.0,
        10.0,
    ]
    # 1 + 2^-10 rounds back to 1 in bf16 (8 bits of mantissa)
    one = np.uint16([0x3F80])
    assert dm.apply_f32(one, "BF16", np.float32([2.0**-10])).tolist() == [0x3F80]


@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_stores_the_nearest_value_and_the_residual_restores_float32_exactly(dtype):
    m, mp = finetune_pair(dtype)
    stored, res = diff_of(m, mp, dtype)
    d32 = oracle_d32(m, mp)
    assert same_bits(torch.from_numpy(dm.decode(stored, dtype, res)), d32)
    finite = torch.isfinite(d32.to(TORCH[dtype]))
    assert same_bits(th(stored, dtype)[finite], d32.to(TORCH[dtype])[finite])  # nearest value in the dtype
    exc = (th(stored, dtype).float() != d32).sum().item()
    assert res.exceptions == exc and (dtype == "F32") == (exc == 0)
    if dtype == "BF16":  # Sterbenz: same sign and within 2× ⇒ m′ − m is a bf16, never an exception
        mf, mpf = m.float(), mp.float()
        sterbenz = (
            (torch.sign(mf) == torch.sign(mpf)) & (mpf.abs() <= 2 * mf.abs()) & (mf.abs() <= 2 * mpf.abs())
        )
        assert not sterbenz[torch.from_numpy(res.exc_idx)].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_is_bit_exact_including_signed_zeros(dtype):
    m, mp = finetune_pair(dtype, seed=1)
    stored, res = diff_of(m, mp, dtype)
    back = th(dm.apply(np_(m), dtype, stored, dtype, res), dtype)
    assert same_bits(back, mp)
    formula = (m.float() + oracle_d32(m, mp)).to(m.dtype)
    failures = int((~torch.from_numpy(bits(np_(formula)) == bits(np_(mp)))).sum())
    assert res.roundtrip_fixes == failures > 0  # the float32 Δ alone would miss these (−0 at least)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.5, 0.7])
def test_apply_to_another_target_is_the_float32_formula(dtype, alpha):
    m, mp = finetune_pair(dtype, seed=2)
    t = (
        m.double()
        + torch.randn(len(m), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e-3
    )
    t = t.to(TORCH[dtype])
    t[:1000] = m[:1000]  # some target elements equal the base: the round-trip rule applies there
    t[-18:] = m[-18:]  # the hard cases too
    stored, res = diff_of(m, mp, dtype)
    got = th(dm.apply(np_(t), dtype, stored, dtype, res, alpha=alpha), dtype)
    assert same_bits(got, oracle_apply(t, m, mp, alpha))
    plain = (t.float() + torch.tensor(alpha, dtype=torch.float32) * oracle_d32(m, mp)).to(t.dtype)
    changed = int((~torch.from_numpy(bits(np_(got)) == bits(np_(plain)))).sum())
    assert changed <= res.roundtrip_fixes  # only round-trip elements ever differ from the plain formula


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_recycle_equals_diff_then_apply(dtype, alpha):
    m, mp = finetune_pair(dtype, seed=4)
    t = m.clone()
    t[::3] = (m[::3].double() * 1.01).to(m.dtype)  # a target equal to the base at two elements in three
    stored, res = diff_of(m, mp, dtype)
    two = dm.apply(np_(t), dtype, stored, dtype, res, alpha=alpha)
    one = dm.recycle(np_(m), dtype, np_(mp), dtype, np_(t), dtype, alpha=alpha)
    assert np.array_equal(bits(one), bits(two))


def test_float32_storage_of_a_bf16_delta_is_exact_too():
    m, mp = finetune_pair("BF16", seed=5)
    stored, res = dm.diff(np_(m), "BF16", np_(mp), "BF16", "F32")
    assert stored.dtype == np.float32 and res.exceptions == 0 and res.roundtrip_fixes > 0
    assert same_bits(th(dm.apply(np_(m), "BF16", stored, "F32", res), "BF16"), mp)


def test_nonfinite_values_and_overflows_are_refused():
    one, nan, inf = np.float32([1.0, 2.0]), np.float32([1.0, np.nan]), np.float32([np.inf, 1.0])
    for base, tuned, role in ((nan, one, "base"), (one, inf, "fine-tuned")):
        with pytest.raises(NonFiniteChunk, match=role):
            dm.diff(base, "F32", tuned, "F32", "F32")
    bmax = np.uint16([0x7F7F, 0x3F80])  # ±bf16 max: their difference overflows float32
    with pytest.raises(NonFiniteChunk, match="overflows float32"):
        dm.diff(bmax, "BF16", bmax ^ np.uint16(0x8000), "BF16", "BF16")
    with pytest.raises(NonFiniteChunk, match="target"):
        dm.apply_f32(np.uint16([0x7FC0, 0]), "BF16", np.float32([1, 1]))  # NaN in the target
    with pytest.raises(NonFiniteChunk, match="Δ"):
        dm.apply_f32(np.uint16([0, 0]), "BF16", np.float32([1, np.inf]))
    with pytest.raises(NonFiniteChunk, match="overflows"):  # finite in float32, Inf once rounded to bf16
        dm.apply_f32(np.uint16([0x7F7F, 0]), "BF16", np.float32([2.0**120, 0]))
    with pytest.raises(NonFiniteChunk, match="overflows"):
        dm.apply_f32(np.float16([60000, 0]), "F16", np.float32([6000, 0]))


def test_stored_delta_saturates_where_the_dtype_overflows():
    m, mp = np.float32([-1e36, 1.0]), np.float32([3.39e38, 1.0])  # Δ = 3.40e38: a float32, above bf16's max
    stored, res = dm.diff(m, "F32", mp, "F32", "BF16")
    assert stored[0] == 0x7F7F and res.exceptions == 1  # bf16 max, the exact value in the residual
    assert dm.decode(stored, "BF16", res)[0] == mp[0] - m[0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        dm.diff(np.zeros(3, np.float32), "F32", np.zeros(4, np.float32), "F32", "F32")
    with pytest.raises(ValueError, match="shape mismatch"):
        dm.apply_f32(np.zeros(3, np.float32), "F32", np.zeros(2, np.float32))


def test_tensor_families():
    assert tensor_family("model.embed_tokens.weight") == "embed"
    assert tensor_family("lm_head.weight") == "lm_head"
    assert tensor_family("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert tensor_family("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert tensor_family("model.layers.0.input_layernorm.weight") == "norm"
    assert tensor_family("model.rotary.inv_freq") == "other"


def test_align_by_tokens_matches_strings_not_positions():
    src = {"a": 0, "b": 1, "c": 2, "d": 3}
    tgt = {"b": 0, "a": 1, "new": 2, "c": 3, "e": 4}
    rm = align_by_tokens(src, tgt, 4, 6)  # target has one padding row (5) without a token
    assert rm.src_rows.tolist() == [1, 0, -1, 2, -1, -1]
    assert (rm.matched, rm.new_in_target, rm.dropped_from_source) == (3, 3, 1)
    assert rm.samples["dropped_from_delta"] == ["d"]
    assert align_by_tokens(src, dict(src), 4, 4).identity


def test_prefix_alignment_and_runs():
    rm = align_by_prefix(3, 5)
    assert rm.src_rows.tolist() == [0, 1, 2, -1, -1]
    assert row_runs(np.array([0, 1, 2, -1, -1, 7, 8, 4])) == [(0, 0, 3), (3, -1, 2), (5, 7, 2), (7, 4, 1)]
