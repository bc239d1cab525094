"""Resync, audit and match when the suspect (or the reference) went through a converter.

Every conversion of :mod:`fixtures.conversions` is applied to a permuted copy (the suspect is
converted) and to the reference (the reference is converted, the suspect is only permuted):
resync must put every neuron back (Psi 100), the output must keep the suspect's form and be
equivalent to it, a wrong permutation of it must be caught, and audit must call the pair
"permuted", with the conversion reported beside the verdict.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady import analyze, unpermute_model
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._across import _half_ulp, read_constant, unit_bias, unit_weight
from onnxlady._resync._entry import resync_model
from onnxlady._resync._match import find_units, match_models
from onnxlady._transforms._perturb import perturb_model
from onnxlady._verify._compare import verify_models
from onnxlady.cli import main
from onnxlady.testing import constant_bytes, copy_model, permute_copy, permute_producer_only

#: What each conversion must be recognised as (on a fixture where it changes something).
EXPECTED_FINDING = {
    "float16": "float16",
    "bfloat16": "bfloat16",
    "fold-bn": "batchnorm-folded",
    "simplify": "renamed",
    "qdq": "quantized",
    "opset": "opset",
}
#: Fixtures covering convolutions with BatchNorm, depthwise convs, Concat, Flatten into Gemm,
#: MatMul layers and a transformer block.
FIXTURE_NAMES = ("resnet", "mobilenet", "concat", "vgg", "matmul_mlp", "encoder_prenorm")
#: Verify tolerances fitting each converted model's own arithmetic: a float16 graph rounds its
#: outputs to float16 (a unit in the last place is 2e-3 at 4), and re-ordering its neurons may
#: flip that rounding. A wrong permutation moves the outputs by 6e-3 to 2 here.
TOLERANCES = {"float16": (1e-3, 4e-3)}


def _tolerance(conversion: str) -> dict[str, float]:
    atol, rtol = TOLERANCES.get(conversion, (1e-4, 1e-3))
    return {"atol": atol, "rtol": rtol}


@pytest.fixture(scope="module")
def permuted() -> dict[str, tuple[onnx.ModelProto, onnx.ModelProto, object]]:
    """Per fixture: (reference, permuted copy, true key)."""
    found = {}
    for name in FIXTURE_NAMES:
        reference = FIXTURES[name](0)
        model, _, _, key = permute_copy(reference, 7)
        found[name] = (reference, model, key)
    return found


def _stored_types(model: onnx.ModelProto) -> list[int]:
    return sorted(t.data_type for t in model.graph.initializer)


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_resync_of_a_converted_suspect(permuted, name: str, conversion: str) -> None:
    reference, model, key = permuted[name]
    suspect = CONVERSIONS[conversion](model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == 100.0
    # The output keeps the suspect's form and computes what the suspect computes...
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in suspect.graph.node]
    assert _stored_types(result.model) == _stored_types(suspect)
    assert verify_models(suspect, result.model, provider="cpu", **_tolerance(conversion)).equivalent
    # ...which a wrong permutation would not (the check above can fail).
    wrong = copy_model(result.model)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(suspect, wrong, provider="cpu", **_tolerance(conversion)).equivalent
    # The recovered key turns the suspect into the output, bit for bit.
    restored = copy_model(suspect)
    unpermute_model(restored, result.key)
    assert constant_bytes(restored) == constant_bytes(result.model)


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
@pytest.mark.parametrize("name", ("resnet", "encoder_prenorm"))
def test_resync_against_a_converted_reference(permuted, name: str, conversion: str) -> None:
    reference, model, key = permuted[name]
    result = resync_model(CONVERSIONS[conversion](reference), model, true_key=key)
    assert result.psi == 100.0
    assert verify_models(model, result.model, provider="cpu").equivalent
    assert constant_bytes(result.model) == constant_bytes(reference)


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_audit_calls_a_permuted_and_converted_model_permuted(permuted, conversion: str) -> None:
    reference, model, _ = permuted["resnet"]
    report = audit_models(reference, CONVERSIONS[conversion](model))
    assert report.verdict == "permuted" and report.exit_code == 0
    assert EXPECTED_FINDING[conversion] in {c.kind for c in report.conversions}
    assert "converted" in report.summary
    backwards = audit_models(CONVERSIONS[conversion](reference), model)
    assert backwards.verdict == "permuted"
    assert EXPECTED_FINDING[conversion] in {c.kind for c in backwards.conversions}


@pytest.mark.parametrize("conversion", ("float16", "fold-bn", "qdq"))
def test_audit_of_a_converted_copy_in_order(permuted, conversion: str) -> None:
    reference = permuted["resnet"][0]
    report = audit_models(reference, CONVERSIONS[conversion](reference))
    assert report.verdict == "converted" and report.exit_code == 0


@pytest.mark.parametrize("conversion", ("float16", "fold-bn", "qdq", "simplify"))
def test_audit_finds_noise_through_a_conversion(permuted, conversion: str) -> None:
    reference, model, _ = permuted["resnet"]
    noisy = copy_model(model)
    perturb_model(noisy, noise=0.5, seed=3)
    report = audit_models(reference, CONVERSIONS[conversion](noisy))
    # Noise seen through a conversion is a modification; its kind is named only when the
    # calibrated evidence is clear (fold-bn rescales rows, which blurs the noise statistics).
    assert report.verdict in ("perturbed", "modified") and report.exit_code == 1
    assert report.conversions


@pytest.mark.parametrize("conversion", ("float16", "bfloat16", "qdq", "simplify", "opset"))
def test_audit_finds_scaled_neurons_through_a_conversion(permuted, conversion: str) -> None:
    """The integrity attack of the paper (rows times k, nothing compensating) survives a converter."""
    reference, model, _ = permuted["vgg"]
    attacked = copy_model(model)
    holders = {t.name: t for t in attacked.graph.initializer}
    weight = holders["features.block2.conv.weight"]
    values = numpy_helper.to_array(weight).copy()
    values[[1, 4]] *= 1.5
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    report = audit_models(reference, CONVERSIONS[conversion](attacked))
    assert report.verdict == "scaled" and report.exit_code == 1
    assert len(report.scaled_neurons) == 2
    assert all(abs(s.k - 1.5) < 1e-2 for s in report.scaled_neurons)


@pytest.mark.parametrize("conversion", ("float16", "bfloat16", "qdq", "simplify", "opset"))
def test_audit_finds_compensated_rescales_through_a_conversion(permuted, conversion: str) -> None:
    """Rows times k with the next layer's columns divided by k computes the same function: after
    a conversion it is still ``permuted-rescaled`` with every k found, not "modified" (coarse
    storage rounds the rows below the twin-graph cosine test; the storage bounds decide).
    """
    reference, model, _ = permuted["vgg"]
    rescaled = copy_model(model)
    scales = np.random.default_rng(5).uniform(0.5, 2.0, 32)
    holders = {t.name: t for t in rescaled.graph.initializer}
    for name, view in (
        ("features.block2.conv.weight", scales[:, None, None, None]),
        ("features.block2.conv.bias", scales),
        ("features.block3.conv.weight", 1 / scales[None, :, None, None]),
    ):
        values = numpy_helper.to_array(holders[name]).astype(np.float64) * view
        holders[name].CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    # The group of block2 is permuted in `model`: its scales follow the permutation.
    report = audit_models(reference, CONVERSIONS[conversion](rescaled))
    assert report.verdict == "permuted-rescaled" and report.exit_code == 0, report.summary
    assert report.conversions and len(report.rescaled) == 32
    recovered = {s.neuron: s.k for s in report.rescaled}
    matches = report.resync.across.matches[report.rescaled[0].group]  # reference neuron -> suspect's
    tolerance = 2e-2 if conversion == "qdq" else 2e-3
    assert np.allclose([recovered[j] for j in range(32)], scales[matches], rtol=tolerance)
    # Scales that the next layer does not undo are the paper's attack, caught as such.
    attacked = copy_model(rescaled)
    holder = {t.name: t for t in attacked.graph.initializer}["features.block3.conv.weight"]
    holder.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(holder) * scales[None, :, None, None].astype(np.float32), holder.name))
    assert audit_models(reference, CONVERSIONS[conversion](attacked)).verdict == "scaled"


@pytest.mark.parametrize("conversion", ("float16", "bfloat16", "qdq", "simplify", "opset"))
def test_audit_finds_batchnorm_absorbed_rescales_through_a_conversion(permuted, conversion: str) -> None:
    """Rows times k with the BatchNorm's mean times k and variance times k^2 computes the same
    function up to eps: when both models keep the BatchNorm, the conversion compares it as
    stored and audit names every k (folded on both sides, the rescale would be lost in eps).
    """
    reference, model, _ = permuted["resnet"]
    rescaled = copy_model(model)
    # Kept 10 % away from 1: the statistics are compared within BN_MATCH (1 %), so a scale of
    # 0.995 on the weight alone also reads as absorbed.
    rng = np.random.default_rng(6)
    scales = rng.uniform(1.1, 2.0, 16) ** rng.choice([-1, 1], 16)
    holders = {t.name: t for t in rescaled.graph.initializer}
    for name, view in (
        ("layer1.conv1.conv.weight", scales[:, None, None, None]),
        ("layer1.conv1.bn.mean", scales),
        ("layer1.conv1.bn.var", scales * scales),
    ):
        values = numpy_helper.to_array(holders[name]).astype(np.float64) * view
        holders[name].CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))
    report = audit_models(reference, CONVERSIONS[conversion](rescaled))
    assert report.verdict == "permuted-rescaled" and report.exit_code == 0, report.summary
    assert len(report.rescaled) == 16 and all(s.compensated_by == "batchnorm" for s in report.rescaled)
    recovered = {s.neuron: s.k for s in report.rescaled}
    matches = report.resync.across.matches[report.rescaled[0].group]
    tolerance = 2e-2 if conversion == "qdq" else 2e-3
    assert np.allclose([recovered[j] for j in range(16)], scales[matches], rtol=tolerance)
    # The statistics left alone: nothing absorbs the scale, which is the attack.
    attacked = copy_model(model)
    holder = {t.name: t for t in attacked.graph.initializer}["layer1.conv1.conv.weight"]
    values = numpy_helper.to_array(holder).astype(np.float64) * scales[:, None, None, None]
    holder.CopyFrom(numpy_helper.from_array(values.astype(np.float32), holder.name))
    assert audit_models(reference, CONVERSIONS[conversion](attacked)).verdict == "scaled"


# -- matching ---------------------------------------------------------------------------------
@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_match_pairs_every_group(permuted, conversion: str) -> None:
    reference, model, _ = permuted["resnet"]
    result = match_models(reference, CONVERSIONS[conversion](model))
    assert result.complete and not result.divergences and not result.unmatched
    ref_groups = {g.id for g in analyze(reference).permutable_groups}
    assert {p.reference for p in result.groups if p.permutable} == ref_groups
    assert EXPECTED_FINDING[conversion] in {c.kind for c in result.conversions}


def test_match_names_where_two_architectures_diverge() -> None:
    result = match_models(FIXTURES["vgg"](0), FIXTURES["resnet"](0))
    assert not result.complete
    assert result.divergences and "Conv 'layer1.conv1.conv'" in result.divergences[0]
    with pytest.raises(OnnxladyError, match=r"beyond a conversion: after Conv 'features.block1.conv'"):
        resync_model(FIXTURES["vgg"](0), FIXTURES["resnet"](0))


def test_match_command(tmp_path, capsys, permuted) -> None:
    reference, model, _ = permuted["resnet"]
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(CONVERSIONS["fold-bn"](model), tmp_path / "sus.onnx")
    onnx.save(FIXTURES["vgg"](0), tmp_path / "other.onnx")
    assert main(["match", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "--json", "--quiet"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["complete"] and document["groups"]
    assert any(c["kind"] == "batchnorm-folded" for c in document["conversions"])
    # Another architecture is refused as a different model, naming where the structures diverge.
    assert main(["match", str(tmp_path / "ref.onnx"), str(tmp_path / "other.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "different models" in err and "beyond a conversion: after Conv" in err


def test_resync_and_audit_commands_across_a_conversion(tmp_path, capsys, permuted) -> None:
    reference, model, _ = permuted["resnet"]
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(CONVERSIONS["qdq"](model), tmp_path / "sus.onnx")
    code = main(["resync", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "-o", str(tmp_path / "out.onnx"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "matched across conversions" in out and "conversion (quantized) in the suspect" in out
    assert main(["audit", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "--json", "--quiet"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["verdict"] == "permuted"
    assert [c["kind"] for c in document["conversions"]] == ["quantized"]


# -- common form and error bounds ---------------------------------------------------------------
def test_folded_and_unfolded_units_read_the_same_numbers() -> None:
    reference = FIXTURES["resnet"](0)
    folded = CONVERSIONS["fold-bn"](reference)
    ref_graph, sus_graph = ModelGraph(reference), ModelGraph(folded)
    ref_units, sus_units = find_units(ref_graph), find_units(sus_graph)
    assert sum(u.batchnorm is not None for u in ref_units.values()) >= 3
    assert all(u.batchnorm is None for u in sus_units.values())
    for ref_unit, sus_unit in zip(ref_units.values(), sus_units.values()):
        a, b = unit_weight(ref_graph, ref_unit), unit_weight(sus_graph, sus_unit)
        assert a is not None and b is not None
        assert np.all(np.abs(a.value - b.value) <= a.error + b.error + 1e-7 * np.abs(a.value).max())
        size = a.value.shape[ref_unit.out_axis]
        c, d = unit_bias(ref_graph, ref_unit, size), unit_bias(sus_graph, sus_unit, size)
        assert c is not None and d is not None
        assert np.allclose(c.value, d.value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "bits", "step"),
    [("float16", 11, 2.0**-24), ("bfloat16", 8, 2.0**-133), ("float32", 24, 2.0**-149), ("float64", 53, 0.0)],
)
def test_half_ulp_is_half_the_gap_to_the_next_stored_number(dtype: str, bits: int, step: float) -> None:
    """Read off the exponent bits, it equals frexp's definition (|v| = m 2^e, half a unit is
    2^(e - 1 - bits)) on normals, subnormals, zeros and signs, floored at a whole subnormal step
    (converters clamp tiny values up to it: tests/test_float16_converters.py); an integer type
    has no rounding error.
    """
    import ml_dtypes

    numpy_type = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    values = rng.standard_normal(20000) * 10.0 ** rng.integers(-46, 38, 20000)
    values = np.concatenate([values, [0.0, -0.0, 1.0, -1.0, 2.0**-149, -(2.0**-126), 65504.0, 6e-8]])
    with np.errstate(over="ignore"):
        stored = values.astype(numpy_type).astype(np.float64)
    stored = stored[np.isfinite(stored)]
    _, exponent = np.frexp(stored)
    expected = np.maximum(np.ldexp(1.0, exponent - 1 - bits), step)
    expected[stored == 0] = step
    assert np.array_equal(_half_ulp(stored, np.dtype(numpy_type)), expected)
    assert not np.any(_half_ulp(stored, np.dtype(np.int8)))


@pytest.mark.parametrize("conversion", ("float16", "bfloat16", "qdq"))
def test_error_bounds_hold_and_are_tight(conversion: str) -> None:
    """Each converted weight lies within its bound of the original, and the bound is tight."""
    reference = FIXTURES["resnet"](0)
    converted = CONVERSIONS[conversion](reference)
    ref_graph, graph = ModelGraph(reference), ModelGraph(converted)
    ref_units, units = find_units(ref_graph), find_units(graph)
    assert len(ref_units) == len(units) >= 5
    for ref_unit, unit in zip(ref_units.values(), units.values()):
        original = read_constant(ref_graph, ref_graph.nodes[ref_unit.node].input[ref_unit.weight_slot])
        read = read_constant(graph, graph.nodes[unit.node].input[unit.weight_slot])
        assert original is not None and read is not None
        gap = np.abs(read.value - original.value)
        assert np.all(gap <= read.error + original.error)
        if gap.size >= 100:  # some element is rounded by nearly its whole bound
            assert float((gap / read.error).max()) >= 0.9


def _one_hot_model() -> onnx.ModelProto:
    """Token ids -> one-hot (Equal against an int64 arange) -> MatMul -> Relu -> MatMul, as
    magika's embedding is exported: the one-hot index is a group whose only constants are integers.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Unsqueeze", ["ids", "last"], ["ids1"]),
        helper.make_node("Equal", ["ids1", "arange"], ["hot"]),
        helper.make_node("Cast", ["hot"], ["hotf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["hotf", "embed"], ["e"]),
        helper.make_node("Relu", ["e"], ["r"]),
        helper.make_node("MatMul", ["r", "proj"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
        numpy_helper.from_array(np.arange(16, dtype=np.int64), "arange"),
        numpy_helper.from_array(rng.standard_normal((16, 12)).astype(np.float32), "embed"),
        numpy_helper.from_array((rng.standard_normal((12, 4)) / np.sqrt(12)).astype(np.float32), "proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "one_hot",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_group_held_only_by_integer_constants_is_matched_too() -> None:
    reference = _one_hot_model()
    analysis = analyze(reference)
    assert any(g.size == 16 and g.permutable for g in analysis.groups)
    model, _, _, key = permute_copy(reference, 2)
    suspect = CONVERSIONS["opset"](model)
    result = resync_model(reference, suspect, true_key=key)
    assert result.psi == 100.0  # the 16 one-hot positions included
    assert audit_models(reference, suspect).verdict == "permuted"


def _symbolic_attention() -> onnx.ModelProto:
    """An attention block whose batch and sequence sizes are symbolic (as exporters leave them)."""
    from fixtures.transformer import attention
    from onnxlady.testing import GraphBuilder

    b = GraphBuilder("attention", 0)
    x = b.input("x", [1, 6, 32])
    model = b.build(b.matmul(attention(b, x, name="attn", zero_dims=True), 8, name="head", gain=1.0))
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, symbol in ((0, "B"), (1, "T")):
            dims[axis].ClearField("dim_value")
            dims[axis].dim_param = symbol
    del model.graph.value_info[:]
    return model


def _softmax_through_flatten(model: onnx.ModelProto) -> onnx.ModelProto:
    """What onnx's Softmax 12 -> 13 adapter writes: Flatten, Softmax on the last axis, Reshape
    back to the input's shape. Over symbolic sizes the analysis cannot carry the heads through
    the Flatten and freezes them in this form.
    """
    from onnx import helper

    converted = copy_model(model)
    nodes = []
    for node in converted.graph.node:
        if node.op_type != "Softmax":
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        nodes += [
            helper.make_node("Flatten", [x], [x + ".2d"], axis=3),
            helper.make_node("Softmax", [x + ".2d"], [y + ".2d"], axis=-1),
            helper.make_node("Shape", [x], [x + ".shape"]),
            helper.make_node("Reshape", [y + ".2d", x + ".shape"], [y]),
        ]
    del converted.graph.node[:]
    converted.graph.node.extend(nodes)
    return converted


def test_groups_only_the_suspects_form_can_move_are_solved_mirrored() -> None:
    original = _symbolic_attention()
    reference = _softmax_through_flatten(original)
    frozen = {g.size for g in analyze(reference).groups if g.frozen}
    assert 4 in frozen  # the heads, in the reference's converted form
    model, _, _, key = permute_copy(original, 5)
    result = resync_model(reference, model, true_key=key)
    assert result.psi == 100.0 and result.across.mirrored
    assert constant_bytes(result.model) == constant_bytes(original)  # heads included
    report = audit_models(reference, model)
    assert report.verdict == "permuted" and "suspect's form" in report.summary
    # The other way round the heads are solved in the reference's form and left in place.
    forward = resync_model(original, _softmax_through_flatten(model), true_key=key)
    assert forward.psi == 100.0 and forward.across.unwritten
    assert audit_models(original, _softmax_through_flatten(model)).verdict == "permuted"
