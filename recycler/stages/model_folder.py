"""Open an HF model folder for training or evaluation, refusing anything we cannot use safely.

The checks run before any weights are read, so a wrong folder fails in a second with a message that
says what is missing, instead of deep inside transformers (or, worse, by silently downloading from the
hub or unpickling a `.bin`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from recycler.errors import InvalidModelFolder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_model_folder(folder: Path) -> Path:
    """Require config.json and safetensors weights; pickle-only folders are refused, never loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidModelFolder(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise InvalidModelFolder(f"model folder {folder} has no config.json; is this an HF model folder?")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found pickle weights {pickles}; convert them to safetensors first)" if pickles else ""
        raise InvalidModelFolder(f"model folder {folder} has no *.safetensors weights{hint}")
    return folder


def load_tokenizer(folder: Path, *, require_chat_template: bool = True) -> PreTrainedTokenizerBase:
    """Load the folder's own tokenizer (never the hub's) and check it has a chat template if required."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidModelFolder(
            f"model folder {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files from the base model into it"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if require_chat_template and not tokenizer.chat_template:
        raise InvalidModelFolder(
            f"tokenizer in {folder} has no chat template; add one (chat_template.jinja or 'chat_template' "
            "in tokenizer_config.json), e.g. copied from the instruct model of the same family"
        )
    return tokenizer


def load_causal_lm(folder: Path, *, dtype: str = "float32", zero_dropout: bool = False) -> PreTrainedModel:
    """Load weights from safetensors only, no remote code; optionally force every dropout to 0."""
    folder = check_model_folder(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if zero_dropout:
        for key, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")):
                setattr(config, key, 0.0)
    return AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, use_safetensors=True, local_files_only=True
    )


def dropout_settings(config: object) -> dict[str, float]:
    """The config's dropout probabilities, so they can be restored in the published config."""
    return {
        k: v
        for k, v in config.to_dict().items()  # type: ignore[attr-defined]
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop"))
    }
