"""A lineage as a picture a person reads at a glance, and as Mermaid text MLflow can preview.

The lineage DAG (recycler.registry.lineage) is laid out by Graphviz's `dot`, which ranks ancestors
before descendants and routes edges around boxes (the Debian package `graphviz`; `make setup` and the
worker images install it). Oldest on the left, each release cycle one step to the right, so a chain
of ten cycles reads as a row, not a pile. Nodes are coloured by kind; a version reached twice (a
fine-tune reaches its Δ directly and through its merged start) is one node.
"""

from __future__ import annotations

import shutil
import subprocess

from recycler.registry.lineage import LineageNode

COLOURS = {"base": "#dde8f5", "ft": "#dff2df", "diff": "#fde9cf", "merged": "#eadff5", "lora": "#f5dfe6"}
WALK_NOTES = {"shown above", "…"}  # artefacts of walking a DAG as a tree, not facts about a version


def graph(root: LineageNode) -> tuple[dict[str, LineageNode], set[tuple[str, str, str]]]:
    """Nodes by label (the expanded occurrence of each version) and edges (ancestor, descendant, relation)."""
    nodes: dict[str, LineageNode] = {}
    edges: set[tuple[str, str, str]] = set()
    for n in root.walk():
        if n.label not in nodes or (n.children and not nodes[n.label].children):
            nodes[n.label] = n
        edges.update((c.label, n.label, c.relation) for c in n.children)
    return nodes, edges


def _lines(n: LineageNode) -> list[str]:
    release = n.tags.get("base_version")
    lines = [n.label] + ([f"{'release' if n.kind == 'base' else 'base'} {release}"] if release else [])
    lines += [f"{k[5:]} {float(v):.3g}" for k, v in sorted(n.tags.items()) if k.startswith("eval.")]
    lines += [", ".join(n.aliases)] if n.aliases else []
    lines += [f"({n.note})"] if n.note and n.note not in WALK_NOTES else []
    return lines


def to_dot(root: LineageNode) -> str:
    """Graphviz source: left to right, coloured boxes, labelled edges."""
    nodes, edges = graph(root)
    ids = {label: f"n{i}" for i, label in enumerate(sorted(nodes))}
    out = ["digraph lineage {", '  rankdir=LR; nodesep=0.25; ranksep=0.6;',
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=8, color="#777777", fontcolor="#555555"];']  # fmt: skip
    for label, n in sorted(nodes.items()):
        text = "\\n".join(line.replace('"', "'") for line in _lines(n))
        width = ", penwidth=2.5" if n is root or n.label == root.label else ""
        out.append(f'  {ids[label]} [label="{text}", fillcolor="{COLOURS.get(n.kind, "#eeeeee")}"{width}];')
    for child, parent, relation in sorted(edges):
        out.append(f'  {ids[child]} -> {ids[parent]} [label="{relation}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def to_mermaid(root: LineageNode) -> str:
    """Mermaid flowchart (left to right), one node per version, labelled from its expanded occurrence."""
    nodes, edges = graph(root)
    ids = {label: f"n{i}" for i, label in enumerate(sorted(nodes))}
    lines = ["flowchart LR"]
    lines += [f'    {ids[label]}["{"<br/>".join(_lines(n))}"]' for label, n in sorted(nodes.items())]
    lines += [f"    {ids[c]} -->|{rel}| {ids[p]}" for c, p, rel in sorted(edges)]
    return "\n".join(lines) + "\n"


def to_markdown(root: LineageNode) -> str:
    """A Markdown file with the Mermaid chart (MLflow's artifact viewer previews .md files)."""
    return f"# Lineage of {root.label}\n\n```mermaid\n{to_mermaid(root)}```\n"


def render_png(root: LineageNode) -> bytes | None:
    """The picture as PNG bytes, or None when Graphviz's `dot` is not installed (then only the text
    forms are logged, and the log says why)."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    done = subprocess.run(
        [dot, "-Tpng", "-Gdpi=110"], input=to_dot(root).encode(), capture_output=True, check=True, timeout=60
    )
    return done.stdout
