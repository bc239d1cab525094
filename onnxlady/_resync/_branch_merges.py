"""Parallel convolution branches re-parameterised into one convolution (RepVGG's deploy form).

RepVGG, MobileOne and ACNet train a block as parallel branches over one input whose outputs
are summed: a 3x3 convolution, a 1x1 one, an identity (a BatchNorm over the input itself).
Their deploy step writes the block as the one convolution it computes: each branch's BatchNorm
folded, the smaller kernels zero-padded to the centre of the largest, the identity a unit
kernel at the centre, weights and biases summed. The two graphs compute the same function, but
the deploy form has one layer where the trained form has two or three: the branches' sites stay
unpaired and the match refuses the pair as different models (held-out round 17, F7).

:func:`merge_branches` reads such a block as one site where the other model holds one
convolution in its place: the branch whose kernel is the largest is paired with it (by the
ordinary steps) and takes the other branches with it (``Site.branches``, ``Site.identity``), so
its weight and bias are read as the merged kernel and bias (:func:`merged_value`) and compared
with the other model's within a stated bound. Only where the structure proves the merge:

- every branch reads the same tensor, its output read only by the tree of ``Add`` nodes that
  sums the branches (nothing else reaches that sum);
- the convolutions are plain ``Conv`` nodes of one stride, dilation and group count, no
  ``auto_pad``, their kernels nested at the centre (each smaller by an even number, its pads
  smaller by half that times the dilation on both sides), none scaled after it;
- an identity branch (an inference BatchNormalization of the input) needs stride 1, as many
  output channels as input channels and a kernel with a centre; the input itself added with no
  BatchNorm is an ordinary residual (nothing unpaired then says the other model merged it);
- none of the other branches is paired with anything, and the counterpart of the paired branch
  is a convolution of the same shape, stride, dilation, group count and pads, with no
  BatchNorm of its own.

Anything else keeps the branches apart (and the refusal, when they do not pair).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._nchwc_forms import is_fused_sum
from onnxlady._resync._sites import Site
from onnxlady._resync._values import Approx, read_constant, widened

__all__ = ["absorbed_sites", "merge_branches", "merged_sums", "merged_value"]

_STANDARD = ("", "ai.onnx")
#: Relative rounding a converter's float32 re-parameterisation adds per term it sums or folds
#: (a few units in the last place), as for a folded BatchNorm.
_MERGE_ROUNDING = 2.0**-22
#: Most branches one sum may merge (MobileOne over-parameterises a block with a handful).
_MAX_BRANCHES = 8
#: Convolution operators whose attributes say where the kernel reads (the merged side's).
_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcConv", "QLinearConv", "ConvInteger"})


def _conv_geometry(node: onnx.NodeProto, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int, tuple[int, ...]] | None:
    """A convolution's strides, dilations, group count and pads (begin then end), defaults filled in; None with auto_pad."""
    auto_pad = node_attribute(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)) not in ("NOTSET", ""):
        return None
    strides = tuple(int(v) for v in node_attribute(node, "strides", [1] * rank))
    dilations = tuple(int(v) for v in node_attribute(node, "dilations", [1] * rank))
    pads = tuple(int(v) for v in node_attribute(node, "pads", [0] * (2 * rank)))
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return None
    return strides, dilations, int(node_attribute(node, "group", 1)), pads


def _plain_conv(graph: ModelGraph, site: Site) -> bool:
    """A plain ``Conv`` site whose weight and bias are read as stored or evaluated, with no step after it."""
    node = graph.nodes[site.node]
    weight = site.operand("weight")
    return (
        site.family == "conv" and node.op_type == "Conv" and (node.domain or "") in _STANDARD and weight is not None
        and not site.post and site.beyond is None and site.part == 0 and site.live and not site.branches
        and site.identity is None and not site.lone_batchnorm
        and not any(o.nbits or o.quantized or o.blocked or o.split is not None for o in site.operands)
    )  # fmt: skip


def _only_reader(graph: ModelGraph, name: str) -> tuple[int, int] | None:
    readers = graph.consumers.get(name, [])
    if len(readers) != 1 or name in graph.graph_outputs or readers[0][0] < 0:
        return None
    return readers[0]


def _is_add(graph: ModelGraph, index: int) -> bool:
    node = graph.nodes[index]
    return node.op_type == "Add" and (node.domain or "") in _STANDARD and len(node.input) == 2 and len(node.output) == 1


def _sum_leaves(graph: ModelGraph, start: str) -> list[tuple[str, int, int]] | None:
    """The tensors a tree of Adds sums, starting from one of them: ``(tensor, Add node, slot)`` each; None if no tree.

    Inner Adds count only where the tree alone reads them; the tree's top is the Add whose
    output is read otherwise.
    """
    reader = _only_reader(graph, start)
    if reader is None or not _is_add(graph, reader[0]):
        return None
    top = reader[0]
    while True:
        above = _only_reader(graph, graph.nodes[top].output[0])
        if above is None or not _is_add(graph, above[0]):
            break
        top = above[0]
    leaves: list[tuple[str, int, int]] = []
    pending = [top]
    while pending:
        index = pending.pop()
        for slot, name in enumerate(graph.nodes[index].input):
            produced = graph.producer.get(name)
            if produced is not None and produced[0] >= 0 and _is_add(graph, produced[0]) and _only_reader(graph, name) == (index, slot):
                pending.append(produced[0])
            else:
                leaves.append((name, index, slot))
        if len(leaves) > _MAX_BRANCHES:
            return None
    return leaves


def _identity_batchnorm(graph: ModelGraph, site: Site) -> bool:
    """A BatchNormalization of its own in inference mode (a generic site of its four vectors)."""
    node = graph.nodes[site.node]
    return (
        site.family == "other" and node.op_type == "BatchNormalization" and (node.domain or "") in _STANDARD
        and not int(node_attribute(node, "training_mode", 0)) and sum(1 for name in node.output if name) == 1
        and [o.slot for o in site.operands] == [1, 2, 3, 4] and site.live
    )  # fmt: skip


def _branches_of(
    graph: ModelGraph, sites: list[Site], number: int, paired: set[int], by_tail: dict[str, int]
) -> tuple[tuple[int, ...], tuple[int, int] | None] | None:
    """The unpaired branches summed with site ``number``'s convolution, and where an identity enters; None if unproven."""
    main = sites[number]
    output = graph.nodes[main.tail].output[0] if graph.nodes[main.tail].output else ""
    leaves = _sum_leaves(graph, output) if main.family == "conv" else None
    # Every leaf but the layer's own result must be an unpaired site's (most layers fail here).
    if leaves is None or not _plain_conv(graph, main) or any(
        name != output and by_tail.get(name, number) in paired for name, _, _ in leaves if by_tail
    ):
        return None
    main_node = graph.nodes[main.node]
    weight = main.operand("weight")
    assert weight is not None
    rank = len(weight.shape) - 2
    geometry = _conv_geometry(main_node, rank)
    if geometry is None or rank < 1:
        return None
    strides, dilations, group, pads = geometry
    source = main_node.input[0]
    if not by_tail:  # made once per model, where a layer's output is summed at all
        by_tail.update((graph.nodes[site.tail].output[0], n) for n, site in enumerate(sites) if graph.nodes[site.tail].output)
    branches: list[int] = []
    identity: tuple[int, int] | None = None
    for name, _, _ in leaves:
        if name == output:
            continue
        if name == source:
            # The input itself summed with a layer (``x + conv(x)``) is an ordinary residual:
            # nothing unpaired says the other model merged it (a quantizer rewrites its reads).
            return None
        other = by_tail.get(name)
        if other is None or other in paired or _only_reader(graph, name) is None:
            return None
        site = sites[other]
        if _identity_batchnorm(graph, site) and graph.nodes[site.node].input[0] == source and identity is None:
            if any(operand.size != weight.shape[0] for operand in site.operands):
                return None
            identity = (site.node, 0)
            continue
        if not _plain_conv(graph, site) or graph.nodes[site.node].input[0] != source:
            return None
        branch_weight = site.operand("weight")
        assert branch_weight is not None
        if not _nested(graph.nodes[site.node], branch_weight.shape, weight.shape, geometry):
            return None
        branches.append(other)
    if not branches and identity is None:
        return None
    if identity is not None:
        out_channels, per_group, *kernel = weight.shape
        if any(s != 1 for s in strides) or any(k % 2 == 0 for k in kernel) or out_channels % group:
            return None
        if per_group * group != out_channels:  # the identity maps output channel o to input channel o
            return None
        if any(pads[axis] != pads[axis + rank] or pads[axis] != (kernel[axis] - 1) // 2 * dilations[axis] for axis in range(rank)):
            return None
    return tuple(branches), identity


def _nested(node: onnx.NodeProto, shape: tuple[int, ...], main: tuple[int, ...], geometry: tuple[
        tuple[int, ...], tuple[int, ...], int, tuple[int, ...]]) -> bool:  # fmt: skip
    """Whether a branch convolution's kernel sits at the centre of the main one's, reading where it reads."""
    rank = len(main) - 2
    mine = _conv_geometry(node, rank)
    if mine is None or len(shape) != len(main) or shape[:2] != main[:2]:
        return False
    strides, dilations, group, pads = geometry
    if mine[0] != strides or mine[1] != dilations or mine[2] != group:
        return False
    for axis in range(rank):
        extra = main[2 + axis] - shape[2 + axis]
        if extra < 0 or extra % 2:
            return False
        inset = extra // 2 * dilations[axis]
        if mine[3][axis] != pads[axis] - inset or mine[3][axis + rank] != pads[axis + rank] - inset:
            return False
    return True


def _same_conv(graph: ModelGraph, site: Site, other_graph: ModelGraph, other: Site) -> bool:
    """Whether ``other`` is one convolution of ``site``'s shape and geometry, with no BatchNorm or step of its own."""
    node, theirs = graph.nodes[site.node], other_graph.nodes[other.node]
    weight = site.operand("weight")
    if (other.family != "conv" or other.token != site.token or other.batchnorm is not None or other.post or weight is None
            or other.branches or other.identity is not None or theirs.op_type not in _CONV_OPS):  # fmt: skip
        return False
    rank = len(weight.shape) - 2
    return _conv_geometry(node, rank) == _conv_geometry(theirs, rank) and not _summed_with_its_input(other_graph, other)


def _summed_with_its_input(graph: ModelGraph, site: Site) -> bool:
    """Whether a convolution's output is summed with something computed from its own input: no merged form.

    Its input itself, or what another operator reading that input computes, added to its output
    (``Add(Conv(x), x)``, kept as it is or fused into ``FusedConv``'s sum input), keeps a branch
    beside the kernel.
    """
    node = graph.nodes[site.node]
    if len(node.input) > 3 and node.input[3] and (node.op_type == "FusedConv" or is_fused_sum(graph, site.node, 3)):
        return True  # a residual fused in as a sum input (FusedConv's Z, an NCHWc Conv's Sum)
    source = node.input[0]
    tail = graph.nodes[site.tail].output
    leaves = _sum_leaves(graph, tail[0]) if tail else None
    for name, _, _ in leaves or []:
        if name == source:
            return True
        produced = graph.producer.get(name)
        if produced is not None and produced[0] >= 0 and produced[0] != site.tail and source in graph.nodes[produced[0]].input:
            return True
    return False


def merge_branches(
    reference: ModelGraph, suspect: ModelGraph, ref_sites: list[Site], sus_sites: list[Site], pairs: dict[int, int]
) -> None:
    """Read each proven block of parallel branches as one site where the other model holds one convolution there.

    The paired branch's site is rewritten in place (``ref_sites``/``sus_sites``) with the other
    branches (``Site.branches``) and the identity (``Site.identity``); see the module docstring.
    """
    back = {b: a for a, b in pairs.items()}
    for graph, sites, other_graph, other_sites, partner, paired in (
        (reference, ref_sites, suspect, sus_sites, pairs, set(pairs)),
        (suspect, sus_sites, reference, ref_sites, back, set(back)),
    ):
        by_tail: dict[str, int] = {}  # the site whose result each tensor is
        for number, counterpart in sorted(partner.items()):
            found = _branches_of(graph, sites, number, paired, by_tail)
            if found is None or not _same_conv(graph, sites[number], other_graph, other_sites[counterpart]):
                continue
            branches, identity = found
            sites[number] = replace(sites[number], branches=tuple(sites[n] for n in branches), identity=identity)


def absorbed_sites(sites: list[Site]) -> set[int]:
    """The numbers of the sites another site took in as its branches (convolutions and identity BatchNorms)."""
    keys = {branch.key for site in sites for branch in site.branches}
    keys |= {(site.identity[0], 0) for site in sites if site.identity is not None}
    return {number for number, site in enumerate(sites) if site.key in keys}


def merged_sums(graph: ModelGraph, sites: list[Site]) -> set[str]:
    """The outputs of the Adds that sum the branches of the merged sites: joins the other model's kernel holds.

    Such an Add is gone from the merged form, and a tool that keeps the largest branch's node
    (and its output) makes its readers read that branch: no branch is lost, its kernel holds the
    others' (compared merged), which :func:`~onnxlady._audit._bypassed_branches.bypassed_branches`
    must not report.
    """
    found: set[str] = set()
    for site in sites:
        if not (site.branches or site.identity is not None) or not graph.nodes[site.tail].output:
            continue
        reader = _only_reader(graph, graph.nodes[site.tail].output[0])
        pending = [reader[0]] if reader is not None and _is_add(graph, reader[0]) else []
        while pending:  # up to the top of the tree, then every Add below it
            index = pending.pop()
            found.add(graph.nodes[index].output[0])
            above = _only_reader(graph, graph.nodes[index].output[0])
            if above is not None and _is_add(graph, above[0]) and graph.nodes[above[0]].output[0] not in found:
                pending.append(above[0])
            for name in graph.nodes[index].input:
                produced = graph.producer.get(name)
                if produced is not None and produced[0] >= 0 and _is_add(graph, produced[0]) and name not in found:
                    pending.append(produced[0])
    return found


def merged_value(graph: ModelGraph, site: Site, role: str, own: Approx, parts: list[Approx]) -> Approx | None:
    """A merged site's weight or bias: its own (folded) plus each branch's padded to its kernel plus the identity.

    ``own`` and ``parts`` are the site's and its branches' values in canonical layout, each
    with its BatchNorm folded (``_site_value``). The bound is theirs summed, plus a float32
    rounding of every term (a converter folds and sums in float32).
    """
    own = widened(own)
    bounded = own.bounded
    value = own.value.copy()
    error = np.array(own.error, dtype=np.float64) if bounded else None
    magnitude = np.abs(own.value)
    for part in parts:
        part = widened(part)
        placed, placed_error = _padded(part.value, value.shape), _padded(np.asarray(part.error, dtype=np.float64), value.shape)
        if placed is None or placed_error is None:
            return None
        value += placed
        magnitude = magnitude + np.abs(placed)
        if error is not None:
            error += placed_error
    if site.identity is not None:
        found = _identity(graph, site, role, value.shape)
        if found is None:
            return None
        value += found.value
        magnitude = magnitude + np.abs(found.value)
        if error is not None:
            error += found.error
    if error is None:
        return Approx(value)
    return Approx(value, error + _MERGE_ROUNDING * magnitude)


def _padded(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A bias as it is, or a kernel zero-padded to ``shape`` at its centre."""
    array = np.broadcast_to(array, array.shape)
    if array.shape == shape:
        return np.array(array, dtype=np.float64)
    if array.ndim != len(shape) or array.shape[:2] != shape[:2]:
        return None
    out = np.zeros(shape)
    index = [slice(None), slice(None)] + [slice((big - small) // 2, (big - small) // 2 + small)
                                          for big, small in zip(shape[2:], array.shape[2:])]
    out[tuple(index)] = array
    return out


def _identity(graph: ModelGraph, site: Site, role: str, shape: tuple[int, ...]) -> Approx | None:
    """The identity branch as a convolution: a unit kernel at the centre with the BatchNorm over it folded, its bias."""
    assert site.identity is not None
    node = graph.nodes[site.identity[0]]
    channels = shape[0]
    read = [read_constant(graph, name) for name in node.input[1:5]]
    if node.op_type != "BatchNormalization" or any(part is None or part.value.size != channels for part in read):
        return None
    gamma, beta, mean, var = (widened(part) for part in read if part is not None)
    eps = float(node_attribute(node, "epsilon", 1e-5))
    root = np.sqrt(var.value.reshape(-1) + eps)
    scale = gamma.value.reshape(-1) / root
    scale_error = np.abs(gamma.error.reshape(-1)) / root + np.abs(gamma.value.reshape(-1)) * 0.5 * var.error.reshape(-1) / root**3
    scale_error = scale_error + _MERGE_ROUNDING * np.abs(scale)
    if role == "bias":
        shifted = mean.value.reshape(-1) * scale
        value = beta.value.reshape(-1) - shifted
        error = (beta.error.reshape(-1) + mean.error.reshape(-1) * np.abs(scale) + np.abs(mean.value.reshape(-1)) * scale_error
                 + _MERGE_ROUNDING * (np.abs(shifted) + np.abs(beta.value.reshape(-1))))  # fmt: skip
        return Approx(value, error)
    if role != "weight" or len(shape) < 3:
        return None
    per_group = shape[1]
    value, error = np.zeros(shape), np.zeros(shape)
    rows = np.arange(channels)
    # Output channel o reads input channel o: position o % per_group of its group, at the centre.
    index: tuple[np.ndarray | int, ...] = (rows, rows % per_group, *((k - 1) // 2 for k in shape[2:]))
    value[index] = scale
    error[index] = scale_error
    return Approx(value, error)
