"""The lineage picture and Mermaid text, from the DAG that `recycler.registry.lineage` walks."""

from __future__ import annotations

import re
import shutil

from servers import missing

from recycler.registry.lineage import LineageNode
from recycler.registry.lineage_graph import graph, render_png, to_dot, to_markdown, to_mermaid


def node(
    name: str, version: str, relation: str, kind: str, *children: LineageNode, note: str = ""
) -> LineageNode:
    return LineageNode(
        name,
        version,
        relation,
        kind,
        {"base_version": "v2", "eval.accuracy": "0.5"},
        (),
        list(children),
        note,
    )


def cycles(n: int) -> LineageNode:
    """n release cycles, each Δ_i ← FT_i ← (Δ_{i−1}, merged_i ← Δ_{i−1} (shown above), base_i): what
    the service produces; the walk marks repeated versions "shown above"."""
    diff = node(
        "d", "1", "source_ft", "diff", node("ft", "1", "source_ft", "ft", node("b", "1", "base", "base"))
    )
    for i in range(2, n + 1):
        seen = node("d", str(i - 1), "parent_diff", "diff", note="shown above")
        merged = node("m", str(i), "source_merged", "merged", seen)
        ft = node("ft", str(i), "source_ft", "ft", diff, merged, node("b", str(i), "base", "base"))
        diff = node("d", str(i), "self", "diff", ft)
    return diff


def test_one_node_per_version_from_its_expanded_occurrence():
    nodes, edges = graph(cycles(3))
    assert len(nodes) == 3 * 4 - 1  # base, ft, Δ per cycle; a merged start from the second on
    assert nodes["d v1"].children  # the expanded occurrence, not the "shown above" stub
    assert ("d v1", "m v2", "parent_diff") in edges and ("m v2", "ft v2", "source_merged") in edges
    text = to_mermaid(cycles(3))
    assert "shown above" not in text and text.startswith("flowchart LR")
    assert len(re.findall(r"^    n\d+\[", text, re.M)) == len(nodes)  # each version declared once
    assert "```mermaid" in to_markdown(cycles(3))


def test_dot_and_png_for_a_long_chain():
    chain = cycles(12)
    dot = to_dot(chain)
    assert dot.count("->") == len(graph(chain)[1]) and "rankdir=LR" in dot
    if shutil.which("dot") is None:
        missing("Graphviz `dot` not installed: `make setup` installs it (apt-get install graphviz)")
    png = render_png(chain)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import struct

    width, height = struct.unpack(">II", png[16:24])
    assert width > 3 * height  # twelve cycles read left to right as a row, not a pile
