"""A family's release-cycle settings (`CycleSpec`), read from the YAML file an operator writes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from recycler.errors import InvalidConfig, RecyclerError
from recycler.io.config_file import read_yaml_mapping
from recycler.stages.finetune.config import FinetuneConfig
from recycler.store.releases import check_id


class EvalSettings(BaseModel):
    """How a model is scored on the family's task (the same names as `recycler evaluate`'s options)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Path
    limit: int | None = None
    extract: Literal["number", "text"] = "number"
    max_new_tokens: int = 256
    batch_size: int = 8


class CycleSpec(BaseModel):
    """What a family's release cycle needs besides the release itself."""

    model_config = ConfigDict(frozen=True)

    family: str
    variant: str = "instruct"
    mode: Literal["iterative", "direct"] = "iterative"
    train: Path
    eval_task: Path
    finetune: FinetuneConfig = FinetuneConfig()
    alpha: float = 1.0
    max_relative_norm: float = 0.5
    gate_margin: float = 0.0
    precheck_min_score: float | None = None
    precheck_sample: Path | None = None
    baseline: bool = False  # also fine-tune from the plain base: savings report (and Δ^dir in direct mode)
    pick_best: bool = True  # with a baseline, the better of FT(M_i + Δ) and FT(M_i) is the candidate
    eval_limit: int | None = None

    @property
    def evaluation(self) -> EvalSettings:
        ft = self.finetune
        return EvalSettings(
            task=self.eval_task,
            limit=self.eval_limit,
            extract=ft.eval_extract,
            max_new_tokens=ft.eval_max_new_tokens,
            batch_size=ft.eval_batch_size,
        )

    def model_post_init(self, _: object) -> None:
        check_id(self.family)
        check_id(self.variant, "variant")
        if self.mode == "direct" and not self.baseline:
            raise RecyclerError("mode 'direct' recycles FT(base) − base, so it needs baseline=True")


def load_spec(path: Path) -> CycleSpec:
    """A CycleSpec from YAML; relative data paths are taken relative to the YAML file."""
    values = read_yaml_mapping(path, "CycleSpec fields")
    for key in ("train", "eval_task", "precheck_sample"):
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str((Path(path).parent / values[key]).resolve())
    try:
        return CycleSpec.model_validate(values)
    except ValidationError as e:
        raise InvalidConfig(f"{path}: {e}") from None
