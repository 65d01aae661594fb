"""Publish a folder atomically: build it under a temporary sibling name, fsync, rename into place.

A crash leaves either no destination or a complete one (plus, at worst, a `.<name>.tmp-*` sibling that
`recycler doctor` can remove). Inputs are never written to: a destination that is, contains or lies
inside an input folder is refused, because safetensors readers mmap their inputs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from recycler.errors import OutputExists

TMP_MARK = ".tmp-"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(dest: Path, inputs: Iterable[Path] = (), *, overwrite: bool = False) -> Path:
    """Refuse a destination that exists (unless `overwrite`) or that overlaps any input folder."""
    dest = Path(dest).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if dest == src or src.is_relative_to(dest) or dest.is_relative_to(src):
            raise OutputExists(f"output {dest} overlaps input {src}; write to a separate folder")
    if dest.exists() and not overwrite:
        raise OutputExists(f"output {dest} already exists; pass --overwrite to replace it")
    return dest


@contextmanager
def atomic_folder(dest: Path, inputs: Iterable[Path] = (), *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success publish it as `dest`, on any error remove it.

    With `overwrite`, an existing `dest` is swapped out only after the new folder is complete.
    """
    dest = check_destination(dest, inputs, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if dest.exists():
            if not overwrite:  # appeared while we were working
                raise OutputExists(f"output {dest} appeared while writing; not replacing it")
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stale_temporaries(parent: Path) -> list[Path]:
    """Temporary folders left by a crashed writer under `parent` (for cleanup tools)."""
    return sorted(p for p in Path(parent).glob(f".*{TMP_MARK}*") if p.is_dir())


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (free, and the source stays untouched), copying across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
