"""An Einsum's constant weight as a producer layer of the fingerprint.

The Einsum rule (:mod:`onnxlady._rules.einsum`) reads the equation letter by letter: a letter
on the constant weight and the output only is a new axis of neurons the Einsum *produces*, a
letter on the weight and a data operand only is an input feature it *consumes*. That is a
layer's weight exactly as a MatMul's: ``bsd,df->bsf`` is ``x @ W`` (``f`` the neurons, ``d``
the inputs), ``bsd,dhe->bhse`` a projection to ``h * e`` neurons, ``bhse,hed->bsd`` one from
``h * e`` inputs. The weight is read as rows ``(neurons, inputs)``, the neuron letters in the
weight's own order, so the layer is the same one a MatMul with the weight reshaped would give.

The weight's axes are the rule's own reading (:func:`~onnxlady._rules.einsum.einsum_weight_axes`). Any
weight letter of another kind (on data and output too: a per-head weight, a batch of
weights; on the weight alone: a sum over it), an ellipsis or repeated letter on the weight, or
more than one constant operand: not read (the fingerprint takes no layer on a guess).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from onnxlady._rules.einsum import einsum_equation, einsum_weight_axes


def einsum_rows(node: onnx.NodeProto, operands: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The Einsum's constant weight as rows ``(neurons, inputs)``, or None when it holds no layer.

    Args:
        node: the Einsum node.
        operands: its operands' constant float values, None for a data operand (one computed
            at run time).

    Returns:
        The weight's neuron letters' axes flattened into rows and its input letters' into
        columns (see the module docstring), or None.
    """
    constants = [slot for slot, value in enumerate(operands) if value is not None]
    if len(constants) != 1 or len(operands) < 2:
        return None
    slot = constants[0]
    weight = operands[slot]
    if weight is None:
        return None
    # The rule's own reading of which weight letters are neurons and which are inputs.
    axes = einsum_weight_axes(einsum_equation(node), len(operands), slot, weight.ndim, lambda i: operands[i] is not None)
    if axes is None:
        return None
    neurons, features = axes
    if not neurons or not features or len(neurons) + len(features) != weight.ndim:
        return None
    rows = math.prod(weight.shape[axis] for axis in neurons)
    return np.transpose(weight, neurons + features).reshape(rows, -1)
