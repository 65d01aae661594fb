"""Per-release working folders: where a cycle's intermediate models live while it runs.

Every output is published into its folder atomically and verified against its manifest before an
earlier attempt's copy is reused, so a re-run after a crash redoes only what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recycler.store.releases import check_id, check_version


@dataclass(frozen=True)
class Workspace:
    """<home>/work/<family>/<variant>/<version>: base, merged start, fine-tunes, Δ, evaluations."""

    root: Path

    @classmethod
    def for_release(cls, home: Path, family: str, variant: str, version: str) -> Workspace:
        root = Path(home) / "work" / check_id(family) / check_id(variant, "variant") / check_version(version)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def version(self) -> str:
        return self.root.name

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def download(self) -> Path:
        return self.root / "download"

    @property
    def prev_diff(self) -> Path:
        return self.root / "prev-diff"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def ft(self) -> Path:
        return self.root / "ft"

    @property
    def baseline(self) -> Path:
        return self.root / "ft-from-base"

    def finetuned(self, role: str) -> Path:
        """The folder of fine-tune `role` ("ft" or "ft-from-base")."""
        return self.ft if role == "ft" else self.baseline

    @property
    def delta(self) -> Path:
        return self.root / "delta"

    @property
    def lora(self) -> Path:
        """Δ_i as a LoRA adapter for this base (the spec's `adapter:` option)."""
        return self.root / "lora"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    def transfer(self, how: str, key: str) -> Path:
        """A manual backport/recycle output, keyed by everything that determines its content."""
        return self.root / f"{how}-{key}"
