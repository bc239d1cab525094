"""Resync, audit and match across the converters deployment pipelines really run (issue 12).

A permuted copy of a fixture goes through a real converter (:mod:`fixtures.deployment`: ONNX
Runtime's offline optimizer at its basic and extended levels, its transformer optimizer,
onnxslim, onnx-simplifier, int4 MatMulNBits); a converter that does not install here is skipped
with the reason. Resync must put every neuron back (Psi 100) while the output keeps the
suspect's converted form, computes what the suspect computes (and a wrong permutation of it
does not), and is the suspect re-ordered by the recovered key, bit for bit; audit must call the
pair ``permuted`` and name the conversion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from fixtures.deployment import CASES, CONVERTERS, FINDINGS, unavailable
from onnxlady import analyze, unpermute_model
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import match_models
from onnxlady._resync._solver import ResyncResult
from onnxlady._verify._compare import verify_models
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only

logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

PAIRS = [(converter, name) for converter, names in CASES.items() for name in names]
_CACHE: dict[tuple[str, str], tuple[onnx.ModelProto, onnx.ModelProto, object, onnx.ModelProto]] = {}


def _case(converter: str, name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, object, onnx.ModelProto]:
    """(reference, permuted copy, true key, the permuted copy through the converter), built once."""
    reason = unavailable(converter)
    if reason is not None:
        pytest.skip(reason)
    if (converter, name) not in _CACHE:
        reference = FIXTURES[name](0)
        model, _, _, key = permute_copy(reference, 7)
        _CACHE[(converter, name)] = (reference, model, key, CONVERTERS[converter](model))
    return _CACHE[(converter, name)]


def check_resync_across(reference: onnx.ModelProto, suspect: onnx.ModelProto, key: object) -> ResyncResult:
    """Resync of a converted permuted copy: Psi 100, and its output is the suspect re-ordered.

    The output keeps the suspect's form, computes what the suspect computes (and a wrong
    permutation of it does not: the check can fail), and is the suspect re-ordered by the
    recovered key, bit for bit.
    """
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in suspect.graph.node]
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu").equivalent
    restored = copy_model(suspect)
    unpermute_model(restored, result.key)
    assert constant_bytes(restored) == constant_bytes(result.model)
    return result


@pytest.mark.parametrize(("converter", "name"), PAIRS)
def test_resync_across_a_real_converter(converter: str, name: str) -> None:
    reference, model, key, suspect = _case(converter, name)
    before = onnx.load_from_string(suspect.SerializeToString())
    assert [n.op_type for n in suspect.graph.node] != [n.op_type for n in reference.graph.node]  # it converted
    result = check_resync_across(reference, suspect, key)
    assert suspect == before  # the suspect was not modified
    # Where the suspect's form can move every group, the output is the reference's order.
    if converter != "nbits" and not result.across.unwritten:
        plain = copy_model(model)
        unpermute_model(plain, key)
        assert verify_models(reference, plain, provider="cpu").equivalent


@pytest.mark.parametrize(("converter", "name"), PAIRS)
def test_audit_names_the_conversion(converter: str, name: str) -> None:
    reference, _, _, suspect = _case(converter, name)
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    kinds = {finding.kind for finding in report.conversions}
    assert kinds & set(FINDINGS[converter]), kinds


@pytest.mark.parametrize(("converter", "name"), [("ort-extended", "resnet"), ("ort-transformer", "bert_like")])
def test_resync_against_a_converted_reference(converter: str, name: str) -> None:
    """The reference went through the converter, the suspect is only permuted."""
    reference, model, key, _ = _case(converter, name)
    converted = CONVERTERS[converter](reference)
    result = resync_model(converted, model, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(reference)
    assert audit_models(converted, model).verdict == "permuted"


def test_audit_of_a_noisy_copy_through_a_converter_is_not_permuted() -> None:
    reference, model, _, _ = _case("ort-extended", "resnet")
    from onnxlady._transforms._perturb import perturb_model

    noisy = copy_model(model)
    perturb_model(noisy, noise=0.5, seed=3)
    report = audit_models(reference, CONVERTERS["ort-extended"](noisy))
    assert report.verdict not in ("permuted", "identical", "converted") and report.exit_code == 1


def test_reordered_projections_are_paired_by_content() -> None:
    """ONNX Runtime's optimizer writes k_proj before q_proj: content pairs them right.

    The alignment pairs them crosswise; their weights' invariant signatures put them right, and
    say so.
    """
    reference, _, _, suspect = _case("ort-extended", "encoder_postnorm")
    match = match_models(reference, suspect)
    assert match.confidence == pytest.approx(1.0) and not match.divergences
    moved = [pair for pair in match.site_pairs if pair.method == "content"]
    assert moved and all(pair.margin is not None and pair.margin > 0.5 for pair in moved)
    for pair in moved:  # the same projection on both sides, whatever the node order
        assert pair.reference.split("'")[1].split(".matmul")[0] == pair.suspect.split("'")[1].split(".matmul")[0]
    assert {pair.method for pair in match.groups} >= {"content"}
    assert "reordered" in {finding.kind for finding in match.conversions}
    assert "fused" in {finding.kind for finding in match.conversions}


def test_an_int4_suspect_is_solved_in_the_references_form() -> None:
    """An int4 suspect's groups are solved in the common form, and left in place where it cannot move them.

    MatMulNBits holds its input features in whole quantization blocks: the groups it cannot move
    are solved in the common form (Psi 100) and left in place, and say why.
    """
    reference, _, key, suspect = _case("nbits", "matmul_mlp")
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0) and result.across.unwritten
    reasons = [item.reason for item in result.across.match.unmatched]
    assert reasons and all("another structure" in reason or "frozen in the suspect" in reason for reason in reasons)
    # Distances stay within int4's error: the pairs are conversions, not different weights.
    assert all(pair.distance is not None and pair.distance < 0.05 for pair in result.across.match.site_pairs)
    assert np.isfinite([pair.distance for pair in result.across.match.site_pairs]).all()


# -- nothing permutable ---------------------------------------------------------------------------
def _conv_to_output() -> onnx.ModelProto:
    """One Conv whose channels are the graph's output: its only group is frozen."""
    from onnxlady.testing import GraphBuilder

    b = GraphBuilder("conv_only", 0)
    x = b.input("input", (1, 3, 8, 8))
    return b.build(b.conv(x, 4, 3, name="conv"))


def test_permute_refuses_a_model_with_nothing_permutable(tmp_path) -> None:
    import onnxlady
    from onnxlady.cli import main

    model = _conv_to_output()
    assert not analyze(model).permutable_groups
    with pytest.raises(OnnxladyError, match=r"nothing to permute in the model: .*graph-output x1 \(e\.g\. graph output"):
        onnxlady.permute(model)
    onnx.save(model, tmp_path / "conv.onnx")
    assert main(["permute", str(tmp_path / "conv.onnx"), "-o", str(tmp_path / "out.onnx"), "--quiet"]) == 2
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.onnx.key.json").exists()


# -- shared weights through a converter, int4 values, torch and genai exports -------------------
def test_shared_layers_through_a_converter() -> None:
    """ALBERT-style shared weights: one permutation, no copies, and resync across ORT's optimizer."""
    from fixtures.deployment import build_shared_layers

    reference = build_shared_layers(0)
    model, _, _, key = permute_copy(reference, 4)
    assert len(model.graph.initializer) == len(reference.graph.initializer)
    suspect = CONVERTERS["ort-extended"](model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert verify_models(suspect, result.model, provider="cpu").equivalent


def test_int4_values_are_read_within_their_bound() -> None:
    """MatMulNBits dequantized by onnxlady: within one step of the float weight it was made from.

    And most within half a step (the rounding).
    """
    from onnxlady._graph._model_graph import ModelGraph
    from onnxlady._resync._values import read_nbits

    reference = FIXTURES["matmul_mlp"](0)
    quantized = CONVERTERS["nbits"](reference)
    graph = ModelGraph(quantized)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    for index, node in enumerate(quantized.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        read = read_nbits(graph, index)
        assert read is not None
        original = weights[node.input[1].removesuffix("_Q4")].T.astype(np.float64)  # [N, K]
        n, k = original.shape
        rows = read.value.reshape(n, -1)[:, :k]
        bound = read.error.reshape(n, -1)[:, :k]
        assert np.all(np.abs(rows - original) <= bound)
        assert np.mean(np.abs(rows - original) <= bound / 2) > 0.95


DEPLOYMENT = Path(__file__).resolve().parents[1] / ".cache" / "deployment"


@pytest.mark.skipif(not (DEPLOYMENT / "llama.onnx").exists(),
                    reason="no torch exports (/tmp/zoo-venv/bin/python -m tools.export_deployment_models --genai)")
def test_a_torch_exported_decoder_through_ort() -> None:
    from onnxlady._io._files import load_model

    reference = load_model(DEPLOYMENT / "llama.onnx").model
    model, _, _, key = permute_copy(reference, 7)
    suspect = CONVERTERS["ort-extended"](model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == pytest.approx(100.0)
    assert verify_models(suspect, result.model, provider="cpu").equivalent
    assert audit_models(reference, suspect).verdict == "permuted"


@pytest.mark.skipif(not (DEPLOYMENT / "genai_int4" / "model.onnx").exists(),
                    reason="no genai builds (/tmp/zoo-venv/bin/python -m tools.export_deployment_models --genai)")
def test_one_decoder_written_by_torch_and_by_the_genai_builder() -> None:
    """torch.onnx's export and ONNX Runtime GenAI's fp32 and int4 builds of the same weights.

    The builds (packed QKV into GroupQueryAttention, SkipSimplifiedLayerNorm, KV cache, int4
    MatMulNBits) pair with each other and with the torch export as a conversion. Permuted with
    their KV caches as state, each is put back in the torch export's order (Psi 100) and
    audited ``permuted``: the query heads within a KV head's group, which only the fused form
    can move, are solved in its form. (The decoder's vocabulary differs from its MLP width: with
    both 128, GenAI 0.18's builder took layer 0's gate projection for the LM head.)
    """
    from onnxlady import permute
    from onnxlady._io._files import load_model

    fp32 = load_model(DEPLOYMENT / "genai_fp32" / "model.onnx").model
    int4 = load_model(DEPLOYMENT / "genai_int4" / "model.onnx").model
    report = audit_models(fp32, int4)
    assert report.verdict == "converted", report.summary
    assert {"quantized", "fused"} <= {c.kind for c in report.conversions}
    torch_export = load_model(DEPLOYMENT / "llama.onnx").model
    match = match_models(torch_export, fp32)
    assert match.same_model, match.divergences
    assert audit_models(torch_export, fp32).verdict == "converted"
    for build in (fp32, int4):
        permutation = permute(build, seed=7, kv_state=True)
        result = resync_model(torch_export, permutation.model, true_key=permutation.key)
        assert result.psi == pytest.approx(100.0)
        assert audit_models(torch_export, permutation.model).verdict == "permuted"


def _gpt2_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` through ``onnxruntime.transformers.optimizer`` with ``model_type="gpt2"``, saved and read back."""
    import tempfile

    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(copy_model(model), model_type="gpt2", num_heads=4, hidden_size=64,
                                     opt_level=0)  # it rewrites the proto it is given
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "optimized.onnx")
        fused.save_model_to_file(path)
        return onnx.load(path)


@pytest.mark.parametrize(("name", "converter"), [("gpt2", "gpt2"), ("whisper_encoder", "ort-extended"),
                                                 ("whisper_encoder", "onnxsim"), ("bert", "ort-extended")])
def test_torch_exports_through_their_deployment_optimizer(name: str, converter: str) -> None:
    """Torch exports through the optimizer their deployments run are resynced and audited ``permuted``.

    Held-out: GPT-2 through the gpt2 transformer optimizer was called different models (its packed
    c_attn Gemm is split after a Reshape, the optimizer writes three MatMuls), and an untouched Whisper
    encoder through the extended optimizer was audited modified (the query's scale Mul follows the
    fused Gemm's output Reshape), and through onnx-simplifier modified too (it folds GELU's trailing
    ``Mul 0.5`` into the next conv's weight). BERT through the extended optimizer (session 14, while
    comparing arithmetic constants): ORT folds the token-type embedding into a stored constant and
    moves the position embedding's ``Add`` into a SkipLayerNormalization, which still adds it.
    """
    reason = unavailable(converter) if converter in CONVERTERS else None
    if reason is not None:
        pytest.skip(reason)
    path = DEPLOYMENT / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"no torch export of {name} (/tmp/zoo-venv/bin/python -m tools.export_deployment_models)")
    from onnxlady._io._files import load_model

    convert = _gpt2_optimized if converter == "gpt2" else CONVERTERS[converter]
    reference = load_model(path).model
    assert audit_models(reference, convert(reference)).verdict == "converted"
    model, _, _, key = permute_copy(reference, 7)
    suspect = convert(model)
    check_resync_across(reference, suspect, key)
    assert audit_models(reference, suspect).verdict == "permuted"


def _scaled_convs(fold: bool) -> onnx.ModelProto:
    """Conv -> Mul by a scalar -> Add of a scalar -> Relu, twice (Paddle's MobileOne branches).

    With ``fold``, the scalars are folded into each conv's weight and bias (onnx-simplifier's form).
    """
    from onnxlady.testing import GraphBuilder

    b = GraphBuilder("scaled_convs", 0)
    x = b.input("input", (1, 3, 16, 16))
    for k, (scale, shift) in enumerate(((0.75, 0.5), (1.5, -0.25)), start=1):
        weight = b.conv_weight(x, 8, 3)
        bias = b.small_normal((8,), 0.5)
        if fold:
            weight, bias = weight * np.float32(scale), bias * np.float32(scale) + np.float32(shift)
        w, c = b.param(f"conv{k}.weight", weight), b.param(f"conv{k}.bias", bias)
        x = b.conv(x, 8, 3, weight=w, bias=c, name=f"conv{k}")
        if not fold:
            x = b.add(b.mul(x, np.array(scale, np.float32), name=f"scale{k}"), np.array(shift, np.float32), name=f"shift{k}")
        x = b.relu(x, name=f"relu{k}")
    return b.build(b.gemm(b.flatten(b.global_avg_pool(x, name="pool"), name="flat"), 4, name="head", gain=1.0))


def test_scalar_steps_folded_into_a_layer_are_a_conversion() -> None:
    reference, folded = _scaled_convs(False), _scaled_convs(True)
    assert verify_models(reference, folded, provider="cpu").equivalent
    model, _, _, key = permute_copy(folded, 3)
    result = resync_model(reference, model, true_key=key)
    assert result.psi == pytest.approx(100.0)
    report = audit_models(reference, model)
    assert report.verdict == "permuted", report.summary
    assert any("Conv+Mul+Add as Conv" in finding.detail for finding in report.conversions)
    scaled = copy_model(model)  # the same, one neuron's weights scaled: now an integrity change
    holders = {t.name: t for t in scaled.graph.initializer}
    values = onnx.numpy_helper.to_array(holders["conv1.weight"]).copy()
    values[2] *= 1.5
    holders["conv1.weight"].CopyFrom(onnx.numpy_helper.from_array(values, "conv1.weight"))
    assert audit_models(reference, scaled).verdict != "permuted"


# -- groups of another structure: solved in the form that can move them --------------------------
def test_query_heads_within_their_group_pair_across_the_fused_and_standard_forms() -> None:
    """GroupQueryAttention vs the same attention in standard operators (torch.onnx's LLaMA form).

    Both forms move the query heads within each KV head's group: the fused form by its rule, the
    standard form because the repeat of the KV heads (``Unsqueeze`` + ``Expand`` + ``Reshape``)
    makes equal copies that any permutation of a group's query heads leaves alone. (Until the
    repeat was read that way, it pinned them, and the groups were solved the other way round.)
    The groups of the two forms pair one to one, in either direction: Psi 100, the suspect
    written back bit for bit; audit of the fused form permuted: ``permuted``.
    """
    from fixtures.deployment import build_gqa_form

    reference, fused = build_gqa_form(0, fused=False), build_gqa_form(0, fused=True)
    assert verify_models(reference, fused, provider="cpu").equivalent  # one function, two forms
    model, _, _, key = permute_copy(fused, 3)
    result = resync_model(reference, model, true_key=key)
    assert not result.across.match.unmatched and not result.across.mirrored
    assert result.psi == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(fused)  # every group written back
    assert verify_models(model, result.model, provider="cpu").equivalent
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    report = audit_models(reference, model)
    assert report.verdict == "permuted", report.summary
    standard, _, _, standard_key = permute_copy(reference, 3)  # the other way: the standard form permuted
    back = resync_model(fused, standard, true_key=standard_key)
    assert back.psi == pytest.approx(100.0)
    assert constant_bytes(back.model) == constant_bytes(reference)


def test_a_decoder_permuted_with_its_kv_cache_resyncs_and_audits() -> None:
    """A decoder permuted with its KV caches as state (``permute --kv-state``): resync puts it back whole.

    Resync and audit analyse a model with KV-cache pairs with the caches as state: analysed
    with them pinned, the heads and head dims they carry are frozen in both models, so resync
    could neither solve nor write them (the true key did not even fit) and audit called the
    pair modified. Also across ONNX Runtime's optimizer.
    """
    from fixtures.decoder import build_decoder
    from onnxlady import permute

    reference = build_decoder(0)
    permutation = permute(reference, seed=5, kv_state=True)
    assert permutation.key.extra.get("kv_state")  # the caches moved
    for suspect in (permutation.model, CONVERTERS["ort-extended"](permutation.model)):
        result = resync_model(reference, suspect, true_key=permutation.key)
        assert result.psi == pytest.approx(100.0)
        assert verify_models(suspect, result.model, provider="cpu").equivalent
        if suspect is permutation.model:  # every group written back: the reference, bit for bit
            assert constant_bytes(result.model) == constant_bytes(reference)
        report = audit_models(reference, suspect)
        assert report.verdict == "permuted", report.summary
    wrong = copy_model(permutation.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(permutation.model, wrong, provider="cpu").equivalent
    # A key made with the caches pinned (a plain permute) names the groups of that analysis.
    pinned = permute(reference, seed=5)
    assert not pinned.key.extra.get("kv_state")
    result = resync_model(reference, pinned.model, true_key=pinned.key)
    assert result.psi == pytest.approx(100.0)
    assert constant_bytes(result.model) == constant_bytes(reference)


def test_a_reshape_with_an_unnamed_trailing_dim_keeps_its_channels_permutable() -> None:
    """``Reshape [0, 4, 16, -1]`` on ``[batch, 64, length]``: the 64 channels split into 4 x 16.

    Shape inference names the ``-1`` afresh, so the trailing dims did not read as the same and
    the channels froze ("unknown sizes"): YOLOv8n through ONNX Runtime's basic optimizer lost
    3.5 points of coverage this way.
    """
    from fixtures.deployment import build_folded_reshape

    model = build_folded_reshape(0)
    analysis = analyze(model)
    assert analysis.summary()["freeze_reasons_by_kind"] == {"graph-output": 1}
    assert analysis.summary()["permutable_producer_neurons"] == 64  # every hidden channel; the output's 8 stay
    permuted, _, _, key = permute_copy(model, 2)
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    assert resync_model(model, permuted, true_key=key).psi == pytest.approx(100.0)


def test_fused_matmul_moving_batch_axes_keeps_attention_permutable() -> None:
    """``FusedMatMul`` with ``transBatchA`` / ``transBatchB`` (torch MHA through ORT's extended optimizer).

    It froze every attention projection (coverage 0 on that model); read through the batch
    move, the heads and head dims move as in the unfused graph.
    """
    from fixtures.deployment import build_batch_moved_attention

    model = build_batch_moved_attention(0)
    analysis = analyze(model)
    assert analysis.summary()["freeze_reasons_by_kind"] == {"graph-output": 1}
    # embed, Q, K, V and o_proj: 5 x 32 neurons move; the head's 10 are the output.
    assert analysis.summary()["permutable_producer_neurons"] == 160
    permuted, _, _, key = permute_copy(model, 4)
    assert verify_models(model, permuted, provider="cpu").equivalent
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(model, wrong, provider="cpu").equivalent
    assert resync_model(model, permuted, true_key=key).psi == pytest.approx(100.0)


def test_a_scalar_step_behind_the_reshape_of_a_fused_gemm_stays_with_its_layer() -> None:
    """ORT writes ``MatMul + Add + Mul`` of a 3-D input as ``Reshape, Gemm, Reshape, Mul``."""
    from fixtures.contrib import ort_optimized
    from fixtures.deployment import build_scaled_query

    reference = build_scaled_query(0)
    converted = ort_optimized(reference, "extended")
    gemm = next(node for node in converted.graph.node if node.op_type == "Gemm" and "q_proj" in node.name)
    reader = next(node for node in converted.graph.node if gemm.output[0] in node.input)
    assert reader.op_type == "Reshape"  # the form the held-out Whisper encoder had
    assert verify_models(reference, converted, provider="cpu").equivalent
    wrong = copy_model(converted)  # the check above can fail
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, converted).verdict == "converted"
    model, _, _, key = permute_copy(reference, 5)
    suspect = ort_optimized(model, "extended")
    assert resync_model(reference, suspect, true_key=key).psi == pytest.approx(100.0)
    assert audit_models(reference, suspect).verdict == "permuted"
    changed = copy_model(suspect)  # the query's bias really changed: still caught
    holders = {t.name: t for t in changed.graph.initializer}
    bias = onnx.numpy_helper.to_array(holders["q_proj.bias"]).copy()
    bias[3] += 0.5
    holders["q_proj.bias"].CopyFrom(onnx.numpy_helper.from_array(bias, "q_proj.bias"))
    assert audit_models(reference, changed).verdict not in ("permuted", "converted")
