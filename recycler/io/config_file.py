"""Configuration files: one YAML reader for every file a user writes (fine-tuning options, family specs)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from recycler.errors import InvalidConfig

Model = TypeVar("Model", bound=BaseModel)


def read_yaml_mapping(path: Path, what: str = "options") -> dict:
    """The mapping in YAML file `path`; InvalidConfig naming the file if it is missing, invalid or not a
    mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidConfig(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise InvalidConfig(f"{path}: expected a mapping of {what}, found {type(values).__name__}")
    return values


def unknown_fields(values: dict, model: type[BaseModel], where: str = "") -> list[str]:
    """Every key of `values` that `model` does not define, with the valid names, closest first."""
    problems = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            valid = list(model.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
            rest = [v for v in valid if v not in close]
            hint = (
                f"did you mean {' or '.join(close)}? " if close else ""
            ) + f"valid: {', '.join(close + rest)}"
            problems.append(f"unknown field {where}{key!r} ({hint})")
        elif (
            isinstance(value, dict)
            and isinstance(field.annotation, type)
            and issubclass(field.annotation, BaseModel)
        ):
            problems += unknown_fields(value, field.annotation, f"{where}{key}.")
    return problems


def validate_all(model: type[Model], values: dict, source: str, root: str = "<root>") -> Model:
    """`model` validated from `values`, or InvalidConfig listing every problem at once (unknown fields
    first, with the valid names), so a user fixes a file in one pass instead of one error per run."""
    problems = unknown_fields(values, model)
    try:
        validated = model.model_validate(values)
    except ValidationError as exc:
        problems += [
            f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}"
            for e in exc.errors()
            if e["type"] != "extra_forbidden"
        ]
        validated = None
    if problems or validated is None:
        raise InvalidConfig(f"{source}: " + "; ".join(problems))
    return validated
