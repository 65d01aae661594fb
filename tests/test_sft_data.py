"""SFT data: validation with file:line errors, response-only labels, truncation, collation, example order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recycler.errors import InvalidData
from recycler.stages.finetune.config import ExampleOrder
from recycler.stages.finetune.data import IGNORE_INDEX, SFTRecord, collate, encode_record, load_sft_records
from recycler.toy.tiny import CHAT_TEMPLATE, char_tokenizer


@pytest.fixture(scope="module")
def tok() -> object:
    return char_tokenizer()


def record(messages: list[dict], line: int = 1) -> SFTRecord:
    return SFTRecord(Path("data.jsonl"), line, messages)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_labels_only_on_response_tokens(tok) -> None:
    """<s><|user|>2+2?<|end|><|assistant|>4<|end|>: only '4' and its <|end|> carry loss."""
    enc = encode_record(tok, record([user("2+2?"), assistant("4")]), max_length=64)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert tokens == ["<s>", "<|user|>", "2", "+", "2", "?", "<|end|>", "<|assistant|>", "4", "<|end|>"]
    response = {8, 9}
    for i, (token_id, label) in enumerate(zip(enc.input_ids, enc.labels, strict=True)):
        assert label == (token_id if i in response else IGNORE_INDEX), (i, tokens[i])


def test_multi_turn_masks_every_assistant_turn_and_nothing_else(tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief"},
        user("hi"),
        assistant("yo"),
        user("1+1?"),
        assistant("2"),
    ]
    enc = encode_record(tok, record(messages), max_length=128)
    learned = "".join(
        tok.convert_ids_to_tokens(
            [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
        )
    )
    assert learned == "yo<|end|>2<|end|>"


def test_template_without_generation_markers_gives_the_same_labels(tok) -> None:
    """Templates of real models often lack {% generation %}; the prefix-rendering fallback must agree."""
    plain = char_tokenizer()
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    messages = [user("hi"), assistant("yo"), user("1+1?"), assistant("2")]
    assert encode_record(plain, record(messages), 128) == encode_record(tok, record(messages), 128)


def test_truncation_keeps_the_start_and_rejects_prompt_only_examples(tok) -> None:
    enc = encode_record(tok, record([user("ab"), assistant("xyz")]), max_length=8)
    assert enc.truncated and len(enc.input_ids) == 8 and enc.labels[-1] == enc.input_ids[-1]
    with pytest.raises(InvalidData, match=r"data\.jsonl:7: the prompt alone fills max_length=6"):
        encode_record(tok, record([user("a long prompt"), assistant("x")], line=7), max_length=6)


def test_both_record_formats_load(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "response": "r"})
        + "\n\n"
        + json.dumps({"messages": [user("u"), assistant("a")]})
        + "\n"
    )
    records = load_sft_records(path)
    assert [r.line for r in records] == [1, 3]  # blank lines are skipped but still counted
    assert records[0].messages == [user("p"), assistant("r")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "response": "r"', r"d\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"d\.jsonl:2: expected a JSON object"),
        ('{"text": "x"}', r"d\.jsonl:2: expected 'messages' or 'prompt' \+ 'response'"),
        ('{"prompt": "p", "response": ""}', r"d\.jsonl:2: .*response non-empty"),
        ('{"messages": [{"role": "user", "content": "u"}]}', r"d\.jsonl:2: no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"d\.jsonl:2: messages\[0\]"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "fine"}) + "\n" + line + "\n")
    with pytest.raises(InvalidData, match=message):
        load_sft_records(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidData, match="does not exist"):
        load_sft_records(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidData, match="contains no examples"):
        load_sft_records(tmp_path / "empty.jsonl")


def test_collate_pads_right_and_masks_padding(tok) -> None:
    short = encode_record(tok, record([user("a"), assistant("b")]), 64)
    long = encode_record(tok, record([user("abcd"), assistant("efg")]), 64)
    batch = collate([short, long], pad_id=0)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == 0).all()
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))


def test_example_order_is_a_pure_function_of_seed_and_step() -> None:
    order = ExampleOrder(examples=10, batch_size=4, seed=3)
    stream = [i for step in range(5) for i in order.step_indices(step)]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch reshuffles
    assert ExampleOrder(10, 4, 3).step_indices(3) == order.step_indices(3)  # resumable without state
    assert ExampleOrder(10, 4, 4).step_indices(0) != order.step_indices(0)


def test_a_tokenizer_that_loses_the_text_is_refused_before_training() -> None:
    """Every response becomes unknown tokens (a tokenizer without digits): training would "converge"
    to a small loss on nothing. Refused with the numbers; a sane tokenizer passes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from recycler.stages.finetune.data import encode_records
    from recycler.toy.tiny import SPECIAL_TOKENS

    records = [record([user(f"Q:{a}+{a}?"), assistant(str(2 * a))], line=a + 1) for a in range(10, 40)]
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *"Q:+?"])}  # no digits at all
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    lossy = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    lossy.chat_template = CHAT_TEMPLATE
    with pytest.raises(
        InvalidData,
        match=r"loses the training text: 30 of 30 .*data.jsonl:11: '20' → 3 response tokens decoding to ''",
    ):
        encode_records(lossy, records, max_length=64)
    assert len(encode_records(char_tokenizer(), records, max_length=64)) == 30
