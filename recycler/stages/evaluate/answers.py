"""Answer extraction for exact-match scoring.

GSM8K-style: a model's answer is the last number it writes, unless it uses the "#### <answer>" marker,
in which case the first number after the last marker wins. Numbers are compared canonically
("1,234.50" equals "1234.5"), so formatting differences are not counted as wrong answers.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

Extract = Literal["number", "text"]

# A number not glued to a word or another number: "-1,234.5", ".5", "12"; "3-4" yields 3 and 4, not -4.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def canonical_number(raw: str) -> str:
    """'1,234.50' -> '1234.5', '-0' -> '0', '1E+2'-free: equal numbers get equal strings."""
    value = Decimal(raw.replace(",", "").replace("−", "-"))
    value = Decimal(0) if value == 0 else value.normalize()
    return format(value, "f")


def extract_number(text: str) -> str | None:
    """GSM8K-style: the first number after the last '####' if there is one, else the last number."""
    text = text.replace("−", "-")  # unicode minus
    tail = text.rsplit("####", 1)[1] if "####" in text else None
    found = _NUMBER.findall(tail if tail is not None else text)
    if not found:
        return None
    try:
        return canonical_number(found[0] if tail is not None else found[-1])
    except InvalidOperation:  # only commas, e.g. "1,,"
        return None


def normalize_text(text: str) -> str:
    return " ".join(text.split()).strip().casefold()


def extract_answer(text: str, mode: Extract) -> str | None:
    """'number': canonical number or None; 'text': whitespace- and case-normalised text."""
    return extract_number(text) if mode == "number" else normalize_text(text)
