"""An embedding whose gathered rows feed a MatMul, through ONNX Runtime's ``quantize_dynamic``.

With its default operator types the quantizer stores the table as integers and, because the
gathered rows feed a MatMul, passes the *integer* rows straight into ``MatMulInteger`` (the
table's zero point at slot 2, its scale first in the scale ``Mul``, no DynamicQuantizeLinear),
plus a ``DequantizeLinear`` of the rows where a float path (a residual) reads them too. That is
the ALBERT / factorised-embedding pattern. The table must read as the reference's table and the
MatMulInteger as its layer: an untouched quantized model is ``converted``, a permuted one
``permuted``, and resync with the true key puts every neuron back (Psi 100).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._entry import resync_model
from onnxlady._resync._quantized_forms import read_quantized
from onnxlady._transforms._key import PermutationKey
from onnxlady._verify._compare import verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

quantization = pytest.importorskip(
    "onnxruntime.quantization", reason="onnxruntime.quantization (ONNX Runtime's quantizer) is not installed"
)

#: Re-ordered neurons move an int8 activation path by a few quantization steps at most.
ATOL, RTOL = 1e-4, 1e-3


def _embedding_mlp(residual: bool) -> onnx.ModelProto:
    """Token ids -> embedding [40, 16] -> MatMul 24 -> Relu -> MatMul 16 (+ the embedding) -> LayerNorm -> head."""
    g = GraphBuilder("embedding_mlp", seed=3)
    ids = g.input("ids", (2, 5), TensorProto.INT64)
    rows = g.embedding(ids, 40, 16, name="emb")
    hidden = g.relu(g.matmul(rows, 24, name="l1"))
    hidden = g.matmul(hidden, 16, name="l2")
    if residual:
        hidden = g.add(rows, hidden)
    return g.build(g.matmul(g.layer_norm(hidden, name="ln"), 10, name="head"))


def _quantize(model: onnx.ModelProto, folder: Path, stem: str) -> onnx.ModelProto:
    source, target = folder / f"{stem}-source.onnx", folder / f"{stem}-quantized.onnx"
    onnx.save(model, str(source))
    quantization.quantize_dynamic(str(source), str(target))
    return onnx.load(str(target))


@functools.cache
def _case(residual: bool, folder: str) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto, onnx.ModelProto, PermutationKey]:
    """(reference, quantized reference, permuted float, permuted and quantized, true key)."""
    reference = _embedding_mlp(residual)
    permuted, _, _, key = permute_copy(reference, 7)
    stem = "residual" if residual else "plain"
    return (reference, _quantize(reference, Path(folder), f"{stem}-untouched"), permuted,
            _quantize(permuted, Path(folder), f"{stem}-permuted"), key)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("quantized-gather-matmul"))


def _rows_into_matmul_integer(model: onnx.ModelProto) -> tuple[int, int]:
    """(the Gather of an integer table, the MatMulInteger reading its output at slot 0)."""
    graph = ModelGraph(model)
    for index, node in enumerate(graph.nodes):
        table = graph.constant_value(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.dtype.kind not in "iu":
            continue
        for reader, slot in graph.consumers.get(node.output[0], []):
            if slot == 0 and graph.nodes[reader].op_type == "MatMulInteger":
                return index, reader
    raise AssertionError("the quantizer did not feed the gathered integer rows into MatMulInteger")


@pytest.mark.parametrize("residual", [True, False], ids=["with-dequantized-residual", "rows-only-to-matmul"])
def test_the_quantizer_writes_the_form(folder: str, residual: bool) -> None:
    _, quantized, _, suspect, _ = _case(residual, folder)
    for model in (quantized, suspect):
        gather, _ = _rows_into_matmul_integer(model)
        readers = {model.graph.node[r].op_type for r, _ in ModelGraph(model).consumers[model.graph.node[gather].output[0]]}
        assert readers == ({"MatMulInteger", "DequantizeLinear"} if residual else {"MatMulInteger"})
        assert "DynamicQuantizeLinear" not in {node.op_type for node in model.graph.node[:gather]}


@pytest.mark.parametrize("residual", [True, False], ids=["with-dequantized-residual", "rows-only-to-matmul"])
def test_the_integer_table_reads_as_the_float_one(folder: str, residual: bool) -> None:
    reference, quantized, _, _, _ = _case(residual, folder)
    gather, _ = _rows_into_matmul_integer(quantized)
    read = read_quantized(ModelGraph(quantized), gather, 0)
    assert read is not None
    table = onnx.numpy_helper.to_array(next(t for t in reference.graph.initializer if t.name == "emb.weight"))
    assert np.all(np.abs(read.value - table) <= read.error + 1e-7)
    assert float(np.max(read.error)) > 0  # a real quantization step, not an exact copy


@pytest.mark.parametrize("residual", [True, False], ids=["with-dequantized-residual", "rows-only-to-matmul"])
def test_untouched_quantized_model_is_converted(folder: str, residual: bool) -> None:
    reference, quantized, _, _, _ = _case(residual, folder)
    report = audit_models(reference, quantized)
    assert report.verdict == "converted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("residual", [True, False], ids=["with-dequantized-residual", "rows-only-to-matmul"])
def test_permuted_quantized_model_is_permuted_and_resynced(folder: str, residual: bool) -> None:
    reference, _, permuted, suspect, key = _case(residual, folder)
    # The permuted float model computes what the reference computes; a wrong permutation does not.
    assert verify_models(reference, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in suspect.graph.node]
    # The resynced suspect computes what the suspect computes, a wrong permutation of it not.
    assert verify_models(suspect, result.model, provider="cpu", atol=ATOL, rtol=RTOL).equivalent
    shuffled = copy_model(result.model)
    permute_producer_only(shuffled, analyze(shuffled))
    assert not verify_models(suspect, shuffled, provider="cpu", atol=ATOL, rtol=RTOL).equivalent


@pytest.mark.parametrize("residual", [True, False], ids=["with-dequantized-residual", "rows-only-to-matmul"])
def test_a_changed_table_row_is_seen_through_the_quantizer(folder: str, residual: bool) -> None:
    reference, quantized, _, _, _ = _case(residual, folder)
    changed = copy_model(quantized)
    gather, _ = _rows_into_matmul_integer(changed)
    tensor = next(t for t in changed.graph.initializer if t.name == changed.graph.node[gather].input[0])
    table = onnx.numpy_helper.to_array(tensor).copy()
    table[3, 5] = table[3, 5] + 60 if table[3, 5] < 128 else table[3, 5] - 60  # 60 quantization steps
    tensor.CopyFrom(onnx.numpy_helper.from_array(table, tensor.name))
    report = audit_models(reference, changed)
    assert report.verdict not in ("identical", "converted", "permuted"), report.summary
