"""DeBERTa-v2's shared relative-position projections through ONNX Runtime's quantizers (held-out round 13, F12).

DeBERTa-v2 projects its relative-position table through each layer's own query and key
weights: one weight read by two MatMuls, one on the hidden states and one on constants (a
layer of constants, which does not weigh; the exporter reads the second use through an
Identity). The quantizers split or fold that second use:

- ``quantize_dynamic`` and the MatMulNBits quantizer quantize the hidden states' MatMul and
  leave the constants' one in float, reading the float weight;
- ``quant_pre_process`` (before ``quantize_static``, QDQ) folds the constants' one away.

Content cannot tell the two uses apart (equal weights, or one at the quantizer's step from the
other), so the pairing went by order, and the order of a quantized graph differs: the hidden
states' layer paired with the constants' one, every connection of both counted as lost
(refused as "different models", 57.9 %), the other layer was left "only in one of them", or
the order paired the query with the key (``perturbed`` / ``modified``, false accusations).
Twins (one model's sites with bitwise equal signatures) now compete for counterparts together
(content decides against the sites outside them), and a layer that reads activations takes
the counterpart that reads activations. Copies written by the quantizers, and in another
topological order (a converter's own), read ``converted``; permuted copies resync with their
key and read ``permuted``; a row scaled or an edge rewired before the same quantizer is caught.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import calibration_inputs
from onnxlady._audit._verdicts import audit_models
from onnxlady.testing import copy_model, permute_copy
from tests.test_deployment import check_resync_across

quantization = pytest.importorskip("onnxruntime.quantization")

_SEQ, _WIDTH, _LAYERS = 8, 32, 2


def _model(relative_first: bool) -> onnx.ModelProto:
    """Two DeBERTa-like layers: q/k/v on the hidden states, q/k again on a normalised table of constants.

    ``relative_first``: the constants' projections come before the hidden states' in the node
    list (both orders occur: the exporter writes them after, a converter's sort may not).
    """
    rng = np.random.default_rng(0)
    initializers: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: object, dtype: type = np.float32) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def dense(x: str, weight: str, bias: str, name: str) -> str:
        return node("Add", [node("MatMul", [x, weight], f"{name}.matmul"), bias], f"{name}.add")

    def norm(x: str, name: str) -> str:
        scale = const(f"{name}.scale", 1 + rng.standard_normal(_WIDTH) / 10)
        return node(
            "LayerNormalization", [x, scale, const(f"{name}.shift", rng.standard_normal(_WIDTH) / 10)], name, axis=-1
        )

    def weight(name: str, rows: int, cols: int) -> str:
        return const(name, rng.standard_normal((rows, cols)) / np.sqrt(rows))

    relative = norm(const("rel.table", rng.standard_normal((_SEQ, _WIDTH))), "rel.norm")
    hidden = norm(
        dense(
            "x", weight("embed.weight", _WIDTH, _WIDTH), const("embed.bias", rng.standard_normal(_WIDTH) / 10), "embed"
        ),
        "embed.norm",
    )
    # Repeated over the batch (DeBERTa's ``.repeat``): the projections on constants meet the
    # hidden states through a computed operand, so no simplifier folds them into a weight.
    batch = node(
        "Slice",
        [node("Shape", ["x"], "x.shape"), const("first", [0], np.int64), const("second", [1], np.int64)],
        "batch",
    )
    batched = node("Concat", [batch, const("sizes", [_WIDTH, _SEQ], np.int64)], "batched", axis=0)
    for layer in range(_LAYERS):
        p = f"layer{layer}"
        w = {c: weight(f"{p}.{c}.weight", _WIDTH, _WIDTH) for c in "qkvo"}
        b = {c: const(f"{p}.{c}.bias", rng.standard_normal(_WIDTH) / 10) for c in "qkvo"}
        for c in "qk":  # the exporter's Identity of a shared parameter, first in the graph
            nodes.insert(0, helper.make_node("Identity", [w[c]], [f"{p}.{c}.shared"], name=f"{p}.{c}.shared"))
        projected: dict[str, str] = {}
        for part in ("constants", "hidden") if relative_first else ("hidden", "constants"):
            if part == "hidden":
                projected.update({c: dense(hidden, w[c], b[c], f"{p}.{c}") for c in "qkv"})
            else:
                projected.update({f"{c}_rel": dense(relative, f"{p}.{c}.shared", b[c], f"{p}.{c}_rel") for c in "qk"})
        q, k, v, q_rel, k_rel = (projected[name] for name in ("q", "k", "v", "q_rel", "k_rel"))
        c2c = node("MatMul", [q, node("Transpose", [k], f"{p}.kt", perm=[0, 2, 1])], f"{p}.c2c")
        c2p = node(
            "MatMul",
            [q, node("Expand", [node("Transpose", [k_rel], f"{p}.krt", perm=[1, 0]), batched], f"{p}.krt.b")],
            f"{p}.c2p",
        )
        p2c = node(
            "MatMul",
            [k, node("Expand", [node("Transpose", [q_rel], f"{p}.qrt", perm=[1, 0]), batched], f"{p}.qrt.b")],
            f"{p}.p2c",
        )
        scores = node("Add", [node("Add", [c2c, c2p], f"{p}.s1"), p2c], f"{p}.s2")
        attention = node(
            "Softmax",
            [node("Mul", [scores, const(f"{p}.scale", 1 / np.sqrt(3 * _WIDTH))], f"{p}.scaled")],
            f"{p}.softmax",
            axis=-1,
        )
        context = node("MatMul", [attention, v], f"{p}.ctx")
        hidden = norm(node("Add", [hidden, dense(context, w["o"], b["o"], f"{p}.o")], f"{p}.res1"), f"{p}.norm1")
        up = dense(
            hidden,
            weight(f"{p}.fc1.weight", _WIDTH, 2 * _WIDTH),
            const(f"{p}.fc1.bias", rng.standard_normal(2 * _WIDTH) / 10),
            f"{p}.fc1",
        )
        down = dense(
            node("Relu", [up], f"{p}.relu"),
            weight(f"{p}.fc2.weight", 2 * _WIDTH, _WIDTH),
            const(f"{p}.fc2.bias", rng.standard_normal(_WIDTH) / 10),
            f"{p}.fc2",
        )
        hidden = norm(node("Add", [hidden, down], f"{p}.res2"), f"{p}.norm2")
    nodes.append(helper.make_node("Identity", [hidden], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "shared_relative_projections",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", _SEQ, _WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", _SEQ, _WIDTH])], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime's quantizer loads back
    return model


def _quantized(model: onnx.ModelProto, converter: str, folder: Path) -> onnx.ModelProto:
    """``model`` through one of ONNX Runtime's quantizers, as round 13 ran them."""
    source, quantized = folder / f"{converter}.source.onnx", folder / f"{converter}.onnx"
    onnx.save(model, source)
    if converter == "qdyn":
        quantization.quantize_dynamic(str(source), str(quantized), weight_type=quantization.QuantType.QInt8)
    elif converter == "qdq":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = folder / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(
            str(prepared), str(quantized), calibration_inputs("x", (1, _SEQ, _WIDTH), 4), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            weight_type=quantization.QuantType.QInt8, activation_type=quantization.QuantType.QUInt8,
        )  # fmt: skip
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True, bits=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(quantized), False)
    return onnx.load(quantized)


def _reordered(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in another topological order: the last listed ready node first."""
    model = copy_model(model)
    nodes = list(model.graph.node)
    producer = {name: i for i, n in enumerate(nodes) for name in n.output}
    needs = [{producer[name] for name in n.input if name in producer} for n in nodes]
    readers: dict[int, list[int]] = {}
    for i, inputs in enumerate(needs):
        for j in inputs:
            readers.setdefault(j, []).append(i)
    waiting = [len(inputs) for inputs in needs]
    ready = [-i for i, inputs in enumerate(needs) if not inputs]
    heapq.heapify(ready)
    order: list[onnx.NodeProto] = []
    while ready:
        i = -heapq.heappop(ready)
        order.append(nodes[i])
        for reader in readers.get(i, []):
            waiting[reader] -= 1
            if not waiting[reader]:
                heapq.heappush(ready, -reader)
    assert len(order) == len(nodes)
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model


#: (relative projections first, converter, reordered): each read ``different models``,
#: ``perturbed`` or ``modified`` before.
_CASES = [
    (False, "qdyn", False), (False, "nbits", False), (True, "qdq", False),
    (True, "qdq", True), (True, "qdyn", True), (True, "nbits", True),
]  # fmt: skip


def _suspect(reference: onnx.ModelProto, converter: str, reordered: bool, folder: Path) -> onnx.ModelProto:
    quantized = _quantized(reference, converter, folder)
    return _reordered(quantized) if reordered else quantized


def test_the_quantizers_write_the_finding_forms(tmp_path: Path) -> None:
    """The test of the test: the constants' projection stays in float beside the quantized one, or is folded."""
    reference = _model(relative_first=False)
    for converter, quantized_op in (("qdyn", "MatMulInteger"), ("nbits", "MatMulNBits")):
        model = _quantized(reference, converter, tmp_path)
        kinds = {n.name: n.op_type for n in model.graph.node}
        assert kinds["layer0.q_rel.matmul"] == "MatMul"  # on constants: float, the weight through the Identity
        assert next(n for n in model.graph.node if n.name == "layer0.q_rel.matmul").input[1] == "layer0.q.shared"
        assert kinds["layer0.q.shared"] == "Identity"
        assert quantized_op in {kinds[name] for name in kinds if name.startswith("layer0.q.matmul")}
    folded = _quantized(reference, "qdq", tmp_path)
    assert not [n.name for n in folded.graph.node if "_rel" in n.name]  # quant_pre_process folded them
    assert "DequantizeLinear" in {n.op_type for n in folded.graph.node}


@pytest.mark.parametrize(("relative_first", "converter", "reordered"), _CASES)
def test_a_quantized_copy_reads_converted(
    relative_first: bool, converter: str, reordered: bool, tmp_path: Path
) -> None:
    reference = _model(relative_first)
    report = audit_models(reference, _suspect(reference, converter, reordered, tmp_path))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize(("relative_first", "converter", "reordered"), [_CASES[0], _CASES[3], _CASES[5]])
def test_a_permuted_quantized_copy_resyncs_and_reads_permuted(
    relative_first: bool, converter: str, reordered: bool, tmp_path: Path
) -> None:
    reference = _model(relative_first)
    permuted, _, _, key = permute_copy(reference, 3)
    suspect = _suspect(permuted, converter, reordered, tmp_path)
    check_resync_across(reference, suspect, key)  # Psi 100, and a wrong permutation is caught
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


def _row_scaled(model: onnx.ModelProto) -> onnx.ModelProto:
    """layer1's query weight with one output neuron scaled by 1.5 (both its uses: one weight)."""
    model = copy_model(model)
    tensor = next(t for t in model.graph.initializer if t.name == "layer1.q.weight")
    values = numpy_helper.to_array(tensor).copy()
    values[:, 2] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def _rewired(model: onnx.ModelProto) -> onnx.ModelProto:
    """layer1's second residual Add reads the layer's input instead of its first block's output."""
    model = copy_model(model)
    add = next(n for n in model.graph.node if n.name == "layer1.res2")
    assert add.input[0] == "layer1.norm1"
    add.input[0] = "layer0.norm2"
    return model


@pytest.mark.parametrize(("relative_first", "converter", "reordered"), [_CASES[0], _CASES[2], _CASES[5]])
@pytest.mark.parametrize("change", ["row", "rewire"])
def test_a_change_before_the_same_quantizer_is_caught(
    relative_first: bool, converter: str, reordered: bool, change: str, tmp_path: Path
) -> None:
    reference = _model(relative_first)
    changed = _row_scaled(reference) if change == "row" else _rewired(reference)
    report = audit_models(reference, _suspect(changed, converter, reordered, tmp_path))
    assert report.exit_code == 1 and report.verdict in ("modified", "scaled"), report.summary


def _float_copy_scaled(model: onnx.ModelProto) -> onnx.ModelProto:
    """After the quantizer: the float weight only the constants' projection still reads, one column x1.5.

    The quantized copy the hidden states' MatMul reads is left as the quantizer wrote it, so the
    resync's comparison of the weight (through its first paired use, the quantized one) holds;
    only the stored float copy differs (held-out round 14: this read ``converted``).
    """
    model = copy_model(model)
    readers = [n for n in model.graph.node if "layer0.q.weight" in n.input]
    assert [n.op_type for n in readers] == ["Identity"]  # the quantized MatMul reads a copy of its own
    tensor = next(t for t in model.graph.initializer if t.name == "layer0.q.weight")
    values = numpy_helper.to_array(tensor).copy()
    values[:, 2] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


@pytest.mark.parametrize("converter", ["qdyn", "nbits"])
@pytest.mark.parametrize("permuted", [False, True])
def test_the_float_copy_a_quantizer_leaves_is_compared(converter: str, permuted: bool, tmp_path: Path) -> None:
    reference = _model(relative_first=False)
    source = permute_copy(reference, 3)[0] if permuted else reference
    quantized = _quantized(source, converter, tmp_path)
    untouched = audit_models(reference, quantized)
    assert untouched.verdict == ("permuted" if permuted else "converted"), untouched.summary
    report = audit_models(reference, _float_copy_scaled(quantized))
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
    assert "a stored copy of a constant changed" in report.summary
