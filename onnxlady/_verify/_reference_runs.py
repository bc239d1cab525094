"""The reference's runs, recorded in a first pass so that only one ONNX Runtime session is alive at a time.

Opening an ONNX Runtime session on a model costs about twice the model in memory while ORT
parses, optimizes and packs the weights (each optimization pass holds the old and the new
copy), and keeps one copy or more afterwards (glibc keeps freed blocks under its mmap threshold
for reuse). Opening the candidate's session next to the
reference's, as verify used to, peaked at the sum. On the CPU verify now runs in two passes:

1. the reference's session runs every feed (the same control flow as the comparison, the
   candidate left out) and :class:`ReferenceRuns` records its outputs, or the failure one run
   raised, by run (feed number and step), and every feed drawn;
2. the reference's session is freed (the candidate's is built in the memory it used), then the
   candidate's session is opened and the comparison runs as before, the reference's
   outputs taken from the record in the same order: every accumulator sees the same pairs in
   the same order, and every message (a failing reference, a candidate that does not load or
   run) comes where it came when both ran side by side.

The record holds at most ``budget`` bytes of outputs and feeds: beyond it the first pass stops at
the end of a feed, the reference's session stays open and the runs the record lacks are run live
(both sessions alive, as before). A run the record lacks after the session was freed (a state
loop the candidate ends earlier than the reference, say) reopens it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import numpy as np

from onnxlady._errors import OnnxladyError
from onnxlady._verify._feed_stream import FeedStream, reference_failure
from onnxlady._verify._session import run_session

__all__ = ["CheckNotRunError", "ReferenceRuns"]


class CheckNotRunError(OnnxladyError):
    """The comparison could not run for a reason that says nothing about the candidate.

    Raised when the inputs cannot be made (a shape override or value range that does not fit the
    reference, an unusable input file or script) or the reference itself cannot be loaded or
    run on them. ``permute --verify`` then keeps the permuted model: the permutation succeeded,
    only its check is missing.
    """


def _nbytes(values: Any) -> int:
    return sum(int(getattr(value, "nbytes", 0)) for value in values)


class _Exhausted:
    """Marks a feed stream that ended."""


class ReferenceRuns:
    """The reference's session and its runs: recorded by the first pass, replayed by the second.

    Args:
        session: the reference's ONNX Runtime session.
        reopen: opens the same session again (after :meth:`release`).
        name: the reference's label in messages.
        feeds: the stream the feeds come from (its state names the inputs in a failure message).
        budget: bytes of outputs and feeds the record may hold; 0 records nothing (both sessions
            stay alive, every run is live).
    """

    def __init__(self, session: Any, reopen: Callable[[], Any], name: str, feeds: FeedStream, budget: int) -> None:
        self.session: Any = session
        self._reopen = reopen
        self.name = name
        self._feeds = feeds
        self.budget = budget
        self.recording = False
        self.held = 0
        self._outputs: dict[Hashable, list[Any] | BaseException] = {}
        self._recorded_feeds: list[dict[str, np.ndarray]] = []
        self._feeds_end: BaseException | _Exhausted | None = None
        self._stream: Iterator[dict[str, np.ndarray]] | None = None

    @property
    def over_budget(self) -> bool:
        """Whether the record holds more than its budget (the first pass then stops)."""
        return self.held > self.budget

    def live_session(self) -> Any:
        """The reference's session, reopened if it was released."""
        if self.session is None:
            self.session = self._reopen()
        return self.session

    def release(self) -> None:
        """Free the reference's session (it is reopened if a run needs it): the candidate's reuses its memory."""
        self.session = None

    def run(self, key: Hashable, feed: Mapping[str, np.ndarray]) -> list[Any]:
        """The reference's outputs on ``feed`` for the run ``key``: recorded, replayed or run live.

        Raises:
            CheckNotRunError: the reference cannot run on ``feed`` (recorded, and raised again
                when replayed).
        """
        if not self.recording and key in self._outputs:
            recorded = self._outputs.pop(key)
            if isinstance(recorded, BaseException):
                raise recorded
            return recorded
        session = self.live_session()
        try:
            outputs = list(run_session(session, feed))
        except Exception as exc:  # ORT's own exception types: the inputs do not suit the reference
            failure = CheckNotRunError(reference_failure(exc, self.name, self._feeds, feed))
            failure.__cause__ = exc
            if self.recording:
                self._outputs[key] = failure
            raise failure from exc
        if self.recording:
            self._outputs[key] = outputs
            self.held += _nbytes(outputs)
        return outputs

    def feeds(self, stream: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """The feeds of ``stream``: recorded while recording; replayed from the record, then the rest, after.

        ``stream`` is the same iterator in both passes: the second takes over where the first stopped.
        """
        self._stream = stream
        if self.recording:
            yield from self._record(stream)
            return
        while self._recorded_feeds:
            yield self._recorded_feeds.pop(0)
        if isinstance(self._feeds_end, BaseException):
            raise self._feeds_end
        if isinstance(self._feeds_end, _Exhausted):
            return
        yield from stream

    def _record(self, stream: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        while True:
            try:
                feed = next(stream)
            except StopIteration:
                self._feeds_end = _Exhausted()
                return
            except Exception as exc:  # a feed that cannot be made: raised again where the second pass meets it
                self._feeds_end = exc
                raise
            self._recorded_feeds.append(feed)
            self.held += _nbytes(feed.values())
            yield feed
