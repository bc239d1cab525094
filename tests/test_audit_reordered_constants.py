"""The audit's text on a re-ordering outside the modelled permutations is true (round 16, F2).

Two channels swapped across two GroupNormalization groups (the producer's rows and bias, the
norm's per-channel scale and bias, the reader's columns) change the function; the audit says
``modified``, and its reason used to add "biases and normalisation untouched" although the bias
and the norm's constants had moved. It now says they moved and that the changed weights hold the
reference's own values in other places -- never that the copy is equivalent. A swap inside one
group keeps the function and is a permutation the rules model since session 17 (each group its
own order, ``p (x) {q_g}``): ``permuted``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_group_normalization import CHANNELS, group_normalization_model

from onnxlady import verify_models
from onnxlady._audit._verdicts import audit_models
from onnxlady.testing import copy_model, permute_copy, tensor_holders

#: Each swapped channel's tensors and the axis its channel sits on.
CHANNEL_AXES = (("conv_in.weight", 0), ("conv_in.bias", 0), ("norm.scale", 0), ("norm.bias", 0), ("conv_out.weight", 1))


def _model() -> onnx.ModelProto:
    """Conv -> GroupNormalization(8 groups of 4 channels, per-channel affine, opset 21) -> Relu -> Conv -> pool."""
    return group_normalization_model(8, 21)


def _swapped(model: onnx.ModelProto, first: int, second: int) -> onnx.ModelProto:
    """A copy with channels ``first`` and ``second`` exchanged everywhere they are read."""
    copy = copy_model(model)
    holders = tensor_holders(copy)
    order = np.arange(CHANNELS)
    order[[first, second]] = order[[second, first]]
    for name, axis in CHANNEL_AXES:
        array = numpy_helper.to_array(holders[name])
        holders[name].CopyFrom(numpy_helper.from_array(np.take(array, order, axis=axis), name))
    return copy


def _reason(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> str:
    report = audit_models(reference, suspect)
    assert report.verdict == "modified", report.summary
    assert report.perturbation is not None and report.perturbation["kind"] == "uncertain"
    return str(report.perturbation["reason"])


@pytest.mark.parametrize("permuted", [False, True])
def test_a_swap_inside_one_group_is_permuted(permuted: bool) -> None:
    reference = _model()
    suspect = _swapped(reference, 0, 1)  # both in group 0 (channels 0..3)
    assert verify_models(reference, suspect).equivalent  # the swap keeps the function ...
    assert not verify_models(reference, _swapped(reference, 0, CHANNELS - 1)).equivalent  # ... across groups not
    if permuted:  # onnxlady's own permutation on top: the resync undoes both
        suspect = permute_copy(suspect, 5)[0]
    report = audit_models(reference, suspect)
    assert report.verdict == "permuted", report.summary


def test_a_swap_across_groups_gets_the_same_true_words() -> None:
    """Not equivalent, and the text claims nothing about the function either way."""
    reference = _model()
    reason = _reason(reference, _swapped(reference, 0, CHANNELS - 1))
    assert "3 biases/normalisation constants re-ordered" in reason, reason
    assert "equivalent" not in reason, reason


def test_a_value_changed_besides_the_swap_is_not_called_a_re_ordering() -> None:
    """One weight nudged and one bias changed on top of the swap: said as changes, not moves."""
    reference = _model()
    suspect = _swapped(reference, 0, CHANNELS - 1)
    holders = tensor_holders(suspect)
    weight = numpy_helper.to_array(holders["conv_out.weight"]).copy()
    weight[2, 1, 0, 0] += 0.05
    holders["conv_out.weight"].CopyFrom(numpy_helper.from_array(weight, "conv_out.weight"))
    reason = _reason(reference, suspect)
    assert "1 of the changed weight tensors hold the reference's own values in other places" in reason, reason
    assert "every changed weight" not in reason, reason
    bias = numpy_helper.to_array(holders["norm.bias"]).copy()
    bias[5] += 0.3
    holders["norm.bias"].CopyFrom(numpy_helper.from_array(bias, "norm.bias"))
    reason = _reason(reference, suspect)
    assert "1 biases/normalisation constants changed" in reason, reason
    assert "re-ordered" not in reason and "untouched" not in reason, reason
