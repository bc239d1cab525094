"""Provenance at registry scale: fingerprints, the index, search, clusters, Dask scale-out.

Fingerprints must not see a permutation (records equal up to float rounding), stay within the
"derived" threshold under every perturbation and conversion onnxlady handles, and put other
models (another seed of the same architecture, another architecture) beyond it. The index is
incremental, lists bad files and refuses a newer format; ``find`` puts a derivative's
reference first; the Dask engine runs on a real LocalCluster.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from fixtures.conversions import (
    fold_batchnorm,
    quantize_qdq,
    simplify,
    to_bfloat16_weights,
    to_float16,
    upgrade_opset,
)
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._provenance._find import DERIVED_THRESHOLD, find, find_all_pairs
from onnxlady._provenance._fingerprint import (
    FIELDS,
    LAYER_WIDTH,
    SLICES,
    ModelFingerprint,
    compare_fingerprints,
    fingerprint_distance,
    fingerprint_model,
    layer_record,
    producer_weights,
    resample,
    search_vector,
)
from onnxlady._provenance._index import (
    INDEX_FORMAT,
    add_fingerprints,
    build_index,
    list_models,
)
from onnxlady._provenance._read import fingerprint_file
from onnxlady._provenance._scale import dask_available
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

#: Fixtures whose fingerprints the tests compare: convolutions with BatchNorm, MatMul MLPs,
#: attention blocks, grouped and transposed convolutions.
ARCHITECTURES = ("vgg", "resnet", "mobilenet", "matmul_mlp", "encoder_prenorm", "grouped_conv", "conv_transpose")


def _perturbed(model: onnx.ModelProto, **kwargs: object) -> onnx.ModelProto:
    copy = copy_model(model)
    perturb_model(copy, **kwargs)  # type: ignore[arg-type]
    return copy


def _ort_optimized(model: onnx.ModelProto, folder: Path, level: str = "ORT_ENABLE_EXTENDED") -> onnx.ModelProto:
    import onnxruntime as ort

    source, target = folder / "ort-in.onnx", folder / "ort-out.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(target)


def _ort_dynamic(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_dynamic``: ConvInteger/MatMulInteger, each weight's scale applied after it."""
    from onnxruntime.quantization import quantize_dynamic

    source, target = folder / "dynamic-in.onnx", folder / "dynamic-out.onnx"
    onnx.save(model, source)
    quantize_dynamic(str(source), str(target))
    quantized = onnx.load(target)
    assert {"ConvInteger", "MatMulInteger"} & {n.op_type for n in quantized.graph.node}
    return quantized


# -- fingerprints -----------------------------------------------------------------------------
def _reference_record(rows: np.ndarray) -> np.ndarray:
    """The fields computed the plain way, in float64, from explicit rows (for layer_record)."""
    rows = rows.astype(np.float64)
    k = rows.shape[1]
    rms = np.sqrt((rows**2).mean(1))
    mean = rows.mean(1)
    centred = rows - mean[:, None]
    var = (centred**2).mean(1)
    unit = rows / rms[:, None]
    direction = unit.mean(0)
    column_rms = np.sqrt((unit**2).mean(0))
    median = np.median(rms)
    values = {
        "level": [math.log(median)],
        "norms": resample(np.sort(rms / median)),
        "mean": resample(np.sort(mean / rms)),
        "cosine": resample(np.sort(unit @ (direction / np.linalg.norm(direction)) / math.sqrt(k))),
        "colmean": resample(np.sort(direction / column_rms)),
        "columns": resample(np.sort(column_rms)),
        "skew": resample(np.sort((centred**3).mean(1) / var**1.5)),
        "kurtosis": resample(np.sort(np.log((centred**4).mean(1) / var**2))),
        "peak": resample(np.sort(np.log(np.abs(rows).max(1) / rms))),
    }
    return np.concatenate([np.asarray(values[name], dtype=np.float64) for name, _ in FIELDS])


@pytest.mark.parametrize("neuron_axis", [0, 1])
def test_layer_record_matches_the_plain_computation(neuron_axis: int) -> None:
    """The layer record equals the fields computed the plain way on the explicitly folded rows.

    Stored layout, BatchNorm scale applied on the fly, signs included.
    """
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((24, 40)) * rng.uniform(0.5, 2.0, (24, 1)) + 0.05).astype(np.float32)
    scale = rng.uniform(0.3, 2.0, 24) * np.where(rng.random(24) < 0.25, -1.0, 1.0)
    stored = rows if neuron_axis == 0 else np.ascontiguousarray(rows.T)
    fast = layer_record(stored, neuron_axis, scale)
    plain = _reference_record(rows * scale[:, None])
    np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)
    # The comparison can fail: without the scale's signs the signed fields differ.
    unsigned = layer_record(stored, neuron_axis, np.abs(scale))
    assert np.abs(unsigned[SLICES["mean"]] - plain[SLICES["mean"]]).max() > 1e-2


def test_resample_keeps_the_mean_and_lengths() -> None:
    for n in (1, 3, 16, 17, 1000):
        values = np.sort(np.random.default_rng(n).standard_normal(n))
        out = resample(values)
        assert out.shape == (16,)
        assert out.mean() == pytest.approx(values.mean())
        assert np.all(np.diff(out) >= -1e-12)  # a quantile function stays sorted


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fingerprint_is_permutation_invariant(name: str) -> None:
    reference = FIXTURES[name](0)
    permuted = permute_copy(reference, seed=7)[0]
    a, b = fingerprint_model(reference), fingerprint_model(permuted)
    assert a.layers > 0 and np.array_equal(a.shapes, b.shapes)
    np.testing.assert_allclose(a.records, b.records, rtol=1e-4, atol=1e-5)
    assert fingerprint_distance(a, b) < 1e-3
    # A wrong permutation (one producer's rows moved, its consumers not) keeps the same neurons
    # (up to which BatchNorm scale each one is folded with): the fingerprint calls it derived,
    # and only an audit (test_find_confirm_audits_the_candidates) tells it is broken. A change
    # of one neuron's weights is seen.
    wrong = copy_model(reference)
    from onnxlady import analyze

    permute_producer_only(wrong, analyze(wrong))
    assert fingerprint_distance(a, fingerprint_model(wrong)) < DERIVED_THRESHOLD
    edited = copy_model(reference)
    graph = ModelGraph(edited, infer_shapes=False)
    first = producer_weights(graph)[0]
    tensor = next(t for t in edited.graph.initializer if t.name == graph.nodes[first.node].input[1])
    values = onnx.numpy_helper.to_array(tensor).copy()
    values.reshape(values.shape[0], -1)[0] *= 3.0  # one neuron's row scaled: not a permutation
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    assert fingerprint_distance(a, fingerprint_model(edited)) > 1e-2


DERIVATIONS = {
    "noise": lambda m, tmp: _perturbed(m, noise=0.1, seed=3),
    "quantize8": lambda m, tmp: _perturbed(m, quantize_bits=8),
    "prune30": lambda m, tmp: _perturbed(m, prune_percent=30.0),
    "qdq-int8": lambda m, tmp: quantize_qdq(m),
    "float16": lambda m, tmp: to_float16(m),
    "bfloat16": lambda m, tmp: to_bfloat16_weights(m),
    "fold-bn": lambda m, tmp: fold_batchnorm(m),
    "simplify": lambda m, tmp: simplify(m),
    "opset21": lambda m, tmp: upgrade_opset(m, 21),
    "ort-extended": lambda m, tmp: _ort_optimized(m, tmp),
    "ort-dynamic-int8": lambda m, tmp: _ort_dynamic(m, tmp),
    "ort-all": lambda m, tmp: _ort_optimized(m, tmp, "ORT_ENABLE_ALL"),  # NCHWc convolutions on x86
}


def test_nchwc_convolutions_are_read(tmp_path: Path) -> None:
    """ORT_ENABLE_ALL writes blocked com.microsoft.nchwc Convs (x86): read as the Convs they stand for."""
    reference = FIXTURES["resnet"](0)
    optimized = _ort_optimized(permute_copy(reference, seed=5)[0], tmp_path, "ORT_ENABLE_ALL")
    if not any(node.domain == "com.microsoft.nchwc" for node in optimized.graph.node):
        pytest.skip("this CPU's ONNX Runtime writes no NCHWc layout (it needs AVX2 or AVX-512)")
    fingerprint = fingerprint_model(optimized)
    assert "com.microsoft.nchwc::Conv" in fingerprint.ops
    assert fingerprint.layers == fingerprint_model(reference).layers
    assert fingerprint_distance(fingerprint_model(reference), fingerprint) < 0.05


@pytest.mark.parametrize("name", ["resnet", "encoder_prenorm", "mobilenet"])
@pytest.mark.parametrize("kind", sorted(DERIVATIONS))
def test_fingerprint_survives_perturbations_and_conversions(name: str, kind: str, tmp_path: Path) -> None:
    reference = FIXTURES[name](0)
    derived = DERIVATIONS[kind](permute_copy(reference, seed=5)[0], tmp_path)
    match = compare_fingerprints(fingerprint_model(reference), fingerprint_model(derived))
    assert match.distance < DERIVED_THRESHOLD, (kind, match)
    assert not match.unmatched_a and not match.unmatched_b
    # The same change on an unrelated model of the same architecture stays far.
    other = DERIVATIONS[kind](FIXTURES[name](1), tmp_path)
    assert fingerprint_distance(fingerprint_model(reference), fingerprint_model(other)) > DERIVED_THRESHOLD


def test_ort_fused_operators_are_read(tmp_path: Path) -> None:
    """ORT writes com.microsoft FusedConv/FusedGemm and folds BatchNorm; the layers stay paired."""
    reference = FIXTURES["resnet"](0)
    optimized = _ort_optimized(reference, tmp_path)
    fingerprint = fingerprint_model(optimized)
    assert "com.microsoft::FusedConv" in fingerprint.ops
    assert "BatchNormalization" not in {n.op_type for n in optimized.graph.node}
    assert fingerprint.layers == fingerprint_model(reference).layers
    assert fingerprint_distance(fingerprint_model(reference), fingerprint) < 0.05


def test_matmul_nbits_weights_read_as_onnx_runtime_computes_them() -> None:
    """MatMulNBits (4-bit blocks, zero points): the weight read is what ORT multiplies by."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    reference = FIXTURES["matmul_mlp"](0)
    quantizer = MatMulNBitsQuantizer(copy_model(reference), block_size=16, is_symmetric=False)
    quantizer.process()
    quantized = quantizer.model.model
    node = next(n for n in quantized.graph.node if n.op_type == "MatMulNBits")
    k = next(a.i for a in node.attribute if a.name == "K")
    # One node, fed the identity: its output is the weight it uses, [K, N].
    single = onnx.helper.make_model(
        onnx.helper.make_graph(
            [node],
            "nbits",
            [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, [k, k])],
            [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
            [t for t in quantized.graph.initializer if t.name in node.input],
        ),
        opset_imports=list(quantized.opset_import),
        ir_version=quantized.ir_version,
    )
    session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    used = session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)})[0]
    read = producer_weights(ModelGraph(single, infer_shapes=False))[0]
    assert read.op_type == "com.microsoft::MatMulNBits"
    np.testing.assert_allclose(read.rows(), used.T, rtol=1e-5, atol=1e-6)
    # 4-bit weights are far coarser than int8, yet the model stays near its reference.
    assert fingerprint_distance(fingerprint_model(reference), fingerprint_model(quantized)) < DERIVED_THRESHOLD


@pytest.mark.parametrize(
    ("a", "b"),
    [("resnet", "resnet"), ("vgg", "vgg"), ("encoder_prenorm", "encoder_prenorm"), ("vgg", "resnet"),
     ("matmul_mlp", "encoder_prenorm"), ("mobilenet", "shufflenet_v2")],
)  # fmt: skip
def test_unrelated_models_are_far(a: str, b: str) -> None:
    """Another seed of the same architecture (independent weights) or another architecture."""
    first, second = fingerprint_model(FIXTURES[a](0)), fingerprint_model(FIXTURES[b](1))
    assert fingerprint_distance(first, second) > DERIVED_THRESHOLD
    assert fingerprint_distance(first, second) == pytest.approx(fingerprint_distance(second, first), rel=0.05)


def test_fingerprint_bytes_round_trip_and_newer_version_refused() -> None:
    fingerprint = fingerprint_model(FIXTURES["resnet"](0))
    back = ModelFingerprint.from_bytes(fingerprint.to_bytes())
    assert np.array_equal(back.records, fingerprint.records) and np.array_equal(back.shapes, fingerprint.shapes)
    assert back.ops == fingerprint.ops and back.names == fingerprint.names
    assert json.loads(json.dumps(back.to_json()))["layers"] == fingerprint.layers
    newer = ModelFingerprint(fingerprint.records, fingerprint.shapes, fingerprint.ops, fingerprint.names, version=99)
    with pytest.raises(OnnxladyError, match="newer"):
        ModelFingerprint.from_bytes(newer.to_bytes())
    with pytest.raises(OnnxladyError, match="not a fingerprint"):
        ModelFingerprint.from_bytes(b"garbage")
    assert search_vector(fingerprint).shape == search_vector(back).shape


# -- the index --------------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A small registry: three architectures at two seeds, one nested folder, one corrupt file."""
    root = tmp_path / "registry"
    (root / "nested").mkdir(parents=True)
    for name in ("vgg", "resnet", "matmul_mlp"):
        onnx.save(FIXTURES[name](0), root / f"{name}.onnx")
        onnx.save(FIXTURES[name](1), root / "nested" / f"{name}.seed1.onnx")
    (root / "nested" / "broken.onnx").write_bytes(b"\x08\x07 not a model" * 20)
    (root / "notes.txt").write_text("not scanned")
    return root


def test_build_lists_corrupt_files_and_goes_on(registry: Path, tmp_path: Path) -> None:
    seen = []
    report = build_index([registry], tmp_path / "r.idx", workers=1, progress=seen.append)
    assert report.models == 6 and len(report.indexed) == 6
    assert [e.path for e in report.errors] == [str(registry / "nested" / "broken.onnx")]
    assert "not an ONNX model" in report.errors[0].error
    assert len(seen) == 7 and seen[-1].done == 7 and seen[-1].total == 7
    assert {m.path for m in list_models(tmp_path / "r.idx")} == {
        str(p) for p in registry.rglob("*.onnx") if p.name != "broken.onnx"
    }
    assert json.loads(json.dumps(report.to_json()))["errors"][0]["path"].endswith("broken.onnx")


def test_build_is_incremental(registry: Path, tmp_path: Path) -> None:
    index = tmp_path / "r.idx"
    build_index([registry], index, workers=1)
    again = build_index([registry], index, workers=1)
    assert again.indexed == [] and again.unchanged == 6 and len(again.errors) == 1  # still listed
    # Touched (new time, same bytes): its sha256 is compared, it is not fingerprinted again.
    vgg = registry / "vgg.onnx"
    os.utime(vgg, ns=(vgg.stat().st_atime_ns, vgg.stat().st_mtime_ns + 10**9))
    touched = build_index([registry], index, workers=1)
    assert touched.indexed == [] and touched.touched == [str(vgg)]
    assert build_index([registry], index, workers=1).touched == []
    # Changed bytes: read again. Removed: dropped from the index.
    onnx.save(FIXTURES["vgg"](5), vgg)
    (registry / "resnet.onnx").unlink()
    changed = build_index([registry], index, workers=1)
    assert changed.indexed == [str(vgg)] and changed.removed == [str(registry / "resnet.onnx")]
    assert changed.models == 5
    # The index holds the new model: a seed-5 vgg finds itself at distance 0.
    assert find(FIXTURES["vgg"](5), index, top=1).candidates[0].path == str(vgg)


def test_same_size_new_content_is_fingerprinted_again(registry: Path, tmp_path: Path) -> None:
    index = tmp_path / "r.idx"
    build_index([registry], index, workers=1)
    path = registry / "matmul_mlp.onnx"
    model = onnx.load(path)
    tensor = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(tensor) * 2.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), tensor.name))
    size = path.stat().st_size
    onnx.save(model, path)
    assert path.stat().st_size == size
    report = build_index([registry], index, workers=1)
    assert report.indexed == [str(path)] and report.touched == []


def test_external_data_is_read_and_watched(tmp_path: Path) -> None:
    folder = tmp_path / "ext" / "model"
    folder.mkdir(parents=True)
    model = FIXTURES["resnet"](0)
    onnx.save(
        copy_model(model), folder / "resnet.onnx", save_as_external_data=True, location="resnet.data", size_threshold=0
    )
    index = tmp_path / "e.idx"
    report = build_index([tmp_path / "ext"], index, workers=1)
    assert report.indexed == [str(folder / "resnet.onnx")] and not report.errors
    assert find(model, index, top=1).candidates[0].distance < 1e-6
    data = folder / "resnet.data"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert build_index([tmp_path / "ext"], index, workers=1).indexed == [str(folder / "resnet.onnx")]
    data.unlink()
    missing = build_index([tmp_path / "ext"], index, workers=1)
    assert "external data file" in missing.errors[0].error and missing.models == 0


def test_pool_gives_the_same_fingerprints(registry: Path, tmp_path: Path) -> None:
    serial = build_index([registry], tmp_path / "one.idx", workers=1)
    pooled = build_index([registry], tmp_path / "two.idx", workers=2)
    assert sorted(serial.indexed) == sorted(pooled.indexed)

    def blobs(path: Path) -> dict[str, bytes]:
        with sqlite3.connect(path) as connection:
            return dict(connection.execute("SELECT path, fingerprint FROM models"))

    assert blobs(tmp_path / "one.idx") == blobs(tmp_path / "two.idx")


def test_newer_or_foreign_index_is_refused(registry: Path, tmp_path: Path) -> None:
    index = tmp_path / "r.idx"
    build_index([registry / "vgg.onnx"], index, workers=1)
    with sqlite3.connect(index) as connection:
        connection.execute(f"PRAGMA user_version={INDEX_FORMAT + 1}")
    with pytest.raises(OnnxladyError, match="newer"):
        build_index([registry], index, workers=1)
    with pytest.raises(OnnxladyError, match="newer"):
        find(FIXTURES["vgg"](0), index)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(OnnxladyError, match="not an onnxlady index"):
        find(FIXTURES["vgg"](0), other)
    garbage = tmp_path / "garbage.idx"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(OnnxladyError, match="not an onnxlady index"):
        build_index([registry], garbage, workers=1)
    with pytest.raises(OnnxladyError, match="no such index"):
        find(FIXTURES["vgg"](0), tmp_path / "missing.idx")
    with pytest.raises(OnnxladyError, match="unknown engine"):
        build_index([registry], tmp_path / "x.idx", engine="spark")


# -- find -------------------------------------------------------------------------------------
def test_find_puts_the_reference_first_and_calls_nothing_else_derived(registry: Path, tmp_path: Path) -> None:
    index = tmp_path / "r.idx"
    build_index([registry], index, workers=2)
    for name in ("vgg", "resnet", "matmul_mlp"):
        permuted = permute_copy(FIXTURES[name](0), seed=11)[0]
        for suspect in (permuted, _perturbed(permuted, noise=0.1, seed=2), to_float16(permuted)):
            report = find(suspect, index, top=6)
            assert report.candidates[0].path == str(registry / f"{name}.onnx")
            assert [c.call for c in report.candidates] == ["derived"] + ["unrelated"] * 5
            assert report.candidates[0].score > 0.5 > report.candidates[1].score
    # A model not in the registry (another seed) is related to nothing there.
    report = find(FIXTURES["resnet"](3), index, top=6)
    assert report.derived == [] and report.candidates[0].distance > DERIVED_THRESHOLD
    with pytest.raises(OnnxladyError, match="top"):
        find(FIXTURES["resnet"](3), index, top=0)


def test_find_confirm_audits_the_candidates(registry: Path, tmp_path: Path) -> None:
    index = tmp_path / "r.idx"
    build_index([registry / "vgg.onnx", registry / "matmul_mlp.onnx"], index, workers=1)
    suspect = tmp_path / "suspect.onnx"
    onnx.save(permute_copy(FIXTURES["vgg"](0), seed=2)[0], suspect)
    report = find(suspect, index, top=2, confirm=True)
    assert report.candidates[0].confirmation is not None
    assert report.candidates[0].confirmation.verdict == "permuted"
    assert report.candidates[1].confirmation is not None and report.candidates[1].confirmation.verdict == "unmatched"
    # A wrong permutation keeps the fingerprint (same neurons) but the audit catches it.
    wrong = copy_model(FIXTURES["vgg"](0))
    from onnxlady import analyze

    permute_producer_only(wrong, analyze(wrong))
    onnx.save(wrong, suspect)
    caught = find(suspect, index, top=1, confirm=True).candidates[0]
    assert caught.call == "derived" and caught.confirmation is not None
    assert caught.confirmation.verdict not in ("identical", "permuted", "permuted-rescaled", "converted")
    assert json.loads(json.dumps(find(suspect, index, top=1).to_json()))["candidates"][0]["call"] == "derived"


def test_find_confirm_makes_the_call(registry: Path, tmp_path: Path) -> None:
    """With confirm, the audit decides: a copy the fingerprint misses (here: a limit too tight for
    any noise) is derived when its audit pairs it; a model the audit cannot pair is unrelated."""
    index = tmp_path / "r.idx"
    build_index([registry / "vgg.onnx", registry / "matmul_mlp.onnx"], index, workers=1)
    suspect = tmp_path / "suspect.onnx"
    onnx.save(_perturbed(permute_copy(FIXTURES["vgg"](0), seed=2)[0], noise=0.5, seed=4), suspect)
    by_fingerprint = find(suspect, index, top=2, threshold=1e-9)
    assert [c.call for c in by_fingerprint.candidates] == ["unrelated", "unrelated"]
    assert {c.called_by for c in by_fingerprint.candidates} == {"fingerprint"}
    confirmed = find(suspect, index, top=2, threshold=1e-9, confirm=True)
    first, second = confirmed.candidates
    assert first.path == str(registry / "vgg.onnx") and first.confirmation is not None
    assert first.confirmation.verdict == "perturbed" and (first.call, first.called_by) == ("derived", "audit")
    assert second.confirmation is not None and second.confirmation.verdict == "unmatched"
    assert (second.call, second.called_by) == ("unrelated", "audit")
    assert [c.path for c in confirmed.derived] == [first.path]
    assert json.loads(json.dumps(confirmed.to_json()))["candidates"][0]["called_by"] == "audit"


def test_find_all_pairs_lists_clusters(tmp_path: Path) -> None:
    folder = tmp_path / "store"
    folder.mkdir()
    for name in ("vgg", "resnet"):
        reference = FIXTURES[name](0)
        onnx.save(reference, folder / f"{name}.onnx")
        onnx.save(permute_copy(reference, seed=3)[0], folder / f"{name}.permuted.onnx")
        onnx.save(_perturbed(reference, prune_percent=30.0), folder / f"{name}.pruned.onnx")
        onnx.save(FIXTURES[name](2), folder / f"{name}.other.onnx")
    index = tmp_path / "s.idx"
    build_index([folder], index, workers=1)
    report = find_all_pairs(index)
    members = sorted(tuple(Path(p).name for p in cluster.members) for cluster in report.clusters)
    assert members == [
        ("resnet.onnx", "resnet.permuted.onnx", "resnet.pruned.onnx"),
        ("vgg.onnx", "vgg.permuted.onnx", "vgg.pruned.onnx"),
    ]
    assert all(len(cluster.pairs) == 3 for cluster in report.clusters)
    assert json.loads(json.dumps(report.to_json()))["models"] == 8


def test_add_fingerprints_and_coarse_stage(tmp_path: Path) -> None:
    """Fingerprints stored by name; the coarse stage keeps the true match among many others."""
    rng = np.random.default_rng(0)
    base = fingerprint_model(FIXTURES["resnet"](0))
    entries = [("resnet", base)]
    for number in range(300):  # same shapes, other values: the coarse stage must still rank it
        records = base.records + rng.normal(0, 0.05, base.records.shape).astype(np.float32)
        entries.append((f"other{number}", ModelFingerprint(records, base.shapes, base.ops, base.names)))
    assert add_fingerprints(tmp_path / "f.idx", entries) == 301
    report = find(base, tmp_path / "f.idx", top=3)
    assert report.models == 301 and report.candidates[0].path == "resnet" and report.candidates[0].distance < 1e-5
    assert base.records.shape[1] == LAYER_WIDTH


# -- URLs and Dask ----------------------------------------------------------------------------
def test_fsspec_urls_with_external_data(tmp_path: Path) -> None:
    pytest.importorskip("fsspec", reason="fsspec (the 'scale' extra) is not installed")
    folder = tmp_path / "urls"
    folder.mkdir()
    model = FIXTURES["resnet"](0)
    onnx.save(
        copy_model(model), folder / "resnet.onnx", save_as_external_data=True, location="resnet.data", size_threshold=0
    )
    onnx.save(FIXTURES["vgg"](0), folder / "vgg.onnx")
    url = f"file://{folder}"
    result = fingerprint_file(f"{url}/resnet.onnx")
    assert not result.error and result.data_files and result.data_files[0][0].endswith("resnet.data")
    index = tmp_path / "u.idx"
    report = build_index([url], index, workers=1)
    assert sorted(Path(p).name for p in report.indexed) == ["resnet.onnx", "vgg.onnx"]
    assert build_index([url], index, workers=1).unchanged == 2
    assert find(model, index, top=1).candidates[0].path.endswith("resnet.onnx")


@pytest.mark.skipif(not dask_available(), reason="dask.distributed (the 'scale' extra) is not installed")
def test_dask_engine_on_a_local_cluster(registry: Path, tmp_path: Path) -> None:
    """A real LocalCluster of two worker processes fingerprints local paths and file:// URLs."""
    from dask.distributed import Client, LocalCluster

    reference = build_index([registry], tmp_path / "pool.idx", workers=1)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        report = build_index([registry], tmp_path / "dask.idx", engine="dask", scheduler=client)
        assert sorted(report.indexed) == sorted(reference.indexed) and len(report.errors) == 1
        assert len(client.scheduler_info()["workers"]) == 2
        copy = tmp_path / "copy"
        shutil.copytree(registry, copy)
        urls = build_index([f"file://{copy}"], tmp_path / "urls.idx", engine="dask", scheduler=client)
        assert len(urls.indexed) == 6 and len(urls.errors) == 1

    def blobs(path: Path) -> dict[str, bytes]:
        with sqlite3.connect(path) as connection:
            return {Path(p).name: b for p, b in connection.execute("SELECT path, fingerprint FROM models")}

    assert blobs(tmp_path / "dask.idx") == blobs(tmp_path / "pool.idx") == blobs(tmp_path / "urls.idx")


# -- the fast reader and the batched records ----------------------------------------------------
def _conversions(model: onnx.ModelProto, tmp_path: Path, kinds: tuple[str, ...]) -> dict[str, onnx.ModelProto]:
    forms = {"plain": model}
    for kind in kinds:
        try:
            forms[kind] = DERIVATIONS[kind](model, tmp_path)
        except Exception:  # a converter that refuses this fixture: nothing to compare
            continue
    return forms


def test_fast_walk_reads_what_model_graph_reads(tmp_path: Path) -> None:
    """WeightGraph gives the ModelGraph path's layers bit for bit, on every fixture and form.

    And it is the path taken for nearly all of them (else the test would prove nothing).
    """
    from onnxlady._graph._functions import inlined_view
    from onnxlady._provenance._producers import FullGraphNeeded, WeightGraph, model_producers

    fast = slow = 0
    for name in sorted(FIXTURES):
        # Every fixture as built, quantized and in float16; the slower conversions on a few.
        kinds = ("qdq-int8", "float16") + (
            ("bfloat16", "fold-bn", "simplify", "opset21", "ort-extended") if name in ARCHITECTURES else ()
        )
        for kind, model in _conversions(FIXTURES[name](0), tmp_path, kinds).items():
            # Layers inside local functions are read through the calls, inlined (_graph/_functions.py).
            view = inlined_view(model)
            expected = producer_weights(ModelGraph(view.model if view is not None else model, infer_shapes=False))
            try:
                WeightGraph(model).units()
                fast += 1
            except FullGraphNeeded:
                slow += 1
            found = model_producers(model)
            assert [(w.node, w.name, w.op_type, w.neuron_axis, w.kernel, w.groups) for w in found] == [
                (w.node, w.name, w.op_type, w.neuron_axis, w.kernel, w.groups) for w in expected
            ], (name, kind)
            for a, b in zip(found, expected):
                assert np.array_equal(a.matrix, b.matrix), (name, kind, a.name)
                assert (a.row_scale is None) == (b.row_scale is None), (name, kind, a.name)
                if a.row_scale is not None:
                    assert np.array_equal(a.row_scale, b.row_scale), (name, kind, a.name)
    assert fast > 10 * slow, (fast, slow)


def test_fast_walk_falls_back_where_it_must() -> None:
    from onnxlady._provenance._producers import FullGraphNeeded, WeightGraph

    with pytest.raises(FullGraphNeeded, match="subgraph"):
        WeightGraph(FIXTURES["if_branch"](0))
    model = FIXTURES["vgg"](0)
    reordered = copy_model(model)
    nodes = list(reordered.graph.node)
    del reordered.graph.node[:]
    reordered.graph.node.extend(reversed(nodes))
    with pytest.raises(FullGraphNeeded, match="before it is defined"):
        WeightGraph(reordered)
    # The fallback still fingerprints it as the sorted model.
    assert fingerprint_distance(fingerprint_model(model), fingerprint_model(reordered)) < 1e-6


def test_batched_small_layers_match_one_by_one(monkeypatch) -> None:
    """Small layers reduced together give the records large layers get one by one.

    The batch (float64, reduceat/bincount) matches the float32 einsum passes row for row, in
    the caller's order.
    """
    from onnxlady._provenance import _fingerprint
    from onnxlady._provenance._producers import ProducerWeight

    rng = np.random.default_rng(1)
    layers = []
    for index, (n, k, axis) in enumerate(
        [(8, 27, 0), (40, 30, 1), (300, 64, 0), (16, 9, 0), (5, 200, 1), (64, 600, 0)]
    ):
        matrix = (rng.standard_normal((n, k)) * rng.uniform(0.2, 3.0, (n, 1)) + 0.1).astype(np.float32)
        matrix[0] = 0.0  # a dead neuron
        scale = rng.uniform(0.5, 2.0, n) * np.where(rng.random(n) < 0.3, -1.0, 1.0) if index % 2 else None
        stored = matrix if axis == 0 else np.ascontiguousarray(matrix.T)
        layers.append(ProducerWeight(index, f"l{index}", "Conv", stored, axis, 1, 1, scale))
    together = _fingerprint.layer_records(layers)
    monkeypatch.setattr(_fingerprint, "SMALL_LAYER", 0)  # every layer alone, einsum passes
    alone = np.stack([_fingerprint.layer_records([w])[0] for w in layers])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert np.abs(together[0] - together[3]).max() > 1e-2  # rows are not interchangeable


def test_segment_helpers_match_their_one_segment_forms() -> None:
    from onnxlady._provenance._fingerprint import segment_resample, segment_sort

    rng = np.random.default_rng(2)
    lengths = np.array([1, 3, 16, 17, 40])
    values = rng.standard_normal((int(lengths.sum()), 2))
    ordered = segment_sort(values, lengths)
    resampled = segment_resample(ordered, lengths)
    start = 0
    for number, length in enumerate(lengths):
        block = values[start : start + length]
        np.testing.assert_array_equal(ordered[start : start + length], np.sort(block, axis=0))
        np.testing.assert_allclose(resampled[number], resample(np.sort(block, axis=0)), rtol=1e-12, atol=1e-12)
        start += length


def test_segment_sort_of_equal_lengths_is_the_one_segment_sort_bit_for_bit() -> None:
    """Segments of one length are sorted in one call: the same bits as a sort per segment.

    Signed zeros included (a dead neuron's mean reads -0.0 or 0.0): they compare equal, so only
    the same sort on the same values puts them in the same order.
    """
    from onnxlady._provenance._fingerprint import segment_sort

    rng = np.random.default_rng(5)
    lengths = np.array([16, 3, 16, 1, 40, 16, 3, 1, 17])
    values = rng.standard_normal((int(lengths.sum()), 6))
    values[rng.random(values.shape) < 0.3] = 0.0
    values[rng.random(values.shape) < 0.3] = -0.0
    ordered = segment_sort(values, lengths)
    start = 0
    for length in lengths.tolist():
        expected = np.sort(values[start : start + length], axis=0)
        assert ordered[start : start + length].tobytes() == expected.tobytes()
        start += length
    wrong = values.copy()
    wrong[[0, 19]] = wrong[[19, 0]]  # rows traded between two segments of length 16
    assert segment_sort(wrong, lengths).tobytes() != ordered.tobytes()


def test_near_dead_neurons_read_as_dead() -> None:
    """A neuron a millionth of its layer's largest reads like an all-zero row.

    Such a channel is one float16 or int8 rounds to zero; it never overflows float32 (real
    PaddleOCR models hold rows of RMS 1e-36).
    """
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((12, 50)).astype(np.float32)
    dead, tiny = rows.copy(), rows.copy()
    dead[3] = 0.0
    tiny[3] = rows[3] * np.float32(1e-36)
    with np.errstate(all="raise"):
        a, b = layer_record(dead), layer_record(tiny)
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(a[SLICES["mean"]], b[SLICES["mean"]], atol=1e-9)
    np.testing.assert_allclose(a[SLICES["kurtosis"]], b[SLICES["kurtosis"]], atol=1e-9)


def test_non_finite_layers_are_left_out_without_a_pass_of_their_own() -> None:
    """A layer holding NaN or infinity is no layer of the fingerprint; a huge finite one is kept.

    The arithmetic sees them (the check no longer reads every weight once more): the other
    layers' records are those they get without the bad layer, bit for bit.
    """
    from onnxlady._provenance._fingerprint import fingerprints_of
    from onnxlady._provenance._producers import ProducerWeight

    rng = np.random.default_rng(4)

    def layer(index: int, n: int, k: int) -> ProducerWeight:
        return ProducerWeight(index, f"l{index}", "Gemm", rng.standard_normal((n, k)).astype(np.float32), 0, 1, 1)

    good = [layer(0, 8, 20), layer(1, 300, 40)]  # a small (batched) and a large (einsum) layer
    clean = fingerprints_of([good])[0]
    for bad_value in (np.nan, np.inf, -np.inf):
        for bad in (layer(2, 8, 20), layer(3, 300, 40)):
            bad.matrix[1, 2] = bad_value
            mixed = fingerprints_of([[good[0], bad, good[1]]])[0]
            assert mixed.layers == 2 and mixed.names == clean.names
            np.testing.assert_array_equal(mixed.records, clean.records)
    huge = layer(4, 300, 40)
    huge.matrix[0, 0] = np.float32(1e30)  # finite; its float32 square is not
    kept = fingerprints_of([[good[0], huge]])[0]
    assert kept.layers == 2 and kept.names == ("l0", "l4")


def test_the_unit_floor_needs_two_shaped_layers() -> None:
    """Large trained-like layers get the floor; i.i.d. random ones keep the random-layer gap.

    Two independent random layers of one law converge as they grow and only the random-layer
    gap tells them apart; layers whose neurons have unequal norms (training, a folded
    normalization) do not converge, and a noisy copy of one must still read as derived.
    """
    from onnxlady._provenance._fingerprint import (
        LAYER_UNIT_FLOOR,
        SHAPED_SPREAD,
        layer_unit,
        norm_spread,
        unrelated_gap,
    )

    rng = np.random.default_rng(5)
    n, k = 512, 1280

    def fingerprint(matrix: np.ndarray) -> ModelFingerprint:
        return ModelFingerprint(
            layer_record(matrix)[None].astype(np.float32), np.array([[n, k, 1, 1]]), ("Gemm",), ("l",)
        )

    random_a, random_b = (rng.standard_normal((n, k)).astype(np.float32) for _ in range(2))
    norms = np.exp(rng.normal(0.0, 0.5, (n, 1)))  # neurons of unequal norms
    trained = (rng.standard_t(4, (n, k)) * norms).astype(np.float32)
    noisy = trained + (rng.standard_normal((n, k)) * 0.1 * trained.std(axis=1, keepdims=True)).astype(np.float32)
    spreads = [float(norm_spread(fingerprint(m).records, fingerprint(m).shapes)[0]) for m in (random_a, trained)]
    assert spreads[0] < 1.2 < SHAPED_SPREAD < spreads[1]
    gap = unrelated_gap(np.array([[n, k, 1, 1]]))
    assert gap[0] < LAYER_UNIT_FLOOR  # a layer this large is where the floor matters
    units = layer_unit(np.array([[n, k, 1, 1]]), np.array([True]), np.array([True, False]))
    np.testing.assert_allclose(units, [[LAYER_UNIT_FLOOR, gap[0]]])
    np.testing.assert_allclose(layer_unit(np.array([[n, k, 1, 1]])), gap)
    # Random twins stay as far as the random-layer gap says; the noisy trained copy reads near.
    assert fingerprint_distance(fingerprint(random_a), fingerprint(random_b)) > 0.5
    assert fingerprint_distance(fingerprint(trained), fingerprint(noisy)) < 0.4


def test_file_reader_checks(tmp_path: Path) -> None:
    """The one-read path: hash of the same bytes, regular files only, external data through the loader."""
    import hashlib

    path = tmp_path / "vgg.onnx"
    onnx.save(FIXTURES["vgg"](0), path)
    result = fingerprint_file(str(path))
    assert not result.error and result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.fingerprint == fingerprint_model(onnx.load(path)).to_bytes()
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "no graph" in fingerprint_file(str(tmp_path / "empty.onnx")).error
    assert "is a folder" in fingerprint_file(str(tmp_path)).error
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    assert "not a regular file" in fingerprint_file(str(fifo)).error  # never opened: it would block


# -- the public API ---------------------------------------------------------------------------------
def test_public_api(registry: Path, tmp_path: Path) -> None:
    import onnxlady

    for name in ("build_index", "find", "find_all_pairs", "IndexResult", "FindResult", "ClusterResult", "Candidate"):
        assert name in onnxlady.__all__ and getattr(onnxlady, name).__module__ == "onnxlady"
    messages: list[str] = []
    built = onnxlady.build_index([registry], tmp_path / "api.idx", workers=1, progress=messages.append)
    assert built.models == 6 and len(built.errors) == 1 and built.exit_code == 0
    assert any("fingerprinting" in m for m in messages)  # advance(): a line per tenth of the files
    suspect = permute_copy(FIXTURES["resnet"](0), seed=9)[0]
    found = onnxlady.find(suspect, tmp_path / "api.idx", top=3)
    assert isinstance(found, onnxlady.FindResult) and found.exit_code == 0
    assert found.candidates[0].path == str(registry / "resnet.onnx") and len(found.derived) == 1
    assert "derived" in found.to_text() and json.loads(json.dumps(found.to_json()))["derived"] == 1
    nothing = onnxlady.find(FIXTURES["resnet"](4), tmp_path / "api.idx")
    assert nothing.exit_code == 1 and nothing.derived == []
    clusters = onnxlady.find_all_pairs(tmp_path / "api.idx")
    assert clusters.exit_code == 1 and clusters.clusters == []
    with pytest.raises(OnnxladyError, match="either"):
        onnxlady.find(suspect, tmp_path / "api.idx", all_pairs=True)  # type: ignore[call-overload]
    with pytest.raises(OnnxladyError, match="suspect"):
        onnxlady.find(None, tmp_path / "api.idx")  # type: ignore[call-overload]
