"""The toy world: a synthetic pretraining corpus and an instruction task that tiny models learn on CPU.

Numbers are written least-significant digit first at fixed width (32 → "23", 68 → "860"), so column
arithmetic with carries can be computed left to right by a causal model. Pretraining sees made-up-word
text and arithmetic facts (`32+54=860`, `54-32=22`, `23*4=821`); the instruction task asks the same
kinds of problem in chat format (`Q:32+54?` → `860`) on problems that pretraining never states, in either order.
Stage 2 ("mid-training") is math-heavier and annealed.

The task mixes sums, differences and `mul3` products (3 digits × 1, `321*4?` → `2940`); FT from the base
finds the chat template and the sums/differences within its budget, while the products stay partly wrong,
so nobody ends at 100%. 20% of pretraining facts are asked as plain-text questions (`Q:32+54? A:860`).

What we measured while choosing this (study of 2026; one row per variant, seeds as noted):
- The previous world (add only, stage 1 1,500 steps, FT 100 steps at lr 1e-3): whether FT "finds" the
  template is a pretraining-seed lottery (seed 0: 99.5% on v3–v5, at the ceiling; seed 1: 2–9%). In the
  failing seeds the ones digit, predicted at the `<|assistant|>` position, stays at chance while the other
  digits are right: the pretrained circuits key on the exact `=`/space separators and on operands right
  after a line break, and an extra token (`23+45? = `) or a `Q:` prefix breaks them in some seeds only.
- No FT setting fixed that (lr 3e-4…3e-3, 100–400 steps, batch 16, warm-up 30%, clipping), nor answer
  formats (`=860`, restating `32+54=860`), nor d=128 × 4 layers (1 of 2 seeds), nor chat-template text
  documents, random separators or word prefixes in pretraining (these delay or prevent learning addition).
- A 0.5–2% trace of the chat format itself makes bases strong before FT (add/sub solved zero-shot in
  some seeds, not in others); with a competent base, a Δ is mostly damage to other versions (v5 + Δv4
  below v5's base in a mul-only task).
- Plain-text questions (`qa_text` 0.2) plus 3,000 stage-1 steps: the template is found in every seed
  tried (0, 1, 2; ones digit 100% on v3–v5), v1–v2 stay below 10%. With sums and differences only, FT
  then reaches ≈100%; with 2-digit products they stay at 10–20%; `mul3` products give 20–50% and FT
  plateaus at 70–85% by step 40–60 (lr 1e-3) whatever the start.
- On that plateau recycled and iterative starts end where FT from the base ends (margins −2…+2 points);
  with 40 steps at lr 5e-4 (25% warm-up) FT from the base stops below it (57–75% on v3–v5) and recycled
  starts end 5–11 points higher. Iterative and direct recycling then both reach the plateau: iterative
  starts beat direct ones by 8–14 points before FT, but not after (−1.3…+0.8).
- Seed 2 at that budget: FT from the base finds the template on v3 (57%) but not on v4/v5 (7–8%), while
  recycled starts reach 70–72%. No budget between 40–80 steps at lr 5e-4…1e-3 (warm-up 0.1–0.25) found it
  for v4/v5 of that seed without putting seeds 0/1 on the plateau: FT from the base in [55, 85]% for every
  seed is not reached; the report states the per-seed range instead of assuming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recycler.io.atomic import fsync_file

EQUALS = ("=", " =", "= ", " = ")
# A fact asked as a plain-text question: "Q:32+54? A:860" (no chat tokens: the template stays new to FT).
QA_SEPARATORS = (" ", " A:", " A: ", "\nA:")
SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
Problem = tuple[str, int, int]  # (op, a, b)


class WorldConfig(BaseModel):
    """Everything that determines a toy family; its hash names the cache folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    # model: transformers LlamaForCausalLM via recycler.toy.tiny.tiny_llama_config
    hidden: int = 96
    layers: int = 3
    context: int = 32
    # pretraining
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    stage1_steps: int = 3000
    stage1_final_lr_ratio: float = 0.1  # cosine to 10%: stage 1 is not annealed
    stage1_checkpoints: tuple[int, ...] = (300, 500, 3000)  # → v1, v2, v3
    stage2_steps: int = 600
    stage2_lr: float = 1e-3  # linear to 0: annealed "mid-training"
    stage2_checkpoints: tuple[int, ...] = (300, 600)  # → v4, v5
    stage1_mix: dict[str, float] = Field(
        default_factory=lambda: {"text": 0.3, "add": 0.4, "sub": 0.15, "mul3": 0.15}
    )
    stage2_mix: dict[str, float] = Field(
        default_factory=lambda: {"text": 0.1, "add": 0.25, "sub": 0.25, "mul3": 0.4}
    )
    threads: int = 1  # fixed so that weights are bit-identical whatever the machine's core count
    # share of pretraining facts written as a plain-text question ("Q:32+54? A:860"); without it
    # whether FT finds the chat template is a lottery over pretraining seeds
    qa_text: float = 0.2
    # instruction task: disjoint train/dev/test problems, the task operations in turn
    task_ops: tuple[str, ...] = ("add", "sub", "mul3")
    n_train: int = 1200
    n_dev: int = 128
    n_test: int = 600
    words: int = 150
    # the fine-tuning budget is part of the task: short enough that FT from the base does not converge
    ft_learning_rate: float = 5e-4
    ft_steps: int = 40
    ft_warmup_ratio: float = 0.25

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    @property
    def n_versions(self) -> int:
        return len(self.stage1_checkpoints) + len(self.stage2_checkpoints)


FAST = {
    "hidden": 64,
    "layers": 2,
    "batch_size": 32,
    "learning_rate": 5e-3,
    "warmup_steps": 50,
    "stage1_steps": 600,
    "stage1_checkpoints": (150, 300, 600),
    "stage2_steps": 250,
    "stage2_checkpoints": (125, 250),
    "stage1_mix": {"text": 0.1, "add": 0.7, "sub": 0.15, "mul": 0.05},
    "stage2_mix": {"text": 0.05, "add": 0.45, "sub": 0.25, "mul": 0.25},
    "n_train": 600,
    "n_test": 200,
    "n_dev": 64,
    "qa_text": 0.0,
    "task_ops": ("add",),
    "ft_learning_rate": 1e-3,
    "ft_steps": 200,
    "ft_warmup_ratio": 0.03,
}


def world_config(*, fast: bool = False, seed: int = 0) -> WorldConfig:
    return WorldConfig(seed=seed, **(FAST if fast else {}))


def lsd(n: int, width: int) -> str:
    """`n` at fixed width, least-significant digit first: lsd(68, 3) == '860'."""
    return str(n).zfill(width)[::-1]


SYMBOL = {"add": "+", "sub": "-", "mul": "*", "mul3": "*"}


def operands(op: str, a: int, b: int) -> str:
    """'23+45' for 32+54; the multiplier of `mul` is one digit; `mul3` multiplies 3 digits by one."""
    if op == "mul3":
        return f"{lsd(a, 3)}*{b}"
    return f"{lsd(a, 2)}{SYMBOL[op]}{b if op == 'mul' else lsd(b, 2)}"


def result(op: str, a: int, b: int) -> str:
    if op == "add":
        return lsd(a + b, 3)
    if op == "mul3":
        return lsd(a * b, 4)
    return lsd(a - b, 2) if op == "sub" else lsd(a * b, 3)


def question(op: str, a: int, b: int) -> str:
    return f"Q:{operands(op, a, b)}?"


def random_problem(op: str, rng: np.random.Generator) -> Problem:
    if op == "mul":
        return op, int(rng.integers(0, 100)), int(rng.integers(0, 10))
    if op == "mul3":
        return op, int(rng.integers(0, 1000)), int(rng.integers(0, 10))
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return (op, max(a, b), min(a, b)) if op == "sub" else (op, a, b)


def task_problems(config: WorldConfig) -> dict[str, list[Problem]]:
    """Disjoint train/dev/test problems, the operations in turn; a sum and its swap count as one."""
    rng = np.random.default_rng([config.seed, 1])
    sizes = {"train": config.n_train, "dev": config.n_dev, "test": config.n_test}
    chosen: set[Problem] = set()
    splits: dict[str, list[Problem]] = {}
    for name, size in sizes.items():
        problems: list[Problem] = []
        while len(problems) < size:
            p = random_problem(config.task_ops[len(problems) % len(config.task_ops)], rng)
            if p in chosen or ((p[0], p[2], p[1]) in chosen and p[0] == "add"):
                continue
            chosen.add(p)
            problems.append(p)
        splits[name] = problems
    return splits


def excluded_problems(splits: dict[str, list[Problem]]) -> set[Problem]:
    """Every task problem (sums in both orders): pretraining never states a fact the task asks."""
    out: set[Problem] = set()
    for op, a, b in (p for problems in splits.values() for p in problems):
        out |= {(op, a, b), (op, b, a)} if op == "add" else {(op, a, b)}
    return out


class Corpus:
    """Pretraining documents, batch by batch; batch k of stage s depends only on (seed, s, k)."""

    def __init__(self, config: WorldConfig, excluded: set[Problem], token_ids: dict[str, int], bos: int):
        self.config, self.excluded, self.token_ids, self.bos = config, excluded, token_ids, bos
        wrng = np.random.default_rng([config.seed, 2])
        self.words = ["".join(wrng.choice(SYLLABLES, size=wrng.integers(1, 4))) for _ in range(config.words)]
        freq = 1.0 / np.arange(1, config.words + 1)  # Zipf-like: text that looks like language
        self.word_p = freq / freq.sum()

    def document(self, op: str, rng: np.random.Generator) -> str:
        if op == "text":
            return " ".join(rng.choice(self.words, size=rng.integers(3, 9), p=self.word_p)) + "."
        # The result follows the operands after 1 to 3 characters ("=", " =", "= ", " = "): the model
        # finds operands by content, not at one offset, as it must behind a chat template.
        eq = EQUALS[rng.integers(len(EQUALS))]
        while (p := random_problem(op, rng)) in self.excluded:
            pass
        if self.config.qa_text and rng.random() < self.config.qa_text:
            return f"{question(*p)}{QA_SEPARATORS[rng.integers(len(QA_SEPARATORS))]}{result(*p)}"
        return f"{operands(*p)}{eq}{result(*p)}"

    def batch(self, stage: int, step: int) -> np.ndarray:
        """(batch_size, context) token ids: <s> then newline-separated documents, cut at the context."""
        cfg = self.config
        mix = cfg.stage1_mix if stage == 1 else cfg.stage2_mix
        ops, p = list(mix), np.array(list(mix.values()), dtype=float)
        rng = np.random.default_rng([cfg.seed, 10 + stage, step])
        rows = np.empty((cfg.batch_size, cfg.context), dtype=np.int64)
        for r in range(cfg.batch_size):
            text = ""
            while len(text) < cfg.context:
                text += self.document(ops[rng.choice(len(ops), p=p / p.sum())], rng) + "\n"
            rows[r, 0] = self.bos
            rows[r, 1:] = [self.token_ids[c] for c in text[: cfg.context - 1]]
        return rows


def task_records(problems: list[Problem], *, with_answer_field: bool) -> Iterator[dict]:
    for p in problems:
        user = {"role": "user", "content": question(*p)}
        if with_answer_field:  # a recycler.stages.evaluate.evaluators task line
            yield {"messages": [user], "answer": result(*p)}
        else:  # SFT line
            yield {"messages": [user, {"role": "assistant", "content": result(*p)}]}


def write_jsonl(path: Path, rows: Iterator[dict]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
    fsync_file(path)
    return path
