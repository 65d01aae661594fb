"""manifest.json: what a folder must contain (sha256 and size of every file) and where it came from.

This module is the one place that hashes and verifies files. A manifest is written last, so its
presence means the folder is complete; verification re-reads every byte because S3 and local disks can
both corrupt data without telling (botocore skips checksums on multipart objects). Manifests read from
anywhere (a folder, an S3 object) go through `parse_manifest`, which confines every listed path to its
folder before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from recycler import __version__
from recycler.errors import VerificationFailed
from recycler.io.checkpoint import Checkpoint, open_checkpoint
from recycler.io.direct import read_file_blocks
from recycler.io.layout import MANIFEST_NAME

FORMAT = "recycler/1"
HASH_BLOCK = 1 << 20  # OpenSSL's sha256 (SHA-NI) is fastest here on 1 MiB updates
HEX64 = re.compile(r"^[0-9a-f]{64}$")
Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


@dataclass(frozen=True)
class FileEntry:
    """One file a manifest lists: its path relative to the folder, sha256 and size."""

    rel: str
    sha256: str
    size: int


# ---- hashing -----------------------------------------------------------------------------------------


def sha256_stream(blocks: Iterable[bytes | memoryview]) -> FileDigest:
    """sha256 and byte count of a stream of blocks (a file, an S3 body, a tee of a copy)."""
    h, size = hashlib.sha256(), 0
    for block in blocks:
        h.update(block)
        size += len(block)
    return FileDigest(h.hexdigest(), size)


def read_blocks(path: Path, block: int = HASH_BLOCK) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(block):
            yield chunk


def sha256_file(path: Path) -> FileDigest:
    """sha256 of a file; bytes not already in the page cache are read with O_DIRECT (not cached)."""
    return sha256_stream(read_file_blocks(path))


def sha256_files(paths: list[Path], workers: int = 2) -> list[FileDigest]:
    """Hash several files at once: one file's sha256 is sequential, different files are not
    (hashlib releases the GIL on large updates)."""
    if len(paths) <= 1 or workers <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(paths)), thread_name_prefix="sha256") as pool:
        return list(pool.map(sha256_file, paths))


def copy_verified(src: Path, dst: Path, entry: FileEntry, on_progress: Progress = None) -> str | None:
    """Copy one file while hashing it (one read); return a problem naming the file, or None."""
    dst.parent.mkdir(parents=True, exist_ok=True)

    def tee() -> Iterable[bytes]:
        with open(dst, "wb") as out:
            for block in read_blocks(src):
                out.write(block)
                if on_progress:
                    on_progress(len(block))
                yield block

    return mismatch(str(src), entry, sha256_stream(tee()))


def mismatch(where: str, entry: FileEntry, got: FileDigest) -> str | None:
    if got.size != entry.size:
        return f"{where}: size {got.size} != manifest {entry.size}"
    if got.sha256 != entry.sha256:
        return f"{where}: sha256 mismatch (got {got.sha256[:12]}…, manifest {entry.sha256[:12]}…)"
    return None


def fail_if(problems: list[str], what: str) -> None:
    if problems:
        raise VerificationFailed(f"{what}: {len(problems)} problem(s): " + "; ".join(problems))


# ---- reading -------------------------------------------------------------------------------------------


def safe_relpath(rel: object) -> str:
    """A manifest-listed path, confined to its folder: relative, POSIX, no `..`, `.`, `:`, `\\` or NUL."""
    if not isinstance(rel, str) or not rel or len(rel) > 512 or "\\" in rel or "\x00" in rel:
        raise VerificationFailed(f"manifest lists an unsafe path {rel!r}")
    parts = rel.split("/")  # not PurePosixPath: it silently drops "." and empty parts
    if any(p in ("", ".", "..") or ":" in p for p in parts):
        raise VerificationFailed(f"manifest lists an unsafe path {rel!r}")
    if parts[-1] == MANIFEST_NAME:
        raise VerificationFailed(f"manifest lists {rel!r}; manifests cannot list a manifest")
    return rel


def parse_manifest(raw: bytes, where: str) -> tuple[dict, tuple[FileEntry, ...]]:
    """Decode manifest bytes and validate every listed path, digest and size."""
    try:
        body = json.loads(raw)
        files = tuple(
            FileEntry(safe_relpath(rel), _digest(v["sha256"]), int(v["size"]))
            for rel, v in sorted(body["files"].items())
        )
    except VerificationFailed as e:
        raise VerificationFailed(f"{where}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VerificationFailed(f"{where}: malformed {MANIFEST_NAME} ({type(e).__name__}: {e})") from None
    if any(f.size < 0 for f in files):
        raise VerificationFailed(f"{where}: negative file size in {MANIFEST_NAME}")
    return body, files


def _digest(value: object) -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise ValueError(f"{value!r} is not a lowercase hex sha256")
    return value


def read_manifest(folder: Path) -> tuple[dict, tuple[FileEntry, ...]]:
    path = Path(folder) / MANIFEST_NAME
    return parse_manifest(path.read_bytes(), str(path))


def manifest_digest(folder: Path) -> str:
    """sha256 of manifest.json: a content fingerprint of the whole folder (it lists every file's hash)."""
    return hashlib.sha256((Path(folder) / MANIFEST_NAME).read_bytes()).hexdigest()


def listed_file_problems(folder: Path, files: Iterable[FileEntry], *, workers: int = 2) -> list[str]:
    """Missing, resized or altered files among `files` (sizes first: no hashing of a wrong-size file)."""
    present, problems = [], []
    for f in files:
        path = folder / f.rel
        if not path.is_file():
            problems.append(f"missing file {f.rel}")
        elif path.stat().st_size != f.size:
            problems.append(f"{f.rel}: size {path.stat().st_size} != manifest {f.size}")
        else:
            present.append(f)
    digests = sha256_files([folder / f.rel for f in present], workers)
    problems += [p for f, got in zip(present, digests, strict=True) if (p := mismatch(f.rel, f, got))]
    return problems


# ---- writing -------------------------------------------------------------------------------------------


def write_manifest(folder: Path, body: dict, known: dict[str, FileDigest]) -> dict:
    """Hash the files not in `known`, then write manifest.json listing every file in `folder`."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    rels = [p.relative_to(folder).as_posix() for p in paths]
    todo = [p for p, rel in zip(paths, rels, strict=True) if rel not in known]
    hashed = dict(zip(todo, sha256_files(todo), strict=True))
    files = {}
    for path, rel in zip(paths, rels, strict=True):
        digest = known.get(rel) or hashed[path]
        files[rel] = {"sha256": digest.sha256, "size": digest.size}
    manifest = {"format": FORMAT, "tool": f"recycler {__version__}", **body, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---- checkpoints ---------------------------------------------------------------------------------------


def fingerprint(ckpt: Checkpoint, *, full: bool = False) -> dict:
    """Identify an input's content.

    A folder with our manifest is identified by the manifest's hash (free, and `verify` checks it).
    Otherwise `full=True` hashes every weight file; the default hashes the safetensors headers and
    sizes, which is instant but does not see a value change that keeps every shape (kind "structure").
    """
    if ckpt.manifest is not None:
        return {"kind": "manifest", "sha256": manifest_digest(ckpt.path)}
    h = hashlib.sha256()
    shards = ckpt.shard_files
    digests = sha256_files(shards) if full else [None] * len(shards)
    for shard, digest in zip(shards, digests, strict=True):
        h.update(f"{shard.name}:{digest.sha256 if digest else shard.stat().st_size}\n".encode())
    entries = sorted((e.name, e.dtype, e.shape) for e in ckpt.tensors.values())
    h.update(json.dumps(entries).encode())
    return {"kind": "sha256" if full else "structure", "sha256": h.hexdigest()}


def verify_folder(folder: Path) -> dict:
    """Check a folder against its manifest: every listed file present with matching size and sha256,
    no unlisted files, and a structurally valid checkpoint. Raises VerificationFailed listing all problems.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        ckpt = open_checkpoint(folder, require_config=False)
        raise VerificationFailed(
            f"{folder}: no {MANIFEST_NAME}, so there is nothing to verify against (the safetensors structure "
            f"is valid: {len(ckpt.tensors)} tensors). Folders written by recycler always carry one."
        )
    body, files = read_manifest(folder)
    problems = listed_file_problems(folder, files)
    actual = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    }
    problems += [f"unlisted file {rel}" for rel in sorted(actual - {f.rel for f in files})]
    fail_if(problems, str(folder))
    ckpt = open_checkpoint(folder, require_config=False)  # bytes match; now the structure they describe
    return {
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "tensors": len(ckpt.tensors),
        "kind": body.get("kind"),
    }
