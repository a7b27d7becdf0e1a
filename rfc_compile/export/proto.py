"""Small helpers over ONNX protos shared by the export fix-ups."""

from __future__ import annotations

from collections.abc import Iterator


def subgraphs(node) -> list:
    """The graphs a node carries in its attributes (an ``If``'s branches, a ``Loop``'s body)."""
    found = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            found.append(attribute.g)
        found.extend(attribute.graphs)
    return found


def all_graphs(graph) -> Iterator:
    """``graph`` and every graph nested in its nodes (``If`` branches, ``Loop`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def replace_nodes(model_proto, matches, replacement) -> int:
    """Replace every node for which ``matches(node)`` holds, in the main graph and in every
    subgraph, by the list of nodes ``replacement(node)`` returns; returns how many were replaced."""
    changed = 0

    def walk(graph) -> None:
        nonlocal changed
        nodes, found = [], False
        for node in graph.node:
            for sub in subgraphs(node):
                walk(sub)
            if matches(node):
                nodes += replacement(node)
                changed += 1
                found = True
            else:
                nodes.append(node)
        if found:
            del graph.node[:]
            graph.node.extend(nodes)

    walk(model_proto.graph)
    return changed
