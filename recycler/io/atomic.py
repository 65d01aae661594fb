"""Publish a folder atomically: build it under a temporary sibling name, fsync, rename into place.

A crash leaves either no destination or a complete one, plus, at worst, its `.<name>.tmp-<id>`
sibling: up to a whole model's size. Each writer holds an OS lock on `.<name>.tmp-<id>.lock` while the
temporary exists (released by the kernel when the writer dies, even by SIGKILL), so a temporary whose
lock can be taken belongs to nobody: the next write to the same destination removes it, and
`recycler doctor --fix` removes any under the store and the workspace. Inputs are never written to: a
destination that is, contains or lies inside an input folder is refused (readers mmap their inputs).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from recycler.errors import OutputExists

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # an overwritten destination, removed once the new one is in place
LOCK_SUFFIX = ".lock"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)(?P<mark>\.tmp-|\.old-)(?P<id>[0-9a-f]{12})$")


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
    reclaim_stale(dest.parent, dest.name)  # what a killed writer of this destination left behind
    token = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{token}"
    with _owner_lock(dest.parent / f".{dest.name}{TMP_MARK}{token}{LOCK_SUFFIX}"):
        tmp.mkdir()
        yield from _build_and_publish(tmp, dest, token, overwrite=overwrite)


def _build_and_publish(tmp: Path, dest: Path, token: str, *, overwrite: bool) -> Iterator[Path]:
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if dest.exists():
            if not overwrite:  # appeared while we were working
                raise OutputExists(f"output {dest} appeared while writing; not replacing it")
            old = dest.parent / f".{dest.name}{OLD_MARK}{token}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _owner_lock(path: Path) -> Iterator[None]:
    """Hold the writer's lock while its temporaries exist; remove the lock file once they are gone."""
    lock = FileLock(path)
    with lock:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def temporaries(root: Path, *, recursive: bool = False) -> list[Path]:
    """Temporary and overwritten folders of atomic writes under `root` (`.<name>.tmp-<id>`, `.<name>.old-<id>`)."""
    found = Path(root).rglob(".*") if recursive else Path(root).glob(".*")
    return sorted(p for p in found if _TEMPORARY.match(p.name) and p.is_dir())


def writer_alive(temporary: Path) -> bool:
    """Whether the writer that made `temporary` still runs (holds its lock). A temporary without a
    lock file belongs to no live writer: writers create the lock first and remove it last."""
    m = _TEMPORARY.match(temporary.name)
    if m is None:
        return False
    lock_path = temporary.parent / f".{m['name']}{TMP_MARK}{m['id']}{LOCK_SUFFIX}"
    if not lock_path.exists():
        return False
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def reclaim(temporary: Path) -> int:
    """Remove a temporary whose writer is gone (and its lock file); returns the bytes freed."""
    m = _TEMPORARY.match(temporary.name)
    if m is None or writer_alive(temporary):
        return 0
    freed = sum(f.stat().st_size for f in temporary.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(temporary, ignore_errors=True)
    (temporary.parent / f".{m['name']}{TMP_MARK}{m['id']}{LOCK_SUFFIX}").unlink(missing_ok=True)
    return freed


def reclaim_stale(parent: Path, name: str) -> int:
    """Remove the temporaries of destination `parent/name` whose writers are gone; bytes freed."""
    return sum(reclaim(t) for t in temporaries(parent) if _TEMPORARY.match(t.name)["name"] == name)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link `src` to `dst` (free, and the source stays untouched), copying across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
