"""A constant changed in a converted (and permuted) copy, under its name or a new one: never hollow.

The renamed-constant check (:mod:`onnxlady._audit._renamed_constants`) runs on node-for-node
copies only; a converted copy relies on the resync and the checks across forms. Built here:
a converted + permuted copy (onnxslim, onnx-simplifier, ONNX Runtime) with one constant
changed, stored under its name or a new one.

- A layer's weight or bias: the resync pairs it by its site, whatever its name (``modified``).
- The encoder's position table, which the reference reads through ``Gather(table,
  Range(0, Shape(ids)[1]))``: a converter that knows the static sequence length folds it into a
  stored table added to the token embeddings. The reference's side computed it from a shape,
  so it was "a table a converter folds" of no known value, and the suspect's stored table
  (its site paired with the reference's that does not weigh) was compared by nothing: one
  value changed x1.5 read ``converted`` / ``permuted``, exit 0, while verify says NOT
  EQUIVALENT. Its value is known from the static shapes: compared, ``modified``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FIXTURES
from fixtures.deployment import CONVERTERS
from onnxlady import analyze
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

pytest.importorskip("onnxslim")
logging.getLogger("onnxruntime").setLevel(logging.ERROR)

#: Converters that fold the encoder's static-shape position table into a stored constant.
FOLDING = ("onnxslim", "onnxsim")
_TABLE = "embed.positions"


def _edited(model: onnx.ModelProto, name: str, new_name: str | None) -> onnx.ModelProto:
    """``model`` with one value of constant ``name`` x1.5, stored under ``new_name`` when given."""
    edited = copy_model(model)
    tensor = next(t for t in edited.graph.initializer if t.name == name)
    value = numpy_helper.to_array(tensor).copy()
    value.reshape(-1)[int(np.argmax(np.abs(value)))] *= 1.5
    tensor.CopyFrom(numpy_helper.from_array(value, new_name or name))
    for node in edited.graph.node:
        for slot, read in enumerate(node.input):
            if read == name and new_name:
                node.input[slot] = new_name
    return edited


@pytest.mark.parametrize("converter", FOLDING)
@pytest.mark.parametrize("permuted", [False, True], ids=["same-order", "permuted"])
def test_the_folded_position_table_is_compared(converter: str, permuted: bool) -> None:
    reference = FIXTURES["encoder_postnorm"](0)
    model = permute_copy(reference, 3)[0] if permuted else copy_model(reference)
    suspect = CONVERTERS[converter](model)
    assert _TABLE in {t.name for t in suspect.graph.initializer}  # folded: what this test reads
    assert verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    expected = "permuted" if permuted else "converted"
    assert report.verdict == expected and report.exit_code == 0, report.summary
    for new_name in (None, "embed.positions.edited"):
        tampered = _edited(suspect, _TABLE, new_name)
        assert not verify_models(reference, tampered, provider="cpu").equivalent
        report = audit_models(reference, tampered)
        assert report.verdict == "modified" and report.exit_code == 1, report.summary
        assert "constant outside the weights changed" in report.summary and "'embed.add'" in report.summary, report.summary


@pytest.mark.parametrize("converter", FOLDING)
def test_a_wrong_permutation_of_the_converted_encoder_is_caught(converter: str) -> None:
    reference = FIXTURES["encoder_postnorm"](0)
    wrong = permute_copy(reference, 3)[0]
    permute_producer_only(wrong, analyze(wrong))
    suspect = CONVERTERS[converter](wrong)
    assert not verify_models(reference, suspect, provider="cpu").equivalent
    report = audit_models(reference, suspect)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary


@pytest.mark.parametrize("name", ["fc1.matmul_weight", "fc2.bias"])
def test_a_renamed_changed_weight_of_a_converted_permuted_copy_is_modified(name: str) -> None:
    """The resync pairs a layer's constants by their site, whatever their name (this held on HEAD too)."""
    reference = FIXTURES["matmul_mlp"](0)
    suspect = CONVERTERS["onnxslim"](permute_copy(reference, 3)[0])
    assert audit_models(reference, suspect).verdict == "permuted"
    assert name in {t.name for t in suspect.graph.initializer}
    tampered = _edited(suspect, name, name + ".edited")
    assert not verify_models(reference, tampered, provider="cpu").equivalent
    report = audit_models(reference, tampered)
    assert report.verdict == "modified" and report.exit_code == 1, report.summary
