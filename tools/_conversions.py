"""Resync and audit across one conversion, shared by ``tools.conversions_real_models`` and ``tools.conversions_zoo``.

A permuted copy of a model is converted (``fixtures.conversions``: fold-bn, float16, bfloat16,
QDQ, simplify, opset upgrade...); :func:`convert` applies a conversion as a pipeline would,
:func:`conversion_row` resyncs the converted suspect against the reference, verifies the result
against the suspect (within the tolerances the conversion's arithmetic allows) while a wrong
permutation must be caught, and audits the pair; :func:`clean` says whether a row is all good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from fixtures.conversions import CONVERSIONS, upgrade_opset
from onnxlady import PermutationKey, analyze, audit, resync, verify
from onnxlady._graph._model_graph import ModelGraph  # in_float's constant folding, a test-side rewrite
from onnxlady.testing import copy_model, permute_producer_only

#: Conversions that need opset 13 (Cast from bfloat16, per-axis DequantizeLinear).
NEEDS_OPSET_13 = ("bfloat16", "qdq")


#: Verify tolerances fitting each converted model's own arithmetic. A float16 graph rounds its
#: outputs to float16 (a unit in the last place is 2e-3 at 4).
TOLERANCES = {"float16": {"atol": 1e-3, "rtol": 4e-3}}
#: Conversions whose arithmetic rounds to a coarse type, so that re-ordering the channels
#: changes the outputs. A float16 graph computing in float16 flips roundings of its sums; a
#: converted suspect's re-ordered output is compared within twice the *re-ordering floor*
#: measured per model: the largest difference between the same conversion of the reference (in
#: its own order) and of the permuted copy, the suspect. Both differences compare two orders of
#: the same arithmetic; one draw of the floor is a noisy maximum, hence the factor 2. The wrong
#: permutation must still be caught at that tolerance.
ORDER_SENSITIVE = ("float16",)
FLOOR_FACTOR = 2.0
#: Conversions that quantize activations. A QDQ graph quantizes every activation: re-ordering
#: the input channels changes the float sum's rounding, which flips some activations by one
#: quantization step, and the flips add up over the layers (the QDQ copies of the zoo's
#: deeplabv3 and of a permuted copy differ by 0.62 on outputs up to 4.8). Without its activation
#: pairs, ONNX Runtime's output is still order-sensitive while the weights stay behind
#: DequantizeLinear (ppocrv4_rec: 2e-2, against 2e-5 with them folded into float weights; which
#: of its rewrites does it was not traced). Either way a wrong swap of two rows can move the
#: outputs less (ppocr_cls). Such suspects are compared in float: each weight's
#: DequantizeLinear folded into the float initializer it computes, activation pairs removed, on
#: both models. That checks exactly what resync re-ordered (int8 rows with their scales), with
#: the default tolerances.
ACTIVATIONS_QUANTIZED = ("qdq",)


def main_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ``ai.onnx`` opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto | None, str, str]:
    """Apply conversion ``name`` as a pipeline would (upgrading to opset 17 first where the
    conversion needs opset 13).

    Returns:
        ``(converted, label, "")``, or ``(None, label, why not)`` when the conversion does not
        apply or changes nothing; ``label`` names the conversion and the upgrade, if any.
    """
    label = name
    try:
        if name in NEEDS_OPSET_13 and main_opset(model) < 13:
            model, label = upgrade_opset(model, 17), f"opset 17 + {name}"
        converted = CONVERSIONS[name](model)
    except (ValueError, RuntimeError) as exc:
        return None, label, f"not applicable: {exc}"
    if converted.SerializeToString() == model.SerializeToString():
        return None, label, "nothing to convert"
    return converted, label, ""


def conversion_row(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    key: PermutationKey,
    conversion: str,
    suspect_converted: bool = True,
) -> dict[str, object]:
    """Resync ``suspect`` against ``reference``, verify the output against the suspect (and a
    wrong permutation of the output: one producer's rows swapped), audit the pair.

    Args:
        reference: The model in its original order.
        suspect: The permuted copy; one of the two went through ``conversion``.
        key: The permutation that made the suspect, to score resync (Psi).
        conversion: The conversion's name in ``fixtures.conversions.CONVERSIONS``.
        suspect_converted: Whether the suspect is the converted side; then
            :data:`ORDER_SENSITIVE` and :data:`ACTIVATIONS_QUANTIZED` apply.

    Returns:
        Psi (all neurons and distinguishable ones), whether the resynced model is equivalent to
        the suspect and its largest error, the re-ordering floor (or None), whether the wrong
        permutation was caught, audit's verdict and the conversions it found, resync's seconds.
    """
    tolerance = dict(TOLERANCES.get(conversion, {}))
    logits = logits_of(suspect)
    floor = None
    if suspect_converted and conversion in ORDER_SENSITIVE:
        # The same conversion of the reference, in the reference's own order.
        converted_reference = convert(reference, conversion)[0]
        assert converted_reference is not None, f"{conversion} converted the suspect but not the reference"
        floor = verify(converted_reference, suspect, provider="cpu", add_output=logits, **tolerance).max_abs_error
        tolerance["atol"] = max(tolerance.get("atol", 1e-4), FLOOR_FACTOR * floor)
    start = time.perf_counter()
    result = resync(reference, suspect, true_key=key)
    seconds = time.perf_counter() - start
    psi, psi_distinguishable = result.psi, result.details.psi_distinguishable
    quantized = suspect_converted and conversion in ACTIVATIONS_QUANTIZED
    float_form: Callable[[onnx.ModelProto], onnx.ModelProto] = in_float if quantized else _as_is
    compared = float_form(suspect)
    check = verify(compared, float_form(result.model), provider="cpu", add_output=logits, **tolerance)
    wrong = copy_model(result.model)
    del result  # an across resync holds the compared values in float64: free them before the audit
    permute_producer_only(wrong, analyze(wrong))
    caught = not verify(compared, float_form(wrong), provider="cpu", add_output=logits, **tolerance).equivalent
    del wrong, compared
    report = audit(reference, suspect).report
    found = sorted({c.kind for c in report.conversions})
    return {
        "psi": psi,
        "psi_distinguishable": psi_distinguishable,
        "equivalent": check.equivalent,
        "max_error": check.max_abs_error,
        "floor": floor,
        "wrong_caught": caught,
        "verdict": report.verdict,
        "conversions": found,
        "seconds": seconds,
    }


def _as_is(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself (no copy: the zoo's largest models must not be held twice)."""
    return model


#: Operators between a saturating activation and a graph output that change nothing the check needs.
_PASS_THROUGH = ("Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Transpose")


def logits_of(model: onnx.ModelProto) -> list[str]:
    """The inputs of the Sigmoid/Softmax nodes that make the graph outputs (through Identity,
    Cast, a Q/DQ pair or a reshape: an opset upgrade wraps Softmax in Flatten/Reshape). On
    random inputs those outputs saturate, and a wrong permutation is only seen on the logits
    (tools.real_models names them by hand; a converter renames them).
    """
    producer = {name: node for node in model.graph.node for name in node.output}
    found = []
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Sigmoid", "Softmax") and node.input[0] not in found:
            found.append(node.input[0])
    return found


def in_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy of a QDQ ``model``: every DequantizeLinear of a constant (a weight) becomes
    the float initializer it computes, and computed tensors skip their QuantizeLinear ->
    DequantizeLinear pairs.
    """
    out = copy_model(model)
    graph = ModelGraph(out)
    producer = {name: node for node in out.graph.node for name in node.output}
    replaced: dict[str, str] = {}
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if graph.constant_leaf(node.input[0]) is not None:
            value = np.asarray(graph.constant_value(node.output[0]), dtype=np.float32)
            out.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            replaced[node.output[0]] = source.input[0]
    for node in out.graph.node:
        for slot, name in enumerate(node.input):
            if name in replaced:
                node.input[slot] = replaced[name]
    outputs = {o.name for o in out.graph.output}
    folded = {t.name for t in out.graph.initializer}
    nodes = [n for n in out.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in folded)]
    while True:  # Quantize and Dequantize nodes nobody reads any more
        used = {name for node in nodes for name in node.input} | outputs
        alive = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or set(n.output) & used]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def clean(row: dict[str, object]) -> bool:
    """Every neuron back, output equivalent to the suspect, a wrong permutation caught, audit clean."""
    return (
        row["psi_distinguishable"] == 100.0
        and bool(row["equivalent"])
        and bool(row["wrong_caught"])
        and row["verdict"] == "permuted"
    )


def output_cell(row: dict[str, object]) -> str:
    """'yes 2.1e-05' (largest difference to the suspect), with the re-ordering floor where one applies."""
    cell = f"{'yes' if row['equivalent'] else 'NO'} {row['max_error']:.1e}"
    return cell + (f" (floor {row['floor']:.1e})" if row["floor"] is not None else "")
