"""The lineage picture: layering of the DAG that `Registry.lineage` returns."""

from __future__ import annotations

import io

from recycler.registry.lineage import LineageNode
from recycler.registry.lineage_plot import layers, lineage_figure


def node(
    name: str, version: str, relation: str, kind: str, *children: LineageNode, note: str = ""
) -> LineageNode:
    return LineageNode(name, version, relation, kind, {"base_version": "v2"}, (), list(children), note)


def two_cycles() -> LineageNode:
    """diff2 ← ft2 ← (diff1 ← ft1 ← base1, merged ← diff1 (shown above), base2): the shape a cycle produces."""
    base1 = node("b", "1", "base", "base")
    ft1 = node("ft", "1", "source_ft", "ft", base1)
    diff1 = node("d", "1", "parent_diff", "diff", ft1, node("b", "1", "base", "base", note="shown above"))
    merged = node(
        "m", "1", "source_merged", "merged", node("d", "1", "parent_diff", "diff", note="shown above")
    )
    ft2 = node("ft", "2", "source_ft", "ft", diff1, merged, node("b", "2", "base", "base"))
    return node("d", "2", "self", "diff", ft2)


def test_every_ancestor_sits_below_what_it_produced():
    depth, edges, nodes = layers(two_cycles())
    assert set(nodes) == {"d v2", "ft v2", "d v1", "m v1", "ft v1", "b v1", "b v2"}
    assert all(depth[child] > depth[parent] for child, parent, _ in edges)
    # d v1 is reached directly from ft v2 (depth 2) and through m v1 (depth 3): it goes below m v1
    assert depth["d v1"] == depth["m v1"] + 1
    assert nodes["d v1"].children  # the expanded occurrence is the one kept


def test_figure_renders_to_png():
    buf = io.BytesIO()
    lineage_figure(two_cycles()).savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" and len(buf.getvalue()) > 10_000
