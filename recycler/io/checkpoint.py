"""Open an HF model (or Δ) folder lazily and validate it completely before anything is computed.

Tensors are addressed by name through the index, never by shard file name: two versions of a model
may shard differently. Nothing is loaded here; `stream.ChunkReader` maps byte ranges on demand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from recycler.delta.math import tensor_family
from recycler.errors import InvalidCheckpoint
from recycler.io.layout import (
    CONVERT_HINT,
    GENERATION_CONFIG,
    INDEX_NAME,
    MANIFEST_NAME,
    SHARD_NAME,
    TOKENIZER_FILES,
    is_pickle,
)
from recycler.io.safetensors import TensorEntry, read_header


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidCheckpoint(f"{path}: unreadable or invalid JSON ({e})") from e


@dataclass
class Checkpoint:
    """A validated folder: every tensor's location, the config, and (if present) our manifest."""

    path: Path
    tensors: dict[str, TensorEntry]  # in (shard, offset) order: sequential reads
    config: dict | None
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shard_files(self) -> list[Path]:
        return sorted({e.file for e in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config or {}
        return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head shares the embedding's weights.

        The config decides when it has the key (top level or `text_config`). Without it the answer is
        the model class's default (GPT-2 and Gemma tie; older `save_pretrained` dropped a key equal to
        it), which the tensors reveal without importing transformers: a vocabulary embedding with no
        output head stored beside it is tied (the head is the embedding); a stored head is untied.
        """
        return resolve_tied(self.config, self.tensors, self.vocab_size)

    def side_files(self) -> list[Path]:
        """Tokenizer files and generation config present in the folder (copied into outputs)."""
        return [self.path / n for n in (*TOKENIZER_FILES, GENERATION_CONFIG) if (self.path / n).is_file()]


def resolve_tied(config: dict | None, tensors: Mapping[str, TensorEntry], vocab_size: int | None) -> bool:
    """`Checkpoint.tied_embeddings` for any config and tensor set (a Δ folder keeps its source's config)."""
    cfg = config or {}
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c, dict) and c.get("tie_word_embeddings") is not None:
            return bool(c["tie_word_embeddings"])
    return tied_by_tensors(tensors, vocab_size)


def tied_by_tensors(tensors: Mapping[str, TensorEntry], vocab_size: int | None) -> bool:
    """A vocabulary-sized embedding matrix and no output head: the head is tied to it."""

    def vocab_matrices(family: str) -> list[str]:
        return [
            n
            for n, e in tensors.items()
            if tensor_family(n) == family
            and len(e.shape) == 2
            and (not vocab_size or e.shape[0] == vocab_size)
        ]

    return bool(vocab_matrices("embed")) and not vocab_matrices("lm_head")


def open_checkpoint(path: Path, *, require_config: bool = True) -> Checkpoint:
    """Validate a folder and index its tensors. Raises InvalidCheckpoint naming the file and problem."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidCheckpoint(
            f"{path}: not a folder (expected an HF model folder with config.json and *.safetensors)"
        )
    notes: list[str] = []
    index_path = path / INDEX_NAME
    if index_path.exists():
        tensors = _from_index(path, index_path)
    else:
        singles = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(singles) == 1:
            tensors, _ = read_header(singles[0])
        elif len(singles) > 1:
            raise InvalidCheckpoint(
                f"{path}: {len(singles)} .safetensors files but no {INDEX_NAME} to say which tensor lives where"
            )
        else:
            pickles = sorted(p.name for p in path.iterdir() if is_pickle(p.name))
            if pickles:
                raise InvalidCheckpoint(
                    f"{path}: only pickle weights found ({', '.join(pickles)}). {CONVERT_HINT}"
                )
            raise InvalidCheckpoint(f"{path}: no *.safetensors weights found")
    ignored = sorted(p.name for p in path.iterdir() if is_pickle(p.name))
    if ignored:
        notes.append(f"ignored pickle files (never opened): {', '.join(ignored)}")
    config = None
    cfg_path = path / "config.json"
    if cfg_path.exists():
        config = _load_json(cfg_path)
        if not isinstance(config, dict):
            raise InvalidCheckpoint(f"{cfg_path}: config must be a JSON object")
    elif require_config:
        raise InvalidCheckpoint(
            f"{path}: config.json is missing (needed for the architecture and vocabulary size)"
        )
    manifest = None
    if (path / MANIFEST_NAME).exists():
        manifest = _load_json(path / MANIFEST_NAME)
        if not isinstance(manifest, dict):
            raise InvalidCheckpoint(f"{path / MANIFEST_NAME}: manifest must be a JSON object")
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].file.name, kv[1].start)))
    return Checkpoint(path, ordered, config, manifest, notes)


def _from_index(folder: Path, index_path: Path) -> dict[str, TensorEntry]:
    index = _load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidCheckpoint(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if not SHARD_NAME.match(s)]
    if bad:
        raise InvalidCheckpoint(
            f"{index_path}: refusing shard names {bad}: shards must be plain *.safetensors file names inside the "
            "folder (no paths, '..', drive letters, backslashes or other extensions)"
        )
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise InvalidCheckpoint(f"{index_path}: index lists missing shard(s): {missing}")
    tensors: dict[str, TensorEntry] = {}
    for shard in shards:
        entries, _ = read_header(folder / shard)
        for name, entry in entries.items():
            if name in tensors:
                raise InvalidCheckpoint(
                    f"{folder / shard}: tensor {name!r} also stored in {tensors[name].file.name}"
                )
            tensors[name] = entry
    listed, stored = set(weight_map), set(tensors)
    wrong = sorted(n for n in listed & stored if tensors[n].file.name != weight_map[n])
    if listed != stored or wrong:
        parts = []
        if listed - stored:
            parts.append(f"listed but absent: {sorted(listed - stored)[:10]}")
        if stored - listed:
            parts.append(f"stored but not listed: {sorted(stored - listed)[:10]}")
        if wrong:
            parts.append(f"listed in the wrong shard: {wrong[:10]}")
        raise InvalidCheckpoint(f"{index_path}: index/shard key mismatch; " + "; ".join(parts))
    return tensors


def load_vocab(folder: Path) -> dict[str, int] | None:
    """Token string -> id for the tokenizer in `folder` (added tokens included), or None if it has none."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise InvalidCheckpoint(f"{tj}: cannot load tokenizer ({e})") from e
    if any((folder / n).is_file() for n in ("tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False).get_vocab()
    return None
