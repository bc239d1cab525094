"""``find`` makes a call only on evidence; the fingerprint reads Einsum weights (session 15).

Found by the Einsum rule's work: the fingerprint's layer walk read no Einsum weight, so a
permuted Einsum model had no layer, and ``find`` called its own reference ``unrelated`` at
distance 0 (``0/0/0`` layers), a call made with no evidence. Now (1) the Einsum weights are
layers, read with the Einsum rule's letters (neurons: on the weight and the output; inputs: on
the weight and the data), so a permuted, float16 or simplified copy is found ``derived`` and
another seed's block is not; (2) where the suspect or a candidate has no fingerprinted layer,
the call is ``unknown`` with the reason (distance and score null), ``index build`` lists such
models and ``find --all-pairs`` lists them apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlady
from fixtures import FIXTURES
from fixtures.conversions import simplify, to_float16
from fixtures.einsum import HEAD, HEADS, HIDDEN, WIDTH, build_einsum_block
from onnxlady._provenance._einsum import einsum_rows
from onnxlady._provenance._fingerprint import fingerprint_model
from onnxlady.cli import main
from onnxlady.testing import permute_copy


def _permuted(model: onnx.ModelProto) -> onnx.ModelProto:
    permuted, _, perms, _ = permute_copy(model, 5)
    assert perms, "the Einsum rule found nothing to permute"
    return permuted


COPIES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "permuted": _permuted,
    "float16": to_float16,
    "simplified": simplify,
}


@pytest.fixture(scope="module")
def einsum_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the Einsum block (seed 0), the same block of another seed, and a VGG."""
    folder = tmp_path_factory.mktemp("einsum_registry")
    onnx.save(build_einsum_block(0), folder / "block.onnx")
    onnx.save(build_einsum_block(1), folder / "other_seed.onnx")
    onnx.save(FIXTURES["vgg"](0), folder / "vgg.onnx")
    index = folder / "r.idx"
    onnxlady.build_index([folder], index, workers=1)
    return index


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_a_copy_of_an_einsum_model_is_found_derived(copy: str, einsum_registry: Path, tmp_path: Path) -> None:
    index = einsum_registry
    suspect = tmp_path / f"{copy}.onnx"
    onnx.save(COPIES[copy](build_einsum_block(0)), suspect)
    calls = {Path(c.path).name: c for c in onnxlady.find(suspect, index, top=3).candidates}
    block = calls["block.onnx"]
    # Q, K, V, O, the MLP's two layers and the head: seven layers, all paired.
    assert (block.call, block.paired_layers, block.unpaired_layers) == ("derived", 7, (0, 0))
    assert block.distance < 0.05
    # The same architecture with other weights (a wrong guess of the origin) is not derived.
    assert calls["other_seed.onnx"].call == "unrelated" and calls["other_seed.onnx"].paired_layers == 7


def test_the_weight_rows_follow_the_rule_letters() -> None:
    rng = np.random.default_rng(0)

    def rows(equation: str, *operands: np.ndarray | None) -> np.ndarray | None:
        return einsum_rows(
            helper.make_node("Einsum", [f"i{k}" for k in range(len(operands))], ["y"], equation=equation), operands
        )

    w = rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32)
    np.testing.assert_array_equal(rows("bsd,df->bsf", None, w), w.T)  # x @ W: a MatMul's layer
    np.testing.assert_array_equal(rows("df,bsd->bsf", w, None), w.T)  # the weight first
    np.testing.assert_array_equal(rows("bsd,df", None, w), w.T)  # implicit output (bfs)
    np.testing.assert_array_equal(rows("...d,df->...f", None, w), w.T)
    qkv = rng.standard_normal((WIDTH, HEADS, HEAD)).astype(np.float32)
    np.testing.assert_array_equal(rows("bsd,dhe->bhse", None, qkv), qkv.reshape(WIDTH, -1).T)
    out = rng.standard_normal((HEADS, HEAD, WIDTH)).astype(np.float32)
    np.testing.assert_array_equal(rows("bhse,hed->bsd", None, out), out.reshape(-1, WIDTH).T)
    # Not a layer, or not one the letters prove: no guess.
    square = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    assert rows("bsf,ff->bsf", None, square) is None  # a diagonal (repeated letter)
    assert rows("bsd,kdf->bsf", None, qkv) is None  # a letter on the weight alone (summed over)
    assert rows("df,fe->de", w, square) is None  # two constants
    assert rows("bsd,d->bs", None, w[:, 0]) is None  # a contraction with no neurons
    assert rows("bhse,bhte->bhst", None, None) is None  # attention: no constant


def _relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.ones(8, dtype=np.float32), "unused")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_no_fingerprinted_layer_is_no_evidence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "registry"
    folder.mkdir()
    onnx.save(_relu_model(), folder / "relu.onnx")
    onnx.save(FIXTURES["vgg"](0), folder / "vgg.onnx")
    assert fingerprint_model(_relu_model()).layers == 0
    index = tmp_path / "r.idx"
    assert main(["index", "build", str(folder), "-o", str(index), "--workers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unfingerprinted"] == [str(folder / "relu.onnx")]
    assert main(["index", "build", str(folder), "-o", str(index), "--workers", "1"]) == 0
    assert f"no fingerprinted layer (find cannot call it derived or unrelated): {folder / 'relu.onnx'}" in (
        capsys.readouterr().out
    )

    # A suspect with no layer: nothing is called derived or unrelated, exit 1 (nothing derived).
    assert main(["find", str(folder / "relu.onnx"), "--index", str(index), "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["derived"] == 0 and len(document["candidates"]) == 2
    for candidate in document["candidates"]:
        assert candidate["call"] == "unknown" and candidate["distance"] is None and candidate["score"] is None
    reasons = {Path(c["path"]).name: c["reason"] for c in document["candidates"]}
    assert reasons == {
        "relu.onnx": "neither model has a fingerprinted layer",
        "vgg.onnx": "the suspect has no fingerprinted layer",
    }
    assert main(["find", str(folder / "relu.onnx"), "--index", str(index)]) == 1
    text = capsys.readouterr().out
    assert "0 derived" in text and "2 unknown" in text and "unrelated" not in text

    # A suspect with layers: its own model derived, the model with no layer unknown (ranked last).
    suspect = tmp_path / "vgg_permuted.onnx"
    onnx.save(permute_copy(FIXTURES["vgg"](0), 3)[0], suspect)
    assert main(["find", str(suspect), "--index", str(index), "--json"]) == 0
    candidates = json.loads(capsys.readouterr().out)["candidates"]
    assert [(Path(c["path"]).name, c["call"]) for c in candidates] == [
        ("vgg.onnx", "derived"),
        ("relu.onnx", "unknown"),
    ]
    assert candidates[1]["reason"] == "the candidate has no fingerprinted layer"

    # All pairs: the model with no layer is in no cluster, and listed apart.
    assert main(["find", "--all-pairs", "--index", str(index), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["unfingerprinted"] == [str(folder / "relu.onnx")]
