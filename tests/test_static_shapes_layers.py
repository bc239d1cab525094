"""The static-shape fast path computes a plain CNN's layers as ONNX's inference does, and models with large weights (issue 15).

Conv, pools, BatchNormalization, Flatten and Gemm with random attributes: the fast path's
shapes and types equal inference's wherever it answers, and it declines what it does not
compute exactly (SAME padding, ceil_mode, training BatchNorm, mismatched channels...). A model
with large weights takes the fast path too (11 MB permute: ONNX's first inference call alone,
its operator schemas loaded, cost 9 to 13 ms of about 70).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_static_shapes import _graphs

from fixtures import build_large_model
from onnxlady._graph._model_graph import ModelGraph


def _weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _window_attributes(
    rng: np.random.Generator, kernel: list[int], sizes: list[int], dilate: bool = True
) -> dict[str, object]:
    """Random strides, dilations and pads (or VALID) for a window over ``sizes``, which become the output's.

    Where the window would not fit the padded input, the pads grow until it does (inference
    would fail there, and the fast path decline: a case of its own below).
    """
    spatial = len(sizes)
    attributes: dict[str, object] = {}
    dilations = [int(rng.integers(1, 3)) if dilate and rng.random() < 0.5 else 1 for _ in range(spatial)]
    strides = [int(rng.integers(1, 4)) if rng.random() < 0.6 else 1 for _ in range(spatial)]
    pads = [int(rng.integers(0, 3)) if rng.random() < 0.7 else 0 for _ in range(2 * spatial)]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    for axis in range(spatial):
        pads[axis + spatial] += max(0, spans[axis] - sizes[axis] - pads[axis] - pads[axis + spatial])
    if dilate and rng.random() < 0.8:
        attributes["dilations"] = dilations
    if any(s != 1 for s in strides) or rng.random() < 0.3:
        attributes["strides"] = strides
    if not any(pads) and rng.random() < 0.5:
        attributes["auto_pad"] = "VALID"
    elif any(pads) or rng.random() < 0.5:
        attributes["pads"] = pads
    for axis in range(spatial):
        sizes[axis] = (sizes[axis] + pads[axis] + pads[axis + spatial] - spans[axis]) // strides[axis] + 1
    return attributes


def _random_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """A random chain of Conv, BatchNorm, Relu, pools, then Flatten and Gemm, with random attributes."""
    spatial = int(rng.integers(1, 4))
    channels = in_channels = int(rng.integers(1, 4)) * 2
    sizes = [int(rng.integers(4, 12)) for _ in range(spatial)]
    input_sizes = list(sizes)
    nodes, weights, current, k = [], [], "x", 0
    layers = [str(rng.choice(["conv", "bn", "relu", "maxpool", "avgpool"])) for _ in range(int(rng.integers(2, 6)))]
    for kind in layers:
        out = f"t{k}"
        if kind == "conv":
            group = int(rng.choice([1, 2])) if channels % 2 == 0 else 1
            width = group * int(rng.integers(1, 4))
            kernel = [int(rng.integers(1, 4)) for _ in range(spatial)]
            attributes = _window_attributes(rng, kernel, sizes)
            if group > 1:
                attributes["group"] = group
            if rng.random() < 0.3:
                attributes["kernel_shape"] = kernel
            inputs = [current, f"w{k}"]
            weights.append(_weight(f"w{k}", (width, channels // group, *kernel), rng))
            if rng.random() < 0.5:
                inputs.append(f"b{k}")
                weights.append(_weight(f"b{k}", (width,), rng))
            nodes.append(helper.make_node("Conv", inputs, [out], **attributes))
            channels = width
        elif kind == "bn":
            names = [f"{p}{k}" for p in ("s", "c", "m", "v")]
            weights += [_weight(name, (channels,), rng) for name in names]
            nodes.append(helper.make_node("BatchNormalization", [current, *names], [out], epsilon=1e-3))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", [current], [out]))
        else:
            kernel = [int(rng.integers(1, 3)) for _ in range(spatial)]
            # (AveragePool takes dilations from opset 19 on)
            attributes = _window_attributes(rng, kernel, sizes, dilate=kind == "maxpool")
            if kind == "avgpool" and rng.random() < 0.5:
                attributes["count_include_pad"] = 1
            nodes.append(
                helper.make_node(
                    "MaxPool" if kind == "maxpool" else "AveragePool",
                    [current],
                    [out],
                    kernel_shape=kernel,
                    **attributes,
                )
            )
        current, k = out, k + 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, in_channels, *input_sizes])
    # Pooled, flattened, a Gemm head (either operand transposed, a bias of either rank).
    nodes.append(helper.make_node(str(rng.choice(["GlobalAveragePool", "GlobalMaxPool"])), [current], ["pooled"]))
    axis = int(rng.choice([1, -spatial - 1, 2]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], axis=axis))
    flat_width = channels if axis in (1, -spatial - 1) else 1
    trans_b = int(rng.integers(0, 2))
    weights.append(_weight("head", (5, flat_width) if trans_b else (flat_width, 5), rng))
    weights.append(_weight("head_bias", (5,) if rng.random() < 0.5 else (1, 5), rng))
    nodes.append(helper.make_node("Gemm", ["flat", "head", "head_bias"], ["y"], transB=trans_b, alpha=0.5))
    return _declared(nodes, x, "y", weights)


def _declared(
    nodes: list[onnx.NodeProto], x: onnx.ValueInfoProto, last: str, weights: list[onnx.TensorProto]
) -> onnx.ModelProto:
    """The model with its output declared as ONNX's inference computes it (untyped where it computes nothing)."""
    y = helper.make_tensor_value_info(last, TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], weights), opset_imports=[helper.make_opsetid("", 17)]
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    if last in typed and typed[last].type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(typed[last])
    return model


@pytest.mark.parametrize("seed", range(60))
def test_random_cnns_match_onnx_inference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_cnn(np.random.default_rng(seed))
    fast, slow, answered = _graphs(model, monkeypatch)
    assert fast.shapes == slow.shapes and fast.dtypes == slow.dtypes
    assert answered, [n.op_type for n in model.graph.node]  # the fast path was taken...
    # ...and typed every node output (not two empty answers)
    assert all(name in fast.shapes for node in model.graph.node for name in node.output)


def test_large_model_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_large_model(1)  # wide convolutions: weights above the skeleton's 4096 elements
    assert max(int(np.prod(t.dims)) for t in model.graph.initializer) > 4096
    fast, slow, answered = _graphs(model, monkeypatch)
    assert answered
    assert fast.shapes == slow.shapes and fast.dtypes == slow.dtypes
    monkeypatch.setattr(ModelGraph, "_inferred_infos", lambda self, skeleton: pytest.fail("inference ran"))
    ModelGraph(model)


def _conv_model(
    attributes: dict[str, object],
    *,
    x_shape: tuple[int, ...] = (1, 4, 8, 8),
    w_shape: tuple[int, ...] = (6, 4, 3, 3),
    extra: onnx.NodeProto | None = None,
    pooled: bool = True,
) -> onnx.ModelProto:
    """A Conv (and ``extra``), then, if ``pooled``, a global pool and Flatten.

    The output's shape then does not show the spatial sizes: a wrong one computed inside is
    caught only by the comparison with inference, not by the declared output.
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], **attributes)]
    last = "c"
    weights = [_weight("w", w_shape, rng)]
    if extra is not None:
        nodes.append(extra)
        last = extra.output[0]
        weights += [_weight(name, (w_shape[0],), rng) for name in extra.input[1:]]
    if pooled:
        nodes += [helper.make_node("GlobalAveragePool", [last], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
        last = "f"
    return _declared(nodes, helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), last, weights)


@pytest.mark.parametrize(
    "model",
    [
        _conv_model({"auto_pad": "SAME_UPPER"}),  # SAME padding: not computed here
        _conv_model({"auto_pad": "VALID", "pads": [1, 1, 1, 1]}),  # pads with VALID
        _conv_model({}, x_shape=(1, 5, 8, 8)),  # channels that do not agree with the weight
        _conv_model({"kernel_shape": [2, 2]}),  # a kernel_shape other than the weight's
        _conv_model({}, x_shape=(1, 4, 2, 2)),  # a window larger than the input
        _conv_model(
            {}, extra=helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], training_mode=1)
        ),
        _conv_model({}, extra=helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], ceil_mode=1)),
        # Dilations an AveragePool before opset 19 does not read (inference ignores them)
        _conv_model({}, extra=helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])),
        _conv_model({}, extra=helper.make_node("Flatten", ["c"], ["y"], axis=7), pooled=False),  # an axis out of range
    ],
    ids=[
        "same-pad",
        "valid-with-pads",
        "channels",
        "kernel-shape",
        "too-small",
        "training-bn",
        "ceil-mode",
        "avgpool-dilations",
        "flatten-axis",
    ],
)
def test_fast_path_declines_layers_it_does_not_compute_exactly(
    model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow, answered = _graphs(model, monkeypatch)
    assert not answered
    assert fast.shapes == slow.shapes and fast.dtypes == slow.dtypes
    # The plain Conv the cases start from is computed without inference.
    assert _graphs(_conv_model({"pads": [1, 1, 1, 1], "strides": [2, 2]}), monkeypatch)[2]
