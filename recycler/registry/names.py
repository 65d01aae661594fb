"""Registered-model names, aliases and the tag vocabulary: the registry's schema, in one place.

Name scheme (family and variant match `^[a-z0-9][a-z0-9._-]{0,63}$`, e.g. family `qwen2.5-7b`,
variant `math`):

    {family}-base              releases of the base model (one version per base release)
    {family}-{variant}-ft      fine-tunes
    {family}-{variant}-diff    Δ = fine-tuned − base, extracted from an ft version
    {family}-{variant}-merged  base + Δ (a recycled or backported model)
    {family}-{variant}-lora    a Δ in PEFT LoRA adapter form, for the base it was made for

Aliases: `next-diff` on the diff model (the Δ the next cycle applies), `champion` and
`approved-<base_version>` (the fine-tune the gate promoted on that release) on the ft model.
(`latest` is reserved by MLflow.) The per-release alias sorts before `champion`: MLflow's models list
shows one alias per model, the last of the newest version's in the server's order (alphabetical on
SQLite), and that one should be `champion`.

`TAGS` documents every tag recycler writes on a version (the README's table is tested against it);
`Lineage` is the typed form of the tags that say where a version comes from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from recycler.errors import RegistryError
from recycler.io.manifest import HEX64
from recycler.store.artifact import ArtifactRef

KINDS = ("base", "diff", "ft", "merged", "lora")
ARTIFACT_KINDS = {
    "base": ("base", "model"),
    "diff": ("diff",),
    "ft": ("model",),
    "merged": ("model",),
    "lora": ("adapter",),
}
NEXT_DIFF, CHAMPION = "next-diff", "champion"
LOCK_PREFIX = "_recycler-lock-"
PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RELEASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
ALIAS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,254}$")
METRIC = re.compile(r"^[A-Za-z0-9_.\-/]{1,100}$")

# Every tag on a recycler model version: name → what it says. Identity tags are set at registration
# and never change; lineage tags hold `name/version` references; status tags are set as a cycle runs.
TAGS: dict[str, str] = {
    # identity
    "kind": "base, ft, diff, merged or lora (the registered model's kind)",
    "family": "model family, e.g. `llama-3-8b`",
    "variant": "fine-tuned variant, e.g. `instruct` (empty on bases)",
    "base_version": "the base release this version belongs to (for a Δ: the base it was extracted against)",
    "manifest_sha256": "sha256 of the artifact's manifest.json: its address and the deduplication key",
    "artifact_uri": "where the weights are (s3://…/<kind>/<digest> or a local store path)",
    "artifact_kind": "artifact store kind: base, model, diff or adapter",
    "release_fingerprint": "content fingerprint of the base release the cycle processed (a re-published version differs)",
    # lineage (references `name/version`)
    "parent_diff": "the Δ this model started from (M_i + Δ): on merged models and recycled fine-tunes",
    "source_ft": "on a Δ: the fine-tune it was extracted from (Δ = source_ft − base)",
    "source_merged": "on a recycled fine-tune: the merged start M_i + Δ it was trained from",
    "cycle_parent_diff": "on a Δ: the Δ the cycle that produced it applied (the chain of Δ^iter)",
    "source_diff": "on a LoRA adapter: the exact Δ it is the low-rank form of",
    "diff_mode": "on a Δ: iterative (Δ^iter, from the recycled fine-tune) or direct (Δ^dir, from FT(M_i))",
    "role": "on a fine-tune: ft (first cycle), adopted (the spec's initial_finetune, first cycle), recycled-ft (FT(M_i + Δ)) or ft-from-base (the FT(M_i) baseline)",
    "transfer": "on a merged model or adapter made by hand: backport or recycle",
    "composed_of": "on a merged model made from several Δs: every Δ and its α (`name/version×α; …`), in the order summed",
    "diff_base_version": "on a backported/recycled model: the base release the applied Δ came from",
    "run_id": "the MLflow run that produced the version",
    # status
    "gate": "on a cycle's fine-tunes: `promoted` or `refused: <reason>` (the gate's decision)",
    "gate_champion_before": "the champion's score the gate compared against (`none` on the first cycle)",
    "gate_champion": "the champion version the gate compared against (`none` on the first cycle)",
    "gate_evidence": "the gate's rule and paired differences with their confidence intervals",
    "cycle_status": "`complete` once the cycle that registered this fine-tune has finished",
    "eval_provenance": "digest of what the score measured: the task file's content and the evaluation settings",
    "eval_outcomes": "per-example results (1 = correct, task order): zlib-compressed bits, base64",
    "eval_n": "number of examples the score was measured on",
    "adapter": "on a Δ: its LoRA adapter form (`{family}-{variant}-lora/N`), scored next to it",
    "lora_ranks": "on a LoRA adapter: how its ranks were chosen and the range they took, e.g. `rank 16` or `energy 0.99: 3-12`",
    "lora_error": "on a LoRA adapter: ‖Δ − BA‖/‖Δ‖ over every tensor of its Δ (what the low rank cost)",
    "eval.<metric>": "evaluation score of this version on the family's task, e.g. eval.accuracy",
}
REF_TAGS = ("source_ft", "parent_diff", "source_merged", "cycle_parent_diff", "source_diff")
IDENTITY_TAGS = (
    "kind",
    "family",
    "variant",
    "base_version",
    "manifest_sha256",
    "artifact_uri",
    "artifact_kind",
    "release_fingerprint",
)
EVAL_TAGS = ("eval_provenance", "eval_outcomes", "eval_n")
STATUS_TAGS = (
    "composed_of",
    "gate",
    "gate_champion_before",
    "gate_champion",
    "gate_evidence",
    "cycle_status",
    "adapter",
    "lora_ranks",
    "lora_error",
    *EVAL_TAGS,
)


@dataclass(frozen=True)
class Lineage:
    """Where a version comes from (typed tags; None = not applicable)."""

    parent_diff: str | None = None
    source_ft: str | None = None
    source_merged: str | None = None
    cycle_parent_diff: str | None = None
    source_diff: str | None = None
    diff_mode: Literal["iterative", "direct"] | None = None
    role: Literal["ft", "adopted", "recycled-ft", "ft-from-base"] | None = None
    transfer: Literal["backport", "recycle"] | None = None
    diff_base_version: str | None = None
    run_id: str | None = None

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if v}


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    kind: str
    family: str
    variant: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    run_id: str | None = None

    @property
    def reference(self) -> str:
        """`name/version`, the form stored in lineage tags."""
        return f"{self.name}/{self.version}"

    @property
    def digest(self) -> str:
        return self.tags.get("manifest_sha256", "")

    @property
    def artifact(self) -> ArtifactRef:
        """The verified artifact this version points at."""
        return ArtifactRef(self.tags["artifact_kind"], self.tags["manifest_sha256"], self.source)

    def score(self, metric: str = "accuracy") -> float | None:
        value = self.tags.get(f"eval.{metric}")
        return float(value) if value is not None else None

    @property
    def fingerprint(self) -> str:
        """The release fingerprint the version was registered for ('' before recycler recorded it)."""
        return self.tags.get("release_fingerprint", "")


def check_part(what: str, value: str) -> str:
    if not isinstance(value, str) or not PART.match(value):
        raise RegistryError(f"{what} {value!r} must match {PART.pattern} (lowercase, digits, . _ -)")
    return value


def check_model_name(name: str) -> str:
    """A registered-model name that is safe inside a search filter (no quotes, no spaces)."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$", name or ""):
        raise RegistryError(
            f"model name {name!r} is not a recycler model name ({{family}}-{{variant}}-{{kind}})"
        )
    return name


def check_digest(digest: str) -> str:
    if not HEX64.match(digest or ""):
        raise RegistryError(f"{digest!r} is not a manifest sha256")
    return digest


def model_name(kind: str, family: str, variant: str | None = None) -> str:
    """The registered-model name for `kind` (see the module docstring)."""
    if kind not in KINDS:
        raise RegistryError(f"model kind {kind!r} is not one of {', '.join(KINDS)}")
    check_part("family", family)
    if kind == "base":
        return f"{family}-base"
    return f"{family}-{check_part('variant', variant or '')}-{kind}"


APPROVED = "approved"


def champion_alias(base_version: str) -> str:
    """`approved-<base_version>`, one alias per version and never two versions on one alias (`V5` and
    `v5`, `v1.0` and `v1-0` are different releases): aliases allow only [a-z0-9_-], so '_' is written
    '__', '.' '_-' and an upper-case letter '_' + its lower case; every other character is as is."""
    escaped = "".join(
        "__" if c == "_" else "_-" if c == "." else f"_{c.lower()}" if c.isupper() else c
        for c in base_version
    )
    return f"{APPROVED}-{escaped}"


def check_tag(key: str) -> str:
    """A tag recycler knows (TAGS); anything else is a typo that would silently never be read."""
    if key not in TAGS and not (key.startswith("eval.") and METRIC.match(key[5:])):
        raise RegistryError(f"unknown tag {key!r}; recycler's tags are {', '.join(sorted(TAGS))}")
    return key


def version_tags(
    kind: str,
    family: str,
    variant: str | None,
    ref: ArtifactRef,
    base_version: str,
    lineage: dict[str, str],
    metrics: dict[str, float] | None,
    status: dict[str, str] | None,
    release_fingerprint: str = "",
) -> dict[str, str]:
    """Every tag of a new version: identity, lineage (references already resolved), eval.<metric>, status."""
    tags = {
        "kind": kind,
        "family": family,
        "variant": variant or "",
        "base_version": base_version,
        "manifest_sha256": ref.digest,
        "artifact_uri": ref.uri,
        "artifact_kind": ref.kind,
        "release_fingerprint": release_fingerprint,
        **lineage,
    }
    for metric, value in (metrics or {}).items():
        if not METRIC.match(str(metric)):
            raise RegistryError(f"metric name {metric!r} must match {METRIC.pattern}")
        tags[f"eval.{metric}"] = f"{float(value):.6g}"
    for key, value in (status or {}).items():
        if key in tags:
            raise RegistryError(f"status tag {key!r} would overwrite a recycler tag")
        tags[check_tag(key)] = str(value)
    return {k: v for k, v in tags.items() if v}


def composed_of(refs: list[str], alphas: list[float]) -> str:
    """The `composed_of` tag: every Δ and its α, in the order they are summed."""
    return "; ".join(f"{r}×{a:g}" for r, a in zip(refs, alphas, strict=True))


def parse_composed_of(tag: str) -> list[tuple[str, float]]:
    """The `composed_of` tag read back as (reference, α) pairs."""
    pairs = []
    for part in filter(None, (p.strip() for p in tag.split(";"))):
        ref, _, alpha = part.rpartition("×")
        pairs.append((ref, float(alpha)))
    return pairs
