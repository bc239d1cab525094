"""One layer chunked by Slices (torch's legacy exporter) or by a Split (its dynamo exporter): the same parts (held-out F3).

The legacy exporter cuts ``in_proj``'s output into its two halves with ``Slice``s whose bounds
come from ``Shape`` arithmetic (folded to constants by the graph's folding); the dynamo
exporter writes one ``Split``. resync's sites cut the layer into the same parts in both forms,
each part connected to its own readers, so the audit calls the pair ``converted`` and a
permuted copy of one form against the other ``permuted``, while a tampered part is caught.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxlady import analyze, audit, verify_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._sites import find_sites
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only, tensor_holders

WIDTH, INNER = 8, 24


def _chunked(form: str) -> onnx.ModelProto:
    """In_proj [8 -> 48] cut into halves a, b (``form``: "slice" or "split"), then fc(a) * sigmoid(b) -> out_proj."""
    b = GraphBuilder(f"chunked_{form}", 7)
    x = b.input("input", (1, 5, WIDTH))
    h = b.matmul(x, 2 * INNER, bias=False, name="in_proj")  # [1, 5, 48]
    if form == "split":
        a, z = b.split(h, [INNER, INNER], axis=2, name="chunk")
    else:
        shape = b.custom("Shape", "", [h], (3,), name="shape")
        index = b.param("index", np.array(2, dtype=np.int64))
        two = b.param("two", np.array(2, dtype=np.int64))
        half_scalar = b.custom("Div", "", [b.custom("Gather", "", [shape, index], (), name="last"), two], (), name="half")
        half = b.unsqueeze(half_scalar, [0], name="half_1d")
        full = b.unsqueeze(b.custom("Mul", "", [half_scalar, two], (), name="whole"), [0], name="whole_1d")
        zero = b.param("zero", np.array([0], dtype=np.int64))
        axes = b.param("axes", np.array([2], dtype=np.int64))
        a = b.custom("Slice", "", [h, zero, half, axes], (1, 5, INNER), name="first")
        z = b.custom("Slice", "", [h, half, full, axes], (1, 5, INNER), name="second")
    y = b.mul(b.matmul(a, INNER, name="fc"), b.sigmoid(z, name="gate"), name="gated")
    return b.build(b.matmul(y, 3, name="out_proj", gain=1.0))


def _same_weights(form: str) -> onnx.ModelProto:
    """The ``form`` model with the slice model's weights (the builders draw them in one order)."""
    model = _chunked(form)
    source = tensor_holders(_chunked("slice"))
    for name, tensor in tensor_holders(model).items():
        if name in source and source[name].data_type == TensorProto.FLOAT:
            tensor.CopyFrom(source[name])
    return model


def test_the_two_forms_compute_the_same() -> None:
    report = verify_models(_same_weights("slice"), _same_weights("split"), provider="cpu", iterations=2)
    assert report.equivalent and not report.degenerate_outputs


def test_slices_that_tile_the_output_cut_the_layer_into_parts_with_their_own_tails() -> None:
    graph = ModelGraph(_chunked("slice"))
    parts = [site for site in find_sites(graph, set()) if graph.nodes[site.node].name == "in_proj"]
    assert [(site.part, site.token) for site in parts] == [(0, ("dense", (INNER, WIDTH))), (1, ("dense", (INNER, WIDTH)))]
    assert [graph.nodes[site.tail].name for site in parts] == ["first", "second"]


def test_slices_that_overlap_leave_the_layer_whole() -> None:
    model = _chunked("slice")
    (second,) = [n for n in model.graph.node if n.name == "second"]
    second.input[1] = "zero"  # [0, 48): the second Slice now overlaps the first
    graph = ModelGraph(model)
    parts = [site for site in find_sites(graph, set()) if graph.nodes[site.node].name == "in_proj"]
    assert len(parts) == 1 and parts[0].token == ("dense", (2 * INNER, WIDTH))


def test_slice_and_split_forms_are_the_same_model_converted() -> None:
    result = audit(_same_weights("slice"), _same_weights("split"))
    assert result.verdict == "converted", result.to_text()
    assert result.exit_code == 0
    back = audit(_same_weights("split"), _same_weights("slice"))
    assert back.verdict == "converted", back.to_text()


def test_a_permuted_slice_form_against_the_split_form_is_permuted() -> None:
    permuted, _, _, _ = permute_copy(_same_weights("slice"), 3)
    assert verify_models(_same_weights("split"), permuted, provider="cpu").equivalent
    result = audit(_same_weights("split"), permuted)
    assert result.verdict == "permuted", result.to_text()


def test_a_wrong_permutation_of_the_slice_form_is_caught() -> None:
    source = _same_weights("slice")
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(_same_weights("split"), wrong, provider="cpu").equivalent
    assert audit(_same_weights("split"), wrong).verdict not in ("converted", "permuted", "identical")
