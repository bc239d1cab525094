"""Weights a graph normalizes from its constants: reductions and a standardizing BatchNorm, with a bound.

Two export forms compute a layer's weight from stored constants through per-channel statistics:

- weight standardization (timm's ``ScaledStdConv2d``, NF-ResNets, NFNets; see
  :mod:`onnxlady._rules.standardized`): ``W = Reshape(BatchNormalization(V, gain, shift, mean,
  var))`` with ``training_mode=1``, which normalizes each output channel of ``V`` by the mean and
  variance of its own fan-in (``mean`` and ``var`` only feed the running statistics);
- weight normalization (``torch.nn.utils.parametrizations.weight_norm`` exported without
  constant folding): ``W = g * v / ReduceL2(v)`` over every axis but the output channels.

A constant-folding converter (onnxslim, onnxsim, polygraphy's ``--fold-constants``, ONNX
Runtime's extended optimizations) writes either as plain stored weights. To pair such a copy the
resync reads the reference's weight as the value its subgraph computes
(:func:`~onnxlady._resync._computed.read_computed`); this module evaluates the reductions and the
BatchNormalization in float64 and bounds how far the runtime's own computation in the tensor's
type may be from that: first order in the inputs' bounds, plus the rounding of a sum of ``n``
terms in the worst case (``n`` units of roundoff times the sum of magnitudes), whatever order the
runtime sums in. Anything else (an axis attribute it does not know, an opset before the forms it
reads) is not evaluated: no value is compared without its bound.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._resync._values import Approx

__all__ = ["STATISTICS_OPS", "evaluate_statistics", "statistics_inputs"]

#: Operators evaluated here, with the earliest standard opset whose form is read.
STATISTICS_OPS = {"ReduceMean": 1, "ReduceL2": 1, "ReduceSum": 1, "ReduceSumSquare": 1, "BatchNormalization": 9}
#: Unit roundoff of the types the runtime may compute in (the input's type).
_ROUNDOFF: dict[int, float] = {
    onnx.TensorProto.FLOAT: 2.0**-24,
    onnx.TensorProto.FLOAT16: 2.0**-11,
    onnx.TensorProto.BFLOAT16: 2.0**-8,
    onnx.TensorProto.DOUBLE: 2.0**-53,
}
#: The opset from which each reduction takes its axes as an input rather than an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceL2": 18, "ReduceSumSquare": 18}


def statistics_inputs(node: onnx.NodeProto, opset: int, output: int) -> list[int] | None:
    """The input slots whose values output ``output`` of ``node`` is computed from, or None if not read here.

    A BatchNormalization in training mode normalizes by its input's own statistics: its given
    ``mean`` and ``var`` only feed outputs 1 and 2, so they are no input of output 0. The axes
    input of a reduction is an integer constant, not listed (read as it is stored).
    """
    since = STATISTICS_OPS.get(node.op_type)
    if since is None or (node.domain or "") not in ("", "ai.onnx") or opset < since or output != 0:
        return None
    if node.op_type == "BatchNormalization":
        if any(attribute.name in ("spatial", "is_test", "consumed_inputs") for attribute in node.attribute):
            return None  # the forms before opset 9
        if len(node.input) < 5:
            return None
        return [0, 1, 2] if _training(node, opset) else [0, 1, 2, 3, 4]
    return [0]


def _training(node: onnx.NodeProto, opset: int) -> bool:
    return opset >= 14 and int(node_attribute(node, "training_mode", 0)) == 1


def evaluate_statistics(
    node: onnx.NodeProto, inputs: list[Approx | None], axes: np.ndarray | None, opset: int, dtype: int | None
) -> Approx | None:
    """Output 0 of ``node`` in float64 with its first-order bound (the output's own rounding not included).

    Args:
        node: an operator of :data:`STATISTICS_OPS` that :func:`statistics_inputs` accepts.
        inputs: each input's value and bound (None where absent or not read).
        axes: a reduction's axes given as an input (its stored value), else None.
        opset: the model's standard opset.
        dtype: the type of the node's first input (the type the runtime computes in).

    Returns:
        The value and bound, or None where it is not computed here (a value not finite, an
        axis out of range, a variance of zero).
    """
    roundoff = _ROUNDOFF.get(dtype) if dtype is not None else None
    first = inputs[0] if inputs else None
    if roundoff is None or first is None:
        return None
    with np.errstate(all="ignore"):
        if node.op_type == "BatchNormalization":
            result = _batchnorm(node, inputs, opset, roundoff)
        else:
            result = _reduce(node, first, axes, opset, roundoff)
    if result is None or not (np.all(np.isfinite(result.value)) and np.all(np.isfinite(result.error))):
        return None
    return result


def _reduce(
    node: onnx.NodeProto, data: Approx, axes_input: np.ndarray | None, opset: int, roundoff: float
) -> Approx | None:
    value, error = data.value, np.broadcast_to(data.error, data.value.shape)
    rank = value.ndim
    if opset >= _AXES_INPUT_SINCE[node.op_type]:
        axes = None if axes_input is None else [int(a) for a in np.asarray(axes_input).reshape(-1)]
        if axes is None or not axes:
            if int(node_attribute(node, "noop_with_empty_axes", 0)):
                return None  # the identity: nothing the folds write
            axes = list(range(rank))
    else:
        attribute = node_attribute(node, "axes")
        axes = [int(a) for a in attribute] if attribute is not None else list(range(rank))
    if any(not -rank <= a < rank for a in axes):
        return None
    reduced = tuple(sorted({a % rank for a in axes}))
    keep = bool(int(node_attribute(node, "keepdims", 1)))
    count = int(np.prod([value.shape[a] for a in reduced])) if reduced else 1
    if count == 0:
        return None
    sums = (count + 1) * roundoff  # a sum of ``count`` terms, any order, then one division or root
    op = node.op_type
    if op in ("ReduceMean", "ReduceSum"):
        scale = 1.0 / count if op == "ReduceMean" else 1.0
        result = np.sum(value, axis=reduced, keepdims=keep) * scale
        bound = (
            np.sum(error, axis=reduced, keepdims=keep) + sums * np.sum(np.abs(value), axis=reduced, keepdims=keep)
        ) * scale
        return Approx(result, bound)
    squares = np.sum(value * value, axis=reduced, keepdims=keep)
    # d sum(x^2) = sum(2 |x| dx); the squares' rounding is one more unit per term.
    square_bound = np.sum(2.0 * np.abs(value) * error, axis=reduced, keepdims=keep) + (sums + roundoff) * squares
    if op == "ReduceSumSquare":
        return Approx(squares, square_bound)
    norm = np.sqrt(squares)  # ReduceL2; d sqrt(s) = ds / (2 sqrt(s))
    return Approx(norm, square_bound / (2.0 * norm) + roundoff * norm)


def _batchnorm(node: onnx.NodeProto, inputs: list[Approx | None], opset: int, roundoff: float) -> Approx | None:
    data = inputs[0]
    assert data is not None
    x, ex = data.value, np.broadcast_to(data.error, data.value.shape)
    if x.ndim < 2:
        return None
    channels = x.shape[1]
    params: list[tuple[np.ndarray, np.ndarray]] = []
    for slot in (1, 2) if _training(node, opset) else (1, 2, 3, 4):
        item = inputs[slot] if slot < len(inputs) else None
        if item is None or item.value.size != channels:
            return None
        shape = (1, channels) + (1,) * (x.ndim - 2)  # per channel, along axis 1
        params.append((item.value.reshape(shape), np.broadcast_to(item.error, item.value.shape).reshape(shape)))
    epsilon = float(node_attribute(node, "epsilon", 1e-5))
    axes = tuple(a for a in range(x.ndim) if a != 1)
    if _training(node, opset):
        count = int(np.prod([x.shape[a] for a in axes]))
        if count == 0:
            return None
        sums = (count + 3) * roundoff
        mean = np.mean(x, axis=axes, keepdims=True)
        mean_error = np.mean(ex, axis=axes, keepdims=True) + sums * np.mean(np.abs(x), axis=axes, keepdims=True)
        centered = x - mean
        centered_error = ex + mean_error + roundoff * np.abs(centered)
        variance = np.mean(centered * centered, axis=axes, keepdims=True)
        # A runtime may compute the variance as E[x^2] - E[x]^2: its rounding scales with E[x^2].
        variance_error = np.mean(
            2.0 * np.abs(centered) * centered_error, axis=axes, keepdims=True
        ) + 2.0 * sums * np.mean(x * x, axis=axes, keepdims=True)
    else:
        (mean, mean_error), (variance, variance_error) = params[2], params[3]
        centered = x - mean
        centered_error = ex + mean_error + roundoff * np.abs(centered)
    deviation = np.sqrt(variance + epsilon)
    if not np.all(deviation > 0.0):
        return None
    deviation_error = variance_error / (2.0 * deviation) + roundoff * deviation
    normalized = centered / deviation
    normalized_error = (
        centered_error / deviation + np.abs(centered) * deviation_error / deviation**2 + roundoff * np.abs(normalized)
    )
    (scale, scale_error), (shift, shift_error) = params[0], params[1]
    result = normalized * scale + shift
    bound = (
        np.abs(scale) * normalized_error
        + np.abs(normalized) * scale_error
        + shift_error
        + roundoff * np.abs(normalized * scale)
    )
    return Approx(result, np.broadcast_to(bound, result.shape))
