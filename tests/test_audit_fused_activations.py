"""A core operator made a fused activation in a converted copy is an edit (held-out round 13, F3).

An ``Erf`` made a ``com.microsoft.Gelu`` in an onnx-simplifier or float16 copy of ConvMixer kept
every weight and was audited ``converted``: the operator counts (:mod:`onnxlady._audit._added_operators`)
read a ``Gelu`` as the kind of the ``Erf`` it fuses. Now a core (``Erf``, ``Tanh``, ``Sigmoid``,
``HardSigmoid``) counts as the fused activation only inside that activation's arithmetic
(``x * 0.5 * (1 + erf(x / sqrt 2))``, ``x * sigmoid(x)``), alone as itself; a fused activation put
where the arithmetic has its core (``0.5 x (1 + Gelu(x / sqrt 2))``) as neither. ONNX Runtime's
own fusions of the same models stay ``converted`` (the test of the test).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import FIXTURES
from fixtures.contrib import ort_optimized, ort_transformer_optimized
from fixtures.transformer import gelu_erf, gelu_tanh
from onnxlady import audit, verify_models
from onnxlady._audit._added_operators import added_operators, approximated_gelus
from onnxlady.testing import GraphBuilder, copy_model

logging.getLogger("onnxruntime").setLevel(logging.ERROR)

Activation = Callable[..., str]


def _erf(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.erf(b.mul(x, np.array(0.5, np.float32), name=f"{name}.scale", const_name=f"{name}.k"), name=name)


def _gelu_new(b: GraphBuilder, x: str, *, name: str) -> str:
    """The tanh Gelu as T5 and ALBERT export it (``0.5 * x`` first), which ONNX Runtime fuses into ``FastGelu``."""
    with b.scope(name):
        half = b.mul(x, np.array(0.5, np.float32), name="half", const_name="half")
        t = b.mul(b.pow(x, 3.0, name="cube"), np.array(0.044715, np.float32), name="coef", const_name="coef")
        t = b.mul(b.add(x, t, name="add_x"), np.array(math.sqrt(2 / math.pi), np.float32), name="scale", const_name="scale")
        t = b.add(b.tanh(t, name="tanh"), np.array(1.0, np.float32), name="one", const_name="one")
        return b.mul(half, t, name="mul")


def _tanh(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.tanh(x, name=name)


def _sigmoid(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.sigmoid(x, name=name)


def _silu(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.mul(x, b.sigmoid(x, name=f"{name}.sigmoid"), name=name)


def _hard_sigmoid(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.hardsigmoid(x, name=name)


def _hard_swish(b: GraphBuilder, x: str, *, name: str) -> str:
    return b.mul(x, b.hardsigmoid(x, name=f"{name}.hardsigmoid"), name=name)


def _mlp(activation: Activation) -> onnx.ModelProto:
    """Tokens [1, 8, 16] -> (MatMul + bias, activation) x2 -> MatMul head [1, 8, 10]."""
    b = GraphBuilder("activation_mlp", 0)
    x = b.input("input", (1, 8, 16))
    for i in range(2):
        x = activation(b, b.matmul(x, 32, name=f"fc{i}", gain=1.0), name=f"act{i}")
    return b.build(b.matmul(x, 10, name="output", gain=1.0))


#: Core operator -> the fused activation a tamper puts in its place (op type, domain, attributes).
_FUSED: dict[str, tuple[str, str, dict[str, object]]] = {
    "Erf": ("Gelu", "com.microsoft", {}), "Tanh": ("FastGelu", "com.microsoft", {}),
    "Sigmoid": ("QuickGelu", "com.microsoft", {"alpha": 1.0}), "HardSigmoid": ("HardSwish", "", {}),
}  # fmt: skip


def _fuse_one(model: onnx.ModelProto, core: str) -> onnx.ModelProto:
    """``model`` with its last ``core`` operator made the fused activation, all else kept."""
    node = [node for node in model.graph.node if node.op_type == core][-1]
    op_type, domain, attributes = _FUSED[core]
    node.op_type, node.domain = op_type, domain
    del node.attribute[:]
    node.attribute.extend(onnx.helper.make_attribute(key, value) for key, value in attributes.items())
    if domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return model


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("activation", "core"), [
    (gelu_erf, "Erf"), (_erf, "Erf"), (_gelu_new, "Tanh"), (gelu_tanh, "Tanh"), (_tanh, "Tanh"), (_silu, "Sigmoid"),
    (_sigmoid, "Sigmoid"), (_hard_swish, "HardSigmoid"), (_hard_sigmoid, "HardSigmoid"),
], ids=["erf-in-gelu", "lone-erf", "tanh-in-gelu-new", "tanh-in-gelu", "lone-tanh", "sigmoid-in-silu", "lone-sigmoid",
        "hardsigmoid-in-hardswish", "lone-hardsigmoid"])  # fmt: skip
def test_a_core_made_a_fused_activation_in_a_converted_copy_is_modified(
    tmp_path: Path, activation: Activation, core: str
) -> None:
    source = _mlp(activation)
    suspect = _fuse_one(ort_optimized(source, "basic"), core)  # basic keeps the cores: no fusion of its own
    onnx.checker.check_model(suspect)
    assert not verify_models(source, suspect).equivalent
    assert added_operators(source, suspect), "the fused activation in the core's place counted as the core"
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(suspect, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "operators added with the weights kept" in result.summary


@pytest.mark.parametrize("activation", [gelu_erf, _erf, _gelu_new, gelu_tanh, _tanh, _silu, _sigmoid, _hard_swish, _hard_sigmoid],
                         ids=["gelu-erf", "erf", "gelu-new", "gelu-tanh", "tanh", "silu", "sigmoid", "hardswish", "hardsigmoid"])
@pytest.mark.parametrize("level", ["extended", "all"])
def test_what_the_optimizer_fuses_adds_no_operator(tmp_path: Path, activation: Activation, level: str) -> None:
    """ONNX Runtime's Gelu, FastGelu, QuickGelu and HardSwish fusions, both ways round: no edit."""
    source = _mlp(activation)
    optimized = ort_optimized(source, level)
    assert added_operators(source, optimized) == [] and added_operators(optimized, source) == []
    result = audit(_saved(source, tmp_path / "reference.onnx"), _saved(optimized, tmp_path / "suspect.onnx"))
    assert result.verdict == "converted", result.summary


def test_the_fusions_are_made() -> None:
    """The optimizer does fuse each decomposed form (else the test above would test nothing)."""
    fused = {name: {node.op_type for node in ort_optimized(_mlp(activation), "extended").graph.node}
             for name, activation in [("gelu", gelu_erf), ("fastgelu", _gelu_new), ("silu", _silu)]}
    assert "Gelu" in fused["gelu"] and "Erf" not in fused["gelu"]
    assert "FastGelu" in fused["fastgelu"] and "Tanh" not in fused["fastgelu"]
    assert "QuickGelu" in fused["silu"] and "Sigmoid" not in fused["silu"]


def test_the_transformer_optimizers_bias_gelu_adds_no_operator() -> None:
    """``onnxruntime.transformers.optimizer`` fuses the Erf form with its bias into ``BiasGelu``: no edit, both ways."""
    source = FIXTURES["bert_like"](0)
    fused = ort_transformer_optimized(source)
    assert "BiasGelu" in {node.op_type for node in fused.graph.node}
    assert added_operators(source, fused) == [] and added_operators(fused, source) == []
    edited = copy_model(fused)
    node = next(node for node in edited.graph.node if node.op_type == "BiasGelu")
    node.op_type = "FastGelu"  # the tanh approximation in the exact Gelu's place, its bias kept
    # ONNX Runtime's gelu approximation (held-out round 15, F2): a converter's, named as such by the audit.
    assert added_operators(source, edited) == [] and approximated_gelus(source, edited) == 1
    del node.input[1:]  # a FastGelu that adds no reference Gelu's bias is no approximation
    assert added_operators(source, edited) == [
        f"1 more fastgelu operator in the suspect than in the reference ('{node.name}')"]


def test_hard_swish_counts_as_its_decomposed_form() -> None:
    """ONNX Runtime's CPU optimizer leaves ``x * HardSigmoid(x)`` (exported before opset 14) as it is: the op, both ways."""
    fused = _mlp(lambda b, x, *, name: b.hardswish(x, name=name))
    assert added_operators(_mlp(_hard_swish), fused) == [] and added_operators(fused, _mlp(_hard_swish)) == []
    assert added_operators(_mlp(_hard_sigmoid), fused) == [
        "2 more hardswish operators in the suspect than in the reference ('act0', 'act1')"]


def _gelu_on_quotient(model: onnx.ModelProto) -> bool:
    """Whether a ``Gelu`` reads ``x / sqrt 2`` (where the decomposed form has its ``Erf``)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Gelu" else None
        if source is not None and source.op_type == "Div" and source.input[1] in constants:
            value = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == source.input[1]))
            return bool(abs(float(value) - math.sqrt(2.0)) < 1e-3)
    return False


def test_the_tamper_puts_the_gelu_inside_the_arithmetic() -> None:
    """The held-out tamper's shape: ``Gelu(x / sqrt 2)`` with ``+ 1``, ``* x``, ``* 0.5`` kept around it."""
    suspect = _fuse_one(ort_optimized(_mlp(gelu_erf), "basic"), "Erf")
    assert _gelu_on_quotient(suspect)
    assert added_operators(_mlp(gelu_erf), suspect) == [
        "1 more gelu in place of erf operator in the suspect than in the reference ('act1.erf')"]
