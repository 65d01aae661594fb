"""Evaluation: an `Evaluator` protocol and built-in tasks read from local JSONL files.

* `GenerationTask` — greedy generation (batched, left padding) + answer extraction + exact match.
  Numeric answers are compared as numbers (GSM8K-style "last number", "####" marker wins).
* `MultipleChoiceTask` — MMLU-style: each choice's log-probability given the prompt, argmax.
* `LossEvaluator` — mean response-token loss on held-out SFT data (the fine-tuning convergence curve).

Task files: `{"prompt"|"messages", "answer"}` per line for generation, `{"prompt"|"messages",
"choices": [...], "answer": index}` for multiple choice. Gold answers are validated when the file is
loaded, so a task that cannot be scored fails before the model is even loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel

from recycler.errors import InvalidTask
from recycler.io.jsonl import read_jsonl_objects, require_nonempty
from recycler.stages.evaluate.answers import Extract, extract_answer
from recycler.stages.evaluate.options import EvalOptions
from recycler.stages.evaluate.scoring import (
    continuation_logprobs,
    eval_mode,
    greedy_generate,
    pad_token_id,
    prompt_ids,
    token_nll_sum,
)
from recycler.stages.finetune.data import (
    IGNORE_INDEX,
    EncodedExample,
    Messages,
    collate,
    encode_records,
    load_sft_records,
)

Normalize = Literal["sum", "tokens", "chars"]


class EvalResult(BaseModel):
    task: str
    metric: str  # "accuracy" for tasks, "eval_loss" for held-out loss
    score: float
    n: int
    higher_is_better: bool = True
    records: list[dict] = []


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a model; fine-tuning calls it every `eval_every` steps for the curve."""

    name: str

    def evaluate(self, model: torch.nn.Module, tokenizer: object) -> EvalResult: ...


# ---- task files ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationExample:
    line: int
    messages: Messages  # ends with the user turn; the model writes the next assistant turn
    answer: str  # gold answer after extraction


@dataclass(frozen=True)
class ChoiceExample:
    line: int
    messages: Messages
    choices: tuple[str, ...]
    answer: int


def _messages_of(obj: dict, where: str) -> Messages:
    if isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj.get("messages")
    if (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        )
    ):
        if msgs[-1]["role"] == "assistant":
            raise InvalidTask(f"{where}: the last message must not be the assistant's (the model answers it)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    raise InvalidTask(f"{where}: expected a string 'prompt' or a list of {{role, content}} 'messages'")


def _choice_example(obj: dict, where: str, line: int) -> ChoiceExample:
    choices, answer = obj["choices"], obj.get("answer")
    if not (
        isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
    ):
        raise InvalidTask(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InvalidTask(
            f"{where}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}"
        )
    return ChoiceExample(line, _messages_of(obj, where), tuple(choices), answer)


def _generation_example(obj: dict, where: str, line: int, extract: Extract) -> GenerationExample:
    raw = obj.get("answer")
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise InvalidTask(f"{where}: 'answer' must be a string or a number, got {raw!r}")
    gold = extract_answer(str(raw), extract)
    if not gold:
        hint = " (for non-numeric answers use the 'text' extraction)" if extract == "number" else ""
        raise InvalidTask(f"{where}: cannot parse an answer from {raw!r}{hint}")
    return GenerationExample(line, _messages_of(obj, where), gold)


def read_task_examples(path: Path, *, extract: Extract = "number", limit: int | None = None) -> list:
    """Validate a task file: all lines must be one kind (generation or multiple choice)."""
    examples: list[GenerationExample | ChoiceExample] = []
    for line, obj in read_jsonl_objects(path):
        where = f"{path}:{line}"
        if "answer" not in obj:
            raise InvalidTask(f"{where}: no 'answer' field")
        ex = (
            _choice_example(obj, where, line)
            if "choices" in obj
            else _generation_example(obj, where, line, extract)
        )
        if examples and type(ex) is not type(examples[0]):
            raise InvalidTask(f"{where}: mixes multiple-choice and generation examples; split the file")
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    return require_nonempty(path, examples)


def load_task(
    path: Path,
    *,
    limit: int | None = None,
    extract: Extract = "number",
    normalize: Normalize = "sum",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    chat: bool = True,
) -> GenerationTask | MultipleChoiceTask:
    examples = read_task_examples(Path(path), extract=extract, limit=limit)
    name = Path(path).stem
    if isinstance(examples[0], ChoiceExample):
        return MultipleChoiceTask(name, examples, normalize=normalize, batch_size=batch_size, chat=chat)
    return GenerationTask(
        name, examples, extract=extract, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat
    )


# ---- tasks -------------------------------------------------------------------------------------------------


def accuracy_result(task: str, records: list[dict]) -> EvalResult:
    correct = sum(r["correct"] for r in records)
    return EvalResult(
        task=task, metric="accuracy", score=correct / len(records), n=len(records), records=records
    )


class GenerationTask:
    def __init__(
        self,
        name: str,
        examples: Sequence[GenerationExample],
        *,
        extract: Extract = "number",
        max_new_tokens: int = 256,
        batch_size: int = 8,
        chat: bool = True,
    ) -> None:
        self.name, self.examples, self.extract = name, list(examples), extract
        self.max_new_tokens, self.batch_size, self.chat = max_new_tokens, batch_size, chat

    def evaluate(self, model: torch.nn.Module, tokenizer: object) -> EvalResult:
        prompts = [prompt_ids(tokenizer, ex.messages, chat=self.chat) for ex in self.examples]
        texts = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
        )
        records = []
        for ex, text in zip(self.examples, texts, strict=True):
            predicted = extract_answer(text, self.extract)
            records.append(
                {
                    "line": ex.line,
                    "output": text,
                    "predicted": predicted,
                    "answer": ex.answer,
                    "correct": predicted == ex.answer,
                }
            )
        return accuracy_result(self.name, records)


class MultipleChoiceTask:
    def __init__(
        self,
        name: str,
        examples: Sequence[ChoiceExample],
        *,
        normalize: Normalize = "sum",
        batch_size: int = 8,
        chat: bool = True,
    ) -> None:
        self.name, self.examples, self.normalize = name, list(examples), normalize
        self.batch_size, self.chat = batch_size, chat

    def _score(self, logprob: float, n_tokens: int, choice: str) -> float:
        if self.normalize == "tokens":
            return logprob / n_tokens
        if self.normalize == "chars":
            return logprob / len(choice)
        return logprob

    def evaluate(self, model: torch.nn.Module, tokenizer: object) -> EvalResult:
        pairs = []  # (context ids, choice ids), choices of one example contiguous
        for ex in self.examples:
            context = prompt_ids(tokenizer, ex.messages, chat=self.chat)
            if not context:
                raise InvalidTask(
                    f"{self.name}:{ex.line}: the prompt encodes to no tokens; nothing to condition on"
                )
            for choice in ex.choices:
                pairs.append((context, list(tokenizer(choice, add_special_tokens=False)["input_ids"])))  # type: ignore[operator]
        logprobs = iter(
            continuation_logprobs(model, pairs, batch_size=self.batch_size, pad_id=pad_token_id(tokenizer))
        )
        lengths = iter(len(choice_ids) for _, choice_ids in pairs)
        records = []
        for ex in self.examples:
            scores = [self._score(next(logprobs), next(lengths), choice) for choice in ex.choices]
            predicted = max(range(len(scores)), key=scores.__getitem__)
            records.append(
                {
                    "line": ex.line,
                    "scores": scores,
                    "predicted": predicted,
                    "answer": ex.answer,
                    "correct": predicted == ex.answer,
                }
            )
        return accuracy_result(self.name, records)


class LossEvaluator:
    """Mean loss per response token on held-out SFT examples (lower is better)."""

    def __init__(self, name: str, examples: Sequence[EncodedExample], *, batch_size: int = 8) -> None:
        self.name, self.examples, self.batch_size = name, list(examples), batch_size

    def evaluate(self, model: torch.nn.Module, tokenizer: object) -> EvalResult:
        device, total, count = next(model.parameters()).device, 0.0, 0
        with eval_mode(model):
            for start in range(0, len(self.examples), self.batch_size):
                batch = collate(self.examples[start : start + self.batch_size], pad_token_id(tokenizer))
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                total += float(token_nll_sum(logits, batch["labels"].to(device)))
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = total / count
        return EvalResult(
            task=self.name,
            metric="eval_loss",
            score=loss,
            n=len(self.examples),
            higher_is_better=False,
            records=[{"tokens": count, "perplexity": math.exp(min(loss, 50.0))}],
        )


def evaluator_for_file(
    path: Path, tokenizer: object, *, max_length: int, options: EvalOptions = EvalOptions()
) -> Evaluator:
    """Held-out data for fine-tuning: a task file (lines with 'answer') scores accuracy, SFT data eval loss.

    A task is scored with every option of `options` (chat template, normalization included), so the
    fine-tune's curve is measured as the cycle measures its scores.
    """
    first = next(read_jsonl_objects(path), (0, {}))[1]
    if "answer" in first:
        return load_task(path, **options.model_dump())
    records = load_sft_records(path)[: options.limit]
    encoded = encode_records(tokenizer, records, max_length)  # type: ignore[arg-type]
    return LossEvaluator(Path(path).stem, encoded, batch_size=options.batch_size)
