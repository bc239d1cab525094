"""Search an index for the models a suspect derives from, and find clusters of related models.

:func:`find` ranks every indexed model by fingerprint distance to a suspect in two stages:

1. *coarse*: the search vectors of all models (one float32 matrix, see
   :func:`~onnxlady._provenance._fingerprint.search_vector`) are ranked by Euclidean distance
   to the suspect's in numpy: one matrix-vector product, a few milliseconds for 100,000
   models;
2. *exact*: the first :data:`CANDIDATES` (or ``8 * top`` if more) are compared layer by layer
   (:func:`~onnxlady._provenance._fingerprint.compare_fingerprints`) and ranked by that
   distance.

Each result carries a ``score`` in (0, 1], ``1 / (1 + (distance / threshold)^2)`` (1: the same
neurons up to order; 0.5 at the threshold), and a call: ``"derived"`` when ``distance <=
threshold``, else ``"unrelated"``. A model that pairs no layer with the suspect ranks after
every model that pairs one (it holds no evidence either way).

The threshold grows with the evidence (:func:`derived_threshold`). Distances are in units of
the gap between two unrelated layers of the same shape (see
:mod:`onnxlady._provenance._fingerprint`): the squared distance is the mean over ``n`` layer
slots (paired layers and unpaired ones) of values near 1 for an unrelated model, so an
unrelated model's squared distance concentrates around 1 with a spread that shrinks as
``1 / sqrt(n)``. The threshold is set that many spreads below: ``threshold(n)^2 = 1 -
EVIDENCE / sqrt(n)`` (at least :data:`MIN_THRESHOLD`), a fixed false-alarm rate whatever the
depth, like a z-test; a noisy copy of a 60-layer trained network 0.89 away is as clearly
derived as a 3-layer one 0.3 away. Calibration of :data:`EVIDENCE` in the registry experiment
(``python3 -m tools.registry_experiment``; fixtures, real PaddleOCR/YOLOv8/Magika models and
torch-trained networks as references, each permuted, with noise OMEGA = 0.1, int8 QDQ, 30 %
magnitude pruning, float16, ORT's extended optimizer and fine-tuning, against other seeds of
the same architectures and every other model): ``(1 - distance^2) * sqrt(n)`` is at most 1.32
for every unrelated pair and at least 1.58 for every derivative (Magika's pruned copy, 3 large
layers read in the floored unit of
:func:`~onnxlady._provenance._fingerprint.layer_unit`; 1.63 for every other); the constant sits
between, at 1.45. Heavier changes (noise OMEGA >= 0.3,
pruning far beyond 50 %, long fine-tuning) leave the "derived" side; a confirmed resync
(``confirm=True``) then decides. A fixed ``threshold`` can be given instead.

Two corrections keep independently initialised models of one architecture apart (held-out
finding of issue 17): degenerate layers (all-zero or constant, the same in every seed) are no
slots (:attr:`~onnxlady._provenance._fingerprint.LayerMatch.slots`), and the limit is scaled
by the pair's own unrelated gap where it can be measured
(:attr:`~onnxlady._provenance._fingerprint.LayerMatch.unrelated_scale`, at most 1). A pair
with no weighed layer is never derived, nor one whose paired layers are no closer to each
other than to their other same-shape candidates (the ratio test of
:attr:`~onnxlady._provenance._fingerprint.LayerMatch.contrast`: ViT-B/16 of two seeds), nor
one within the limit only thanks to its closest pair
(:attr:`~onnxlady._provenance._fingerprint.LayerMatch.without_closest`: an OPT and an SBERT
sharing one token table, held-out finding of session 12; not with a fixed ``threshold``).

``confirm=True`` audits each returned candidate against the suspect
(:func:`onnxlady._audit._verdicts.audit_models`, which runs
:func:`onnxlady._resync._entry.resync_model` first): the verdict (``permuted``,
``perturbed``...) and the resync's mean neuron similarity, or why they could not be paired.
The audit then decides the call (``called_by: "audit"``): it refuses models whose structures
pair but whose weights do not (:func:`onnxlady._audit._relatedness.check_related`), so any
verdict means derived, and ``unmatched`` unrelated; a fingerprint that a heavier change moved
past the limit is overruled by the neurons themselves (held-out finding: Magika with noise
OMEGA 0.5 audited ``perturbed`` while the call stayed ``unrelated``).

A call needs evidence: where the suspect or a candidate has no fingerprinted layer (no
operator the walk reads, :mod:`onnxlady._provenance._producers`), the distance between them
measures nothing (two such models are 0 apart, one against any other model 1), so the call is
``"unknown"`` with the reason, never ``derived`` or ``unrelated`` (held-out finding of session
15: an Einsum model, unread then, was called ``unrelated`` to its own reference at distance 0).

:func:`find_all_pairs` lists every cluster of related models in an index: pairs whose exact
distance is within the threshold, joined into connected components; models with no
fingerprinted layer are listed apart (never compared).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxlady._audit._relatedness import check_related
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import load_model
from onnxlady._provenance._fingerprint import (
    LayerMatch,
    ModelFingerprint,
    compare_fingerprints,
    fingerprint_model,
    is_derived,
    search_vector,
)
from onnxlady._provenance._index import open_index, read_fingerprints, search_matrix, unfingerprinted_models
from onnxlady._provenance._read import fingerprint_file, is_url, load_url
from onnxlady._resync._across import resync_across
from onnxlady._resync._solver import ResyncOptions

__all__ = [
    "CANDIDATES",
    "DERIVED_THRESHOLD",
    "EVIDENCE",
    "MIN_THRESHOLD",
    "UNKNOWN",
    "Candidate",
    "Cluster",
    "ClusterReport",
    "Confirmation",
    "FindReport",
    "find",
    "find_all_pairs",
    "derived_threshold",
    "no_evidence",
    "score_of",
]

#: How many spreads of an unrelated model's squared distance the threshold sits below 1 (see the
#: module docstring for its calibration): ``threshold(n)^2 = 1 - EVIDENCE / sqrt(n)``.
EVIDENCE = 1.45
#: The threshold of a comparison of one or two layer slots (the rule would give none).
MIN_THRESHOLD = 0.3
#: The threshold at 4 layer slots (``derived_threshold(4)``, about 0.52), for a single figure.
DERIVED_THRESHOLD = math.sqrt(1.0 - EVIDENCE / 2.0)
#: Models compared exactly after the coarse ranking (at least; ``8 * top`` when larger).
CANDIDATES = 64
#: All pairs: the coarse neighbours per model compared exactly, beyond those within the cutoff.
_NEIGHBOURS = 16
#: All pairs: coarse (search-vector) distance below which a pair is always compared exactly.
_COARSE_CUTOFF = 3.0
_BLOCK = 2048


def derived_threshold(slots: int) -> float:
    """The largest distance called "derived" for a comparison over ``slots`` layer slots.

    ``sqrt(1 - EVIDENCE / sqrt(slots))``, at least :data:`MIN_THRESHOLD` (module docstring):
    about 0.40 at 3 slots, 0.70 at 8, 0.80 at 16, 0.90 at 60, 0.96 at 500.

    Args:
        slots: paired layers plus the unpaired layers of both models.
    """
    squared = 1.0 - EVIDENCE / math.sqrt(max(slots, 1))
    return max(math.sqrt(max(squared, 0.0)), MIN_THRESHOLD)


def score_of(distance: float, threshold: float = DERIVED_THRESHOLD) -> float:
    """``1 / (1 + (distance / threshold)^2)``: 1 for equal fingerprints, 0.5 at the threshold."""
    return 1.0 / (1.0 + (distance / threshold) ** 2)


def _threshold_of(match: LayerMatch, fixed: float | None) -> float:
    if fixed is not None:
        return fixed
    # Degenerate layers (all-zero, constant) pair but are no evidence: they are no slots either.
    # Scaled by the comparison's own unrelated gap where it can measure one (at most 1).
    return derived_threshold(match.slots) * match.unrelated_scale


# -- results ----------------------------------------------------------------------------------
#: A confirmation's verdict when the audit could not pair the two models (or refused them as unrelated).
UNMATCHED = "unmatched"

#: A candidate's call when the fingerprint holds no evidence either way (see the module docstring).
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Confirmation:
    """The audit of one candidate (as reference) against the suspect.

    Attributes:
        verdict: the audit's verdict (``identical``, ``permuted``, ``permuted-rescaled``,
            ``scaled``, ``perturbed``, ``converted``) or ``"unmatched"`` when the two models
            could not be paired (another architecture).
        summary: the audit's one-line summary, or why they could not be paired.
        mean_similarity: mean similarity of the resync's matched neurons (None without resync).
        seconds: time the confirmation took.
    """

    verdict: str
    summary: str
    mean_similarity: float | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The confirmation as JSON-ready data (its fields by name)."""
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One indexed model ranked against a suspect.

    Attributes:
        rank: 1 for the closest.
        path: the indexed model's path or URL.
        distance: exact fingerprint distance (0: same neurons up to order).
        score: :func:`score_of` the distance.
        call: ``"derived"``, ``"unrelated"``, or ``"unknown"`` when either model has no
            fingerprinted layer (:attr:`reason` says which).
        paired_layers: producer layers paired between the two.
        unpaired_layers: layers of (suspect, candidate) left without partner.
        confirmation: the audit, when asked for.
        threshold: the distance limit of a "derived" call for this candidate.
        called_by: what made the call: ``"fingerprint"`` (distance against the limit) or
            ``"audit"`` (the confirmation's verdict: any verdict is derived, ``unmatched`` not).
        reason: why the fingerprint could not call the candidate (its distance and score then
            measure nothing: null in JSON), or None.
    """

    rank: int
    path: str
    distance: float
    score: float
    call: str
    paired_layers: int
    unpaired_layers: tuple[int, int]
    confirmation: Confirmation | None = None
    threshold: float = DERIVED_THRESHOLD
    called_by: str = "fingerprint"
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The candidate as JSON-ready data (its fields, the distance and score rounded).

        Without evidence (:attr:`reason`), distance and score are null and ``reason`` is added.
        """
        measured = self.reason is None
        document = {
            "rank": self.rank,
            "path": self.path,
            "distance": round(self.distance, 6) if measured else None,
            "score": round(self.score, 6) if measured else None,
            "call": self.call,
            "called_by": self.called_by,
            "threshold": round(self.threshold, 6),
            "paired_layers": self.paired_layers,
            "unpaired_layers": list(self.unpaired_layers),
            "confirmation": self.confirmation.to_json() if self.confirmation is not None else None,
        }
        if not measured:
            document["reason"] = self.reason
        return document


@dataclass
class FindReport:
    """The ranking of an index's models against one suspect.

    Attributes:
        suspect: the suspect's path (or ``"<model>"`` for an in-memory model).
        index: the index searched.
        models: models in the index.
        threshold: the fixed distance limit of a "derived" call, or None: each candidate's own
            (:func:`derived_threshold` of its layer slots).
        candidates: the ranked candidates, closest first (those without evidence last).
        search_seconds: time of the search itself (coarse and exact stages, without
            fingerprinting the suspect or confirming).
        seconds: total time.
    """

    suspect: str
    index: str
    models: int
    threshold: float | None
    candidates: list[Candidate] = field(default_factory=list)
    search_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def derived(self) -> list[Candidate]:
        """The candidates called "derived"."""
        return [c for c in self.candidates if c.call == "derived"]

    @property
    def unknown(self) -> list[Candidate]:
        """The candidates the fingerprint could not call (no fingerprinted layer on a side)."""
        return [c for c in self.candidates if c.call == UNKNOWN]

    def to_json(self) -> dict[str, Any]:
        return {
            "suspect": self.suspect,
            "index": self.index,
            "models": self.models,
            "threshold": self.threshold,
            "derived": len(self.derived),
            "candidates": [c.to_json() for c in self.candidates],
            "search_seconds": round(self.search_seconds, 4),
            "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class Cluster:
    """Models related to each other (connected by "derived" pairs).

    Attributes:
        members: their paths, sorted.
        pairs: (path, path, distance) of every "derived" pair inside the cluster.
    """

    members: tuple[str, ...]
    pairs: tuple[tuple[str, str, float], ...]

    def to_json(self) -> dict[str, Any]:
        """The cluster as JSON-ready data: its members and its related pairs with their distances."""
        return {
            "members": list(self.members),
            "pairs": [{"a": a, "b": b, "distance": round(d, 6)} for a, b, d in self.pairs],
        }


@dataclass
class ClusterReport:
    """Every cluster of related models in an index (models related to none are left out).

    Attributes:
        index: the index.
        models: models in the index.
        threshold: the fixed distance limit of a "derived" pair, or None: each pair's own
            (:func:`derived_threshold` of its layer slots).
        clusters: the clusters, largest first.
        unfingerprinted: models with no fingerprinted layer, sorted: never compared (no
            evidence either way), so in no cluster whatever they are.
        compared_pairs: pairs compared exactly (the rest were far apart in the coarse stage).
        seconds: time taken.
    """

    index: str
    models: int
    threshold: float | None
    clusters: list[Cluster] = field(default_factory=list)
    compared_pairs: int = 0
    seconds: float = 0.0
    unfingerprinted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``unfingerprinted`` only when there are some)."""
        document: dict[str, Any] = {
            "index": self.index,
            "models": self.models,
            "threshold": self.threshold,
            "clusters": [c.to_json() for c in self.clusters],
            "compared_pairs": self.compared_pairs,
            "seconds": round(self.seconds, 3),
        }
        if self.unfingerprinted:
            document["unfingerprinted"] = list(self.unfingerprinted)
        return document


# -- the suspect ------------------------------------------------------------------------------
def _suspect_fingerprint(
    suspect: str | os.PathLike[str] | onnx.ModelProto | ModelFingerprint,
) -> tuple[str, ModelFingerprint]:
    if isinstance(suspect, ModelFingerprint):
        return "<fingerprint>", suspect
    if isinstance(suspect, onnx.ModelProto):
        return "<model>", fingerprint_model(suspect)
    text = os.fspath(suspect)
    result = fingerprint_file(text, digest=False)
    if result.error:
        raise OnnxladyError(result.error)
    return result.path, ModelFingerprint.from_bytes(result.fingerprint)


def _load(path: str) -> onnx.ModelProto:
    return load_url(path) if is_url(path) else load_model(path).model


def _unrelated_at_first_pass(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> str | None:
    """Why the weights are unrelated, judged on resync's first pass; None when they may be related.

    The audit refuses an unrelated pair (:func:`~onnxlady._audit._relatedness.check_related`)
    only after resync has settled its ties, and an unrelated pair is all ties: a same-architecture
    seed of resnet18 against a float16 copy took 332 s of CPU (held-out finding of issue 17),
    its first pass 8 s. The first pass decides it already: that pair has 99.97 % of its 2,880
    neurons ambiguous (mean similarity 0.03), its true source 0 % (0.99); of the held-out set,
    the 20 same-architecture seed pairs (resnet18, convnext_atto, mobilenetv3, a 2-layer BERT
    against five conversions of the other seed) are all refused here, none of the 48 derivatives
    (six models, eight conversions) is. Structures that do not pair are left to the audit.
    """
    try:
        result, _ = resync_across(reference, suspect, ResyncOptions(settle_ties=False), None, None)
    except OnnxladyError:  # the structures do not pair (or cannot be read): the audit says why
        return None
    try:
        check_related(result)
    except OnnxladyError as exc:
        return f"{exc} (resync's first pass: the audit was not run)"
    return None


def _confirm(reference_path: str, suspect: onnx.ModelProto, precheck: bool = False) -> Confirmation:
    start = time.perf_counter()
    try:
        reference = _load(reference_path)
        unrelated = _unrelated_at_first_pass(reference, suspect) if precheck else None
        if unrelated is not None:
            return Confirmation(UNMATCHED, unrelated, None, time.perf_counter() - start)
        report = audit_models(reference, suspect)
    except OnnxladyError as exc:
        return Confirmation(UNMATCHED, str(exc), None, time.perf_counter() - start)
    similarity = None
    if report.resync is not None and report.resync.groups:
        similarity = float(np.mean([group.mean_similarity for group in report.resync.groups]))
    elif report.verdict == "identical":
        similarity = 1.0
    return Confirmation(report.verdict, report.summary, similarity, time.perf_counter() - start)


# -- find -------------------------------------------------------------------------------------
def find(
    suspect: str | os.PathLike[str] | onnx.ModelProto | ModelFingerprint,
    index_path: str | os.PathLike[str],
    *,
    top: int = 5,
    confirm: bool = False,
    threshold: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> FindReport:
    """Rank the indexed models by fingerprint distance to ``suspect`` (module docstring).

    Args:
        suspect: a model file or URL, a loaded model, or a fingerprint.
        index_path: the index built by :func:`onnxlady._provenance._index.build_index`.
        top: how many candidates to return.
        confirm: audit each returned candidate against the suspect (needs the suspect as a
            file or model, and the candidates' files).
        threshold: the largest distance called "derived"; None (the default): each candidate's
            :func:`derived_threshold` of the layer slots it was compared over.
        progress: called with one line per confirmation.

    Returns:
        The ranked candidates.

    Raises:
        OnnxladyError: the suspect cannot be read, the index is missing, not an index, of a
            newer format, or ``top``/``threshold`` are not positive, or ``confirm`` with a
            fingerprint as suspect.
    """
    if top < 1:
        raise OnnxladyError(f"top must be at least 1, not {top}")
    if threshold is not None and not threshold > 0:
        raise OnnxladyError(f"threshold must be positive, not {threshold}")
    if confirm and isinstance(suspect, ModelFingerprint):
        raise OnnxladyError("confirm needs the suspect model, not only its fingerprint")
    start = time.perf_counter()
    name, fingerprint = _suspect_fingerprint(suspect)
    with open_index(index_path) as connection:
        search_start = time.perf_counter()
        ids, matrix = search_matrix(connection)
        report = FindReport(name, str(index_path), int(ids.size), threshold)
        if ids.size:
            query = search_vector(fingerprint)
            coarse = _coarse_distances(matrix, query)
            keep = min(ids.size, max(CANDIDATES, 8 * top))
            nearest = np.argpartition(coarse, keep - 1)[:keep] if keep < ids.size else np.arange(ids.size)
            stored = read_fingerprints(connection, ids[nearest])
            ranked = []
            stored_layers: dict[str, int] = {}
            for model_id in ids[nearest]:
                path, other = stored[int(model_id)]
                match = compare_fingerprints(fingerprint, other)
                ranked.append((match.distance, path, match))
                stored_layers[path] = other.layers
            # A model none of whose layers pairs with the suspect's (no shape in common within the
            # window) holds no evidence either way: it ranks after every model that pairs at all,
            # whatever the distance (a pruned or noisy copy of a large trained layer can sit past
            # the 1.0 that a wholly unpaired model gets).
            ranked.sort(key=lambda item: (not item[2].weighed_pairs, item[0], item[1]))
            for rank, (distance, path, match) in enumerate(ranked[:top], start=1):
                limit = _threshold_of(match, threshold)
                reason = no_evidence(fingerprint.layers, stored_layers[path])
                call = "derived" if is_derived(match, limit, support=threshold is None) else "unrelated"
                report.candidates.append(
                    Candidate(
                        rank, path, distance, score_of(distance, limit), call if reason is None else UNKNOWN,
                        len(match.pairs), (len(match.unmatched_a), len(match.unmatched_b)), threshold=limit,
                        reason=reason,
                    )
                )  # fmt: skip
        report.search_seconds = time.perf_counter() - search_start
    if confirm and report.candidates:
        model = suspect if isinstance(suspect, onnx.ModelProto) else _load(os.fspath(suspect))  # type: ignore[arg-type]
        confirmed = []
        for candidate in report.candidates:
            if progress is not None:
                progress(f"find: auditing {candidate.path} against the suspect")
            # A candidate the fingerprint does not call derived is refused at resync's first pass
            # when its weights are unrelated (the audit would only refuse it minutes later).
            precheck = candidate.call != "derived"
            confirmed.append(_with_confirmation(candidate, _confirm(candidate.path, model, precheck)))
        report.candidates = confirmed
    report.seconds = time.perf_counter() - start
    return report


def _with_confirmation(candidate: Candidate, confirmation: Confirmation) -> Candidate:
    """The candidate with its audit, which now makes the call (see the module docstring)."""
    call = "unrelated" if confirmation.verdict == UNMATCHED else "derived"
    return Candidate(
        candidate.rank, candidate.path, candidate.distance, candidate.score, call,
        candidate.paired_layers, candidate.unpaired_layers, confirmation, candidate.threshold, "audit",
        candidate.reason,
    )  # fmt: skip


def no_evidence(suspect_layers: int, candidate_layers: int) -> str | None:
    """Why two fingerprints can be called neither derived nor unrelated, or None when they can.

    A model with no fingerprinted layer is 0 away from another such model and 1 from any
    other: no distance to it measures anything.
    """
    if suspect_layers and candidate_layers:
        return None
    if not suspect_layers and not candidate_layers:
        return "neither model has a fingerprinted layer"
    return f"the {'suspect' if not suspect_layers else 'candidate'} has no fingerprinted layer"


def _coarse_distances(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each row of ``matrix`` to ``query`` (float32 math)."""
    norms = np.einsum("ij,ij->i", matrix, matrix)
    return norms - 2.0 * (matrix @ query) + float(query @ query)


# -- all pairs --------------------------------------------------------------------------------
def find_all_pairs(
    index_path: str | os.PathLike[str],
    *,
    threshold: float | None = None,
) -> ClusterReport:
    """Every cluster of related models in an index.

    Pairs are compared exactly when they are among each other's :data:`_NEIGHBOURS` nearest
    search vectors or closer than a coarse cutoff; pairs within their threshold are joined into
    clusters (connected components).

    Args:
        index_path: the index.
        threshold: the largest distance of a "derived" pair; None: :func:`derived_threshold`
            of the pair's layer slots.

    Returns:
        The clusters, largest first (members sorted by path).

    Raises:
        OnnxladyError: the index is missing, not an index, or of a newer format.
    """
    if threshold is not None and not threshold > 0:
        raise OnnxladyError(f"threshold must be positive, not {threshold}")
    start = time.perf_counter()
    with open_index(index_path) as connection:
        ids, matrix = search_matrix(connection)
        report = ClusterReport(str(index_path), int(ids.size), threshold)
        candidates = _coarse_pairs(matrix)
        report.unfingerprinted = unfingerprinted_models(connection)
        stored = read_fingerprints(connection, ids[np.unique(np.array(list(candidates), dtype=np.int64).ravel())] if candidates else [])
    parent = list(range(ids.size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    related: list[tuple[int, int, float]] = []
    for i, j in sorted(candidates):
        match = compare_fingerprints(stored[int(ids[i])][1], stored[int(ids[j])][1])
        distance = match.distance
        if is_derived(match, _threshold_of(match, threshold), support=threshold is None):
            related.append((i, j, distance))
            parent[root(i)] = root(j)
    report.compared_pairs = len(candidates)
    groups: dict[int, list[int]] = {}
    for i, _, _ in related:
        groups.setdefault(root(i), [])
    for i in range(ids.size):
        if root(i) in groups:
            groups[root(i)].append(i)
    clusters = []
    for members in groups.values():
        inside = set(members)
        pairs = tuple(
            sorted(
                (min(stored[int(ids[i])][0], stored[int(ids[j])][0]), max(stored[int(ids[i])][0], stored[int(ids[j])][0]), d)
                for i, j, d in related
                if i in inside
            )
        )
        clusters.append(Cluster(tuple(sorted(stored[int(ids[i])][0] for i in members)), pairs))
    clusters.sort(key=lambda c: (-len(c.members), c.members))
    report.clusters = clusters
    report.seconds = time.perf_counter() - start
    return report


def _coarse_pairs(matrix: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (i < j) worth an exact comparison, by blocks of rows (memory stays bounded)."""
    count = matrix.shape[0]
    pairs: set[tuple[int, int]] = set()
    if count < 2:
        return pairs
    norms = np.einsum("ij,ij->i", matrix, matrix)
    neighbours = min(_NEIGHBOURS, count - 1)
    for begin in range(0, count, _BLOCK):
        block = matrix[begin : begin + _BLOCK]
        squared = norms[begin : begin + _BLOCK, None] - 2.0 * block @ matrix.T + norms[None, :]
        rows = np.arange(block.shape[0])
        squared[rows, begin + rows] = np.inf  # not with itself
        nearest = np.argpartition(squared, neighbours - 1, axis=1)[:, :neighbours]
        close_i, close_j = np.nonzero(squared < _COARSE_CUTOFF**2)
        for i, j in zip(np.repeat(rows, neighbours), nearest.ravel()):
            a, b = begin + int(i), int(j)
            pairs.add((min(a, b), max(a, b)))
        for i, j in zip(close_i, close_j):
            a, b = begin + int(i), int(j)
            pairs.add((min(a, b), max(a, b)))
    return pairs
