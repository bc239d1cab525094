"""What matching two models finds (:mod:`onnxlady._resync._match`), and the refusal of different models.

:class:`ModelMatch` holds the paired sites and groups, the unmatched groups with their reasons,
the divergences, the conversions and the confidence; :func:`check_same_model` refuses two models
whose confidence is below :data:`MATCH_THRESHOLD`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._errors import OnnxladyError
from onnxlady._resync._nchwc_forms import NCHWC, nchwc_block
from onnxlady._resync._sites import Site

__all__ = [
    "LAYER_ELEMENTS",
    "MATCH_THRESHOLD",
    "ConversionFinding",
    "GroupPair",
    "ModelMatch",
    "SitePair",
    "UnmatchedGroup",
    "check_same_model",
]

#: Below this confidence two models are different models, not conversions of one another
#: (:func:`check_same_model`). The confidence is the smallest of three shares (item 5 of
#: :mod:`onnxlady._resync._match`): weights, sites and connections paired. A converter keeps all three (a
#: permuted, converted copy pairs 100 %); two different architectures share a few layers of
#: common shapes and fewer of their connections.
MATCH_THRESHOLD = 0.9
#: Weights from which a layer only one model has makes them different models (smaller ones, a
#: constant 1x16 DFL kernel say, may be folded away by a simplifier). 256 let a rank-4 LoRA
#: adapter of a 32-wide layer (two 128-element MatMuls) be deleted unseen through a converter
#: that renames the tensors around it (held-out round 17, F2); on 1,400 held-out (reference,
#: derived) pairs no conversion leaves a live layer of 32 to 255 elements unpaired.
LAYER_ELEMENTS = 32


@dataclass(frozen=True)
class GroupPair:
    """A reference group and the suspect group holding the same neurons, and how they were paired.

    ``method``: ``structure`` when every site that paired them was paired by the aligned
    structure, ``content`` when one was paired on its weights' invariant signatures against
    (or without) the structure, ``order`` when one was left over by both and paired in order.
    ``margin``: the smallest content margin of those sites (1 - best / second-best signature
    distance; ``None`` when no site had a competitor); ``distance``: the largest signature
    distance of those sites (0 for a permuted copy, the storage error for a conversion).
    """

    reference: str
    suspect: str
    size: int
    permutable: bool  # in both models
    method: str = "structure"
    margin: float | None = None
    distance: float | None = None
    #: Both models hold the neurons alike (the same neuron at every paired position); False
    #: where the suspect holds them in groups of another structure (then ``suspect`` may list
    #: several ids, and the group is solved in the reference's form only).
    alike: bool = True


@dataclass(frozen=True)
class UnmatchedGroup:
    """A group with no counterpart, and why."""

    model: str  # "reference" or "suspect"
    group: str
    size: int
    reason: str


@dataclass(frozen=True)
class ConversionFinding:
    """A difference of form, not of function: what a converter did and on which side."""

    #: "float16", "bfloat16", "float64", "batchnorm-folded", "quantized", "opset", "renamed",
    #: "simplified", "fused", "reordered", "ort-optimized", "ort-transformer-optimized", "scale-folded",
    #: "gelu-approximated", "constants-folded", "branches-merged", "float16-as-float32"
    kind: str
    model: str  # the side that has the converted form: "reference" or "suspect"
    detail: str


@dataclass(frozen=True)
class SitePair:
    """Two sites holding the same weights, and how they were paired (see :class:`GroupPair`)."""

    reference: str
    suspect: str
    method: str
    margin: float | None
    distance: float | None


@dataclass
class ModelMatch:
    """How two models' sites and groups correspond."""

    reference: ChannelAnalysis
    suspect: ChannelAnalysis
    #: Paired sites: reference site key (node, part) -> suspect site key.
    sites: dict[tuple[int, int], tuple[int, int]]
    reference_sites: list[Site]
    suspect_sites: list[Site]
    groups: list[GroupPair]
    unmatched: list[UnmatchedGroup]
    divergences: list[str]
    conversions: list[ConversionFinding]
    #: Site counts on each side (what the alignment worked on).
    site_counts: tuple[int, int] = (0, 0)
    #: How much of both models pairs, 0 to 1 (see :data:`MATCH_THRESHOLD`).
    confidence: float = 0.0
    site_pairs: list[SitePair] = field(default_factory=list)
    #: Learned layers (a Conv/Gemm/MatMul's own weights, :data:`LAYER_ELEMENTS` or more) that
    #: only one model has: ``"reference: Gemm 'head' [100,192]"``. A converter fuses, folds,
    #: packs and quantizes layers but never adds or removes one, so any makes two models.
    unpaired_layers: list[str] = field(default_factory=list)
    #: The three shares the confidence is the smallest of: weights (elements) held by paired
    #: sites, sites paired, layer-to-layer connections both models have.
    shares: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _by_reference: dict[str, GroupPair] = field(default_factory=dict)
    _reference_by_key: dict[tuple[int, int], Site] = field(default_factory=dict)
    _suspect_by_key: dict[tuple[int, int], Site] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_reference = {pair.reference: pair for pair in self.groups}
        self._reference_by_key = {site.key: site for site in self.reference_sites}
        self._suspect_by_key = {site.key: site for site in self.suspect_sites}

    def suspect_group(self, reference_group: str) -> GroupPair | None:
        """The pairing of a reference group with its suspect group.

        Args:
            reference_group: a group id of the reference's analysis.

        Returns:
            The pair, or None when the reference group has no partner in the suspect.
        """
        return self._by_reference.get(reference_group)

    def reference_site(self, key: tuple[int, int]) -> Site:
        """The reference's site with key ``key``.

        Args:
            key: a site key, ``(node index, part)``, as :attr:`sites` holds them.

        Returns:
            The site.

        Raises:
            KeyError: the reference has no site with that key.
        """
        return self._reference_by_key[key]

    def suspect_site(self, key: tuple[int, int]) -> Site:
        """The suspect's site with key ``key``.

        Args:
            key: a site key, ``(node index, part)``, as :attr:`sites` holds them.

        Returns:
            The site.

        Raises:
            KeyError: the suspect has no site with that key.
        """
        return self._suspect_by_key[key]

    @property
    def same_model(self) -> bool:
        """Enough of both models pairs for them to be one model in two forms, and no learned layer is extra."""
        return self.confidence >= MATCH_THRESHOLD and not self.unpaired_layers

    @property
    def complete(self) -> bool:
        """Every permutable group of either model is paired and every site has its counterpart."""
        return not any(item.reason != "frozen in both models" for item in self.unmatched) and not self.divergences

    def to_dict(self) -> dict[str, Any]:
        """The match as JSON-ready data (``onnxlady match --json`` prints it beside the two paths).

        Returns:
            A dict of plain values: completeness, confidence, site counts, paired sites and groups,
            unmatched groups, divergences, learned layers only one model has and conversion findings.
        """
        return {
            "complete": self.complete,
            "confidence": round(self.confidence, 6),
            "threshold": MATCH_THRESHOLD,
            "same_model": self.same_model,
            "sites": {"reference": self.site_counts[0], "suspect": self.site_counts[1], "paired": len(self.sites)},
            "site_pairs": [asdict(pair) for pair in self.site_pairs],
            "groups": [asdict(pair) for pair in self.groups],
            "unmatched": [asdict(item) for item in self.unmatched],
            "divergences": list(self.divergences),
            "unpaired_layers": list(self.unpaired_layers),
            "conversions": [asdict(item) for item in self.conversions],
        }


def check_same_model(match: ModelMatch) -> None:
    """Refuse two models whose weights mostly do not pair: they are different models.

    Args:
        match: a pairing from :func:`onnxlady._resync._match.match_analyses`.

    Raises:
        OnnxladyError: the paired share is below :data:`MATCH_THRESHOLD` ("different models",
            with the share and the first divergence; a layout onnxlady does not read is named
            as the likely cause).
    """
    if match.same_model:
        return
    if match.confidence >= MATCH_THRESHOLD:  # they pair, but one has a learned layer the other lacks
        extra = match.unpaired_layers
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise OnnxladyError(
            f"different models: {100 * match.confidence:.1f} % of them pair, but a learned layer is only in one "
            f"of them, which no conversion does: {extra[0]}{more}"
        )
    where = match.divergences[0] if match.divergences else _no_divergence(match)
    more = f" (and {len(match.divergences) - 1} more places)" if len(match.divergences) > 1 else ""
    raise OnnxladyError(
        f"different models: {100 * match.confidence:.1f} % of them pair (weights, operators and their "
        f"connections), below the {100 * MATCH_THRESHOLD:.0f} % a conversion keeps; suspect differs from "
        f"reference beyond a conversion: {where}{more}" + _unread_layouts(match)
    )


def _no_divergence(match: ModelMatch) -> str:
    """What fell short where every weighing site found a counterpart: the smallest share, said plainly."""
    weights, sites, connections = match.shares
    if not match.sites:
        return "no weight of either model has a counterpart"
    if connections <= min(weights, sites):
        return (
            f"{len(match.sites)} of {max(match.site_counts)} weights pair, but only {100 * connections:.1f} % of "
            "the connections between paired layers (which layer feeds which) agree"
        )
    what = "weights (elements)" if weights <= sites else "weighing sites"
    return f"{len(match.sites)} weights pair, but they hold only {100 * min(weights, sites):.1f} % of both models' {what}"


def _unread_layouts(match: ModelMatch) -> str:
    """Why a conversion may look like another model: a weight layout onnxlady does not read."""
    for side, analysis in (("reference", match.reference), ("suspect", match.suspect)):
        blocked = sum(node.domain == NCHWC for node in analysis.graph.model.graph.node)
        if blocked:
            block = nchwc_block(analysis.graph)
            how = f"read in blocks of {block} channels" if block else "that no block size fits"
            return (
                f"; the {side} holds {blocked} nodes of ONNX Runtime's NCHWc layout (com.microsoft.nchwc, "
                f"written by the CPU optimizer at ORT_ENABLE_ALL), {how} (the model does not store the "
                "block size, 8 with AVX2 or 16 with AVX-512): compare a copy saved at ORT_ENABLE_EXTENDED"
            )
    return ""
