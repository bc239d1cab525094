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
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._external import is_mapped, mapped_array
from onnxlady._resync._match_results import ModelMatch

__all__ = [
    "ActivationScales",
    "activation_scales",
    "mismatched_activation_quantization",
    "unclamped_fused_activations",
]


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


#: ONNX Runtime's QOperator forms: where each reads its quantized inputs' scale and zero point
#: (``(data, scale, zero point)`` slots). QLinearConcat's inputs are triples after its own output's.
_INPUT_PARAMETERS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "QLinearConv": ((0, 1, 2),), "QLinearMatMul": ((0, 1, 2), (3, 4, 5)), "QLinearAdd": ((0, 1, 2), (3, 4, 5)),
    "QLinearMul": ((0, 1, 2), (3, 4, 5)), "QGemm": ((0, 1, 2),), "DequantizeLinear": ((0, 1, 2),),
    "QLinearSigmoid": ((0, 1, 2),), "QLinearLeakyRelu": ((0, 1, 2),), "QLinearSoftmax": ((0, 1, 2),),
    "QLinearGlobalAveragePool": ((0, 1, 2),), "QLinearAveragePool": ((0, 1, 2),), "QLinearReduceMean": ((0, 1, 2),),
}  # fmt: skip


def _input_parameters(node: onnx.NodeProto) -> list[tuple[int, int, int]]:
    if node.op_type == "QLinearConcat":
        return [(slot, slot + 1, slot + 2) for slot in range(2, len(node.input) - 2, 3)]
    return [triple for triple in _INPUT_PARAMETERS.get(node.op_type, ()) if triple[1] < len(node.input)]


def _mismatched_qoperator_reads(graph: onnx.GraphProto, constants: Mapping[str, onnx.TensorProto]) -> list[str]:
    """QOperator readers of a ``QLinear*`` output that read it with other constants than it was written with.

    A ``QLinear*`` node writes its output at its own scale and zero point; every QLinear node or
    DequantizeLinear that reads that output names them again (ONNX Runtime: the same
    initializers). A reader given another scale or zero point reads other numbers, which no
    converter writes (the QDQ pairs' counterpart, :func:`mismatched_activation_quantization`).
    """
    written: dict[str, tuple[str, str]] = {}  # tensor -> the scale and zero point it was written with
    for node in graph.node:
        own = 1 if node.op_type == "QuantizeLinear" else _OUTPUT_SCALE.get(node.op_type)
        if own is not None and node.output and len(node.input) > own and node.input[own]:
            written[node.output[0]] = (node.input[own], node.input[own + 1] if len(node.input) > own + 1 else "")
    quantized = {node.output[0] for node in graph.node if node.op_type == "QuantizeLinear" and node.output}
    found: list[str] = []
    for node in graph.node:
        for data, scale, zero in _input_parameters(node):
            writer = written.get(node.input[data])
            if writer is None or node.input[data] in constants:
                continue
            if node.op_type == "DequantizeLinear" and node.input[data] in quantized:
                continue  # a QDQ pair: compared below
            scales = _same(constants, writer[0], node.input[scale])
            zero_points = _same(constants, writer[1], node.input[zero] if zero < len(node.input) else "")
            if scales is False or zero_points is False:
                found.append(node.name or node.output[0])
    return found


def mismatched_activation_quantization(model: onnx.ModelProto) -> list[str]:
    """The nodes (by output name) that read a quantized activation with other constants than it was quantized with.

    A DequantizeLinear of a QuantizeLinear's output (QDQ), or a QOperator node reading a
    ``QLinear*`` node's output (:func:`_mismatched_qoperator_reads`). Only pairs on computed
    tensors count (a quantized weight has no QuantizeLinear in front of it); pairs whose
    constants are computed at run time are left alone (nothing to compare).
    """
    graph = model.graph
    constants = _constants(graph)
    quantizer = {node.output[0]: node for node in graph.node if node.op_type == "QuantizeLinear" and node.output}
    found: list[str] = _mismatched_qoperator_reads(graph, constants) if any(
        node.op_type in _OUTPUT_SCALE for node in graph.node
    ) else []
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


#: Where a quantized layer's output zero point is: the QOperator forms (one past their output
#: scale, :data:`_OUTPUT_SCALE`) and a ``QuantizeLinear`` of a float layer's result (QDQ).
_OUTPUT_ZERO_POINT = {"QLinearConv": 7, "QLinearMatMul": 7, "QLinearAdd": 7, "QGemm": 8, "QuantizeLinear": 2}
#: The operators a converter may leave between a layer and its clamp without changing what the
#: clamp sees: the (de)quantization of that very result, and moves of its values (ONNX Runtime's
#: Gemm fusion reshapes a MatMul's result back before its Relu).
_QUANTIZATION_STEPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
})  # fmt: skip


def _readers(graph: ModelGraph, name: str) -> list[onnx.NodeProto]:
    return [graph.nodes[index] for index, _ in graph.consumers.get(name, [])]


def _clamped_at_zero(graph: ModelGraph, node: onnx.NodeProto) -> bool:
    """Whether a layer's result is read by one clamp from zero alone (a ``Relu``, a ``Clip`` whose minimum is >= 0)."""
    if not node.output or node.output[0] in graph.graph_outputs:
        return False
    readers = _readers(graph, node.output[0])
    if len(readers) != 1:
        return False
    clamp = readers[0]
    if clamp.op_type == "Relu" and clamp.domain in ("", "ai.onnx"):
        return True
    if clamp.op_type != "Clip" or clamp.domain not in ("", "ai.onnx"):
        return False
    if len(clamp.input) > 1:  # opset 11 on: the minimum an input
        low = graph.constant_value(clamp.input[1]) if clamp.input[1] else None
        return low is not None and low.size == 1 and float(low.reshape(())) >= 0.0
    return float(node_attribute(clamp, "min", -3.4028234663852886e38)) >= 0.0


def _quantized_output(graph: ModelGraph, tail: int) -> tuple[onnx.NodeProto, str] | None:
    """The last quantization of a layer's result before the next operator reads it, and its zero point's name.

    From the layer's result (a ``QLinear*`` node's output, or a float result: from the
    ``QLinear*`` node before a ``DequantizeLinear`` tail, or the layer itself), along its one
    reader at a time through :data:`_QUANTIZATION_STEPS`: the last ``QuantizeLinear`` (or the
    ``QLinear*`` node itself) is what the next operator's values come out of. An earlier one may
    quantize the unclamped result (ONNX Runtime rounds a Gemm's result before the Reshape that
    precedes the dropped Relu). None where a ``Relu`` or ``Clip`` is met (the clamp was kept) or
    nothing quantizes the result.
    """
    node = graph.nodes[tail]
    if node.op_type == "DequantizeLinear" and node.input:
        produced = graph.producer.get(node.input[0])
        node = graph.nodes[produced[0]] if produced is not None else node
    last = node if node.op_type in _OUTPUT_ZERO_POINT else None
    current = node
    for _ in range(16):  # the steps a converter leaves: a few
        if not current.output or current.output[0] in graph.graph_outputs:
            break
        readers = _readers(graph, current.output[0])
        if any(reader.op_type in ("Relu", "Clip") for reader in readers):
            return None
        if len(readers) != 1 or readers[0].op_type not in _QUANTIZATION_STEPS:
            break
        current = readers[0]
        if current.op_type == "QuantizeLinear":
            last = current
    if last is None:
        return None
    slot = _OUTPUT_ZERO_POINT[last.op_type]
    if last.op_type == "QGemm" and (len(last.input) <= slot - 1 or not last.input[slot - 1]):
        return None  # a float output: nothing quantized
    return last, (last.input[slot] if len(last.input) > slot else "")


def _lowest(dtype: np.dtype) -> tuple[int, ...]:
    """The zero points a clamp from zero calibrates to in ``dtype``.

    The type's lowest value (ONNX Runtime's ``compute_scale_zp`` takes ``rmin = min(rmin, 0)``,
    0 for a clamped result, so ``zp = qmin``), and for a signed type its reduced range's lowest.
    """
    info = np.iinfo(dtype)
    return (int(info.min), int(info.min) // 2) if info.min < 0 else (0,)


def unclamped_fused_activations(match: ModelMatch) -> list[str]:
    """Quantized layers whose clamp the converter fused into a zero point that no longer clamps.

    Where the reference clamps a layer's result from zero (``Relu``, ``Clip(0, ...)``), a static
    quantizer with asymmetric activations (ONNX Runtime's, QOperator and QDQ) drops the clamp:
    the calibrated range of a clamped result starts at 0, so its zero point is the type's lowest
    value and the integer type clamps at zero. A zero point above it lets negative values through:
    the reference's clamp is gone, and no calibration writes it (held-out round 19, F2: a
    QLinearConv's output zero point +7 read ``converted``). Other activation zero points are
    calibrated on data the reference does not hold and are left alone. Returns lines naming
    each such layer.
    """
    reference, suspect = match.reference.graph, match.suspect.graph
    found: list[str] = []
    for site in match.reference_sites:
        partner_key = match.sites.get(site.key)
        if partner_key is None or site.family not in ("dense", "conv"):
            continue
        if not _clamped_at_zero(reference, reference.nodes[site.tail]):
            continue
        quantized = _quantized_output(suspect, match.suspect_site(partner_key).tail)
        if quantized is None or not quantized[1]:
            continue
        node, name = quantized
        zero = suspect.constant_value(name)
        if zero is None or zero.dtype.kind not in "iu" or zero.size != 1:
            continue
        slot = _OUTPUT_ZERO_POINT[node.op_type] - 1
        scale = suspect.constant_value(node.input[slot]) if node.input[slot] else None
        if scale is None or (scale.size == 1 and float(scale.reshape(())) == 1.0 and int(zero.reshape(())) == 0):  # ruff: ignore[float-equality-comparison] - exactly 1: what ONNX Runtime writes
            continue  # a range calibrated empty (a dead layer): ONNX Runtime writes scale 1, zero point 0
        if int(zero.reshape(())) not in _lowest(zero.dtype):
            found.append(
                f"{node.op_type} '{node.name or node.output[0]}' quantizes a result the reference clamps at zero "
                f"with zero point {int(zero.reshape(()))} ({name}), which lets negative values through"
            )
    return list(dict.fromkeys(found))
