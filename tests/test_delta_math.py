"""Pure Δ arithmetic: hand-computable values, exactness contracts, and the bf16 storage error bound."""

from __future__ import annotations

import pytest
import torch

from recycler.delta.math import (
    apply,
    apply_into,
    diff,
    diff_into,
    roundtrip_mismatches,
    tensor_family,
)
from recycler.delta.vocab import align_by_prefix, align_by_tokens, row_runs


def test_hand_computed_values():
    base = torch.tensor([1.0, 2.0, -3.0])
    tuned = torch.tensor([1.5, 4.0, -3.0])
    assert diff(base, tuned).tolist() == [0.5, 2.0, 0.0]
    assert apply(base, diff(base, tuned)).tolist() == [1.5, 4.0, -3.0]
    assert apply(torch.tensor([10.0, 10.0, 10.0]), diff(base, tuned), alpha=0.5).tolist() == [
        10.25,
        11.0,
        10.0,
    ]


def test_apply_casts_to_target_dtype():
    out = apply(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0**-10]))
    assert out.dtype == torch.bfloat16
    assert out.item() == 1.0  # 1 + 2^-10 rounds back to 1 in bf16 (8 bits of mantissa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_is_bit_exact_for_half_precision(dtype):
    g = torch.Generator().manual_seed(0)
    # Wide exponent range, including values far apart (where tuned − base is not exact in float32).
    base = (torch.randn(200_000, generator=g) * torch.logspace(-6, 3, 200_000)).to(dtype)
    tuned = (base.float() + torch.randn(200_000, generator=g) * 0.05).to(dtype)
    tuned[:100] = (torch.randn(100, generator=g) * 1e4).to(dtype)  # unrelated values: huge Δ
    tuned[100:200] = 0
    d = diff(base, tuned)
    assert d.dtype == torch.float32
    assert torch.equal(apply(base, d), tuned)
    assert roundtrip_mismatches(base, tuned, d) == 0


def test_fp32_roundtrip_exact_for_finetune_sized_changes_and_counted_otherwise():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100_000, generator=g)
    tuned = base * (1 + 0.01 * torch.randn(100_000, generator=g))  # within a factor 2: Sterbenz, exact
    assert torch.equal(apply(base, diff(base, tuned)), tuned)
    # Catastrophic cancellation: 1e-8 − 1 is not exact in float32, so the round trip misses.
    b, t = torch.tensor([1.0, 3.0]), torch.tensor([1e-8, 3.5])
    assert roundtrip_mismatches(b, t, diff(b, t)) == 1


def test_bf16_storage_error_bound():
    """Δ stored in bf16 errs by at most 2⁻⁸·|Δ| (bf16's unit roundoff) before the final rounding (README).

    It is exact wherever tuned and base are within a factor 2 (Sterbenz), so additive noise, which
    flips the sign of weights near zero, is needed to see any loss at all.
    """
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(500_000, generator=g) * 0.02).to(torch.bfloat16)
    tuned = (base.float() + 0.002 * torch.randn(500_000, generator=g)).to(torch.bfloat16)
    d32 = diff(base, tuned)
    out = apply(base, diff(base, tuned, dtype=torch.bfloat16))
    err = (out.float() - tuned.float()).abs()
    big = torch.maximum(out.float().abs(), tuned.float().abs()).clamp_min(1e-30)
    half_ulp = torch.pow(2.0, torch.floor(torch.log2(big)) - 8)
    assert torch.all(err <= d32.abs() * 2.0**-8 + half_ulp)
    mismatch = (out != tuned).float().mean().item()
    assert 0 < mismatch < 0.05  # lossy but rare; the exact count goes into the manifest
    multiplicative = (base.float() * 1.01).to(torch.bfloat16)
    assert torch.equal(apply(base, diff(base, multiplicative, dtype=torch.bfloat16)), multiplicative)


def test_streaming_kernels_match_eager_bitwise():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(4096, generator=g)).to(torch.bfloat16)
    out32, scratch = torch.empty(4096), torch.empty(4096)
    assert torch.equal(diff_into(base, tuned, scratch, out32), diff(base, tuned))
    assert torch.equal(scratch, base.float())  # the widened base comes back for norms and round trips
    for alpha in (1.0, 0.5, -0.3):
        acc = apply_into(tuned, out32, alpha, torch.empty(4096))
        assert torch.equal(acc.to(torch.bfloat16), apply(tuned, out32, alpha))
    assert torch.equal(apply_into(tuned, None, 1.0, torch.empty(4096)), tuned.float())
    assert roundtrip_mismatches(base.float(), tuned, out32) == 0  # bf16 through a float32 Δ: exact
    lossy = out32.to(torch.bfloat16)
    assert roundtrip_mismatches(base.float(), tuned, lossy) == int((apply(base, lossy) != tuned).sum())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        diff(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="shape mismatch"):
        apply(torch.zeros(3), torch.zeros(2, 2))


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
    assert row_runs(torch.tensor([0, 1, 2, -1, -1, 7, 8, 4])) == [(0, 0, 3), (3, -1, 2), (5, 7, 2), (7, 4, 1)]
