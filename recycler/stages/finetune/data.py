"""Instruction data for supervised fine-tuning: load, validate, tokenize with response-only labels, collate.

Loss is taken on assistant tokens only (labels are -100 elsewhere), so the model learns to answer, not to
reproduce prompts. The chat template decides which tokens are the assistant's: through its
`{% generation %}` markers when it has them, otherwise by rendering growing conversation prefixes and
taking the tokens each assistant turn adds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from recycler.errors import InvalidData, InvalidModelFolder
from recycler.io.jsonl import read_jsonl_objects, require_nonempty

IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # not `add_generation_prompt`
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SFTRecord:
    """One validated example; `line` points back into the source file for error messages."""

    source: Path
    line: int
    messages: Messages


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt/template tokens, == input_ids on response tokens
    truncated: bool


def parse_record(obj: dict, where: str) -> Messages:
    """Accept `{"messages": [...]}` or `{"prompt", "response"}`; `where` is "file:line" for errors."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidData(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise InvalidData(
                    f"{where}: messages[{i}] must be an object with string 'role' and 'content'"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidData(f"{where}: no assistant message, so nothing to learn from this example")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in obj or "response" in obj:
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise InvalidData(f"{where}: 'prompt' and 'response' must both be strings, response non-empty")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise InvalidData(f"{where}: expected 'messages' or 'prompt' + 'response', found keys {sorted(obj)}")


def load_sft_records(path: Path) -> list[SFTRecord]:
    """Validate the whole file before training starts; the first bad line stops it with file:line."""
    path = Path(path)
    records = [SFTRecord(path, n, parse_record(obj, f"{path}:{n}")) for n, obj in read_jsonl_objects(path)]
    return require_nonempty(path, records)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages, **kwargs: object) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    )


def response_mask(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of the assistant tokens in it."""
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(enc["input_ids"]), list(enc["assistant_masks"])
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        through = _render(tokenizer, messages[: i + 1])
        if ids[: len(through)] != through or through[: len(start)] != start:
            raise InvalidModelFolder(
                "the chat template renders conversation prefixes inconsistently, so response tokens cannot "
                "be located; add {% generation %} markers around assistant content in the template"
            )
        mask[len(start) : len(through)] = [1] * (len(through) - len(start))
    return ids, mask


def encode_record(tokenizer: PreTrainedTokenizerBase, record: SFTRecord, max_length: int) -> EncodedExample:
    """Tokenize with the chat template, labels on response tokens only, truncated to `max_length`."""
    ids, mask = response_mask(tokenizer, record.messages)
    if not any(mask):
        raise InvalidData(
            f"{record.source}:{record.line}: the chat template marks no assistant tokens "
            "(empty response, or a template without {% generation %} markers that drops assistant turns)"
        )
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise InvalidData(
            f"{record.source}:{record.line}: the prompt alone fills max_length={max_length} tokens, so no "
            "response token is left to train on; shorten the prompt or raise max_length"
        )
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return EncodedExample(ids, labels, truncated)


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[SFTRecord], max_length: int, *, check: bool = True
) -> list[EncodedExample]:
    """Encode every record; with `check`, first make sure the tokenizer keeps the responses' text."""
    encoded = [encode_record(tokenizer, r, max_length) for r in records]
    if check:
        check_round_trip(tokenizer, records, encoded)
    return encoded


def _norm(text: str) -> str:
    return " ".join(text.split())


def check_round_trip(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[SFTRecord],
    encoded: Sequence[EncodedExample],
    sample: int = 32,
) -> None:
    """Refuse to train on nothing: decoding the tokens that carry loss must give back the response.

    A tokenizer that does not fit the data (replaced by a library upgrade, the wrong model's) can turn
    every response into a few unknown or special tokens; training then "converges" to a tiny loss on
    nothing and the model learns no answer. A sample of examples is decoded and compared.
    """
    step = max(1, len(records) // sample)
    picked = list(range(0, len(records), step))[:sample]
    lost = []
    for i in picked:
        labels = [t for t in encoded[i].labels if t != IGNORE_INDEX]
        decoded = tokenizer.decode(labels, skip_special_tokens=True)
        responses = [m["content"] for m in records[i].messages if m["role"] == "assistant"]
        if not all(_norm(r) in _norm(decoded) for r in responses) and not encoded[i].truncated:
            lost.append((records[i], responses[-1], decoded, len(labels)))
    if len(lost) * 2 > len(picked):  # most of the sample: not an odd example, the tokenizer
        rec, response, decoded, n = lost[0]
        raise InvalidData(
            f"the tokenizer loses the training text: {len(lost)} of {len(picked)} sampled examples do not "
            f"decode back to their response (e.g. {rec.source}:{rec.line}: {response[:40]!r} → {n} response "
            f"tokens decoding to {decoded[:40]!r}); check that the model folder's tokenizer and chat "
            "template belong to this model and data"
        )


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
