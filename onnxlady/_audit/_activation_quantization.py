"""Activation quantization no converter writes: a DequantizeLinear with its QuantizeLinear's constants changed.

A DequantizeLinear that undoes its QuantizeLinear with another scale or zero point.
A static quantizer (ONNX Runtime's ``quantize_static``, any QDQ exporter) calibrates one scale
and zero point per quantized activation and writes them to both halves of the pair: ``x ->
QuantizeLinear(s, z) -> DequantizeLinear(s, z)``, very often as the same initializers. Those
constants are no weights: no analysis group holds them and the float reference has none to
compare them with, so a weight-by-weight audit does not see them, though they decide what the
model computes. One DequantizeLinear given another scale multiplies everything after it (held-out
round 10, finding F6: a scale times 8 changed 42 of 60 outputs, and the audit said
``converted``). Pairs whose halves disagree are found here, as evidence of a change that no
converter makes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._graph._attributes import node_attribute
from onnxlady._io._external import is_mapped, mapped_array

__all__ = ["mismatched_activation_quantization"]


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    found[node.output[0]] = attribute.t
    return found


def _value(constants: Mapping[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = constants.get(name)
    if tensor is None:
        return None
    return np.asarray(mapped_array(tensor)) if is_mapped(tensor) else numpy_helper.to_array(tensor)


def _same(constants: Mapping[str, onnx.TensorProto], first: str, second: str) -> bool | None:
    """Whether two scale or zero-point inputs hold the same numbers (None: one is computed)."""
    if first == second:
        return True
    a, b = _value(constants, first) if first else None, _value(constants, second) if second else None
    if (first and a is None) or (second and b is None):
        return None
    # An absent zero point is 0 of the quantized type.
    a = np.zeros((), np.int64) if a is None else a
    b = np.zeros((), np.int64) if b is None else b
    return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64)))


def mismatched_activation_quantization(model: onnx.ModelProto) -> list[str]:
    """The DequantizeLinear nodes (by output name) that read a QuantizeLinear's output with other constants.

    Only pairs on computed tensors count (a quantized weight has no QuantizeLinear in front of
    it); pairs whose constants are computed at run time are left alone (nothing to compare).
    """
    graph = model.graph
    constants = _constants(graph)
    quantizer = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear" and node.output}
    found: list[str] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not node.input or node.input[0] not in quantizer:
            continue
        quantize = quantizer[node.input[0]]
        if quantize.input[0] in constants:
            continue
        scales = _same(constants, quantize.input[1], node.input[1])
        zero_points = _same(
            constants,
            quantize.input[2] if len(quantize.input) > 2 else "",
            node.input[2] if len(node.input) > 2 else "",
        )
        axes_differ = int(node_attribute(quantize, "axis", 1)) != int(node_attribute(node, "axis", 1))
        if scales is False or zero_points is False or axes_differ:
            found.append(node.output[0] or node.name)
    return found
