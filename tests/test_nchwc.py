"""ONNX Runtime's NCHWc layout (``ORT_ENABLE_ALL`` on x86): read by resync, audit and match.

Every suspect here is written by the real optimizer (``SessionOptions.graph_optimization_level =
ORT_ENABLE_ALL`` with ``optimized_model_filepath``); the tests skip where this CPU makes it write
no NCHWc node (no AVX2).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized
from onnxlady import analyze, unpermute_model
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import check_same_model, match_models
from onnxlady._resync._nchwc_forms import NCHWC, blocked_conv, nchwc_block, read_blocked
from onnxlady._verify._compare import verify_models
from onnxlady.cli import main
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def padded_convnet(seed: int = 0) -> onnx.ModelProto:
    """Convolutions whose channel counts are no whole blocks: the optimizer pads them.

    A plain 20-channel input (reordered, padded to 32), a depthwise conv of 24 channels (its
    ``group`` padded too), a 1x1 conv to 8 channels (outputs padded) read back as NCHW by a
    3x3 conv (the ``OIHWBo`` form), a grouped conv, a residual Add and a Relu.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, x: str, out: int, per_group: int, k: int, group: int = 1) -> str:
        inits.append(numpy_helper.from_array(rng.standard_normal((out, per_group, k, k)).astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.standard_normal(out).astype(np.float32), f"{name}.b"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, group=group,
                                      pads=[k // 2] * 4))  # fmt: skip
        return name

    a = conv("c1", "x", 24, 20, 3)
    nodes.append(helper.make_node("Relu", [a], ["r1"], name="r1"))
    b = conv("c2", "r1", 24, 1, 3, group=24)
    nodes.append(helper.make_node("Add", [b, "r1"], ["res"], name="res"))
    c = conv("c3", "res", 8, 24, 1)
    d = conv("c4", c, 64, 8, 3)
    nodes.append(helper.make_node("Relu", [d], ["r4"], name="r4"))
    e = conv("c5", "r4", 64, 32, 3, group=2)
    graph = helper.make_graph(
        nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 20, 12, 12])],
        [helper.make_tensor_value_info(e, TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


BUILDERS = {"resnet": FIXTURES["resnet"], "mobilenet": FIXTURES["mobilenet"], "padded": padded_convnet}


def _all(model: onnx.ModelProto) -> onnx.ModelProto:
    optimized = ort_optimized(model, "all")
    if not any(node.domain == NCHWC for node in optimized.graph.node):
        pytest.skip("this CPU makes ONNX Runtime write no NCHWc nodes (no AVX2)")
    return optimized


def test_the_padded_fixture_is_padded() -> None:
    """The optimizer pads this fixture's channels: what the reading below has to undo (this can fail)."""
    suspect = _all(padded_convnet())
    graph = ModelGraph(suspect)
    convs = [blocked_conv(graph, index) for index in range(len(graph.nodes))]
    read = [conv for conv in convs if conv is not None]
    assert len(read) == 5
    assert any(conv.stored[0] > conv.shape[0] for conv in read)  # padded outputs
    assert any(conv.stored[1] > conv.shape[1] for conv in read if conv.form == "OIHWBiBo")  # padded inputs
    assert {conv.form for conv in read} == {"OIHWBo", "OIHWBiBo"}
    assert nchwc_block(graph) in (8, 16)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_blocked_weights_read_back_as_the_conv_weights(name: str) -> None:
    """Un-blocked and cut to the true channels, each NCHWc weight and bias is its Conv's, bit for bit."""
    reference = BUILDERS[name](0)
    suspect = _all(reference)
    graph = ModelGraph(suspect)
    weights = [numpy_helper.to_array(t) for t in reference.graph.initializer if t.dims and len(t.dims) == 4]
    read = [
        read_blocked(graph, index, 1) for index in range(len(graph.nodes)) if blocked_conv(graph, index) is not None
    ]
    assert read and all(r is not None for r in read)
    if name == "padded":  # no BatchNorm: the stored weights are the Conv weights themselves
        assert sorted(r.value.shape for r in read if r is not None) == sorted(w.shape for w in weights)
        for r in read:
            assert r is not None
            assert any(w.shape == r.value.shape and np.array_equal(w, r.value) for w in weights)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resync_across_ort_enable_all(name: str) -> None:
    """REF vs ORT_ENABLE_ALL(permuted REF): every permutation recovered, exactly the key's."""
    reference = BUILDERS[name](0)
    model, _, _, key = permute_copy(reference, 7)
    suspect = _all(model)
    before = suspect.SerializeToString()
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert suspect.SerializeToString() == before  # the suspect was not modified
    # Solved in the reference's form (the suspect's NCHWc groups are frozen): suspect neuron
    # matches[gid][j] is reference neuron j, the inverse of the key's permutation.
    for gid, perm in key.permutations().items():
        assert np.array_equal(np.argsort(result.across.matches[gid]), perm), gid
    # The output keeps the suspect's form (its NCHWc groups frozen) and computes what it computes.
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    # The permuted model the key undoes computes the reference...
    plain = copy_model(model)
    unpermute_model(plain, key)
    assert verify_models(reference, plain, provider="cpu").equivalent
    # ...and one permuted wrongly (producers only) does not: through the optimizer, audit does
    # not call it a permutation.
    wrong = copy_model(model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    report = audit_models(reference, _all(wrong))
    assert report.verdict == "modified" and report.exit_code == 1


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_audit_names_the_nchwc_conversion(name: str) -> None:
    reference = BUILDERS[name](0)
    model, _, _, _ = permute_copy(reference, 5)
    report = audit_models(reference, _all(model))
    assert report.verdict == "permuted" and report.exit_code == 0
    kinds = {finding.kind for finding in report.conversions}
    assert {"nchwc", "ort-optimized"} <= kinds, kinds
    report = audit_models(reference, _all(reference))
    assert report.verdict == "converted" and report.exit_code == 0
    assert "nchwc" in {finding.kind for finding in report.conversions}


def test_a_changed_blocked_weight_is_a_modification() -> None:
    """One weight of an NCHWc convolution changed after optimizing: audit reads `modified`."""
    reference = padded_convnet()
    model, _, _, _ = permute_copy(reference, 5)
    suspect = _all(model)
    graph = ModelGraph(suspect)
    index = next(i for i in range(len(graph.nodes)) if (c := blocked_conv(graph, i)) is not None and c.form == "OIHWBiBo")
    name = suspect.graph.node[index].input[1]
    tensor = next(t for t in suspect.graph.initializer if t.name == name)
    value = numpy_helper.to_array(tensor).copy()
    value.reshape(-1)[0] += 0.5 + abs(float(value.reshape(-1)[0]))
    tensor.CopyFrom(numpy_helper.from_array(value, name))
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1


def test_match_pairs_every_layer_of_ort_enable_all() -> None:
    reference = FIXTURES["resnet"](0)
    match = match_models(reference, _all(reference))
    check_same_model(match)
    assert match.confidence == pytest.approx(1.0)
    assert all(pair.suspect.startswith(("Conv", "Gemm")) for pair in match.site_pairs)


def test_another_model_through_ort_enable_all_is_still_refused() -> None:
    """Reading the layout does not make different models pair: vgg vs ORT_ENABLE_ALL(resnet)."""
    match = match_models(FIXTURES["vgg"](0), _all(FIXTURES["resnet"](0)))
    with pytest.raises(OnnxladyError, match="different models"):
        check_same_model(match)


def test_nchwc_groups_freeze_with_the_reason(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect/permute on the optimized graph itself: every NCHWc group frozen, saying why; permute exits 2."""
    suspect = _all(FIXTURES["resnet"](0))
    analysis = analyze(suspect)
    convs = [group for group in analysis.groups if any(r.kind == "nchwc" for r in group.reasons)]
    assert convs and all(group.frozen for group in convs)
    assert not [group for group in analysis.groups if group.permutable]
    path = tmp_path / "all.onnx"
    onnx.save(suspect, path)
    assert main(["permute", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "NCHWc layout" in capsys.readouterr().err
