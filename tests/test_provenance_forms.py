"""Provenance of two ONNX Runtime forms whose weights are not where the plain reader looks.

- ``quantize_dynamic`` of a model whose weights are ``Constant`` nodes (PaddleOCR's exports):
  the quantizer leaves them float and quantizes each at run time (``DynamicQuantizeLinear`` of
  the weight feeding ``ConvInteger``), with the BatchNorm after the scale ``Mul``.
- ``ORT_ENABLE_ALL``'s NCHWc layout of a residual network whose block ends in a zero-initialised
  BatchNorm (timm's ResNet): the folded convolution's rows are all zero, which the layout alone
  reads as block padding; the next convolution's weights say those channels are true ones.

Each form is made by the real ONNX Runtime tool, must be found at rank 1 and called derived,
and the same change of an unrelated model (another seed) must stay far.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.conversions import fold_batchnorm
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._provenance._find import DERIVED_THRESHOLD, find
from onnxlady._provenance._fingerprint import fingerprint_distance, fingerprint_model
from onnxlady._provenance._index import build_index
from onnxlady._provenance._producers import model_producers, producer_weights
from onnxlady.testing import copy_model, permute_copy

ort = pytest.importorskip("onnxruntime")


def _constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer moved into a ``Constant`` node, as Paddle's exporter stores weights."""
    copy = copy_model(model)
    constants = [
        onnx.helper.make_node("Constant", [], [tensor.name], value=tensor, name=f"{tensor.name}.constant")
        for tensor in copy.graph.initializer
    ]
    nodes = constants + list(copy.graph.node)
    del copy.graph.initializer[:]
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def _dynamic_int8(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = folder / "dynamic-in.onnx", folder / "dynamic-out.onnx"
    onnx.save(model, source)
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return onnx.load(target)


def _zero_last_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The residual block's last BatchNorm initialised to zero (gamma and beta), as timm does.

    Folded into the convolutions, as PyTorch's export writes an eval-mode network: the
    block's last convolution holds all-zero rows.
    """
    copy = copy_model(model)
    for tensor in copy.graph.initializer:
        if tensor.name in ("layer1.conv2.bn.scale", "layer1.conv2.bn.bias"):
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    return fold_batchnorm(copy)


def _ort_all(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    source, target = folder / "all-in.onnx", folder / "all-out.onnx"
    onnx.save(model, source)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(target)


def _runtime_quantized_weights(model: onnx.ModelProto) -> bool:
    """Whether a ConvInteger reads its weight from a DynamicQuantizeLinear of a Constant."""
    made = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "ConvInteger":
            quantizer = made.get(node.input[1])
            if quantizer is not None and quantizer.op_type == "DynamicQuantizeLinear":
                source = made.get(quantizer.input[0])
                if source is not None and source.op_type == "Constant":
                    return True
    return False


def _has_nchwc(model: onnx.ModelProto) -> bool:
    """Whether ONNX Runtime wrote NCHWc convolutions (x86 with AVX2 or AVX-512 only)."""
    return any(node.domain == "com.microsoft.nchwc" and node.op_type == "Conv" for node in model.graph.node)


FORMS: dict[
    str, tuple[Callable[[onnx.ModelProto], onnx.ModelProto], Callable[[onnx.ModelProto, Path], onnx.ModelProto]]
] = {
    "paddle-dynamic-int8": (_constant_weights, _dynamic_int8),
    "zero-init-ort-all": (_zero_last_batchnorm, _ort_all),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_form_is_found_at_rank_one_and_an_unrelated_copy_is_not(form: str, tmp_path: Path) -> None:
    prepare, convert = FORMS[form]
    root = tmp_path / "registry"
    root.mkdir()
    reference = prepare(FIXTURES["resnet"](0))
    onnx.save(reference, root / "reference.onnx")
    for name in ("vgg", "mobilenet"):
        onnx.save(prepare(FIXTURES[name](0)), root / f"{name}.onnx")
    index = tmp_path / "r.idx"
    build_index([root], index, workers=1)

    suspect = convert(permute_copy(reference, seed=5)[0], tmp_path)
    if form == "paddle-dynamic-int8":
        assert _runtime_quantized_weights(suspect)
    elif not _has_nchwc(suspect):
        pytest.skip("this CPU's ONNX Runtime writes no NCHWc layout (it needs AVX2 or AVX-512)")
    # Every layer is read, with the reference's shapes (the converters may reorder the nodes).
    assert sorted((w.neurons, w.fan_in) for w in model_producers(suspect)) == sorted(
        (w.neurons, w.fan_in) for w in model_producers(reference)
    )

    # The light graph index and the ModelGraph read it bit for bit alike (BatchNorms folded in).
    fast, full = model_producers(suspect), producer_weights(ModelGraph(suspect, infer_shapes=False))
    assert [(w.node, w.neurons, w.fan_in) for w in fast] == [(w.node, w.neurons, w.fan_in) for w in full]
    for a, b in zip(fast, full):
        assert np.array_equal(a.rows(), b.rows()), a.name

    report = find(suspect, index, top=3)
    assert report.candidates[0].path == str(root / "reference.onnx")
    assert [c.call for c in report.candidates] == ["derived", "unrelated", "unrelated"]
    assert report.candidates[0].distance < 0.1 * DERIVED_THRESHOLD

    # The same change of another seed's model is related to nothing in the registry.
    other = convert(prepare(FIXTURES["resnet"](1)), tmp_path)
    assert find(other, index, top=3).derived == []
    assert fingerprint_distance(fingerprint_model(reference), fingerprint_model(other)) > DERIVED_THRESHOLD
