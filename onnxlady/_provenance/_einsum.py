"""An Einsum's constant weight as a producer layer of the fingerprint.

The Einsum rule (:mod:`onnxlady._rules.einsum`) reads the equation letter by letter: a letter
on the constant weight and the output only is a new axis of neurons the Einsum *produces*, a
letter on the weight and a data operand only is an input feature it *consumes*. That is a
layer's weight exactly as a MatMul's: ``bsd,df->bsf`` is ``x @ W`` (``f`` the neurons, ``d``
the inputs), ``bsd,dhe->bhse`` a projection to ``h * e`` neurons, ``bhse,hed->bsd`` one from
``h * e`` inputs. The weight is read as rows ``(neurons, inputs)``, the neuron letters in the
weight's own order, so the layer is the same one a MatMul with the weight reshaped would give.

A weight letter on a data operand and the output too is a batch of weights: ``bhsd,hdf->bhsf``
holds one ``[d, f]`` weight per head ``h``, the batched MatMul ``x[b,h,s,d] @ W[h,d,f]``. Its
rows are read as a MatMul's batched weight is (``_axis_matrix`` in
:mod:`~onnxlady._provenance._producers`): the neuron letters' axes flattened into rows, every other
axis (batch and input letters) into columns, in the weight's order, so the Einsum and the
batched MatMul give one layer (each neuron ``f`` reads its ``d`` inputs of every head); any
permutation of heads, neurons or inputs moves rows or columns only.

The weight's axes are the rule's own reading (:func:`~onnxlady._rules.einsum.einsum_weight_axes`,
:func:`~onnxlady._rules.einsum.einsum_batch_axes`). Any weight letter of another kind (on the
weight alone: a sum over it; on constants only), an ellipsis or repeated letter on the weight,
no neuron or no input letter, or more than one constant operand: not read (the fingerprint takes
no layer on a guess).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from onnxlady._rules.einsum import einsum_batch_axes, einsum_equation, einsum_weight_axes


def einsum_rows(node: onnx.NodeProto, operands: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The Einsum's constant weight as rows ``(neurons, inputs)``, or None when it holds no layer.

    Args:
        node: the Einsum node.
        operands: its operands' constant float values, None for a data operand (one computed
            at run time).

    Returns:
        The weight's neuron letters' axes flattened into rows and its other axes (input and
        batch letters) into columns (see the module docstring), or None.
    """
    constants = [slot for slot, value in enumerate(operands) if value is not None]
    if len(constants) != 1 or len(operands) < 2:
        return None
    slot = constants[0]
    weight = operands[slot]
    if weight is None:
        return None
    # The rule's own reading of which weight letters are neurons, inputs and batches.
    equation, constant = einsum_equation(node), lambda i: operands[i] is not None
    axes = einsum_weight_axes(equation, len(operands), slot, weight.ndim, constant)
    batch = einsum_batch_axes(equation, len(operands), slot, weight.ndim, constant)
    if axes is None or batch is None:
        return None
    neurons, features = axes
    if not neurons or not features or len(neurons) + len(features) + len(batch) != weight.ndim:
        return None
    columns = [axis for axis in range(weight.ndim) if axis not in neurons]  # batch and inputs, in order
    rows = math.prod(weight.shape[axis] for axis in neurons)
    return np.transpose(weight, neurons + columns).reshape(rows, -1)
