"""Audit of MatMulNBits weights whose K is not a whole number of blocks (held-out round 19, F1).

ONNX Runtime's ``MatMulNBitsQuantizer`` pads a partial last block of K with zeros. The audit
compares an int4 weight dequantized (``[N, blocks, bytes, values per byte]``); where the float
model's form freezes groups the quantized one permutes (its blocks along K), the comparison is
made a second time with the roles exchanged, the quantized model as the reference. There, a weight
of K = 48 in blocks of 32 was never compared (its padding counted as a part without counterpart):
one block of one column negated, or its scale x1.5, read ``converted``. The quantizer rounds every
weight to within its block's step, so both are far outside what the conversion allows.
"""

from __future__ import annotations

import functools

import onnx
import pytest
from onnx import numpy_helper

from fixtures.block_dequantize import float_mlp
from onnxlady._audit._verdicts import audit_models
from onnxlady.testing import copy_model, permute_copy

BLOCK = 32
#: The input, then each layer's width: K = 48 (a block and a half) for the first two layers.
WIDTHS = (48, 48, 96, 8)


def _float_mlp() -> onnx.ModelProto:
    """``x [1, 4, 48]`` through MatMul + Add (bias) + Relu layers (no Relu after the last)."""
    return float_mlp(3, widths=WIDTHS, bias=True)


def _quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:  # the quantizer needs onnx_ir
        pytest.skip(f"ONNX Runtime's MatMulNBitsQuantizer cannot run here: {exc}")
    quantizer = MatMulNBitsQuantizer(copy_model(model), block_size=BLOCK, is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


@functools.cache
def _models() -> tuple[bytes, bytes, bytes]:
    """(float reference, its quantized copy, a permuted copy quantized), serialized."""
    reference = _float_mlp()
    permuted = permute_copy(reference, 5)[0]
    return tuple(m.SerializeToString() for m in (reference, _quantized(reference), _quantized(permuted)))  # type: ignore[return-value]


def _model(which: int) -> onnx.ModelProto:
    return onnx.load_from_string(_models()[which])


def _tampered(kind: str, layer: int) -> onnx.ModelProto:
    """The quantized copy with column 1's first block of layer ``layer`` changed."""
    model = _model(1)
    node = [n for n in model.graph.node if n.op_type == "MatMulNBits"][layer]
    assert int(next(a.i for a in node.attribute if a.name == "K")) % BLOCK, "the fixture's K must end in a partial block"
    inits = {t.name: t for t in model.graph.initializer}
    slot = 1 if kind == "negated" else 2
    tensor = inits[node.input[slot]]
    values = numpy_helper.to_array(tensor).copy()
    if kind == "negated":  # every nibble q -> 15 - q: the block's weights negated (less one step)
        values[1, 0, :] ^= 0xFF
    else:  # the block's scale x1.5
        values.reshape(values.shape[0], -1)[1, 0] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return model


def test_the_clean_quantized_copy_is_converted() -> None:
    report = audit_models(_model(0), _model(1))
    assert report.verdict == "converted" and report.exit_code == 0, report.summary
    assert any(c.kind == "quantized" and "MatMulNBits" in c.detail for c in report.conversions)


def test_a_permuted_quantized_copy_is_permuted() -> None:
    report = audit_models(_model(0), _model(2))
    assert report.verdict == "permuted" and report.exit_code == 0, report.summary


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("kind", ["negated", "scaled"])
def test_a_changed_block_of_a_padded_weight_is_caught(kind: str, layer: int) -> None:
    report = audit_models(_model(0), _tampered(kind, layer))
    assert report.verdict in ("modified", "scaled") and report.exit_code == 1, report.summary
