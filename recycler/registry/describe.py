"""What a person reads on a model version's page in the MLflow UI: one plain line saying what the
version is, then links to every related version (backwards and forwards) and to the run that made it.

Tags are the machine-readable lineage; this is the same lineage for people. MLflow renders Markdown in
version descriptions, and in-app links (recycler.registry.links) become real links. The versions list shows the first line, so
it is plain text that says the lineage at a glance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recycler.redact import redact
from recycler.registry.links import model_link, run_link, version_link
from recycler.registry.names import REF_TAGS, parse_composed_of

if TYPE_CHECKING:
    from recycler.registry.client import Registry


@dataclass(frozen=True)
class Related:
    """The other versions and the run a description mentions (references are `name/version`)."""

    base: str | None = None  # the registered base of the version's release
    run: tuple[str, str, str] | None = None  # (experiment id, run id, run name)
    used_by: tuple[tuple[str, dict[str, str]], ...] = ()  # (reference, tags) of versions that use this one


def gate_sentence(gate: str | None) -> str:
    """The gate's decision as a sentence (empty for versions no gate looked at)."""
    if gate is None:
        return ""
    if gate == "promoted":
        return " Gate: promoted to champion."
    return f" Gate: refused, champion kept ({gate.removeprefix('refused: ')})."


def headline(tags: dict[str, str], related: Related) -> str:
    """One plain sentence: what the version is and where it comes from."""
    kind, release = tags.get("kind", ""), tags.get("base_version", "?")
    base = related.base or f"release {release}"
    on = f"{base} (release {release})"
    verdict = gate_sentence(tags.get("gate"))
    if kind == "base":
        return f"Base release {release} of family {tags.get('family', '?')}."
    if kind == "diff":
        mode = {"iterative": "Iterative Δ^iter", "direct": "Direct Δ^dir"}.get(tags.get("diff_mode", ""), "Δ")
        return f"{mode} = {tags.get('source_ft', '?')} − {on}."
    if kind == "lora":
        how = f" ({tags['transfer']})" if tags.get("transfer") else ""
        cost = f", ‖Δ − BA‖/‖Δ‖ {float(tags['lora_error']):.3g}" if tags.get("lora_error") else ""
        ranks = f" ({tags['lora_ranks']}{cost})" if tags.get("lora_ranks") else ""
        return f"LoRA adapter{how} for {on}: the low-rank form of Δ {tags.get('source_diff', '?')}{ranks}."
    if kind == "merged":
        if how := tags.get("transfer"):
            source = f" (from release {tags['diff_base_version']})" if tags.get("diff_base_version") else ""
            what = f"Δ {tags.get('parent_diff', '?')}{source}"
            if parts := parse_composed_of(tags.get("composed_of", "")):
                what = "Δs " + " + ".join(f"{a:g}·{r}" for r, a in parts)
            return f"{how[0].upper()}{how[1:]}: {what} added to {on}, no training."
        return f"Cycle start for release {release}: {base} + Δ {tags.get('parent_diff', '?')}, no training."
    role = tags.get("role")
    if role == "ft-from-base":
        return f"Baseline FT(M): fine-tuned from the plain {on}, for comparison with the recycled start.{verdict}"
    if role == "recycled-ft":
        return f"Fine-tune of {tags.get('source_merged', '?')} = {base} + Δ {tags.get('parent_diff', '?')} (release {release}).{verdict}"
    if role == "adopted":
        return f"Existing fine-tune of {on}, adopted by the family's first cycle (no training).{verdict}"
    return f"Fine-tune of {on}, the family's first cycle.{verdict}"


def describe(name: str, tags: dict[str, str], related: Related = Related(), version: str = "") -> str:
    """The Markdown description of version `version` of `name`: the headline, then links, then facts."""
    lines = [headline(tags, related), "", "**Lineage**", ""]
    if related.base:
        lines.append(f"- base: {version_link(related.base)} (release {tags.get('base_version')})")
    for tag, label in (
        ("source_merged", "trained from (M + Δ)"),
        ("parent_diff", "Δ applied"),
        ("source_ft", "extracted from (fine-tune)"),
        ("cycle_parent_diff", "previous Δ in the chain"),
        ("source_diff", "low-rank form of (Δ)"),
        ("adapter", "LoRA adapter form"),
    ):
        if ref := tags.get(tag):
            lines.append(f"- {label}: {version_link(ref)}")
    for ref, alpha in parse_composed_of(tags.get("composed_of", ""))[1:]:
        lines.append(f"- Δ also added: {version_link(ref)} (α {alpha:g})")
    if related.run:
        experiment, run_id, run_name = related.run
        lines.append(f"- made by run: {run_link(experiment, run_id, run_name or run_id[:8])}")
    lines.append(f"- all versions: {model_link(name)}")
    if related.used_by:
        lines += ["", "**Used by**", ""]
        lines += [
            f"- {version_link(ref)}: "
            + (_use_of_base(ref_tags) if tags.get("kind") == "base" else _use(f"{name}/{version}", ref_tags))
            for ref, ref_tags in related.used_by
        ]
    facts = [f"{k[5:]} {v}" for k, v in sorted(tags.items()) if k.startswith("eval.")]
    if tags.get("gate"):
        facts.append(
            f"gate: {tags['gate']}"
            + (
                f" (champion before: {tags['gate_champion_before']})"
                if tags.get("gate_champion_before")
                else ""
            )
        )
    if tags.get("diff_mode"):
        facts.append(f"diff mode: {tags['diff_mode']}")
    if tags.get("lora_ranks"):
        facts.append(f"LoRA ranks: {tags['lora_ranks']}; ‖Δ − BA‖/‖Δ‖ {tags.get('lora_error', '?')}")
    lines += ["", "**Facts**", "", *[f"- {f}" for f in facts]]
    lines.append(
        f"- artifact: `{tags.get('artifact_uri', '?')}` (manifest sha256 `{tags.get('manifest_sha256', '?')[:16]}…`)"
    )
    return redact("\n".join(lines) + "\n")  # artifact URIs and run names pass through


def _use(reference: str, tags: dict[str, str]) -> str:
    """How a later version used this one (named `reference` in its tags), in a few words."""
    release = tags.get("base_version", "?")
    if tags.get("source_diff") == reference:
        return f"its LoRA adapter form for release {release} ({tags.get('lora_ranks', '?')})"
    if tags.get("source_ft") == reference:
        return f"the Δ extracted from it (release {release})"
    if tags.get("cycle_parent_diff") == reference:
        return f"the next Δ in the chain (release {release})"
    if tags.get("source_merged") == reference:
        return f"fine-tuned from it (release {release})"
    if tags.get("transfer"):
        return f"{tags['transfer']} onto release {release} (base + this Δ, no training)"
    if tags.get("kind") == "merged":
        return f"the start of the release {release} cycle (base + this Δ)"
    return f"fine-tuned from base + this Δ (release {release})"


def _use_of_base(tags: dict[str, str]) -> str:
    """How a version of the same release was built on its base."""
    kind, role = tags.get("kind"), tags.get("role")
    if kind == "diff":
        return f"the Δ extracted on it, from {tags.get('source_ft', '?')}"
    if kind == "lora":
        return f"a LoRA adapter for it, from Δ {tags.get('source_diff', '?')}"
    if kind == "merged" and tags.get("transfer"):
        return f"{tags['transfer']}: it + Δ {tags.get('parent_diff', '?')}, no training"
    if kind == "merged":
        return f"the cycle's start: it + Δ {tags.get('parent_diff', '?')}"
    if role == "ft-from-base":
        return "the baseline fine-tuned from it"
    if role == "recycled-ft":
        return f"fine-tuned from it + Δ {tags.get('parent_diff', '?')}"
    return "fine-tuned from it"


def users_of(
    reference: str, candidates: Iterable[tuple[str, dict[str, str]]]
) -> tuple[tuple[str, dict[str, str]], ...]:
    """The versions among `candidates` that name `reference` as their Δ, merged start, source or parent."""
    return tuple((ref, tags) for ref, tags in candidates if any(tags.get(t) == reference for t in REF_TAGS))


def related_of(
    registry: Registry, reference: str | None, tags: dict[str, str], run_id: str | None
) -> Related:
    """Look up what a description links to: the release's base version, the run, later users."""
    base = None
    if tags.get("kind") != "base" and tags.get("family") and tags.get("base_version"):
        found = registry.base_version(tags["family"], tags["base_version"])
        base = found.reference if found else None
    run = None
    if run_id:
        try:
            info = registry.call(registry.client.get_run, run_id).info
            run = (info.experiment_id, run_id, info.run_name or "")
        except Exception:  # a run on another tracking server, or deleted: the tag still names it
            run = None
    used_by: tuple = ()
    if reference and tags.get("kind") == "base" and tags.get("family") and tags.get("base_version"):
        built_on = registry.search(
            f"tags.family = '{tags['family']}' and tags.base_version = '{tags['base_version']}'"
        )
        used_by = tuple(
            sorted(
                (
                    (f"{mv.name}/{mv.version}", dict(mv.tags))
                    for mv in built_on
                    if mv.tags.get("kind") != "base"
                ),
                key=lambda kv: (kv[0].rsplit("/", 1)[0], int(kv[0].rsplit("/", 1)[1])),
            )
        )
    elif reference:
        found_by = {}
        for tag in REF_TAGS:
            for mv in registry.search(f"tags.{tag} = '{reference}'"):
                found_by[f"{mv.name}/{mv.version}"] = dict(mv.tags)
        used_by = users_of(
            reference,
            sorted(found_by.items(), key=lambda kv: (kv[0].rsplit("/", 1)[0], int(kv[0].rsplit("/", 1)[1]))),
        )
    return Related(base=base, run=run, used_by=used_by)


def refresh(registry: Registry, reference: str) -> None:
    """Rewrite the description of `reference` from its current tags, run and users (forward links)."""
    v = registry.resolve(reference)
    related = related_of(registry, v.reference, v.tags, v.run_id or v.tags.get("run_id"))
    text = describe(v.name, v.tags, related, str(v.version))
    registry.call(registry.client.update_model_version, v.name, v.version, description=text)


def refresh_lineage_of(registry: Registry, tags: dict[str, str]) -> None:
    """After a version is registered, the versions it names gain a forward link to it."""
    for tag in REF_TAGS:
        if ref := tags.get(tag):
            refresh(registry, ref)
    if tags.get("kind") != "base" and tags.get("family") and tags.get("base_version"):
        base = registry.base_version(tags["family"], tags["base_version"])  # the base links to what it bears
        if base is not None:
            refresh(registry, base.reference)
