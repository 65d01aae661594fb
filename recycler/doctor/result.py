"""One finding of `recycler doctor`, scrubbed of credentials when it is built."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, field_validator

from recycler.redact import redact

Status = Literal["ok", "warn", "fail"]
SHOWN = 5  # problems spelled out in `detail`; all of them are in `items`


class CheckResult(BaseModel):
    """`fixable`: `--fix` would repair it; `fixed`: this run repaired it (status is then the state after
    the repair). `detail` and `items` are scrubbed of credentials on construction."""

    name: str
    status: Status
    detail: str = ""
    fixable: bool = False
    fixed: bool = False
    items: list[str] = []

    @field_validator("detail")
    @classmethod
    def _scrub(cls, v: str) -> str:
        return redact(v)

    @field_validator("items")
    @classmethod
    def _scrub_items(cls, v: list[str]) -> list[str]:
        return [redact(i) for i in v]


def listing(items: list[str]) -> str:
    more = f" … and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def hours(td: timedelta) -> str:
    return f"{td.total_seconds() / 3600:g} h"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
