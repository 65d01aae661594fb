"""manifest.json: what a folder must contain (sha256 and size of every file) and where it came from.

A manifest is written last, so its presence means the folder is complete; `verify_folder` re-reads
every byte because S3 and local disks can both corrupt data without telling (botocore skips checksums
on multipart objects).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from recycler import __version__
from recycler.checkpoint import MANIFEST_NAME, Checkpoint, open_checkpoint
from recycler.errors import VerificationFailed
from recycler.writer import FileDigest

FORMAT = "recycler/1"
_HASH_BLOCK = 8 * 1024 * 1024


def sha256_file(path: Path) -> FileDigest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    return FileDigest(h.hexdigest(), size)


def write_manifest(folder: Path, body: dict, known: dict[str, FileDigest]) -> dict:
    """Hash the files not in `known`, then write manifest.json listing every file in `folder`."""
    files: dict[str, dict] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(folder).as_posix()
        digest = known.get(rel) or sha256_file(path)
        files[rel] = {"sha256": digest.sha256, "size": digest.size}
    manifest = {"format": FORMAT, "tool": f"recycler {__version__}", **body, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def manifest_digest(folder: Path) -> str:
    """sha256 of manifest.json: a content fingerprint of the whole folder (it lists every file's hash)."""
    return hashlib.sha256((Path(folder) / MANIFEST_NAME).read_bytes()).hexdigest()


def fingerprint(ckpt: Checkpoint, *, full: bool = False) -> dict:
    """Identify an input's content.

    A folder with our manifest is identified by the manifest's hash (free, and `verify` checks it).
    Otherwise `full=True` hashes every weight file; the default hashes the safetensors headers and
    sizes, which is instant but does not see a value change that keeps every shape (kind "structure").
    """
    if ckpt.manifest is not None:
        return {"kind": "manifest", "sha256": manifest_digest(ckpt.path)}
    h = hashlib.sha256()
    for shard in ckpt.shard_files:
        if full:
            h.update(f"{shard.name}:{sha256_file(shard).sha256}\n".encode())
        else:
            h.update(f"{shard.name}:{shard.stat().st_size}\n".encode())
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
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except ValueError as e:
        raise VerificationFailed(f"{folder / MANIFEST_NAME}: not valid JSON ({e})") from e
    listed: dict[str, dict] = manifest.get("files", {})
    problems: list[str] = []
    for rel, want in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing file {rel}")
            continue
        if path.stat().st_size != want.get("size"):
            problems.append(f"{rel}: size {path.stat().st_size} != manifest {want.get('size')}")
            continue
        got = sha256_file(path)
        if got.sha256 != want.get("sha256"):
            problems.append(
                f"{rel}: sha256 mismatch (file {got.sha256[:12]}…, manifest {str(want.get('sha256'))[:12]}…)"
            )
    actual = {
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    }
    for rel in sorted(actual - set(listed)):
        problems.append(f"unlisted file {rel}")
    if problems:
        raise VerificationFailed(f"{folder}: {len(problems)} problem(s): " + "; ".join(problems))
    ckpt = open_checkpoint(folder, require_config=False)  # bytes match; now the structure they describe
    return {
        "files": len(listed),
        "bytes": sum(v["size"] for v in listed.values()),
        "tensors": len(ckpt.tensors),
        "kind": manifest.get("kind"),
    }
