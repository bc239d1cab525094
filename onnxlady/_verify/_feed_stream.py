"""The feeds verify runs both models on, a record of how each input was fed, and what to say when the reference fails.

Feeds are generated (:func:`onnxlady._verify._inputs.draw`) or given by the user (a file or a
script, :mod:`onnxlady._verify._feeds`); an input a given feed lacks is drawn with the sizes the
given arrays imply. The records say, per input, the rule or the source, the range and the shape,
for the report and for a README table of what verify drew.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxlady._verify._feeds import coerce_feed
from onnxlady._verify._inputs import InputPlan, draw, plan_inputs
from onnxlady._verify._models import GraphIndex, declared_dims, fed_inputs
from onnxlady._verify._report import InputRecord
from onnxlady._verify._session import first_line

#: Input rules that draw random values (the others are fixed or the user's).
_RANDOM_RULES = ("integers", "embedding-index", "uniform", "coin")


@dataclass
class _Tally:
    """What the feeds held for one input so far."""

    shape: tuple[int, ...]
    shapes_vary: bool = False
    feeds: int = 0
    given: int = 0
    low: float = math.inf
    high: float = -math.inf


class FeedStream:
    """The feeds both models run on, and a record of how each input was fed.

    Args:
        graph: The reference model (its inputs are the ones fed).
        index: Its :class:`GraphIndex`.
        plans: How each input is drawn (see :func:`onnxlady._verify._inputs.plan_inputs`).
        shapes: The user's shape overrides.
        input_range: The default range of floating-point inputs.
        value_ranges: The user's ranges by input name.
    """

    def __init__(
        self,
        graph: onnx.ModelProto,
        index: GraphIndex,
        plans: list[InputPlan],
        shapes: Mapping[str, Sequence[int]] | None,
        input_range: Sequence[float],
        value_ranges: Mapping[str, Sequence[float]] | None,
    ) -> None:
        self._graph, self._index = graph, index
        self._shapes, self._input_range, self._value_ranges = shapes, input_range, value_ranges
        self.plans = plans
        self._by_name = {plan.name: plan for plan in plans}
        self._declared = {vi.name: declared_dims(vi) for vi in fed_inputs(graph)}
        self._tallies: dict[str, _Tally] = {}
        #: The file or script giving the inputs; None when verify draws them all.
        self.given_by: str | None = None
        #: How the last feed got each input: ``"given"`` or ``"drawn"``.
        self.current: dict[str, str] = {}

    def generated(self, rng: np.random.Generator, iterations: int) -> Iterator[dict[str, np.ndarray]]:
        """``iterations`` feeds drawn from ``rng`` by the plans."""
        for _ in range(iterations):
            feed = {plan.name: draw(plan, rng) for plan in self.plans}
            self._note(feed, dict.fromkeys(feed, "drawn"))
            yield feed

    def given(self, raw: Iterator[Any], label: str, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """The user's feeds, checked and cast; inputs a feed lacks are drawn at the sizes it implies."""
        self.given_by = label
        for number, item in enumerate(raw, start=1):
            feed = coerce_feed(item, self._by_name, self._declared, f"{label}, feed {number}")
            how = dict.fromkeys(feed, "given")
            missing = [plan for plan in self.plans if plan.name not in feed]
            if missing:
                # Missing inputs take the sizes the given arrays imply (a shared sequence length).
                overrides = {k: v for k, v in (self._shapes or {}).items() if k not in feed}
                overrides.update({name: array.shape for name, array in feed.items()})
                replanned = plan_inputs(self._graph, overrides, self._input_range, self._value_ranges, self._index)
                plans = {plan.name: plan for plan in replanned}
                for plan in missing:
                    feed[plan.name] = draw(plans[plan.name], rng)
                    how[plan.name] = "drawn"
            self._note(feed, how)
            yield {plan.name: feed[plan.name] for plan in self.plans}

    def _note(self, feed: Mapping[str, np.ndarray], how: Mapping[str, str]) -> None:
        self.current = dict(how)
        for name, array in feed.items():
            tally = self._tallies.setdefault(name, _Tally(tuple(array.shape)))
            tally.shapes_vary |= tuple(array.shape) != tally.shape
            tally.feeds += 1
            if how[name] == "given":
                tally.given += 1
                if array.size and array.dtype.kind in "biuf":
                    tally.low = min(tally.low, float(np.min(array)))
                    tally.high = max(tally.high, float(np.max(array)))

    def nodes_named(self, name: str) -> list[onnx.NodeProto]:
        """The reference's top-level operators of that name (ORT names the one that failed)."""
        return [node for node in self._graph.graph.node if node.name == name]

    def records(self) -> tuple[InputRecord, ...]:
        """One record per input, in graph order: its rule (or source), range and shape."""
        records = []
        for plan in self.plans:
            tally = self._tallies.get(plan.name) or _Tally(plan.shape)
            if tally.given:
                rule = "loaded" if (self.given_by or "").startswith("input file") else "script"
                detail = f"given by {self.given_by}"
                if tally.given < tally.feeds:
                    detail += f" in {tally.given} of {tally.feeds} feeds, drawn otherwise ({plan.rule})"
                low = tally.low if math.isfinite(tally.low) else None
                high = tally.high if math.isfinite(tally.high) else None
                records.append(
                    InputRecord(plan.name, tally.shape, plan.dtype, rule, low, high, detail, (), tally.shapes_vary)
                )
                continue
            notes = plan.shape_notes if tally.shape == plan.shape else ("sizes implied by the given inputs",)
            drawn = InputRecord(plan.name, tally.shape, plan.dtype, plan.rule, plan.low, plan.high, plan.detail)
            records.append(dataclasses.replace(drawn, shape_notes=notes, shapes_vary=tally.shapes_vary))
        return tuple(records)


#: The operator ONNX Runtime names in a failed run: "... running GroupQueryAttention node. Name:'X' ...".
_FAILED_NODE = re.compile(r"Name:'([^']*)'")


def culprit_inputs(error: str, feeds: FeedStream) -> list[InputPlan]:
    """The inputs ONNX Runtime's message points at, most likely first.

    The inputs it names; else the guessed inputs the failing operator reads itself (ORT names
    an operator's own input, ``past_key``, not the graph input feeding it); else every input
    with a guessed dimension.
    """
    named = [plan for plan in feeds.plans if _mentions(error, plan.name)]
    if named:
        return named
    guessed = [plan for plan in feeds.plans if plan.guessed]
    failed = _FAILED_NODE.search(error)
    if failed is not None:
        read = {name for node in feeds.nodes_named(failed.group(1)) for name in node.input}
        return [plan for plan in guessed if plan.name in read] or guessed
    return guessed


def _mentions(error: str, name: str) -> bool:
    """Whether ORT's message names the input ``name`` (as a word: input ``x`` is not in ``index``)."""
    return re.search(rf"(?<![\w.:/]){re.escape(name)}(?![\w.:/])", error) is not None


def reference_failure(exc: BaseException, ref_name: str, feeds: FeedStream, feed: Mapping[str, np.ndarray]) -> str:
    """One line saying the reference cannot run on these inputs, and which input or shape to give.

    Args:
        exc: ONNX Runtime's exception.
        ref_name: The reference model's label.
        feeds: The stream the failing feed came from (how each input was fed).
        feed: The failing feed.

    Returns:
        The message: for generated inputs, the input whose guessed shape to give (``--shape``)
        or whose values to bound (``--val-range``); for given inputs, the file or script.
    """
    error = first_line(exc)
    if feeds.given_by is not None:
        drawn_names = [name for name, how in feeds.current.items() if how == "drawn"]
        also = f" (drawn for the inputs it lacks: {', '.join(repr(n) for n in drawn_names)})" if drawn_names else ""
        return f"ONNX Runtime cannot run {ref_name} on the inputs given by {feeds.given_by}{also}: {error}"
    named = [plan for plan in feeds.plans if _mentions(error, plan.name)]
    suspects = culprit_inputs(error, feeds)
    suspect = suspects[0] if suspects else None
    if suspect is not None and suspect.guessed:
        shape = list(feed[suspect.name].shape)
        # The batch size is rarely the culprit: name it only when nothing else was guessed.
        axes = [axis for axis in suspect.guessed if axis > 0] or list(suspect.guessed)
        spec = "x".join("N" if axis in axes else str(size) for axis, size in enumerate(shape))
        return (
            f"ONNX Runtime cannot run {ref_name} on the generated inputs: {error}; input {suspect.name!r} of shape "
            f"{shape} has guessed dimension(s) {', '.join(map(str, axes))}: give its real shape with --shape "
            f"{suspect.name}:{spec} (shapes={{{suspect.name!r}: ...}}), or real inputs with --load-inputs FILE"
        )
    drawn = ", ".join(f"{plan.name!r} {list(feed[plan.name].shape)} {plan.rule}" for plan in feeds.plans)
    # Random values are the likely culprits: integers drawn with no rule first (indices, sizes).
    values = named or [p for p in feeds.plans if p.rule == "integers"]
    values = values or [p for p in feeds.plans if p.rule in _RANDOM_RULES]
    target = values[0].name if len(values) == 1 else "NAME"
    return (
        f"ONNX Runtime cannot run {ref_name} on the generated inputs ({drawn}): {error}; give the values it "
        f"accepts with --val-range {target}:[lo,hi] (value_ranges=), or real inputs with --load-inputs FILE"
    )
