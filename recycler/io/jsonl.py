"""Read JSONL files strictly: every problem names the file and the 1-based line number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from recycler.errors import InvalidData


def read_jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; raise `InvalidData` on the first bad one.

    Blank lines are allowed (editors add them); anything else must be one JSON object per line.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"data file {path} does not exist (or is not a file)")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidData(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise InvalidData(f"{path}:{number}: expected a JSON object, found {type(obj).__name__}")
            yield number, obj


def require_nonempty(path: Path, items: list) -> list:
    """An empty data file is always a mistake (wrong path, failed export), never "train on nothing"."""
    if not items:
        raise InvalidData(f"data file {path} contains no examples")
    return items
