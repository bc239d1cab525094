"""Constant tables of one shape read by several layers: content rules out a wrong counterpart.

Held-out round 10, finding F4: a LLaMA decoder exported by torch's dynamo exporter stores its
rotary cos and sin tables as initializers of one shape, each read by two ``Mul`` sites (queries
and keys). ONNX Runtime's offline optimizer reorders those nodes; the sites of one token were
then paired in graph order, cos with sin, and the untouched model was audited ``modified``
("2 other constants changed"). The two cos readers hold identical content, so content cannot
choose between them, but it does rule the sin table out: a counterpart decisively farther than
a site's best one is never paired by structure or order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from fixtures.conversions import to_float16
from onnxlady import audit, verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy

SEQ, HEADS, HEAD_DIM = 6, 2, 8
WIDTH = HEADS * HEAD_DIM
ROPE_MULS = ("q_cos", "q_sin", "k_cos", "k_sin")


def _rotary_attention() -> onnx.ModelProto:
    """One attention layer with rotary tables stored as constants; the four rotary Muls contiguous."""
    b = GraphBuilder("rope_tables", 0)
    x = b.input("input", (1, SEQ, WIDTH))

    def heads(t: str, name: str) -> str:
        return b.transpose(b.reshape(t, [1, SEQ, HEADS, HEAD_DIM], name=f"{name}_split"), [0, 2, 1, 3], name=f"{name}_heads")

    q, k, v = (heads(b.matmul(x, WIDTH, name=n, gain=1.0), n) for n in ("q", "k", "v"))
    angles = np.arange(SEQ, dtype=np.float32)[:, None] * (10.0 ** (-np.arange(HEAD_DIM // 2) / (HEAD_DIM // 2)))[None, :]
    angles = np.concatenate([angles, angles], axis=1).astype(np.float32).reshape(1, 1, SEQ, HEAD_DIM)
    cos, sin = b.param("rope.cos", np.cos(angles)), b.param("rope.sin", np.sin(angles))
    half = HEAD_DIM // 2

    def rotate_half(t: str, name: str) -> str:
        first = b.slice(t, [0], [half], [3], name=f"{name}_x1")
        second = b.mul(b.slice(t, [half], [HEAD_DIM], [3], name=f"{name}_x2"), np.array(-1.0, np.float32), name=f"{name}_neg")
        return b.concat([second, first], axis=3, name=f"{name}_rot")

    q_rot, k_rot = rotate_half(q, "q"), rotate_half(k, "k")
    products = [b.mul(q, cos, name="q_cos"), b.mul(q_rot, sin, name="q_sin"),
                b.mul(k, cos, name="k_cos"), b.mul(k_rot, sin, name="k_sin")]  # fmt: skip
    q, k = b.add(products[0], products[1], name="q_rope"), b.add(products[2], products[3], name="k_rope")
    scores = b.softmax(b.matmul_tensors(q, b.transpose(k, [0, 1, 3, 2], name="k_t"), name="scores"), name="probs")
    context = b.transpose(b.matmul_tensors(scores, v, name="context"), [0, 2, 1, 3], name="context_t")
    merged = b.reshape(context, [1, SEQ, WIDTH], name="merge")
    return b.build(b.matmul(merged, WIDTH, name="out", gain=1.0))


def _rope_muls_reversed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its four rotary Muls in reverse order (ONNX Runtime reorders nodes so), in float16.

    float16 is a conversion: the audit then pairs sites across forms rather than node for node.
    """
    reordered = copy_model(model)
    nodes = list(reordered.graph.node)
    where = [i for i, node in enumerate(nodes) if node.name in ROPE_MULS]
    assert where == list(range(where[0], where[0] + 4)), "the rotary Muls must be contiguous"
    nodes[where[0] : where[0] + 4] = nodes[where[0] : where[0] + 4][::-1]
    del reordered.graph.node[:]
    reordered.graph.node.extend(nodes)
    return to_float16(reordered)


def test_tables_of_one_shape_pair_by_content_across_a_reordering(tmp_path: Path) -> None:
    source = _rotary_attention()
    reordered = _rope_muls_reversed(source)
    onnx.checker.check_model(reordered)
    assert verify_models(source, reordered, atol=1e-2).equivalent
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "reordered.onnx"
    onnx.save(source, reference)
    onnx.save(reordered, suspect)
    result = audit(reference, suspect)
    assert result.verdict == "converted", result.summary
    assert result.exit_code == 0


def test_a_permuted_copy_reordered_is_audited_permuted(tmp_path: Path) -> None:
    source = _rotary_attention()
    permuted, _, perms, _ = permute_copy(source, 7)
    assert perms and verify_models(source, permuted).equivalent
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "suspect.onnx"
    onnx.save(source, reference)
    onnx.save(_rope_muls_reversed(permuted), suspect)
    result = audit(reference, suspect)
    assert result.verdict == "permuted", result.summary


def test_a_changed_table_is_still_found(tmp_path: Path) -> None:
    """Content only rules out counterparts: a table really changed is still reported."""
    source = _rotary_attention()
    changed = _rope_muls_reversed(source)
    table = next(t for t in changed.graph.initializer if t.name == "rope.sin")
    values = onnx.numpy_helper.to_array(table).copy()
    values[0, 0, 3, :] += np.float16(0.5)
    table.CopyFrom(onnx.numpy_helper.from_array(values, "rope.sin"))
    reference, suspect = tmp_path / "reference.onnx", tmp_path / "changed.onnx"
    onnx.save(source, reference)
    onnx.save(changed, suspect)
    result = audit(reference, suspect)
    assert result.exit_code == 1 and result.verdict not in ("converted", "identical", "permuted"), result.summary

