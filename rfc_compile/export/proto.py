"""Small helpers over ONNX protos shared by the export fix-ups."""

from __future__ import annotations


def subgraphs(node) -> list:
    """The graphs a node carries in its attributes (an ``If``'s branches, a ``Loop``'s body)."""
    found = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            found.append(attribute.g)
        found.extend(attribute.graphs)
    return found
