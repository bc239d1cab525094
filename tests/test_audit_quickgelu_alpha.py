"""A fused ``QuickGelu``'s alpha is compared: changed, the converted copy is ``modified``.

CLIP's activation is ``x * sigmoid(1.702 x)``; ONNX Runtime's optimizer fuses it into
``com.microsoft.QuickGelu(alpha=1.702)`` (and a SiLU, ``x * sigmoid(x)``, into one of alpha 1).
The audit counted the fused operator as the swish kind its decomposed form is, but did not
compare what it computes: a copy whose QuickGelu's alpha was changed kept every weight and every
count, and was audited ``converted`` (held-out round 14, F1's CLIP cells). The decomposed form's
alpha is now read from the arithmetic around its ``Sigmoid`` (the ``Mul`` by a constant before
it), the fused one's from its attribute, and compared within the kind
(:func:`onnxlady._audit._added_operators.changed_operators`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.contrib import ort_optimized
from onnxlady import audit, verify_models
from onnxlady._audit._added_operators import changed_operators
from onnxlady.testing import GraphBuilder
from tests.test_audit_fused_activations import _mlp, _saved, _silu

logging.getLogger("onnxruntime").setLevel(logging.ERROR)

Activation = Callable[..., str]


def _quick_gelu(b: GraphBuilder, x: str, *, name: str) -> str:
    """CLIP's ``x * sigmoid(1.702 x)``, as torch exports it."""
    scaled = b.mul(x, np.array(1.702, np.float32), name=f"{name}.scale")
    return b.mul(x, b.sigmoid(scaled, name=f"{name}.sigmoid"), name=name)


def _alphas(model: onnx.ModelProto) -> list[float]:
    return [onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "QuickGelu" for a in n.attribute
            if a.name == "alpha"]


@pytest.mark.parametrize(("activation", "alpha", "changed"), [(_quick_gelu, 1.702, 1.9), (_silu, 1.0, 1.702)],
                         ids=["clip-quickgelu", "silu"])
def test_a_changed_quickgelu_alpha_in_an_optimized_copy_is_modified(
    tmp_path: Path, activation: Activation, alpha: float, changed: float
) -> None:
    source = _mlp(activation)
    optimized = ort_optimized(source, "extended")
    assert _alphas(optimized) == pytest.approx([alpha, alpha])  # the optimizer fused both, with the form's alpha
    reference = _saved(source, tmp_path / "reference.onnx")
    clean = audit(reference, _saved(optimized, tmp_path / "clean.onnx"))
    assert clean.verdict == "converted", clean.summary  # ORT's own fusion: no accusation
    node = next(node for node in optimized.graph.node if node.op_type == "QuickGelu")
    next(a for a in node.attribute if a.name == "alpha").f = changed
    assert not verify_models(source, optimized).equivalent  # the alpha matters
    result = audit(reference, _saved(optimized, tmp_path / "suspect.onnx"))
    assert result.verdict == "modified" and result.exit_code == 1, result.summary
    assert "operators changed with the weights kept" in result.summary
    assert f"'{node.name}' computes swish ({changed:g})" in result.summary, result.summary


@pytest.mark.parametrize("activation", [_quick_gelu, _silu], ids=["clip-quickgelu", "silu"])
def test_the_fusion_and_its_decomposed_form_compute_the_same_both_ways(activation: Activation) -> None:
    source = _mlp(activation)
    optimized = ort_optimized(source, "extended")
    assert changed_operators(source, optimized) == [] and changed_operators(optimized, source) == []


def test_a_silu_is_not_taken_for_clips_quickgelu() -> None:
    """The two forms differ by their alpha only: compared, each is the other changed."""
    silu, quick = ort_optimized(_mlp(_silu), "extended"), _mlp(_quick_gelu)
    assert changed_operators(quick, silu) and changed_operators(_mlp(_silu), quick)
