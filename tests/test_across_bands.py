"""Resync across conversions in bands and in one pass: the same numbers, bit for bit, less memory.

- a sketched block of float32 or float16 rows is centred, measured and sketched a band of rows
  at a time in float64 (:func:`onnxlady._resync._solver._centred_sketch`), its rows kept as
  gathered (:class:`~onnxlady._resync._solver._CentredRows`): the numbers of the float64 copy
  centred in place, which is never made;
- a count sketch is summed a band of rows at a time, without a signed copy of the whole block;
- a constant 8- or 16-bit ``DequantizeLinear`` is computed in float32 in one pass: the values of
  the int64 path;
- the re-ordered suspect's moved tensors are computed once, when written, and hashed then for
  the key (not computed a second time only to be hashed).

Resync reports its margins and similarities to the last digit, so each is compared with the
expression it replaces with ``==`` on every bit; each comparison is also shown to fail on a
changed input.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlady._resync._solver as solver
from fixtures import FIXTURES
from fixtures.conversions import CONVERSIONS
from onnxlady._analysis._channels import analyze
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync import _twin
from onnxlady._resync._entry import resync_model
from onnxlady._transforms._permute import unpermute_model
from onnxlady.testing import copy_model, permute_copy, permute_producer_only


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (the sign of zeros included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _rows(n: int, width: int, dtype: type, seed: int) -> np.ndarray:
    """Rows spread over many magnitudes, with zeros and a constant column (it centres to zeros)."""
    rng = np.random.default_rng(seed)
    rows: np.ndarray = (rng.standard_normal((n, width)) * 10.0 ** rng.uniform(-3, 2, (n, width))).astype(dtype)
    rows.reshape(-1)[::7] = 0
    rows[:, 1] = dtype(0.5)
    return rows


def _whole_sketch(rows: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """The count sketch as it was computed before bands: one signed copy of the whole block."""
    signed = rows * sign
    n, width = signed.shape
    whole = width // solver._SKETCH_DIM * solver._SKETCH_DIM
    sketch = signed[:, :whole].reshape(n, -1, solver._SKETCH_DIM).sum(axis=1)
    sketch[:, : width - whole] += signed[:, whole:]
    return sketch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n", "width"), [(1, 1100), (37, 5000), (300, 1537)])
def test_a_count_sketch_in_bands_is_the_whole_blocks(dtype: type, n: int, width: int) -> None:
    rows = _rows(n, width, dtype, n + width)
    sign = np.random.default_rng(1).choice(np.array([-1.0, 1.0], dtype=dtype), width)
    expected = _whole_sketch(rows, sign)
    assert _same(solver._count_sketch(rows, sign), expected)
    changed = rows.copy()
    changed[-1, -1] += dtype(1.0)
    assert not _same(solver._count_sketch(changed, sign), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("n", "width", "band_bytes"), [(2, 1100, 1 << 18), (300, 1537, 1 << 18), (97, 2049, 1)])
def test_a_stored_block_centres_and_sketches_as_its_float64_copy(
    dtype: type, n: int, width: int, band_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(solver, "_SKETCH_BAND_BYTES", band_bytes)  # one row per band, or many
    stored = _rows(n, width, dtype, n)
    sign = np.random.default_rng(2).choice(np.array([-1.0, 1.0]), width)
    wide = stored.astype(np.float64)
    centred = solver._centred(wide, True)  # the float64 copy, centred in place (what was kept)
    rows, sketch, energy = solver._centred_sketch(stored, sign)
    assert _same(energy, solver._row_energy(centred))
    assert _same(sketch, _whole_sketch(centred, sign))
    picked = np.array([n - 1, 0, n // 2])
    assert _same(rows[picked], centred[picked])
    assert _same(rows.whole(), centred)
    assert rows.shape == centred.shape and rows.size == centred.size and rows.stored.dtype == dtype
    changed = stored.copy()
    changed[0, 0] = dtype(7.0)
    assert not _same(solver._centred_sketch(changed, sign)[2], energy)


def test_stored_blocks_score_as_widened_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """:meth:`_Blocks.build` on blocks as gathered gives the products, energies and decisions of widened ones."""
    rng = np.random.default_rng(5)
    n, width = 64, 1500
    perm = rng.permutation(n)
    ref = rng.standard_normal((n, width)).astype(np.float32)
    sus = (ref[perm] + np.float32(0.2) * rng.standard_normal((n, width)).astype(np.float32)).astype(np.float16)
    pairs = [(ref, sus)]
    widened = [(ref.astype(np.float64), sus.astype(np.float64))]
    monkeypatch.setattr(solver, "_EXACT_PRODUCT", 1 << 10)  # a small block, sketched
    kept = solver._Blocks.build(pairs, n, seed=3, stored=[True])
    whole = solver._Blocks.build(widened, n, seed=3, owned=[(True, True)])
    assert isinstance(kept.blocks[0].ref, solver._CentredRows) and isinstance(whole.blocks[0].ref, np.ndarray)
    for mine, theirs in zip(kept.blocks, whole.blocks):
        assert mine.sketch is not None and theirs.sketch is not None
        assert all(_same(a, b) for a, b in zip(mine.sketch, theirs.sketch))
        assert _same(mine.ref_sq, theirs.ref_sq) and _same(mine.sus_sq, theirs.sus_sq)
    weights = kept.unit_weights()
    assert weights == whole.unit_weights()
    first, second = kept.scores(weights, "distance"), whole.scores(weights, "distance")
    assert _same(first.decision, second.decision)
    step = np.argsort(perm)
    assert kept.rescore(weights, first.decision, step) == whole.rescore(weights, second.decision, step)
    assert all(
        _same(a[2], b[2]) for mine, theirs in zip(kept.blocks, whole.blocks) for a, b in zip(mine.exact, theirs.exact)
    )
    assert kept.blocks[0].cross(step) == whole.blocks[0].cross(step)
    kept.blocks[0].cached = whole.blocks[0].cached = None  # the products not kept: the rows themselves
    assert kept.blocks[0].cross(step) == whole.blocks[0].cross(step)
    assert kept.blocks[0].cross(step) != kept.blocks[0].cross(np.arange(n))


def _report(result: solver.ResyncResult) -> tuple[str, str, bytes]:
    return repr(result.groups), repr(result.key.to_json()), result.model.SerializeToString()


@pytest.mark.parametrize("conversion", ["float16", "qdq"])
def test_a_resync_with_stored_blocks_is_the_resync_with_widened_ones(conversion: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, with sketches small enough for a fixture's blocks: the same groups, key and output."""
    reference = FIXTURES["resnet"](0)
    model, _, _, _ = permute_copy(reference, 7)
    suspect = CONVERSIONS[conversion](model)
    monkeypatch.setattr(solver, "_EXACT_PRODUCT", 1 << 8)
    monkeypatch.setattr(solver, "_SKETCH_DIM", 16)
    monkeypatch.setattr(solver, "_SKETCH_BAND_BYTES", 1 << 11)  # a few rows per band
    calls: list[int] = []
    centred_sketch = solver._centred_sketch

    def counted(stored: np.ndarray, sign: np.ndarray) -> tuple[solver._CentredRows, np.ndarray, np.ndarray]:
        calls.append(stored.shape[0])
        return centred_sketch(stored, sign)

    monkeypatch.setattr(solver, "_centred_sketch", counted)
    kept = _report(resync_model(reference, suspect))
    assert calls  # the stored path ran
    monkeypatch.setattr(solver, "_keeps_stored", lambda array, piece: False)
    calls.clear()
    widened = _report(resync_model(reference, suspect))
    assert not calls
    assert kept == widened


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32])
@pytest.mark.parametrize("form", ["tensor", "axis", "block", "no zero point"])
def test_a_dequantized_constant_is_the_int64_paths(dtype: type, form: str) -> None:
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize) * 10 + len(form))
    info = np.iinfo(dtype)
    value: np.ndarray = rng.integers(info.min, info.max, (8, 6, 3), endpoint=True).astype(dtype)
    channels = {"tensor": 1, "axis": 6, "block": 2, "no zero point": 6}[form]
    scale = rng.uniform(1e-4, 2.0, channels).astype(np.float32)
    zero: np.ndarray = rng.integers(info.min, info.max, channels, endpoint=True).astype(dtype)
    if form == "tensor":
        scale, zero = scale.reshape(()), zero.reshape(())
    elif form == "block":
        scale, zero = np.repeat(scale[None, :, None], 8, axis=0), np.repeat(zero[None, :, None], 8, axis=0)
    inputs = ["q", "s"] + ([] if form == "no zero point" else ["z"])
    attributes: dict[str, int] = {"axis": 1} | ({"block_size": 3} if form == "block" else {})
    initializers = [onnx.numpy_helper.from_array(value, "q"), onnx.numpy_helper.from_array(scale, "s")]
    if form != "no zero point":
        initializers.append(onnx.numpy_helper.from_array(zero, "z"))
    if form == "block":
        scale, zero = scale.reshape(8, 2, 1), zero.reshape(8, 2, 1)
        initializers[1:] = [onnx.numpy_helper.from_array(p, n) for p, n in ((scale, "s"), (zero, "z"))]
    node = helper.make_node("DequantizeLinear", inputs, ["y"])
    node.attribute.extend(helper.make_attribute(name, number) for name, number in attributes.items())
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    found = ModelGraph(model).constant_value("y")
    # The int64 path, as it was written.
    if form == "block":
        spread_scale, spread_zero = np.repeat(scale, 3, axis=1)[:, :6], np.repeat(zero, 3, axis=1)[:, :6]
    elif form == "tensor":
        spread_scale, spread_zero = scale, zero
    else:
        spread_scale, spread_zero = scale.reshape(1, -1, 1), zero.reshape(1, -1, 1)
    shifted = value.astype(np.int64) - (0 if form == "no zero point" else spread_zero.astype(np.int64))
    expected = (shifted.astype(np.float32) * spread_scale.astype(np.float32)).astype(np.float32)
    assert found is not None and _same(found, expected)
    wrong = ((value.astype(np.int64) - 1).astype(np.float32) * spread_scale.astype(np.float32)).astype(np.float32)
    assert not _same(found, wrong)


def test_the_moved_tensors_are_computed_once_and_the_key_is_the_copys(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = FIXTURES["resnet"](0)
    model, _, _, _ = permute_copy(reference, 7)
    suspect = CONVERSIONS["float16"](model)
    computed: list[str] = []
    moved_array = _twin._moved_array

    def counted(tensor: onnx.TensorProto, axes: list[tuple[int, np.ndarray]]) -> np.ndarray:
        computed.append(tensor.name)
        return moved_array(tensor, axes)

    monkeypatch.setattr(_twin, "_moved_array", counted)
    result = resync_model(reference, suspect)
    assert result.built is None and result.unbuilt is not None and not computed  # nothing moved yet
    _, overrides = result.unbuilt
    output = result.model  # built from the overrides: each moved tensor computed here, once
    assert sorted(computed) == sorted(overrides)
    digest = result.key.source_weights_sha256  # hashed as they were computed: none again
    assert sorted(computed) == sorted(overrides) and digest
    # The key is the one permuting a copy back gives: it unpermutes the suspect into the output.
    restored = copy_model(suspect)
    assert unpermute_model(restored, result.key)
    assert restored.SerializeToString() == output.SerializeToString()
    wrong = copy_model(suspect)
    permute_producer_only(wrong, analyze(wrong))
    assert not unpermute_model(wrong, result.key)
    # Read before anything is written, the digest computes every moved tensor once, then never again.
    computed.clear()
    again = resync_model(reference, suspect)
    assert again.key.source_weights_sha256 == digest
    assert sorted(computed) == sorted(overrides)
    assert again.model.SerializeToString() == output.SerializeToString()


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_a_dequantized_scalar_is_the_int64_paths(dtype: type) -> None:
    """A 0-d quantized constant (a quantizer's scalar) comes back as the int64 path gives it."""
    value, scale, zero = np.array(7, dtype=dtype), np.array(0.25, dtype=np.float32), np.array(3, dtype=dtype)
    initializers = [onnx.numpy_helper.from_array(a, n) for a, n in ((value, "q"), (scale, "s"), (zero, "z"))]
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers
    )
    found = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).constant_value("y")
    expected = ((value.astype(np.int64) - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32)
    assert found is not None and type(found) is type(expected)
    assert np.asarray(found).tobytes() == np.asarray(expected).tobytes() == np.float32(1.0).tobytes()
