"""The suspect's stored order is kept where it explains a group as well as a move (held-out round 17, F6).

A decoder whose two layers read one stacked KV cache (``past_key [layers, batch, heads, seq, dim]``,
as a torch export of a Whisper/T5-style decoder writes it): with the cache as state, the heads
of both layers are one group. A copy with layer 0's heads 0 and 1 swapped in q/k/v/o (an edit
outside the permutations onnxlady models: the cache holds one head order for both layers) is as
well explained by moving the shared heads group (which re-orders layer 1) as by the stored order
(layer 0 edited). The audit used to move it and then name layer 1's tensors, bit-identical to
the reference's, as the changed ones; and a tie the first pass broke on biases alone moved an
untouched head-dimension group.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from onnxlady._resync._entry import resync_model
from onnxlady._resync._state_analysis import analyze_with_state
from onnxlady.cli import main
from onnxlady.testing import GraphBuilder

HEADS, DIM, WIDTH, STEP, LAYERS = 4, 8, 32, 4, 2


def _split(b: GraphBuilder, h: str, name: str) -> str:
    """A projection with bias, split into heads: ``[1, heads, step, dim]``."""
    heads = b.reshape(b.matmul(h, WIDTH, name=name), [1, STEP, HEADS, DIM], name=f"{name}_heads")
    return b.transpose(heads, [0, 2, 1, 3], name=f"{name}_split")


def _stacked_decoder(seed: int = 0, layers: int = LAYERS) -> onnx.ModelProto:
    """Attention layers (q/k/v/o with biases, residuals) over one stacked cache per K and V."""
    b = GraphBuilder("stacked_cache", seed)
    h = b.matmul(b.input("x", (1, STEP, WIDTH)), WIDTH, name="embed")
    past = {what: b.input(f"past_{what}", (layers, 1, HEADS, 0, DIM)) for what in ("key", "value")}
    stacked: dict[str, list[str]] = {"key": [], "value": []}
    for layer in range(layers):
        with b.scope(f"layers.{layer}"):
            q, k, v = (_split(b, h, name) for name in ("q", "k", "v"))
            caches = []
            for what, new in (("key", k), ("value", v)):
                index = b.param(f"{what}_layer", np.array(layer, dtype=np.int64))
                old = b.custom("Gather", "", [past[what], index], (1, HEADS, 0, DIM), name=f"past_{what}", axis=0)
                cache = b.custom("Concat", "", [old, new], (1, HEADS, STEP, DIM), name=f"cat_{what}", axis=2)
                stacked[what].append(b.unsqueeze(cache, [0], name=f"stack_{what}"))
                caches.append(cache)
            scores = b.matmul_tensors(q, b.transpose(caches[0], [0, 1, 3, 2], name="keys_t"), name="scores")
            scaled = b.mul(scores, np.array(DIM**-0.5, dtype=np.float32), name="scaled")
            attended = b.matmul_tensors(b.softmax(scaled, name="softmax"), caches[1], name="attended")
            merged = b.reshape(b.transpose(attended, [0, 2, 1, 3], name="merge_t"), [1, STEP, WIDTH], name="merge")
            h = b.add(h, b.matmul(merged, WIDTH, name="o"), name="residual")
    presents = [b.custom("Concat", "", stacked[what], (layers, 1, HEADS, STEP, DIM), name=f"present_{what}", axis=0)
                for what in ("key", "value")]  # fmt: skip
    model = b.build([b.matmul(h, 10, name="head", gain=1.0), *presents])
    graph = model.graph
    for tensor in graph.initializer:  # the sequence length is read from the tensor
        if tensor.name.endswith(".shape"):
            target = numpy_helper.to_array(tensor).copy()
            target[1] = -1 if target.size == 4 else 0
            tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))
    renamed = {presents[0]: "present_key", presents[1]: "present_value"}
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
    cache = [layers, 1, HEADS, "past_sequence_length", DIM]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "sequence_length", WIDTH])]
    inputs += [helper.make_tensor_value_info(f"past_{what}", TensorProto.FLOAT, cache) for what in ("key", "value")]
    outputs = [helper.make_tensor_value_info(graph.output[0].name, TensorProto.FLOAT, [1, "sequence_length", 10])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [layers, 1, HEADS, "total_sequence_length", DIM])
                for name in renamed.values()]  # fmt: skip
    del graph.input[:], graph.output[:]
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    return model


def _swap_heads(model: onnx.ModelProto, layer: int = 0, noise: float = 0.0, seed: int = 0) -> onnx.ModelProto:
    """Layer ``layer``'s heads 0 and 1 swapped in q/k/v (columns, biases) and o (rows); optional noise."""
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    order = np.arange(HEADS * DIM).reshape(HEADS, DIM)
    order[[0, 1]] = order[[1, 0]]
    order = order.ravel()
    rng = np.random.default_rng(seed)
    for tensor in swapped.graph.initializer:
        values = numpy_helper.to_array(tensor)
        prefix = f"layers.{layer}."
        if tensor.name in {f"{prefix}{p}.weight" for p in "qkv"}:
            values = values[:, order]
        elif tensor.name in {f"{prefix}{p}.bias" for p in "qkv"}:
            values = values[order]
        elif tensor.name == f"{prefix}o.weight":
            values = values[order, :]
        if noise and values.dtype == np.float32 and values.size > 1:
            values = values + rng.normal(0.0, noise * float(values.std()), values.shape).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values.copy(), tensor.name))
    return swapped


def _differing(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> set[str]:
    """The initializers the suspect stores otherwise than the reference."""
    stored = {t.name: numpy_helper.to_array(t) for t in suspect.graph.initializer}
    return {
        t.name for t in reference.graph.initializer
        if not np.array_equal(numpy_helper.to_array(t), stored[t.name])
    }  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1])
def test_an_untouched_layer_is_never_named_as_changed(tmp_path, capsys, seed: int) -> None:
    reference = _stacked_decoder(seed)
    suspect = _swap_heads(reference)
    edited = _differing(reference, suspect)
    assert edited and all(name.startswith("layers.0.") for name in edited)
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(suspect, tmp_path / "sus.onnx")
    code = main(["audit", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "--json", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    # One layer's heads swapped while the stacked cache holds one head order for both: a
    # re-ordering outside the modelled permutations, named where it is.
    assert (code, report["verdict"]) == (1, "modified")
    assert set(report["differing_tensors"]) == edited
    assert "layers.1." not in report["summary"]
    assert "re-ordering outside the permutations onnxlady models" in report["summary"]


def test_a_group_held_in_two_orders_names_what_the_suspect_moved(tmp_path, capsys) -> None:
    """Three layers, two swapped: the resync takes the swap; the untouched layer is named for what it is."""
    reference = _stacked_decoder(0, layers=3)
    suspect = _swap_heads(_swap_heads(reference, layer=0), layer=1)
    edited = _differing(reference, suspect)
    assert {name.split(".")[1] for name in edited} == {"0", "1"}
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(suspect, tmp_path / "sus.onnx")
    code = main(["audit", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "--json", "--quiet"])
    report = json.loads(capsys.readouterr().out)
    assert (code, report["verdict"]) == (1, "modified")
    assert set(report["differing_tensors"]) == edited  # what the suspect changed, never layer 2
    assert report["summary"].startswith("a group held in two orders: 7 tensors the suspect stores bit for bit")
    assert "layers.2.k.bias" in report["summary"] and "layers.0.k.bias" in report["summary"]


def test_the_shared_heads_permuted_together_stay_a_permutation(tmp_path) -> None:
    reference = _stacked_decoder(0)
    permuted = onnxlady.permute(reference, seed=3, kv_state=True)
    assert permuted.key.permutations()  # the heads of both layers and the dims inside move
    audit = onnxlady.audit(reference, permuted.model)
    assert audit.verdict == "permuted"
    resynced = onnxlady.resync(reference, permuted.model, true_key=permuted.key)
    assert resynced.psi == pytest.approx(100.0)
    # The wrong permutation of the edit above is caught (the control of the equivalence claim).
    assert onnxlady.audit(reference, _swap_heads(reference)).verdict == "modified"


def test_a_tie_is_broken_toward_the_stored_order() -> None:
    """With noise nothing is bit-identical; the head dims of V, first matched on the biases alone, tie."""
    reference = _stacked_decoder(2)
    suspect = _swap_heads(reference, noise=0.05, seed=2)
    analysis = analyze_with_state(reference)
    result = resync_model(reference, suspect, analysis=analysis)
    moved = {gid for gid, perm in result.key.permutations().items() if not np.array_equal(perm, np.arange(perm.size))}
    # Only the heads group may move (it is shared: either layer's order explains it); no group
    # inside a head was permuted, and none moves.
    assert all(analysis.group(gid).size == HEADS for gid in moved), moved
    assert all(group.ambiguous == 0 for group in result.groups if group.id not in moved)
