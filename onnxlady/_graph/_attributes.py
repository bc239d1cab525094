"""Reading a node's attributes: one reader for every layer, so they all agree on defaults."""

from __future__ import annotations

from typing import Any

import onnx

__all__ = ["node_attribute"]


def node_attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when the node does not set it.

    Args:
        node: the node whose attribute is read.
        name: the attribute's name (``"axis"``, ``"perm"``...).
        default: returned when the node has no attribute of that name (the operator's default).

    Returns:
        The value as ``onnx.helper.get_attribute_value`` gives it: an int, float, bytes,
        TensorProto, GraphProto, or a list of those for the repeated kinds.
    """
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default
