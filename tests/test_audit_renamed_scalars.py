"""A node-for-node copy whose operator reads a scalar stored anew, with another value (session 16).

The audit's weight comparison of a node-for-node copy (a twin: permuted, resynced, untouched)
reads each constant under the reference's name; its graph comparison reads every constant as
"a constant" (untying renames them). A ReLU6's bound 6 made 1 as a *new* initializer, the old
one left in the file unread, was compared by nothing: ``converted``, while the copy computes
something else. A constant under a new name is now compared with the one it replaces
(``_audit/_renamed_constants``, which also covers weights: tests/test_audit_renamed_constants.py):
untying copies it as it is, and no permutation or rescale moves a single value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fixtures.models import build_mobilenet
from onnxlady._audit._verdicts import audit_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy, permute_producer_only

_CLIP = "block1.expand_clip"


def _bound_stored_anew(model: onnx.ModelProto, value: float) -> onnx.ModelProto:
    """``model`` whose ReLU6 reads its upper bound from a new initializer holding ``value`` (the old one kept, unread)."""
    changed = copy_model(model)
    changed.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), "clip.max.anew"))
    clip = next(node for node in changed.graph.node if node.name == _CLIP)
    clip.input[2] = "clip.max.anew"
    return changed


def test_a_bound_stored_anew_with_another_value_is_modified() -> None:
    reference = build_mobilenet()
    changed = _bound_stored_anew(reference, 1.0)
    assert not verify_models(reference, changed, provider="cpu").equivalent  # it computes something else
    report = audit_models(reference, changed)
    assert report.verdict == "modified", report.summary
    assert f"Clip '{_CLIP}' reads 'clip.max.anew' where the reference reads" in report.summary
    permuted = permute_copy(reference, 2)[0]
    assert audit_models(reference, _bound_stored_anew(permuted, 1.0)).verdict == "modified"


def test_the_same_bound_stored_anew_is_no_edit() -> None:
    reference = build_mobilenet()
    same = _bound_stored_anew(reference, 6.0)
    assert verify_models(reference, same, provider="cpu").equivalent
    assert audit_models(reference, same).verdict in ("identical", "converted")
    permuted, analysis = permute_copy(reference, 2)[:2]
    assert audit_models(reference, _bound_stored_anew(permuted, 6.0)).verdict == "permuted"
    wrong = copy_model(permuted)
    permute_producer_only(wrong, analysis)  # a wrong permutation: still caught
    assert audit_models(reference, _bound_stored_anew(wrong, 6.0)).exit_code == 1
