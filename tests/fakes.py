"""Fake trainer and scorer: the release cycle's every branch, exercised without training anything.

`FakeTrainer` writes a "fine-tune" by perturbing the start model (a real HF folder, so apply, extract,
publish and register all run for real) and a training record whose accuracy curve comes from a table.
`FakeScorer` answers from the same kind of table, keyed by (release version, workspace role), so a
test states the scores each branch needs: "the baseline wins", "nothing beats the champion", …
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recycler.errors import FinetuneFailed
from recycler.registry.client import Registry
from recycler.service.services import Services
from recycler.service.spec import CycleSpec, EvalSettings
from recycler.settings import Settings
from recycler.stages.gate import Evidence
from recycler.store import open_store
from recycler.toy.tiny import perturb_model

ROLE_OF_FOLDER = {"base": "base", "merged": "merged", "ft": "ft", "ft-from-base": "ft_from_base"}
Scores = Callable[[str, str], float]  # (version, role) → score


def _where(model: Path) -> tuple[str, str]:
    """(version, role) of a workspace folder <home>/work/<family>/<variant>/<version>/<role>."""
    model = Path(model)
    role = ROLE_OF_FOLDER.get(model.name, model.name.split("-", 1)[0])
    return model.parent.name, role


@dataclass
class FakeTrainer:
    """`failures`: release version → how many more times its fine-tune fails (a lost GPU node)."""

    scores: Scores
    steps: int = 30
    calls: list[tuple[Path, Path]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def finetune(self, start: Path, dest: Path, spec: CycleSpec, *, run_id: str | None = None) -> None:
        self.calls.append((Path(start), Path(dest)))
        version, role = _where(dest)
        if self.failures.get(version, 0) > 0:
            self.failures[version] -= 1
            raise FinetuneFailed(f"fine-tuning {start} exited with code 1 (the fake GPU node was lost)")
        final = self.scores(version, role)
        tmp = dest.parent / f".{dest.name}.fake"
        shutil.rmtree(tmp, ignore_errors=True)
        perturb_model(start, tmp, scale=0.02, seed=zlib.crc32(f"{version}/{role}".encode()))
        curve = [[s, final * s / self.steps] for s in range(0, self.steps + 1, 10)]
        record = {"curve": curve, "steps": self.steps, "wall_time_s": 1.0 * self.steps, "loss_per_step": []}
        (tmp / "training_record.json").write_text(json.dumps(record))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)


@dataclass
class FakeScorer:
    """Per-example outcomes too: of `n` examples, the first round(score·n) are correct, so two models'
    paired difference is exactly the difference of their scores (a tie pairs to zero)."""

    scores: Scores
    calls: list[tuple[str, str]] = field(default_factory=list)
    n: int = 200

    def score(self, model: Path, evaluation: EvalSettings) -> Evidence:
        where = _where(model)
        self.calls.append(where)
        score = self.scores(*where)
        k = round(score * self.n)
        return Evidence(k / self.n, tuple([1] * k + [0] * (self.n - k)))


def table(values: dict[tuple[str, str], float], default: float = 0.0) -> Scores:
    """Scores from {(version, role): score}; bases score `default` unless listed."""
    return lambda version, role: values.get((version, role), default)


def services(settings: Settings, scores: dict, **trainer: object) -> Services:
    """Services of a test: the fakes above on `scores`, a local store and the settings' registry."""
    return Services(
        settings,
        open_store(settings),
        Registry(settings.tracking_uri, backoff=0.2),
        FakeTrainer(table(scores), **trainer),  # type: ignore[arg-type]
        FakeScorer(table(scores)),
    )


def aliases(svc: Services, name: str) -> dict[str, str]:
    """alias → version of one model, `kind:family:variant`."""
    return {a: v.version for v in svc.registry.versions(*name.split(":")) for a in v.aliases}
