"""The test models are valid, runnable, O(1), deterministic and named readably."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES, RUNNABLE, build_large_model
from fixtures.models import CUSTOM_DOMAIN
from onnxlady._api._demo_model import build_demo_model
from onnxlady.testing import IR_VERSION, OPSET, GraphBuilder

Builder = Callable[[int], onnx.ModelProto]

EXPECTED_FIXTURES = {
    "vgg", "resnet", "mobilenet", "concat", "unfolded_bn", "constant_weights",
    "shared_initializer", "custom_op", "unruled_op", "matmul_mlp", "conv_transpose",
    "grouped_conv", "bias_reshape", "split_concat", "reshape_digits", "flatten_gemm_nchw",
    "std_conv",
}
# Outputs must neither vanish nor explode, so equivalence checks built on them mean something.
STD_RANGE = (0.05, 20.0)

ALL_BUILDERS: dict[str, Builder] = {**FIXTURES, "demo": build_demo_model}
RUNNABLE_BUILDERS = [*sorted(RUNNABLE), "demo"]


def _run(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    """Run on CPU with a seeded standard-normal input for every graph input."""
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    # Token-id inputs get small integer ids; everything else a standard normal sample.
    feeds = {i.name: (rng.standard_normal(i.shape, dtype=np.float32) if i.type == "tensor(float)"
                      else rng.integers(0, 16, size=i.shape).astype(np.int64))
             for i in session.get_inputs()}
    return session.run(None, feeds)


def _float_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """Float tensors held in initializers and Constant nodes."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    arrays = [numpy_helper.to_array(t) for t in tensors]
    return [a for a in arrays if np.issubdtype(a.dtype, np.floating)]


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(a.size * 4 for a in _float_weights(model) if a.dtype == np.float32)


def test_registry() -> None:
    assert set(FIXTURES) >= EXPECTED_FIXTURES
    assert EXPECTED_FIXTURES - {"custom_op"} <= RUNNABLE and "custom_op" not in RUNNABLE


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_model_is_valid(name: str) -> None:
    model = ALL_BUILDERS[name](0)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == OPSET
    if name == "custom_op":
        assert opsets[CUSTOM_DOMAIN] == 1
        assert any(n.domain == CUSTOM_DOMAIN and n.op_type == "Mystery"
                   for n in model.graph.node)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_names_unique_and_readable(name: str) -> None:
    graph = ALL_BUILDERS[name](0).graph
    node_names = [n.name for n in graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    defined = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    defined += [o for n in graph.node for o in n.output]
    assert all(defined) and len(set(defined)) == len(defined)
    assert all(n.replace(".", "").replace("_", "").isalnum() for n in defined)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_tracked_shapes_match_onnx_inference(name: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's own shape bookkeeping agrees with ONNX's strict shape inference."""
    original = GraphBuilder.build

    def build_with_shapes(self: GraphBuilder, outputs: str | list[str], *,
                          value_info: bool = False) -> onnx.ModelProto:
        return original(self, outputs, value_info=True)

    monkeypatch.setattr(GraphBuilder, "build", build_with_shapes)
    model = ALL_BUILDERS[name](0)
    assert len(model.graph.value_info) > 0
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("name", RUNNABLE_BUILDERS)
def test_runs_with_order_one_outputs(name: str) -> None:
    outputs = _run(ALL_BUILDERS[name](0))
    for out in outputs:
        assert np.all(np.isfinite(out))
        assert STD_RANGE[0] < float(out.std()) < STD_RANGE[1], f"{name}: std {out.std()}"


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_deterministic_and_seeded(name: str) -> None:
    build = ALL_BUILDERS[name]
    first = build(0)
    assert first.SerializeToString() == build(0).SerializeToString()
    other = build(1)
    # Same graph, other weights.
    assert [n.name for n in other.graph.node] == [n.name for n in first.graph.node]
    pairs = list(zip(_float_weights(first), _float_weights(other), strict=True))
    assert any(not np.array_equal(a, b) for a, b in pairs)


def test_shared_initializer_shapes() -> None:
    graph = FIXTURES["shared_initializer"](0).graph
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    assert users["shared.zero_bias"] >= 3
    fp16 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) == 1
    assert {n.op_type for n in graph.node} >= {"Cast", "Identity"}


def test_constant_weights_have_no_initializers() -> None:
    graph = FIXTURES["constant_weights"](0).graph
    assert len(graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in graph.node) > 4


def test_large_model() -> None:
    model = build_large_model(target_megabytes=5)
    assert _weight_bytes(model) >= 5 * (1 << 20)
    assert _weight_bytes(model) < 10 * (1 << 20)
    onnx.checker.check_model(model)
    (out,) = _run(model)
    assert np.all(np.isfinite(out))
    assert STD_RANGE[0] < float(out.std()) < STD_RANGE[1]
    assert model.SerializeToString() == build_large_model(5).SerializeToString()
