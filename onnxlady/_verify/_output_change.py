"""How much a change of weights moves a model's outputs, on inputs drawn the way verify draws them.

A watermark (or any deliberate weight change) has a cost: ``|y' - y| / |y|`` over the outputs.
The inputs follow verify's plan (:func:`onnxlady._verify._inputs.plan_inputs`): dynamic
dimensions take the user's ``--shape``, else the size the graph pins, else a default; integer
inputs index within their embedding table, masks are ones. A model whose reference run fails on
those inputs gets verify's message naming the input whose shape or values to give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._verify._feed_stream import FeedStream, culprit_inputs
from onnxlady._verify._inputs import plan_inputs
from onnxlady._verify._models import GraphIndex
from onnxlady._verify._session import create_session, first_line, run_session

#: Range of the floating-point inputs (verify's default).
_INPUT_RANGE = (-1.0, 1.0)


def relative_output_change(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> float:
    """``|y_cand - y_ref| / |y_ref|`` over every floating-point output, on ``samples`` feeds.

    Both models must take the same inputs (a weight change keeps them). Elements that are not
    finite in either model are left out of both norms.

    Args:
        reference: The unchanged model (in memory).
        candidate: The changed copy.
        shapes: Shapes of inputs with dynamic dimensions, by name (``--shape``).
        samples: Number of feeds.
        seed: Seed of the feeds.

    Returns:
        The relative L2 change, 0.0 when the reference's outputs are all zero.

    Raises:
        OnnxladyError: an input verify cannot generate, a bad shape override, or a model ONNX
            Runtime cannot run (for the reference, naming the input or shape to give).
    """
    index = GraphIndex(reference)
    plans = plan_inputs(reference, shapes, _INPUT_RANGE, None, index)
    feeds = FeedStream(reference, index, plans, shapes, _INPUT_RANGE, None)
    ref_name, cand_name = "the model", "the changed model"
    ref_session, _, _ = create_session(reference, "cpu", name=ref_name)
    cand_session, _, _ = create_session(candidate, "cpu", name=cand_name)
    num = den = 0.0
    for feed in feeds.generated(np.random.default_rng(seed), samples):
        try:
            ref_out = run_session(ref_session, feed)
        except Exception as exc:  # ORT's own exception types: the drawn inputs do not suit the model
            raise OnnxladyError(_reference_failure(exc, feeds, feed)) from exc
        try:
            cand_out = run_session(cand_session, feed)
        except Exception as exc:
            raise OnnxladyError(f"ONNX Runtime cannot run {cand_name}: {first_line(exc)}") from exc
        for a, b in zip(ref_out, cand_out):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind != "f" or a.shape != b.shape:
                continue
            a, b = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            num += float(np.sum((a[finite] - b[finite]) ** 2))
            den += float(np.sum(a[finite] ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _reference_failure(exc: BaseException, feeds: FeedStream, feed: Mapping[str, np.ndarray]) -> str:
    """One line: the model does not run on the drawn inputs, and the ``--shape`` to give."""
    drawn = ", ".join(f"{name!r} {list(array.shape)}" for name, array in feed.items())
    message = (
        f"ONNX Runtime cannot run the model on random inputs ({drawn}) to measure the output change: "
        f"{first_line(exc)}; give the input shapes it accepts with --shape NAME:DIMS (shape= in Python)"
    )
    guessed = [plan for plan in culprit_inputs(first_line(exc), feeds) if plan.guessed]
    if guessed:
        plan = guessed[0]
        # The batch size is rarely the culprit: name it only when nothing else was guessed.
        axes = [axis for axis in plan.guessed if axis > 0] or list(plan.guessed)
        spec = "x".join("N" if axis in axes else str(size) for axis, size in enumerate(feed[plan.name].shape))
        message += f", e.g. --shape {plan.name}:{spec} (dimension(s) {', '.join(map(str, axes))} were guessed)"
    return message
