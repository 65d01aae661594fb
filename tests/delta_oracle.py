"""Random tiny checkpoints and the oracle they are checked against (tests/test_differential.py).

The oracle is the README's definition written again in plain torch, one whole tensor at a time,
knowing which tensor is which from how the case was built (never from recycler's own name rules);
see test_differential.py for the formulas.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from recycler.errors import IncompatibleCheckpoints, NonFiniteValues, UnrelatedModels

TORCH = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOATS = list(TORCH)
EXACT = ("BF16", "F16", "F32")
HIDDEN = 8
STYLES = {  # (embedding, head) names of two real naming schemes: Llama's, GPT-NeoX's
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),
    "neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
}
LAYERS = {  # other float tensors: name → shape (matrices and vectors)
    "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.up_proj.weight": (2 * HIDDEN, HIDDEN),
    "model.layers.0.input_layernorm.weight": (HIDDEN,),
    "model.norm.weight": (HIDDEN,),
}
INTS = {"model.layers.0.mlp.down_proj.qweight": ((HIDDEN, 2 * HIDDEN), torch.int8),
        "model.rotary.position_ids": ((1, 16), torch.int64)}  # fmt: skip


# ---- building a random case ------------------------------------------------------------------------------


@dataclass
class Side:
    """One checkpoint of a case, as the oracle knows it."""

    tensors: dict[str, torch.Tensor]
    tokens: list[str]
    tied: bool
    config_style: str  # "explicit", "text_config" or "omitted" (the class default, read from tensors)


@dataclass
class Case:
    seed: int
    style: str
    base: Side
    tuned: Side
    target: Side
    alpha: float
    only_in_delta: str
    store: str
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, str]:
        return STYLES[self.style]


def _draw(g: torch.Generator, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _plant_hard_values(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """In m′: a sign flip, a change by more than 2×, −0 and a value far from m's (matrices only, few
    enough that ‖Δ‖/‖m‖ stays that of a fine-tune); a −0 in vectors."""
    y, x = y.clone().reshape(-1), x.reshape(-1)
    if len(y) >= 64:
        y[0], y[1], y[2], y[3] = -0.5 * x[0], 3 * x[1], -0.0, x[3] * 2.0**-12
    elif len(y):
        y[0] = -0.0
    return y


def _cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype.startswith("F8"):  # stay inside the FP8 range (E4M3: 448) whatever the draw
        x = x.clamp(-400, 400)
    return x.to(TORCH[dtype])


def build_case(seed: int) -> Case:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    style = rng.choice(list(STYLES))
    embed, head = STYLES[style]
    vocab = [f"tok{i}" for i in range(rng.randint(6, 12))]
    src_tied, tgt_tied = rng.random() < 0.4, rng.random() < 0.4
    unrelated = rng.random() < 0.07
    overflow = rng.random() < 0.12

    # target vocabulary: the same, grown, reordered, or reordered and grown
    tgt_vocab = list(vocab)
    how = rng.choice(["same", "same", "grown", "reordered", "both"])
    if how in ("reordered", "both"):
        i, j = rng.sample(range(len(tgt_vocab)), 2)
        tgt_vocab[i], tgt_vocab[j] = tgt_vocab[j], tgt_vocab[i]
    if how in ("grown", "both"):
        tgt_vocab += [f"new{i}" for i in range(rng.randint(1, 3))]

    shapes = {embed: (len(vocab), HIDDEN), **LAYERS} | ({} if src_tied else {head: (len(vocab), HIDDEN)})
    base, tuned, target = {}, {}, {}
    for name, shape in shapes.items():
        bdt = rng.choice(FLOATS)
        tdt = bdt if rng.random() < 0.8 else rng.choice(FLOATS)
        scale = 3.0 if overflow else rng.choice([0.02, 0.5, 3.0])
        x = _draw(g, shape, scale)
        y = _draw(g, shape, scale) if unrelated else x + _draw(g, shape, 0.02 * scale)
        y = _plant_hard_values(x, y).reshape(shape)
        base[name], tuned[name] = _cast(x, bdt), _cast(y, tdt)
    for name, (shape, dt) in INTS.items():
        v = torch.randint(-100, 100, shape, generator=g).to(dt)
        base[name], tuned[name] = v, v.clone()
        if rng.random() < 0.06:
            tuned[name].view(-1)[0] += 1  # a quantised weight or buffer changed by the fine-tune
    # the target: another release (base + noise), or the base itself, in its own dtypes and vocabulary
    own = rng.random() < 0.15 and how == "same" and src_tied == tgt_tied
    tshapes = {embed: (len(tgt_vocab), HIDDEN), **LAYERS} | (
        {} if tgt_tied else {head: (len(tgt_vocab), HIDDEN)}
    )
    for name, shape in tshapes.items():
        if own and name in base:
            target[name] = base[name].clone()
            continue
        src = base.get(name, base[embed])
        dt = dtype_name(src.dtype) if rng.random() < 0.7 else rng.choice(FLOATS)
        x = src.double()
        if name in (embed, head):  # rows follow the target's tokens (new tokens: fresh rows)
            rows = [vocab.index(t) if t in vocab else None for t in tgt_vocab]
            x = torch.stack(
                [x[r] if r is not None else torch.zeros(HIDDEN, dtype=torch.float64) for r in rows]
            )
        x = x + _draw(g, shape, 0.1 * float(x.abs().mean()) + 1e-3)
        target[name] = _cast(x, dt)
    for name in INTS:
        target[name] = base[name].clone()
    if overflow:  # a target element at its dtype's largest value, and a Δ pushing it further
        name = rng.choice(list(LAYERS))
        t = target[name]
        t.view(-1)[7] = torch.finfo(t.dtype).max
        tuned[name].view(-1)[7] = _cast(
            base[name].double().view(-1)[7:8] + 20.0, dtype_name(tuned[name].dtype)
        )[0]
    if rng.random() < 0.15:
        target["model.extra_adapter.weight"] = torch.ones(2, 2, dtype=torch.bfloat16)  # only in the target
    if rng.random() < 0.15:
        del target["model.layers.0.mlp.up_proj.weight"]  # its Δ has no counterpart
    styles = ["explicit", "text_config", "omitted"]
    return Case(
        seed=seed,
        style=style,
        base=Side(base, vocab, src_tied, rng.choice(styles)),
        tuned=Side(tuned, vocab, src_tied, rng.choice(styles)),
        target=Side(target, tgt_vocab, tgt_tied, rng.choice(styles)),
        alpha=1.0 if own else rng.choice([1.0, 1.0, 0.7, 0.5, -1.0, 1.3, 2.0]),
        only_in_delta=rng.choice(["error", "ignore"]),
        store=rng.choice(["auto", "auto", "float32", "bfloat16", "float16"]),
        notes=[f"vocab {how}", f"tied {src_tied}->{tgt_tied}"] + (["unrelated"] if unrelated else []),
    )


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in TORCH.items() if v == dtype)


def write_side(side: Side, folder: Path, style: str) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in side.tensors.items()}, str(folder / "model.safetensors"))
    cfg = {"model_type": "llama" if style == "llama" else "gpt_neox", "vocab_size": len(side.tokens),
           "hidden_size": HIDDEN}  # fmt: skip
    if side.config_style == "explicit":
        cfg["tie_word_embeddings"] = side.tied
    elif side.config_style == "text_config":
        cfg["text_config"] = {"tie_word_embeddings": side.tied, "vocab_size": len(side.tokens)}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(side.tokens)}, unk_token=side.tokens[0]))
    tok.save(str(folder / "tokenizer.json"))
    return folder


# ---- the oracle ------------------------------------------------------------------------------------------


# FP8 rounding, for the oracle: nearest by float64 distance over all 256 codes, ties to the even code,
# the sign kept; the value one step beyond the largest finite one stands for "overflow" (E4M3: code
# 0x7F, odd, so the 464 tie goes to 448; E5M2: Inf, code 0x7C, even, so the 59392 tie overflows).
FP8_BEYOND = {"F8_E4M3": (480.0, 0x7F), "F8_E5M2": (61440.0, 0x7C)}


def round_fp8(r: torch.Tensor, dtype: str) -> tuple[torch.Tensor, bool]:
    values = torch.arange(128, dtype=torch.uint8).view(TORCH[dtype]).to(torch.float64)
    codes = torch.arange(128)
    keep = values.isfinite()
    beyond, code = FP8_BEYOND[dtype]
    values = torch.cat([values[keep], torch.tensor([beyond], dtype=torch.float64)])
    codes = torch.cat([codes[keep], torch.tensor([code])])
    a = r.double().abs().reshape(-1, 1)
    dist = (a - values).abs()
    best = dist == dist.min(dim=1, keepdim=True).values
    even = best & (codes % 2 == 0)
    pick = torch.where(even.any(dim=1, keepdim=True), even, best).float().argmax(dim=1)
    chosen = codes[pick]
    overflow = bool((chosen == code).any() or (a.reshape(-1) > beyond).any())
    out = (chosen | (torch.signbit(r.reshape(-1)).long() << 7)).to(torch.uint8)
    return out.view(TORCH[dtype]).reshape(r.shape), overflow


def round_to(r: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """round_T(r) of float32 `r` and whether it overflows T (refused)."""
    if dtype_name(dtype).startswith("F8"):
        return round_fp8(r, dtype_name(dtype))
    y = r.to(dtype)  # IEEE round to nearest even; beyond the range: ±Inf
    return y, not bool(torch.isfinite(y).all())


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def oracle_refusals_of_pair(case: Case) -> set[type]:
    """What `diff` (and so `recycle`) must refuse: changed non-float tensors, unrelated models."""
    errors: set[type] = set()
    b, t = case.base.tensors, case.tuned.tensors
    if any(not torch.equal(b[n], t[n]) for n in INTS):
        errors.add(IncompatibleCheckpoints)
    sd = sb = 0.0
    for n, x in b.items():
        if n not in INTS and x.dim() >= 2:
            d = (_f32(t[n]) - _f32(x)).double()
            sd, sb = sd + float((d * d).sum()), sb + float((_f32(x).double() ** 2).sum())
    if (sd**0.5) / max(sb**0.5, 1e-30) > 0.5:
        errors.add(UnrelatedModels)
    return errors


def oracle_apply(case: Case, alpha: float) -> tuple[dict[str, torch.Tensor] | None, set[type]]:
    """The expected output tensors of applying the case's Δ to its target, or the errors expected."""
    embed, head = case.names
    base, tuned, target = case.base.tensors, case.tuned.tensors, case.target.tensors
    delta_names = [n for n in base if n not in INTS]
    src_tied, tgt_tied = case.tuned.tied, case.target.tied
    errors: set[type] = set()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    a32 = torch.tensor(alpha, dtype=torch.float32)
    for name, t in target.items():
        if name in INTS or (name not in delta_names and not (name == head and src_tied and not tgt_tied)):
            out[name] = t  # non-float, or only in the target: kept unchanged
            continue
        src = name if name in delta_names else embed  # an untied head fed by the tied embedding's Δ
        used.add(src)
        m, m1 = base[src], tuned[src]
        d32 = _f32(m1) - _f32(m)
        rowmapped = False
        if name in (embed, head) and case.tuned.tokens != case.target.tokens:
            rows = [
                case.tuned.tokens.index(tok) if tok in case.tuned.tokens else None
                for tok in case.target.tokens
            ]
            d32 = torch.stack([d32[r] if r is not None else torch.zeros(HIDDEN) for r in rows])
            rowmapped = True
        t32 = _f32(t)
        r = t32 + d32 if alpha == 1.0 else t32 + a32 * d32
        y, overflow = round_to(r, t.dtype)
        if overflow:
            errors.add(NonFiniteValues)
            continue
        if alpha == 1.0 and not rowmapped and m.dtype == m1.dtype == t.dtype and dtype_name(t.dtype) in EXACT:
            same = (bits_of(t).view(-1, t.element_size()) == bits_of(m).view(-1, m.element_size())).all(dim=1)
            y = torch.where(same.reshape(t.shape), m1, y)  # the round-trip refinement
        out[name] = y
    for name in sorted(set(delta_names) - used):
        if name == head and tgt_tied and not src_tied:
            continue  # the tied target's embedding receives its own Δ
        if case.only_in_delta != "ignore":
            errors.add(IncompatibleCheckpoints)
    return (None if errors else out), errors
