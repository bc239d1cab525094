"""Attention heads merged by a Reshape whose input lost its symbolic dims (held-out round 13, F7).

Hugging Face's ALBERT and T5 exports merge the context layer ``[B, S, H, D] -> [B, S, H * D]``
with a target computed at run time (``Concat(Shape(h)[0], Shape(h)[1], -1)``), after an
attention mask expanded to a computed shape (``Expand`` through ``Where(Equal(shape, -1))``),
which ONNX's shape inference cannot follow: the merge reads ``[?, ?, H, D]`` and writes
``[B, S, ?]``, and the heads froze ("Reshape regroups the permuted axis in a way with no index
map", or "axes reshaped together with this one have unknown sizes"): ALBERT 52 % permutable,
T5 67 %. Two facts settle it, neither a guess: the ``MatMul`` projecting the merged layer
contracts its last dim with a ``[H * D, C]`` weight, so every run has ``H * D`` there; and
known trailing dims of equal product (``H, D`` and ``H * D``) align row-major whatever unknown
dims come before them. The fixtures below are that export pattern, small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze, unpermute_model, verify_models
from onnxlady.testing import IR_VERSION, constant_bytes, copy_model, permute_copy, permute_producer_only

WIDTH, HEADS, HEAD = 32, 4, 8


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _dim(nodes: list[onnx.NodeProto], source: str, axis: int, name: str) -> str:
    """``Unsqueeze(Shape(source)[axis])``: one dim of ``source`` as a 1-D tensor, as the exporter writes it."""
    nodes += [helper.make_node("Shape", [source], [f"{name}.shape"], name=f"{name}.shape"),
              _constant(f"{name}.axis", np.array(axis, np.int64)),
              helper.make_node("Gather", [f"{name}.shape", f"{name}.axis"], [f"{name}.dim"], name=f"{name}.gather", axis=0),
              _constant(f"{name}.zero", np.array([0], np.int64)),
              helper.make_node("Unsqueeze", [f"{name}.dim", f"{name}.zero"], [name], name=f"{name}.unsqueeze")]
    return name


def build_head_merge(seed: int = 0, *, batch: int | str = "batch") -> onnx.ModelProto:
    """``x`` [batch, seq, 32], ``mask`` [batch, seq] -> one attention block -> MatMul head ``logits`` [batch, seq, 10].

    The mask is expanded to a computed ``[B, 1, S, S]`` through torch's ``Where(Equal(shape, -1))``
    and the context layer merged with ``Concat(B, S, -1)``: ``batch="batch"`` is ALBERT's export
    (symbolic batch, the context's ``B, S`` lost), ``batch=1`` T5's (a fixed batch the merge's
    target folds to ``1``, the context's batch that of a mask with a batch dim of its own).
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    nodes: list[onnx.NodeProto] = []
    batch_dim = _dim(nodes, "x", 0, "b")
    mask_batch = batch_dim if isinstance(batch, str) else _dim(nodes, "mask", 0, "mb")
    seq_dim = _dim(nodes, "x", 1, "s")
    # The extended mask: (1 - mask[:, None, None, :]) * -1e4, expanded to [B, 1, S, S] by a computed shape.
    nodes += [_constant("m.axes", np.array([1, 2], np.int64)),
              helper.make_node("Unsqueeze", ["mask", "m.axes"], ["m.4d"], name="m.unsqueeze"),
              _constant("m.one", np.array([1], np.int64)),
              helper.make_node("Concat", [mask_batch, "m.one", seq_dim, seq_dim], ["m.target"], name="m.concat", axis=0),
              _constant("m.minus_one", np.array([-1], np.int64)),
              helper.make_node("Equal", ["m.target", "m.minus_one"], ["m.is_free"], name="m.equal"),
              helper.make_node("Shape", ["m.target"], ["m.rank"], name="m.rank"),
              helper.make_node("ConstantOfShape", ["m.rank"], ["m.ones"], name="m.ones",
                               value=numpy_helper.from_array(np.array([1], np.int64))),
              helper.make_node("Where", ["m.is_free", "m.ones", "m.target"], ["m.shape"], name="m.where"),
              helper.make_node("Expand", ["m.4d", "m.shape"], ["m.expanded"], name="m.expand"),
              _constant("m.unit", np.array(1.0, np.float32)),
              helper.make_node("Sub", ["m.unit", "m.expanded"], ["m.inverted"], name="m.sub"),
              _constant("m.big", np.array(-1e4, np.float32)),
              helper.make_node("Mul", ["m.inverted", "m.big"], ["m.bias"], name="m.mul")]
    nodes.append(_constant("split", np.array([0, 0, HEADS, HEAD], np.int64)))
    for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", weight(f"{part}.weight", (WIDTH, WIDTH), 0.4)], [f"{part}.mm"], name=f"{part}.matmul"),
                  helper.make_node("Add", [f"{part}.mm", weight(f"{part}.bias", (WIDTH,), 0.2)], [f"{part}.lin"], name=f"{part}.add"),
                  helper.make_node("Reshape", [f"{part}.lin", "split"], [f"{part}.heads"], name=f"{part}.reshape"),
                  helper.make_node("Transpose", [f"{part}.heads"], [part], name=f"{part}.transpose", perm=perm)]
    nodes += [helper.make_node("MatMul", ["q", "k"], ["scores"], name="scores"),
              _constant("scale", np.array(HEAD ** -0.5, np.float32)),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scaled"),
              helper.make_node("Add", ["scaled", "m.bias"], ["masked"], name="masked"),
              helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
              helper.make_node("Transpose", ["context"], ["context.t"], name="context.transpose", perm=[0, 2, 1, 3]),
              _constant("free", np.array([-1], np.int64)),
              helper.make_node("Concat", [batch_dim, seq_dim, "free"], ["merge.target"], name="merge.concat", axis=0),
              helper.make_node("Reshape", ["context.t", "merge.target"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", weight("o.weight", (WIDTH, WIDTH), 0.4)], ["o.mm"], name="o.matmul"),
              helper.make_node("Add", ["o.mm", weight("o.bias", (WIDTH,), 0.2)], ["o.lin"], name="o.add"),
              helper.make_node("Add", ["x", "o.lin"], ["residual"], name="residual"),
              helper.make_node("MatMul", ["residual", weight("head.weight", (WIDTH, 10), 0.4)], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "head_merge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, "seq", WIDTH]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch if isinstance(batch, str) else "mask_batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "seq", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _shapes(batch: int | str) -> dict[str, list[int]]:
    rows = 1 if batch == 1 else 2
    return {"x": [rows, 7, WIDTH], "mask": [rows, 7]}


def _heads_frozen(model: onnx.ModelProto) -> list[str]:
    return [reason.message for group in analyze(model).groups for reason in group.reasons if "merge" in reason.message]


@pytest.mark.parametrize("batch", ["batch", 1], ids=["albert-symbolic-batch", "t5-fixed-batch"])
def test_heads_merged_with_a_computed_target_permute(batch: int | str) -> None:
    model = build_head_merge(batch=batch)
    assert _heads_frozen(model) == []
    permuted, analysis, _, key = permute_copy(model, 3)
    sizes = sorted(group.size for group in analysis.groups if not group.frozen)
    assert HEADS in sizes, sizes  # the head group itself moves
    shapes = _shapes(batch)
    assert verify_models(model, permuted, shapes=shapes).equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, shapes=shapes).equivalent
    restored = copy_model(permuted)
    unpermute_model(restored, key)
    assert constant_bytes(restored) == constant_bytes(model)
    assert restored.SerializeToString() == model.SerializeToString()


def test_the_merge_reads_lost_dims() -> None:
    """The fixture has the export's shapes: the merge reads ``[?, ?, H, D]`` (else the test tests nothing)."""
    from onnxlady._graph._model_graph import ModelGraph

    for batch in ("batch", 1):
        graph = ModelGraph(build_head_merge(batch=batch))
        context, merged = graph.shapes["context.t"], graph.shapes["merged"]
        assert context[2:] == (HEADS, HEAD) and context[:2] != merged[:2], (context, merged)
        assert not isinstance(merged[-1], int), merged


def test_a_merge_whose_projection_does_not_fix_the_dim_stays_frozen() -> None:
    """With no ``MatMul`` after it the merged dim stays unknown: the heads are not permuted on a guess."""
    model = build_head_merge()
    graph = model.graph
    for node in graph.node:
        if node.name == "o.matmul":  # read the merged layer element-wise instead of projecting it
            node.op_type = "Mul"
            graph.initializer.remove(next(t for t in graph.initializer if t.name == "o.weight"))
            graph.initializer.append(numpy_helper.from_array(np.ones((WIDTH,), np.float32), "o.weight"))
    assert _heads_frozen(model)


@pytest.mark.parametrize("batch", ["batch", 1], ids=["albert-symbolic-batch", "t5-fixed-batch"])
def test_a_dynamically_quantized_merge_permutes_its_heads(tmp_path: Path, batch: int | str) -> None:
    """ONNX Runtime's dynamic quantizer puts ``DynamicQuantizeLinear -> MatMulInteger`` after the merge: it fixes the dim too."""
    from onnxruntime.quantization import quantize_dynamic

    onnx.save(build_head_merge(batch=batch), tmp_path / "model.onnx")
    quantize_dynamic(str(tmp_path / "model.onnx"), str(tmp_path / "quantized.onnx"))
    model = onnx.load(tmp_path / "quantized.onnx")
    assert "MatMulInteger" in {node.op_type for node in model.graph.node}
    assert _heads_frozen(model) == []
    permuted, _, _, _ = permute_copy(model, 3)
    assert verify_models(model, permuted, shapes=_shapes(batch)).equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, shapes=_shapes(batch)).equivalent
