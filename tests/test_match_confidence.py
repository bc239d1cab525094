"""Matching by what weights compute: invariant signatures, confidence, refusal of different models.

Issue 12 item 1 and issue 13 item 4.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model
from onnxlady._resync._entry import resync_model
from onnxlady._resync._invariants import distance, signature
from onnxlady._resync._match import MATCH_THRESHOLD, match_analyses, match_models
from onnxlady.cli import main
from onnxlady.testing import permute_copy

MODELS = Path(__file__).resolve().parents[1] / ".cache" / "models"
#: Fixture pairs built from the same weights in another storage form: ``weight_only_int8``'s
#: convolutions are ``constant_weights``' own, drawn from the same seed and stored as int8 (only
#: their heads differ). They are one model in two forms as far as matching can tell.
SAME_WEIGHTS = {frozenset({"constant_weights", "weight_only_int8"})}


# -- invariant signatures -----------------------------------------------------------------------
def test_signatures_ignore_permutations_and_see_other_weights() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 16, 3, 3))
    moved = weight[rng.permutation(24)][:, rng.permutation(16)]
    assert distance(signature(weight), signature(moved)) < 1e-12
    half = weight.astype(np.float16).astype(np.float64)
    assert distance(signature(weight), signature(half)) < 1e-3  # a float16 conversion
    other = rng.normal(size=weight.shape)
    assert distance(signature(weight), signature(other)) > 10 * distance(signature(weight), signature(half))
    assert distance(signature(weight), signature(weight[:12])) == float("inf")  # other shapes


# -- confidence and refusal ----------------------------------------------------------------------
def test_a_converted_copy_pairs_completely() -> None:
    reference = FIXTURES["resnet"](0)
    model, _, _, _ = permute_copy(reference, 3)
    result = match_models(reference, model)
    assert result.confidence == pytest.approx(1.0) and result.same_model
    document = json.loads(json.dumps(result.to_dict()))
    assert document["threshold"] == MATCH_THRESHOLD
    assert all({"method", "margin", "distance"} <= set(pair) for pair in document["groups"])
    assert all(pair["distance"] is not None and pair["distance"] < 1e-9 for pair in document["site_pairs"])


def test_every_pair_of_different_fixtures_is_refused() -> None:
    analyses = {name: analyze(build(0)) for name, build in sorted(FIXTURES.items())}
    accepted = [
        (a, b)
        for a, b in itertools.permutations(analyses, 2)
        if frozenset({a, b}) not in SAME_WEIGHTS and match_analyses(analyses[a], analyses[b]).same_model
    ]
    assert accepted == []
    for pair in SAME_WEIGHTS:  # the exception is what it says: the convolutions are the same numbers
        a, b = sorted(pair)
        result = match_analyses(analyses[a], analyses[b])
        convs = [p for p in result.site_pairs if p.reference.startswith("Conv")]
        assert convs and all(p.distance is not None and p.distance < 1e-2 for p in convs)


@pytest.mark.skipif(not MODELS.is_dir(), reason="no real models in .cache/models (python3 -m tools.fetch_models)")
def test_every_pair_of_different_real_models_is_refused() -> None:
    paths = sorted(MODELS.glob("*.onnx"))
    if len(paths) < 2:
        pytest.skip("fewer than two real models in .cache/models")
    analyses = {path.stem: analyze(load_model(path).model) for path in paths}
    confidences = {
        (a, b): match_analyses(analyses[a], analyses[b]).confidence for a, b in itertools.permutations(analyses, 2)
    }
    assert max(confidences.values()) < MATCH_THRESHOLD, confidences


def test_resync_and_audit_refuse_different_models_with_the_first_divergence() -> None:
    reference, other = FIXTURES["bert_like"](0), FIXTURES["encoder_prenorm"](0)
    result = match_models(reference, other)
    assert not result.same_model and result.divergences
    for run in (lambda: resync_model(reference, other), lambda: audit_models(reference, other)):
        with pytest.raises(OnnxladyError, match=r"different models: .* beyond a conversion: at the start: "):
            run()


def test_match_command_refuses_different_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(FIXTURES["vgg"](0), tmp_path / "vgg.onnx")
    onnx.save(FIXTURES["resnet"](0), tmp_path / "resnet.onnx")
    model, _, _, _ = permute_copy(FIXTURES["vgg"](0), 5)
    onnx.save(model, tmp_path / "permuted.onnx")
    assert main(["match", str(tmp_path / "vgg.onnx"), str(tmp_path / "resnet.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxlady: error: different models") and err.count("\n") == 1
    assert main(["match", str(tmp_path / "vgg.onnx"), str(tmp_path / "permuted.onnx"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "confidence 100.0 %" in out and "structure" in out


def test_the_nchwc_layout_of_ort_enable_all_is_read(tmp_path) -> None:
    """ORT_ENABLE_ALL on CPU writes com.microsoft.nchwc convolutions with blocked weights: read, they pair."""
    import onnxruntime as ort

    import onnxlady

    reference = tmp_path / "ref.onnx"
    onnx.save(FIXTURES["resnet"](), reference)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "all.onnx")
    ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "all.onnx"))
    if not any(node.domain == "com.microsoft.nchwc" for node in optimized.graph.node):
        pytest.skip("this ONNX Runtime build wrote no NCHWc nodes (no AVX2 or another CPU)")
    result = onnxlady.match(str(reference), optimized)
    assert result.confidence == pytest.approx(1.0)
    # A refusal still names the layout (another model through the same optimizer).
    with pytest.raises(onnxlady.OnnxladyError, match="NCHWc layout"):
        onnxlady.match(FIXTURES["vgg"](), optimized)


def test_a_learned_layer_only_one_model_has_makes_different_models() -> None:
    """DeiT distilled vs ViT: everything pairs but a second classifier. No converter adds a layer."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxlady._resync._match import check_same_model

    reference = FIXTURES["resnet"]()
    suspect, _, _, _ = permute_copy(reference, 3)
    features = next(t.dims[1] for t in reference.graph.initializer if t.name == "logits.weight")
    head = np.random.default_rng(0).standard_normal((features, 16)).astype(np.float32)
    suspect.graph.initializer.append(numpy_helper.from_array(head, "head_dist.weight"))
    suspect.graph.node.append(helper.make_node("MatMul", ["head.flatten", "head_dist.weight"], ["dist"], name="head_dist"))
    suspect.graph.output.append(helper.make_tensor_value_info("dist", TensorProto.FLOAT, None))
    match = match_analyses(analyze(reference), analyze(suspect))
    assert match.confidence >= MATCH_THRESHOLD  # the shares alone would accept it
    assert len(match.unpaired_layers) == 1 and not match.same_model
    assert match.unpaired_layers[0].startswith("suspect: MatMul 'head_dist'")
    with pytest.raises(OnnxladyError, match="a learned layer is only in one of them"):
        check_same_model(match)
    # The permuted copy without the extra head is the same model.
    twin, _, _, _ = permute_copy(reference, 3)
    assert match_analyses(analyze(reference), analyze(twin)).same_model
