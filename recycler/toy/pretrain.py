"""Two-stage pretraining of the toy base versions on CPU.

Stage 1 ("general") runs a cosine schedule that stops at 10% of the peak learning rate and saves the
early versions; stage 2 ("mid-training") continues the same optimizer on a math-heavier mixture with
the learning rate annealed linearly to zero and saves the later versions. Determinism: one seed fixes
the initial weights and every batch, and a fixed thread count fixes the order of floating-point sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from recycler.toy.tiny import CHARS, char_tokenizer, tiny_llama_config
from recycler.toy.world import Corpus, WorldConfig

StepProgress = Callable[[str, int, int], None]  # (label, done, total)


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init_model(config: WorldConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(config.seed)
    llama = tiny_llama_config(len(tokenizer), hidden=config.hidden, layers=config.layers)
    llama.max_position_embeddings = 2 * config.context
    model = LlamaForCausalLM(llama)
    # Generation stops at the end-of-turn marker as well as at </s> (as recycler.toy.tiny models do).
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|end|>"),
    ]
    return model


def optimizer_for(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """Weight decay on matrices only: embeddings of tokens pretraining never shows must not decay away."""
    embeds = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeds]
    rest = [p for p in model.parameters() if p.ndim < 2 or id(p) in embeds]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def stage_lr(config: WorldConfig, stage: int, step: int) -> float:
    """Learning rate at `step` (0-based) of `stage`."""
    if stage == 1:
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.stage1_steps - config.warmup_steps)
        floor = config.stage1_final_lr_ratio
        return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    return config.stage2_lr * (1 - step / config.stage2_steps)


def save_version(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pretrain(
    config: WorldConfig,
    excluded: set[tuple[int, int]],
    out_dirs: list[Path],
    progress: StepProgress | None = None,
) -> None:
    """Train from scratch and save one HF folder per checkpoint step into `out_dirs` (v1, v2, …)."""
    tokenizer = char_tokenizer()
    token_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in CHARS}
    corpus = Corpus(config, excluded, token_ids, tokenizer.bos_token_id)
    saves = iter(out_dirs)
    with torch_threads(config.threads):
        model = init_model(config, tokenizer)
        model.train()
        opt = optimizer_for(model, config.learning_rate)
        for stage, steps, marks in (
            (1, config.stage1_steps, config.stage1_checkpoints),
            (2, config.stage2_steps, config.stage2_checkpoints),
        ):
            label = f"pretraining stage {stage}"
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = stage_lr(config, stage, step)
                ids = torch.from_numpy(corpus.batch(stage, step))  # (B, T)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(
                        f"pretraining loss became {loss.item()} at stage {stage} step {step}"
                    )
                if step + 1 in marks:
                    model.eval()
                    save_version(model, tokenizer, next(saves))
                    model.train()
                if progress and (step % 20 == 0 or step + 1 == steps):
                    progress(f"{label} (loss {loss.item():.3f})", step + 1, steps)
