"""``onnxlady.build_index``, ``onnxlady.find``, ``onnxlady.find_all_pairs``: provenance at registry scale.

Which of a registry's models derive from a protected one, and which reference a suspect comes
from: every model is reduced to a permutation-invariant fingerprint of its neurons
(:mod:`onnxlady._provenance._fingerprint`), stored in one SQLite index file
(:mod:`onnxlady._provenance._index`) and searched in numpy (:mod:`onnxlady._provenance._find`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import onnx

from onnxlady._api._checks import check_whole
from onnxlady._api._results import Result
from onnxlady._api._sources import ModelSource, jsonable
from onnxlady._errors import OnnxladyError
from onnxlady._io._progress import advance, say
from onnxlady._provenance._find import (
    Candidate,
    Cluster,
    ClusterReport,
    Confirmation,
    FindReport,
)
from onnxlady._provenance._find import find as _find
from onnxlady._provenance._find import find_all_pairs as _find_all_pairs
from onnxlady._provenance._index import IndexBuildReport, IndexProgress, UnreadableFile
from onnxlady._provenance._index import build_index as _build_index

__all__ = [
    "Candidate",
    "Cluster",
    "ClusterResult",
    "Confirmation",
    "FindResult",
    "IndexResult",
    "UnreadableFile",
    "build_index",
    "find",
    "find_all_pairs",
]

#: A path to an index file.
IndexPath = str | os.PathLike[str]


# -- results ----------------------------------------------------------------------------------
@dataclass
class IndexResult(Result):
    """The outcome of :func:`build_index`: what was fingerprinted, skipped, removed or unreadable.

    Exit code 0: the index was written. Files that could not be read are listed in
    :attr:`errors` (and the JSON's ``errors``) and do not fail the build: a registry always
    holds some. Exit code 2 when nothing given could be indexed (every file found unreadable,
    none fingerprinted, unchanged or touched): :attr:`failure` says so in one line.

    Attributes:
        details: the build's counts and lists (see :class:`onnxlady._provenance._index.IndexBuildReport`).
    """

    details: IndexBuildReport = field(repr=False)

    @property
    def index(self) -> Path:
        """The index file."""
        return Path(self.details.index)

    @property
    def models(self) -> int:
        """Models in the index after the build."""
        return self.details.models

    @property
    def indexed(self) -> list[str]:
        """Files fingerprinted by this build (new or changed)."""
        return self.details.indexed

    @property
    def errors(self) -> list[UnreadableFile]:
        """Files that could not be fingerprinted, each with its one-line error."""
        return self.details.errors

    @property
    def failure(self) -> str | None:
        """Why the build indexed nothing, or None when some file given is in the index.

        A build whose every file failed (a wrong folder, a registry of truncated downloads) wrote
        no model: an index of nothing would make every later ``find`` answer "nothing derived".
        An empty folder (no file, no error) is no failure: nothing was there to read.
        """
        report = self.details
        if not report.errors or report.indexed or report.unchanged or report.touched:
            return None
        count = len(report.errors)
        files = "the only file" if count == 1 else f"all {count} files"
        return f"nothing indexed: {files} given could not be read (listed as unreadable)"

    @property
    def exit_code(self) -> int:
        """0 when the index holds what was given; 2 when nothing given could be indexed (:attr:`failure`)."""
        return 2 if self.failure is not None else 0

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady index build --json`` prints."""
        return jsonable(self.details.to_json())

    def to_text(self) -> str:
        """What ``onnxlady index build`` prints: one summary line, then each unreadable file."""
        report = self.details
        lines = [
            (
                f"{report.index}: {report.models} models; {report.scanned} files scanned, {len(report.indexed)} "
                f"fingerprinted, {report.unchanged} unchanged, {len(report.touched)} touched (same bytes), "
                f"{len(report.removed)} removed, {len(report.errors)} unreadable "
                f"({report.seconds:.1f} s, {report.engine} engine, {report.workers} "
                f"worker{'s' if report.workers != 1 else ''})"
            )
        ]
        for item in report.errors:
            lines.append(f"unreadable: {item.error}")
        for path in report.removed:
            lines.append(f"removed: {path}")
        for path in report.unfingerprinted:
            lines.append(f"no fingerprinted layer (find cannot call it derived or unrelated): {path}")
        return "\n".join(lines)


@dataclass
class FindResult(Result):
    """The outcome of :func:`find`: the indexed models ranked by fingerprint distance to a suspect.

    Exit code 0 when at least one candidate is called ``derived`` (with ``confirm``: and its
    audit paired the two models, i.e. its verdict is not ``unmatched``); 1 when none is: like
    ``grep``, a search that finds something succeeds, so a pipeline can write ``if onnxlady
    find ...; then alert``. A candidate the fingerprint cannot call (``unknown``: no fingerprinted
    layer on a side) is not derived: exit 1 when no other is. Bad input is exit 2.

    Attributes:
        details: the ranking (see :class:`onnxlady._provenance._find.FindReport`).
    """

    details: FindReport = field(repr=False)

    @property
    def candidates(self) -> list[Candidate]:
        """The ranked candidates, closest first."""
        return self.details.candidates

    @property
    def derived(self) -> list[Candidate]:
        """The candidates called ``derived`` (with ``confirm``: by their audit, see ``Candidate.called_by``)."""
        return [c for c in self.details.derived if c.confirmation is None or c.confirmation.verdict != "unmatched"]

    @property
    def exit_code(self) -> int:
        """0 when a derived candidate was found, 1 when none was."""
        return 0 if self.derived else 1

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady find --json`` prints (``derived``: as :attr:`derived` counts them)."""
        document = self.details.to_json()
        document["derived"] = len(self.derived)
        return jsonable(document)

    def to_text(self) -> str:
        """What ``onnxlady find`` prints: a summary line and a ranked table."""
        report = self.details
        unknown = report.unknown
        lines = [
            (
                f"{report.suspect} against {report.index} ({report.models} models): "
                f"{len(self.derived)} derived ({_threshold_text(report.threshold, report.candidates)})"
                + (f", {len(unknown)} unknown (no evidence either way)" if unknown else "")
            )
        ]
        if report.candidates:
            confirmed = any(c.confirmation is not None for c in report.candidates)
            header = f"{'rank':>4}  {'score':>6}  {'distance':>8}  {'limit':>6}  {'call':<9}  {'layers':>9}"
            lines.append(header + ("  confirm" if confirmed else "") + "  model")
            for c in report.candidates:
                layers = f"{c.paired_layers}/{c.unpaired_layers[0]}/{c.unpaired_layers[1]}"
                call = c.call + ("*" if c.called_by == "audit" else "")
                score, distance = (f"{c.score:>6.3f}", f"{c.distance:>8.4f}") if c.reason is None else ("-", "-")
                row = f"{c.rank:>4}  {score:>6}  {distance:>8}  {c.threshold:>6.3f}  {call:<9}  {layers:>9}"
                if confirmed:
                    row += f"  {_confirmation_text(c.confirmation)}"
                lines.append(f"{row}  {c.path}")
            lines.append(
                "limit: the largest distance called derived; layers: paired/unpaired in the suspect/unpaired in "
                "the candidate" + ("; *: called by the audit, not the distance" if confirmed else "")
            )
            for reason in dict.fromkeys(c.reason for c in report.candidates if c.reason is not None):
                lines.append(f"no fingerprint evidence (distance measures nothing): {reason}")
        lines.append(f"search {report.search_seconds:.3f} s, total {report.seconds:.3f} s")
        return "\n".join(lines)


def _threshold_text(threshold: float | None, candidates: list[Candidate]) -> str:
    if any(c.called_by == "audit" for c in candidates):
        return "called by the audit of each candidate"
    if threshold is None:
        return "distance within each one's limit"
    return f"distance <= {threshold:g}"


def _confirmation_text(confirmation: Confirmation | None) -> str:
    if confirmation is None:
        return "-"
    if confirmation.mean_similarity is None:
        return confirmation.verdict
    return f"{confirmation.verdict} (similarity {confirmation.mean_similarity:.3f})"


@dataclass
class ClusterResult(Result):
    """The outcome of :func:`find_all_pairs`: every cluster of related models in an index.

    Exit code 0 when at least one cluster was found, 1 when no two models are related.

    Attributes:
        details: the clusters (see :class:`onnxlady._provenance._find.ClusterReport`).
    """

    details: ClusterReport = field(repr=False)

    @property
    def clusters(self) -> list[Cluster]:
        """The clusters, largest first."""
        return self.details.clusters

    @property
    def exit_code(self) -> int:
        """0 when some models are related, 1 when none are."""
        return 0 if self.details.clusters else 1

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady find --all-pairs --json`` prints."""
        return jsonable(self.details.to_json())

    def to_text(self) -> str:
        """What ``onnxlady find --all-pairs`` prints: each cluster, its members and pairs."""
        report = self.details
        lines = [
            (
                f"{report.index}: {len(report.clusters)} clusters of related models among {report.models} "
                f"({_threshold_text(report.threshold, [])}; {report.compared_pairs} pairs compared, {report.seconds:.2f} s)"
            )
        ]
        for number, cluster in enumerate(report.clusters, start=1):
            lines.append(f"cluster {number} ({len(cluster.members)} models):")
            lines.extend(f"  {member}" for member in cluster.members)
            for a, b, distance in cluster.pairs:
                lines.append(f"    {distance:.4f}  {a} <-> {b}")
        if report.unfingerprinted:
            count = len(report.unfingerprinted)
            lines.append(f"no fingerprinted layer, so no evidence and in no cluster ({count} models):")
            lines.extend(f"  {path}" for path in report.unfingerprinted)
        return "\n".join(lines)


# -- functions --------------------------------------------------------------------------------
def build_index(
    paths: Sequence[str | os.PathLike[str]],
    index: IndexPath,
    *,
    workers: int | None = None,
    engine: str = "process",
    scheduler: Any = None,
    progress: Callable[[str], None] | None = None,
) -> IndexResult:
    """Fingerprint the models under ``paths`` into the index file ``index``, incrementally.

    Folders are searched recursively for ``*.onnx`` (external data included); files are taken as
    named. Only new or changed files are fingerprinted (same size and modification time:
    skipped; a new time but the same sha256: kept), files gone from a scanned folder are
    removed, and a file that cannot be read is listed with its error while the build goes on.
    The index is one SQLite file, written as results arrive (an interrupted build keeps what
    it committed). No model given is modified.

    Args:
        paths: files and folders; with ``engine="dask"`` also fsspec URLs (``s3://bucket/models``).
        index: the index file, created when missing.
        workers: processes fingerprinting, this one included (default: the machine's CPU count;
            1 runs in this process alone, N starts a local pool of N - 1), or the workers of the Dask LocalCluster started when no ``scheduler`` is given.
        engine: ``"process"`` (a local process pool) or ``"dask"`` (a Dask cluster; needs the
            ``scale`` extra: ``pip install 'onnxlady[scale]'``).
        scheduler: with ``engine="dask"``: the address of a running scheduler
            (``"tcp://host:8786"``) or a ``distributed.Client``; None starts a LocalCluster.
        progress: called with stage messages; a ``ProgressReporter`` also moves a bar per file.

    Returns:
        What the build did: counts, the files fingerprinted, touched, removed and unreadable.

    Raises:
        OnnxladyError: a path given does not exist, the index is not an onnxlady index or is of
            a newer format, an unknown engine, fewer than one worker, or Dask asked for but not
            installed or unreachable.
    """
    if workers is not None:
        check_whole(workers, "--workers", 1)
    # A registry path that is not there is a typo, not an empty registry: an index of nothing
    # would make every later ``find`` answer "nothing derived". (Files that vanish or fail to
    # read inside a folder are listed as unreadable and the build goes on.)
    for path in paths:
        if "://" not in str(path) and not os.path.lexists(path):
            raise OnnxladyError(f"{path}: no such file or folder (nothing indexed)")
    say(progress, f"index: scanning {len(paths)} path{'s' if len(paths) != 1 else ''}")

    def settled(step: IndexProgress) -> None:
        advance(progress, "index: fingerprinting models", step.done, step.total)

    created = not os.path.lexists(index)
    details = _build_index(
        list(paths), index, workers=workers, engine=engine, scheduler=scheduler,
        progress=settled if progress is not None else None,
    )  # fmt: skip
    result = IndexResult(details)
    if result.failure is not None and created:
        # A build that failed leaves no file behind: the index it created holds nothing.
        for leftover in (str(index), f"{index}-journal", f"{index}-wal", f"{index}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    return result


@overload
def find(
    suspect: ModelSource,
    index: IndexPath,
    *,
    top: int = ...,
    confirm: bool = ...,
    threshold: float | None = ...,
    all_pairs: Literal[False] = ...,
    progress: Callable[[str], None] | None = ...,
) -> FindResult: ...


@overload
def find(
    suspect: None,
    index: IndexPath,
    *,
    top: int = ...,
    confirm: bool = ...,
    threshold: float | None = ...,
    all_pairs: Literal[True],
    progress: Callable[[str], None] | None = ...,
) -> ClusterResult: ...


def find(
    suspect: ModelSource | None,
    index: IndexPath,
    *,
    top: int = 5,
    confirm: bool = False,
    threshold: float | None = None,
    all_pairs: bool = False,
    progress: Callable[[str], None] | None = None,
) -> FindResult | ClusterResult:
    """Rank the models of an index by how likely ``suspect`` derives from them.

    The suspect's fingerprint is compared with every indexed one (a coarse numpy pass over all
    of them, then the exact layer-by-layer distance for the closest); each candidate gets a
    distance (0: the same neurons up to order), a score ``1 / (1 + (distance / threshold)^2)``
    and a call, ``derived`` (distance at most the threshold) or ``unrelated``; the threshold
    grows with the number of layers compared (``sqrt(1 - 1.45 / sqrt(n))``: 0.40 at 3 layers,
    0.90 at 60; see docs/provenance.md) unless a fixed ``threshold`` is given. ``confirm``
    audits every returned candidate against the suspect (resync, then the audit's verdict).
    With ``all_pairs``, the suspect must be None and every cluster of related models in the
    index is listed instead (:func:`find_all_pairs`).

    Args:
        suspect: a model file or an ``onnx.ModelProto`` (not modified); None with ``all_pairs``.
        index: an index written by :func:`build_index`.
        top: how many candidates to return.
        confirm: audit each returned candidate against the suspect (needs the candidates' files).
        threshold: a fixed largest distance called ``derived``; None (the default): the limit
            the number of layers compared sets, calibrated by ``python3 -m
            tools.registry_experiment`` (see docs/provenance.md).
        all_pairs: list the clusters of related models instead of ranking a suspect.
        progress: called with one message per stage (and per confirmation).

    Returns:
        A :class:`FindResult`; with ``all_pairs``, a :class:`ClusterResult`.

    Raises:
        OnnxladyError: the suspect cannot be read (or is given with ``all_pairs``, or missing
            without it), the index is missing, not an onnxlady index or of a newer format, or
            ``top``/``threshold`` are not positive.
    """
    if all_pairs:
        if suspect is not None:
            raise OnnxladyError("find: give either a suspect or all_pairs, not both")
        if confirm:
            raise OnnxladyError("find: confirm applies to a suspect's candidates, not to all_pairs")
        return find_all_pairs(index, threshold=threshold, progress=progress)
    if suspect is None:
        raise OnnxladyError("find: a suspect model is needed (or all_pairs to list related models)")
    if not isinstance(suspect, (str, os.PathLike, onnx.ModelProto)):
        raise OnnxladyError(f"suspect: expected a path or an onnx.ModelProto, got {type(suspect).__name__}")
    say(progress, "find: fingerprinting the suspect and searching the index")
    details = _find(suspect, index, top=top, confirm=confirm, threshold=threshold, progress=progress)
    return FindResult(details)


def find_all_pairs(
    index: IndexPath,
    *,
    threshold: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> ClusterResult:
    """Every cluster of related models in an index: pairs within ``threshold``, joined.

    Pairs are compared exactly when their coarse summaries are near (each model's nearest
    neighbours and everything within a cutoff), so a registry of n models costs far fewer than
    n^2 exact comparisons.

    Args:
        index: an index written by :func:`build_index`.
        threshold: a fixed largest distance of a related ("derived") pair; None (the default):
            the limit the number of layers compared sets (see :func:`find`).
        progress: called with one message when the search starts.

    Returns:
        The clusters, largest first, each with its members and its related pairs.

    Raises:
        OnnxladyError: the index is missing, not an onnxlady index or of a newer format, or
            ``threshold`` is not positive.
    """
    say(progress, f"find: comparing the models of {os.fspath(index)} pairwise")
    return ClusterResult(_find_all_pairs(index, threshold=threshold))
