"""The reference's own rounding noise: when a failed element is no evidence of a difference.

A permutation re-orders sums, and re-ordered sums round differently. In a well-conditioned
model that moves the outputs far below the tolerance; in an ill-conditioned one it does not:
LeViT-128S (timm) moves its outputs (up to 36) by 0.07 when its input moves by one float32
ulp, and by 0.11 between two of ONNX Runtime's optimisation levels, both above the default
tolerance. A correctly permuted copy then "fails" by 0.1, a wrong one by 34.

So before calling a pair not equivalent, verify measures how far the reference moves from
itself when only its rounding changes, on the first feed: run with ONNX Runtime's graph
optimizations off (other kernels and fusions, the same function), and run on its floating-point
inputs moved by one unit in the last place (what one rounding upstream does; a chaotic model
doubles it at every step). A failing tensor whose largest error is within that noise is
rounding: judged as passed, with a note (torchvision's LR-ASPP: 1 of 81,920 elements 1.2e-4
off, where the reference alone moves by 1.7e-4). Within :data:`NOISE_MARGIN` times it, the
check cannot decide: ``inconclusive``, with the noise measured. A wrong permutation moves
outputs by orders of magnitude more (LeViT: 34 against a noise of 0.12) and stays
``not-equivalent``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._verify._evidence import INCONCLUSIVE, judge, tensor_label
from onnxlady._verify._models import ModelLike
from onnxlady._verify._report import OutputComparison
from onnxlady._verify._session import create_session, run_session

__all__ = ["NOISE_MARGIN", "ReferenceNoise", "judge_with_noise", "measure_reference_noise"]

#: A failing tensor whose largest error is at most this many times the reference's own noise
#: (the largest change of that tensor between two optimisation levels) is not evidence.
NOISE_MARGIN: float = 4.0


@dataclass(frozen=True)
class ReferenceNoise:
    """Per compared floating-point tensor: how far the reference moves from itself (largest absolute change)."""

    max_abs: dict[str, float]
    #: How the reference's rounding was changed, for the report.
    sources: tuple[str, ...] = ("graph optimizations off", "its inputs moved by one ulp")


def measure_reference_noise(
    reference: ModelLike,
    session: Callable[[], Any],
    provider: str,
    name: str,
    fetched: Sequence[str],
    extra: Sequence[str],
    steps: Sequence[tuple[Mapping[str, Any], Mapping[str, np.ndarray]]],
) -> ReferenceNoise | None:
    """How far the reference moves from its outputs on each step's feed when only its rounding changes.

    Two runs per step: the reference with ONNX Runtime's graph optimizations off, and the
    optimised session on the feed's floating-point inputs moved by one unit in the last place.

    Args:
        reference: The reference model, as verify was given it.
        session: Gives verify's (optimised) session of the reference, opening it again if it
            was freed; called after the other sessions here have run and been freed, so that
            ONNX Runtime never builds one beside another (each build peaks at several times the
            model, see :mod:`onnxlady._verify._reference_runs`).
        provider: The execution provider verify ran on (``"cpu"`` or ``"cuda"``).
        name: Labels the model in messages.
        fetched: The names of the tensors the optimised session returned, in order.
        extra: The intermediate tensors among them (after the graph outputs).
        steps: ``(outputs, feed)`` per run measured: the optimised session's values of
            ``fetched`` on ``feed``, by name (the first feed; a decoding step after it too).

    Returns:
        The noise per floating-point tensor (the largest over the runs and steps), or None when
        no run could be made (then nothing is known and the verdict stands).
    """
    # The noise is the largest change over the runs, whatever their order: each session built
    # here runs every step and is freed before the next is built; verify's own comes last.
    runs: list[tuple[list[Any], Mapping[str, Any]]] = []
    on = "cpu" if provider == "CPUExecutionProvider" else "cuda"

    def run_steps(model: ModelLike, optimize: bool) -> None:
        """Every step's feed through a session of ``model`` (freed on return), each run in ``runs``."""
        try:
            other = create_session(model, on, name=name, extra_outputs=extra, optimize=optimize)[0]
        except Exception:  # OnnxladyError or ORT's own exception types: these runs say nothing
            return
        for outputs, feed in steps:
            with contextlib.suppress(Exception):  # ORT's own exception types: this run says nothing
                runs.append((run_session(other, feed), outputs))

    run_steps(reference, False)
    sources = ["graph optimizations off", "its inputs moved by one ulp"]
    variant = _float_activations(reference)  # read once the unoptimised session is gone
    if variant is not None:
        sources.append("MatMulNBits reading float inputs instead of int8-rounded ones")  # the int8 rounding of MatMulNBits' inputs depends on their order within a block
        run_steps(variant, True)
        del variant
    for outputs, feed in steps:
        if any(np.issubdtype(value.dtype, np.floating) and value.size for value in feed.values()):
            jittered = {
                key: np.nextafter(value, np.inf).astype(value.dtype) if np.issubdtype(value.dtype, np.floating) else value
                for key, value in feed.items()
            }
            optimised = session()  # outside the suppression: a reference that no longer opens is said
            with contextlib.suppress(Exception):  # ORT's own exception types: this run says nothing
                runs.append((run_session(optimised, jittered), outputs))
    if not runs:
        return None
    noise: dict[str, float] = {}
    for values, outputs in runs:
        for tensor, value in zip(fetched, values):
            optimised_value = np.asarray(outputs[tensor])
            changed = np.asarray(value)
            if optimised_value.shape != changed.shape or not np.issubdtype(optimised_value.dtype, np.floating):
                continue
            a, b = optimised_value.astype(np.float64), changed.astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            if not finite.any():
                continue
            diff = np.abs(a[finite] - b[finite])
            noise[tensor] = max(noise.get(tensor, 0.0), float(diff.max()))
    return ReferenceNoise(noise, tuple(sources))


def _float_activations(reference: ModelLike) -> onnx.ModelProto | None:
    """The reference with every ``MatMulNBits`` reading its input in float (``accuracy_level`` 0).

    At ``accuracy_level`` 4 (ONNX Runtime GenAI's int4 CPU builds) the kernel rounds its input to
    int8 per block of the reduced axis, so a permutation of that axis changes which values share a
    scale: a correct permutation moves the outputs by this rounding, which the one-ulp and
    unoptimised runs do not show. The same function without it measures how large it is. None
    when no node rounds its input this way.
    """
    def rounds_input(graph: onnx.GraphProto) -> bool:
        return any(
            node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
            and int(node_attribute(node, "accuracy_level", 0)) > 0
            for node in graph.node
        )  # fmt: skip

    if isinstance(reference, onnx.ModelProto):
        if not rounds_input(reference.graph):
            return None
        model = onnx.ModelProto()
        model.CopyFrom(reference)
    else:
        if not rounds_input(onnx.load(os.fspath(reference), load_external_data=False).graph):
            return None
        model = onnx.load(os.fspath(reference))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    return model


def judge_with_noise(
    compared: Sequence[OutputComparison], squashed: Sequence[OutputComparison], noise: ReferenceNoise
) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """The verdict when every failure lies within the reference's own rounding noise, else None.

    A failing tensor whose largest error is at most the reference's noise on it is rounding: it
    is judged as passed (its evidence still judged), with a note naming the noise. One within
    :data:`NOISE_MARGIN` times it makes the verdict ``inconclusive``, unless it is a squashing
    op's input whose output passes and carries evidence of its own: that output judges, with a
    note. Any other failure, or a failing tensor with no noise measured (an integer output),
    leaves ``not-equivalent``.

    Returns:
        ``(verdict, reasons, notes)`` as :func:`~onnxlady._verify._evidence.judge` gives them.
    """
    failed = [c for c in list(compared) + list(squashed) if not c.passed]
    floors: dict[str, float] = {}
    for comparison in failed:
        floor = noise.max_abs.get(comparison.name)
        if floor is None or floor <= 0.0 or not comparison.max_abs_error <= NOISE_MARGIN * floor:
            return None
        floors[comparison.name] = floor
    if not failed:
        return None
    # A squashing op's input is compared to lend evidence to an output that has none of its own.
    # Where that output passes and carries evidence by itself, its input failing within the
    # margin of the noise decides nothing: the output judges (a x1000 Softmax's logits are
    # thousands, one near zero is then off by a few rounding steps of its neighbours).
    evident = {c.name for c in compared if c.passed and c.degenerate is None}
    lent = {c.name for c in failed if c.kind == "squash-input" and c.stands_for in evident}
    if all(c.max_abs_error <= floors[c.name] or c.name in lent for c in failed):
        def as_passed(c: OutputComparison) -> OutputComparison:
            return replace(c, passed=True) if c.name in floors else c

        verdict, reasons, notes = judge([as_passed(c) for c in compared], [as_passed(c) for c in squashed])
        rounding = tuple(
            f"{tensor_label(c)} {c.name!r}: {c.mismatched_elements} of {c.total_elements} elements beyond the "
            f"tolerance, by at most {c.max_abs_error:.3g}, and {_moved(floors[c.name], noise.sources)}: "
            + (
                "judged as rounding"
                if c.max_abs_error <= floors[c.name]
                else f"within {NOISE_MARGIN:g} times that, and output {c.stands_for!r} passes and carries evidence "
                "by itself: judged on that output"
            )
            for c in failed
        )
        return verdict, reasons, notes + rounding
    reasons = tuple(
        f"{tensor_label(c)} {c.name!r}: {c.mismatched_elements} of {c.total_elements} elements differ "
        f"(max abs error {c.max_abs_error:.3g}), within {NOISE_MARGIN:g} times the rounding noise, and "
        f"{_moved(floors[c.name], noise.sources)}: this model is too ill-conditioned on these inputs for the tolerances to tell "
        "a re-ordered sum from a change; give wider atol/rtol or other inputs"
        for c in failed
    )
    return INCONCLUSIVE, reasons, ()


def _moved(floor: float, sources: Sequence[str]) -> str:
    how = ", ".join(sources[:-1]) + f", or {sources[-1]}" if len(sources) > 1 else "".join(sources)
    return f"the reference alone moves by up to {floor:.3g} when only its rounding changes ({how})"
