"""Model-side primitives for evaluation: batched greedy generation, continuation log-likelihood, token NLL.

Kept apart from the task definitions so that fine-tuning (which needs only the loss) and evaluation
share one implementation of each computation, with tensor shapes documented in one place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from recycler.errors import InvalidTask
from recycler.stages.finetune.data import IGNORE_INDEX, Messages


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def pad_token_id(tokenizer: object) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else tokenizer.eos_token_id  # type: ignore[attr-defined]


def prompt_ids(tokenizer: object, messages: Messages, *, chat: bool) -> list[int]:
    """Chat: render with the generation prompt. Raw: the single prompt's text as the tokenizer encodes it."""
    if chat:
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )  # type: ignore[attr-defined]
        return list(enc["input_ids"])
    if len(messages) != 1:
        raise InvalidTask("raw (non-chat) prompts must be a single 'prompt' string, not a conversation")
    return list(tokenizer(messages[0]["content"])["input_ids"])  # type: ignore[operator]


def greedy_generate(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy decoding in length-sorted batches, left-padded so every prompt ends where generation starts."""
    pad, device = pad_token_id(tokenizer), next(model.parameters()).device
    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left padded
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for r, i in enumerate(rows):
                texts[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True)  # type: ignore[attr-defined]
    return texts


def continuation_logprobs(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int, pad_id: int
) -> list[float]:
    """Σ log p(continuation tokens | context) for each (context ids, continuation ids) pair."""
    device, scores = next(model.parameters()).device, []
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            width = max(len(c) + len(x) for c, x in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), right padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (c, x) in enumerate(chunk):
                ids[r, : len(c) + len(x)] = torch.tensor(c + x)
                mask[r, : len(c) + len(x)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            for r, (c, x) in enumerate(chunk):
                # logits at position t predict token t+1: positions len(c)-1 .. len(c)+len(x)-2
                step_logits = logits[r, len(c) - 1 : len(c) + len(x) - 1].float()  # (len(x), V)
                logp = F.log_softmax(step_logits, dim=-1).gather(1, torch.tensor(x, device=device)[:, None])
                scores.append(float(logp.sum()))
    return scores


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ -log p(label) over non-ignored positions; logits (B, T, V) predict labels shifted by one."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
