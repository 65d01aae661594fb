"""File names and file rules of the folders recycler reads and writes (no torch, no I/O).

Kept apart so that light modules (the flows, the store, the CLI's option parsing) can name a manifest
or decide which files a release carries without importing the tensor stack.
"""

from __future__ import annotations

import re

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# Pickle formats: never opened, never carried into an output or a published artifact.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Shard names in an index: plain file names inside the folder, nothing that could leave it.
SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")
# What a base release may carry (weights, configs, tokenizer, templates); anything else stays behind.
RELEASE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(safetensors|json|jinja|model|txt)$")
RELEASE_GLOBS = ("*.safetensors", "*.json", "*.jinja", "*.model", "*.txt")  # the same rule for the Hub
CONVERT_HINT = (
    "recycler never unpickles weights. Convert once, in an environment you trust: "
    'python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('SRC').save_pretrained('DST')\" (writes safetensors)"
)


def is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


def is_release_file(name: str) -> bool:
    """The one rule for which files of a release folder or prefix are carried on (staged, downloaded)."""
    return bool(RELEASE_FILE.match(name)) and name != MANIFEST_NAME and not is_pickle(name)
