"""MatMulNBits quantization blocks: which moves along K are exact, on graphs the real quantizer writes.

ONNX Runtime's ``MatMulNBitsQuantizer`` (asymmetric, 4 bits, blocks of 16) packs the zero points
of two blocks into one byte (``[N, ceil(n_blocks / 2)]`` uint8) and pads a partial last block when
``K`` is not a multiple of the block size. The rule moves blocks as whole zero-point bytes (pairs
of blocks), keeps a partial last block (and so the bytes inside every block) in place, and never
touches a nibble: every move is a byte move, so ``unpermute`` is bit-exact.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxlady import analyze
from onnxlady._transforms._permute import unpermute_model
from onnxlady._verify._compare import verify_models
from onnxlady.testing._helpers import constant_bytes, copy_model, permute_copy, permute_producer_only

BLOCK = 16
#: Layer widths: the input, then each MatMul's output. "aligned": every hidden K is a multiple of
#: the block; "ragged": K = 72 is 4 whole blocks and a partial one of 8 values.
WIDTHS = {"aligned": (24, 64, 64, 48, 8), "ragged": (24, 64, 72, 48, 8)}


def _float_mlp(widths: tuple[int, ...]) -> onnx.ModelProto:
    """``x [1, 4, widths[0]]`` through MatMul + Relu layers (none after the last one)."""
    rng = np.random.default_rng(7)
    nodes, inits, current = [], [], "x"
    for layer, (k, n) in enumerate(itertools.pairwise(widths)):
        weight = f"fc{layer}.weight"
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), weight))
        out = f"fc{layer}.out" if layer < len(widths) - 2 else "y"
        nodes.append(helper.make_node("MatMul", [current, weight], [out], name=f"fc{layer}"))
        if layer < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"relu{layer}"], name=f"relu{layer}"))
            out = f"relu{layer}"
        current = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, widths[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, widths[-1]])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@functools.cache
def _bytes(name: str, quantized: bool) -> bytes:
    model = _float_mlp(WIDTHS[name])
    if quantized:
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:  # the quantizer needs onnx_ir
            pytest.skip(f"ONNX Runtime's MatMulNBitsQuantizer cannot run here: {exc}")
        quantizer = MatMulNBitsQuantizer(copy_model(model), block_size=BLOCK, is_symmetric=False)
        quantizer.process()
        model = quantizer.model.model
    return model.SerializeToString()


def _model(name: str, quantized: bool = True) -> onnx.ModelProto:
    return onnx.load_from_string(_bytes(name, quantized))


def _initializer(model: onnx.ModelProto, suffix: str, layer: int) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name.startswith(f"fc{layer}.weight") and init.name.endswith(suffix):
            return numpy_helper.to_array(init)
    raise AssertionError(f"no {suffix} for layer {layer}")


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_the_quantizer_packs_two_zero_points_a_byte(name: str) -> None:
    """The fixture is what the tests claim: MatMulNBits with nibble-packed zero points."""
    model = _model(name)
    assert [n.op_type for n in model.graph.node if n.op_type.startswith("MatMul")] == ["MatMulNBits"] * 4
    k = WIDTHS[name][2]
    n_blocks = -(-k // BLOCK)
    zero_points = _initializer(model, "zero_points", 2)
    assert zero_points.dtype == np.uint8
    assert zero_points.size == WIDTHS[name][3] * -(-n_blocks // 2)


def test_aligned_blocks_keep_the_float_models_coverage() -> None:
    plain, quantized = analyze(_model("aligned", False)).summary(), analyze(_model("aligned")).summary()
    assert quantized["producer_neurons"] == plain["producer_neurons"]
    assert quantized["permutable_producer_neurons"] == plain["permutable_producer_neurons"] == 64 + 64 + 48


def test_a_partial_block_stays_and_the_whole_blocks_move() -> None:
    plain, quantized = analyze(_model("ragged", False)).summary(), analyze(_model("ragged")).summary()
    # fc1's 72 outputs: the 64 in whole blocks move (as pairs of blocks), the 8 of the partial one stay.
    assert quantized["permutable_producer_neurons"] == int(plain["permutable_producer_neurons"]) - 72 % BLOCK  # type: ignore[call-overload]
    analysis = analyze(_model("ragged"))
    plan = next(p for p in analysis.tensors if p.tensor.startswith("fc1.weight") and p.tensor.endswith("_Q4"))
    rows = dict(plan.axes)[0]
    moving = np.zeros(rows.size, dtype=bool)
    for group_id, lab in analysis.neuron_labels(rows).items():
        if analysis.group(group_id).permutable and analysis.group(group_id).size > 1:
            moving |= lab >= 0
    assert moving[:64].all() and not moving[64:].any()


def test_blocks_move_as_whole_zero_point_bytes() -> None:
    analysis = analyze(_model("aligned"))
    weight = next(t.name for t in _model("aligned").graph.initializer if t.name.startswith("fc2.weight")
                  and t.name.endswith("_Q4"))
    moving = sorted(g.size for g in analysis.permutable_groups
                    if any(m.tensor == weight and m.axis == 1 for m in g.members))
    assert moving == [2]  # 4 blocks of K = 64: two zero-point bytes, each holding two blocks


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_permuted_model_is_equivalent_and_unpermutes_bit_exact(name: str) -> None:
    source = _model(name)
    model, _, perms, key = permute_copy(source, 3)
    assert perms
    before, after = constant_bytes(source), constant_bytes(model)
    moved = {tensor for tensor in before if before[tensor] != after[tensor]}
    assert any(t.endswith("zero_points") for t in moved), moved  # packed zero points really move
    report = verify_models(source, model, provider="cpu", iterations=2)
    assert report.equivalent, [(o.name, o.max_abs_error) for o in report.outputs]
    assert not report.degenerate_outputs
    assert unpermute_model(model, key) is True
    assert constant_bytes(model) == constant_bytes(source)


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_wrong_permutation_is_caught(name: str) -> None:
    source = _model(name)
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


def _swap_first_blocks(source: onnx.ModelProto, *, nibbles: bool) -> onnx.ModelProto:
    """Swap fc2's blocks 0 and 1 and fc1's matching output rows: exact only if the zero points follow.

    B and the scales move; with ``nibbles`` the two nibbles of each row's first zero-point byte too.
    """
    model = copy_model(source)
    holders = {t.name: t for t in model.graph.initializer}
    nodes = {n.name.split("_")[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    n_blocks = WIDTHS["aligned"][2] // BLOCK
    fc2 = nodes["fc2"]
    for slot in (1, 2):
        tensor = holders[fc2.input[slot]]
        array = numpy_helper.to_array(tensor)
        shaped = array.reshape(WIDTHS["aligned"][3], n_blocks, -1)
        tensor.CopyFrom(numpy_helper.from_array(shaped[:, [1, 0, 2, 3]].reshape(array.shape), tensor.name))
    if nibbles:
        tensor = holders[fc2.input[3]]
        array = numpy_helper.to_array(tensor)
        swapped = array.copy().reshape(-1, 2)
        swapped[:, 0] = ((array.reshape(-1, 2)[:, 0] & 0x0F) << 4) | (array.reshape(-1, 2)[:, 0] >> 4)
        tensor.CopyFrom(numpy_helper.from_array(swapped.reshape(array.shape), tensor.name))
    order = np.r_[16:32, 0:16, 32:64]  # fc1's outputs are fc2's K
    for slot in (1, 2, 3):
        tensor = holders[nodes["fc1"].input[slot]]
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(array.reshape(64, -1)[order].reshape(array.shape), tensor.name))
    return model


def test_a_block_moved_without_its_zero_point_nibble_is_caught() -> None:
    """Swapping blocks 0 and 1 (one zero-point byte) needs a nibble swap the rule never makes."""
    source = _model("aligned")
    assert verify_models(source, _swap_first_blocks(source, nibbles=True), provider="cpu").equivalent  # control
    assert not verify_models(source, _swap_first_blocks(source, nibbles=False), provider="cpu").equivalent


# -- shape values computed past an operator ONNX's inference does not know ---------------------
def test_magika_int4_keeps_the_float_models_coverage() -> None:
    """ONNX's whole-graph inference stops at MatMulNBits, and with it the shape values jax2tf
    computes for Magika's LayerNorm broadcasts (Shape -> Cast -> Slice -> Concat -> Expand):
    a second run with the contrib outputs typed restores them (8.1 % of producer neurons
    permutable before, 72.9 % as in float). Needs the real model (``python3 -m tools.fetch_models``).
    """
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / ".cache" / "models" / "magika.onnx"
    if not path.exists():
        pytest.skip("the real Magika model is fetched by python3 -m tools.fetch_models")
    contrib = pytest.importorskip("fixtures.contrib")
    reference = onnx.load(str(path))
    try:
        quantized = contrib.nbits_quantized(reference)
    except ImportError as exc:
        pytest.skip(f"MatMulNBitsQuantizer cannot be imported: {exc}")
    plain = analyze(reference).summary()["permutable_producer_neurons"]
    assert analyze(quantized).summary()["permutable_producer_neurons"] == plain == 576
