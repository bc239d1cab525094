"""A depthwise Conv's outputs take their own order inside each input channel's block (round 17, F5).

With depth multiplier ``m`` (``group == C``, ``M = C * m`` outputs), output ``c * m + j`` reads
input channel ``c`` alone through its own weight row, so the ``m`` outputs of one input channel
may be re-ordered among themselves independently of every other channel's (weight rows, bias and
consumers follow). Checked on the ``grouped_conv`` fixture (a depthwise conv 32 -> 64, multiplier 2):
a seeded permute draws a different order per pair, the copy is equivalent and unpermutes bit for
bit; a swap inside one pair is equivalent, audits ``permuted`` and resyncs to the reference's
bytes, while a swap across two pairs and a swap of the conv's rows alone (consumers left) are caught.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from fixtures.models import build_grouped_conv
from onnxlady import analyze, audit, draw_permutations, permute_model, resync, unpermute_model, verify_models
from onnxlady.testing import copy_model, permute_copy

MULTIPLIER = 2
OUTPUTS = 64


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def _row_order(source: onnx.ModelProto, permuted: onnx.ModelProto) -> list[int]:
    """Which source output of the depthwise conv each output of the permuted copy holds (its weight row)."""
    before = [row.tobytes() for row in _weights(source)["depthwise.weight"]]
    return [before.index(row.tobytes()) for row in _weights(permuted)["depthwise.weight"]]


def _reordered(model: onnx.ModelProto, order: list[int], *, consumers: bool = True) -> onnx.ModelProto:
    """A copy whose depthwise outputs take ``order`` (rows and bias; the head's columns when ``consumers``)."""
    axes = {"depthwise.weight": 0, "depthwise.bias": 0} | ({"logits.weight": 1} if consumers else {})
    copy = copy_model(model)
    for init in copy.graph.initializer:
        if init.name in axes:
            moved = np.take(onnx.numpy_helper.to_array(init), order, axis=axes[init.name])
            init.CopyFrom(onnx.numpy_helper.from_array(moved, init.name))
    return copy


def _swap(first: int, second: int) -> list[int]:
    order = list(range(OUTPUTS))
    order[first], order[second] = order[second], order[first]
    return order


def test_each_input_channel_draws_its_own_order_for_its_outputs() -> None:
    source = build_grouped_conv(0)
    assert _weights(source)["logits.weight"].shape == (10, OUTPUTS)
    for seed in range(1, 4):
        permuted, _, _, key = permute_copy(source, seed)
        pairs = np.asarray(_row_order(source, permuted)).reshape(-1, MULTIPLIER)
        assert all(len(set(pair // MULTIPLIER)) == 1 for pair in pairs), pairs  # blocks move whole
        assert any(pair[0] > pair[1] for pair in pairs), pairs  # and the pairs' own orders are drawn
        assert verify_models(source, permuted).equivalent
        assert unpermute_model(permuted, key) is True
        assert [i.raw_data for i in permuted.graph.initializer] == [i.raw_data for i in source.graph.initializer]
    # One input channel's pair alone can move: every other pair keeps its order.
    model = copy_model(source)
    analysis = analyze(model)
    pairs = [g.id for g in analysis.permutable_groups if g.size == MULTIPLIER]
    assert len(pairs) == OUTPUTS // MULTIPLIER
    permute_model(analysis, draw_permutations(analysis, 1, [pairs[0]]))
    order = _row_order(source, model)
    moved = [i for i, j in enumerate(order) if i != j]
    assert len(moved) == MULTIPLIER and moved[0] // MULTIPLIER == moved[1] // MULTIPLIER, order
    assert verify_models(source, model).equivalent


def test_a_swap_inside_a_pair_is_permuted_and_others_are_caught(tmp_path: Path) -> None:
    source = build_grouped_conv(0)
    inside = _reordered(source, _swap(0, 1))            # both outputs of input channel 0
    across = _reordered(source, _swap(1, 2))            # channel 0's second output with channel 1's first
    rows_only = _reordered(source, _swap(0, 1), consumers=False)
    assert verify_models(source, inside).equivalent
    assert not verify_models(source, across).equivalent
    assert not verify_models(source, rows_only).equivalent
    reference = tmp_path / "reference.onnx"
    onnx.save(source, reference)
    for name, model in (("inside", inside), ("across", across), ("rows_only", rows_only)):
        onnx.save(model, tmp_path / f"{name}.onnx")
    assert audit(reference, tmp_path / "inside.onnx").verdict == "permuted"
    assert audit(reference, tmp_path / "across.onnx").verdict == "modified"
    assert audit(reference, tmp_path / "rows_only.onnx").verdict == "modified"
    report = resync(reference, tmp_path / "inside.onnx", output=tmp_path / "restored.onnx")
    restored = onnx.load(tmp_path / "restored.onnx")
    assert [i.raw_data for i in restored.graph.initializer] == [i.raw_data for i in source.graph.initializer], report


def test_a_depthwise_conv_integer_draws_the_same_orders(tmp_path: Path) -> None:
    """ONNX Runtime's dynamic quantizer writes each Conv as ConvInteger: the same rule, the same symmetry."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(build_grouped_conv(0), tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "quantized.onnx", weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv"])  # fmt: skip
    source = onnx.load(tmp_path / "quantized.onnx")
    dw = next(n for n in source.graph.node if n.op_type == "ConvInteger" and n.input[1].startswith("depthwise.weight"))
    permuted, _, _, key = permute_copy(source, 1)
    weights, before = _weights(permuted)[dw.input[1]], [row.tobytes() for row in _weights(source)[dw.input[1]]]
    pairs = np.asarray([before.index(row.tobytes()) for row in weights]).reshape(-1, MULTIPLIER)
    assert all(len(set(pair // MULTIPLIER)) == 1 for pair in pairs), pairs
    assert any(pair[0] > pair[1] for pair in pairs), pairs
    assert verify_models(source, permuted).equivalent
    assert unpermute_model(permuted, key) is True
    assert [i.raw_data for i in permuted.graph.initializer] == [i.raw_data for i in source.graph.initializer]
