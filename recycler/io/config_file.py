"""Configuration files: one YAML reader for every file a user writes (fine-tuning options, family specs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from recycler.errors import InvalidConfig


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
