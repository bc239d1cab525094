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
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._graph._attributes import node_attribute
from onnxlady._io._external import is_mapped, mapped_array

__all__ = ["ActivationScales", "activation_scales", "mismatched_activation_quantization"]


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


#: Layers whose int32 bias a static quantizer scales by the input's scale times the weight's
#: (times ``beta`` for a Gemm): ONNX Runtime's ``quantize_bias_static_impl``.
_BIASED_LAYERS = frozenset({"Conv", "ConvTranspose", "Gemm"})


#: ONNX Runtime's QOperator forms and the input holding their output's (calibrated) scale.
_OUTPUT_SCALE = {
    "QLinearConv": 6, "QLinearMatMul": 6, "QLinearAdd": 6, "QLinearMul": 6, "QGemm": 7, "QLinearConcat": 0,
    "QLinearSigmoid": 3, "QLinearLeakyRelu": 3, "QLinearSoftmax": 3, "QLinearGlobalAveragePool": 3,
    "QLinearAveragePool": 3, "QLinearReduceMean": 3,
}  # fmt: skip


@dataclass
class ActivationScales:
    """What a static quantization's activation scales allow the audit to check (:func:`activation_scales`).

    Calibration sets each activation's scale from data only the quantizer saw: the float
    reference holds nothing to compare it with (held-out round 14, F3: a scale changed x1.5+0.5
    tripled the quantization error and kept every weight). One relation of the converter's
    own holds: a layer's int32 bias is scaled by its input's scale times its weight's, so the
    activation scale feeding a biased layer is checked against the bias scale stored beside it.
    """

    #: Every activation scale: the constant scale of a QuantizeLinear on a computed tensor, or
    #: of a QOperator's output (:data:`_OUTPUT_SCALE`).
    scales: list[str] = field(default_factory=list)
    #: Those the bias scale of a layer they feed ties, and that agree with it.
    tied: list[str] = field(default_factory=list)
    #: Layers whose bias scale is not their input's scale times their weight's: (the input's
    #: scale, a line naming the layer), one per layer.
    broken: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unchecked(self) -> list[str]:
        """The activation scales no relation checks."""
        return [name for name in self.scales if name not in set(self.tied)]


def _dequantized_from(producers: Mapping[str, onnx.NodeProto], name: str) -> onnx.NodeProto | None:
    node = producers.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" and len(node.input) >= 2 else None


def _product_holds(bias_scale: np.ndarray, expected: np.ndarray) -> bool:
    """Whether a stored bias scale is the product, within the rounding of the type it is stored in."""
    stored = bias_scale.astype(np.float64).ravel()
    product = np.broadcast_to(expected, stored.shape) if expected.size == 1 else expected.ravel()
    if product.shape != stored.shape:
        return False
    rtol = 4 * float(np.finfo(bias_scale.dtype).eps) if bias_scale.dtype.kind == "f" else 1e-6
    return bool(np.all(np.abs(stored - product) <= rtol * np.abs(product)))


def activation_scales(model: onnx.ModelProto) -> ActivationScales:
    """A model's activation scales, those its layers' bias scales tie, and the layers where the tie breaks.

    A layer counts where its input, weight and bias are each read through a DequantizeLinear
    with a constant scale and its bias is stored as int32 (ONNX Runtime's QDQ form); the bias
    scale must then be ``input scale x weight scale`` (``x beta`` for a Gemm), which the
    quantizer computes and stores in float32 (or the bias's float16). A changed activation
    scale breaks it; a changed bias or weight scale is a changed weight, compared as one.
    """
    graph = model.graph
    found = ActivationScales()
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear" and len(node.input) >= 2]
    if not quantizers:
        return found
    constants = _constants(graph)
    scales = dict.fromkeys(q.input[1] for q in quantizers if q.input[0] not in constants and q.input[1] in constants)
    for node in graph.node:
        slot = _OUTPUT_SCALE.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in constants:
            scales.setdefault(node.input[slot])
    found.scales = list(scales)
    if not found.scales:
        return found
    producers = {name: node for node in graph.node for name in node.output if name}
    for node in graph.node:
        if node.op_type not in _BIASED_LAYERS or len(node.input) < 3:
            continue
        reads = [_dequantized_from(producers, name) for name in node.input[:3]]
        if any(read is None for read in reads):
            continue
        activation, weight, bias = (read.input for read in reads if read is not None)
        stored_bias = constants.get(bias[0])
        if stored_bias is None or stored_bias.data_type != onnx.TensorProto.INT32 or activation[0] in constants:
            continue
        values = [_value(constants, inputs[1]) for inputs in (activation, weight, bias)]
        if values[0] is None or values[1] is None or values[2] is None:
            continue
        beta = float(node_attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        expected = values[0].astype(np.float64) * values[1].astype(np.float64) * beta
        if _product_holds(values[2], expected):
            found.tied.append(activation[1])
            continue
        line = (
            f"{node.op_type} '{node.name or node.output[0]}' reads its input at scale {activation[1]} "
            f"({float(values[0].ravel()[0]):.6g}), which times its weight's scale is not its bias's scale"
        )
        found.broken.append((activation[1], line))
    found.tied = [name for name in dict.fromkeys(found.tied) if name in scales]
    return found
