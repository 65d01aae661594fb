"""A registered version's lineage drawn as a picture, for MLflow runs (`recycler lineage --log`, cycles).

The MLflow UI shows one model version at a time; this diagram shows how a fine-tune, its Δs and its
bases connect across release cycles, which is the question people open the UI to answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from recycler.registry.client import LineageNode

COLOURS = {"base": "#dde8f5", "ft": "#dff2df", "diff": "#fde9cf", "merged": "#eadff5"}


def layers(root: LineageNode) -> tuple[dict[str, int], set[tuple[str, str, str]], dict[str, LineageNode]]:
    """Longest-path layering of the lineage DAG: every ancestor sits below everything it produced."""
    edges: set[tuple[str, str, str]] = set()
    nodes: dict[str, LineageNode] = {}
    for n in root.walk():
        if n.label not in nodes or (n.children and not nodes[n.label].children):
            nodes[n.label] = n  # keep the expanded occurrence (it has tags and children)
        edges.update((c.label, n.label, c.relation) for c in n.children)
    depth = dict.fromkeys(nodes, 0)
    for _ in range(len(nodes)):  # relax until stable; a DAG settles within len(nodes) rounds
        changed = False
        for child, parent, _rel in edges:
            if depth[child] < depth[parent] + 1:
                depth[child], changed = depth[parent] + 1, True
        if not changed:
            break
    return depth, edges, nodes


def lineage_figure(root: LineageNode) -> Figure:
    """The lineage as a layered diagram: the version on top, its ancestors below, coloured by kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    depth, edges, nodes = layers(root)
    rows: dict[int, list[str]] = {}
    for label in sorted(depth, key=lambda lab: (nodes[lab].kind, lab)):
        rows.setdefault(depth[label], []).append(label)
    pos = {lab: (i - (len(labs) - 1) / 2, -d) for d, labs in rows.items() for i, lab in enumerate(labs)}
    width = max(len(v) for v in rows.values())
    fig = Figure(figsize=(max(7, 3.0 * width), 1.3 * (len(rows) + 1)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for child, parent, rel in sorted(edges):
        (x0, y0), (x1, y1) = pos[child], pos[parent]
        ax.annotate(
            "", xy=(x1, y1 - 0.18), xytext=(x0, y0 + 0.18), arrowprops={"arrowstyle": "->", "color": "#888"}
        )
        ax.text(x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), rel, fontsize=6, color="#666", ha="center")
    for lab, (x, y) in pos.items():
        n = nodes[lab]
        release = n.tags.get("base_version")
        extra = [f"{'release' if n.kind == 'base' else 'base'} {release}"] if release else []
        extra += [f"{k[5:]} {float(v):.3g}" for k, v in sorted(n.tags.items()) if k.startswith("eval.")]
        text = (
            lab
            + ("\n" + " · ".join(extra) if extra else "")
            + ("\n" + ", ".join(n.aliases) if n.aliases else "")
        )
        box = {"boxstyle": "round", "fc": COLOURS.get(n.kind, "#eee"), "ec": "#555"}
        ax.text(x, y, text, ha="center", va="center", fontsize=7, bbox=box)
    ax.legend(
        handles=[Patch(fc=c, ec="#555", label=k) for k, c in COLOURS.items()],
        loc="upper left",
        fontsize=7,
        frameon=False,
    )
    ax.set_xlim(-width / 2 - 0.5, width / 2 + 0.5)
    ax.set_ylim(-len(rows), 0.6)
    ax.axis("off")
    ax.set_title(f"lineage of {root.label}", fontsize=9)
    return fig
