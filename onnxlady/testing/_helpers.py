"""Helpers shared by the tests: copies of models, wrong permutations, tensor comparisons."""

from __future__ import annotations

import numpy as np
import onnx

# Lower layers only: importing the package ``onnxlady`` from here would close a cycle
# (onnxlady -> _api -> the demo model -> onnxlady.testing).
from onnxlady._analysis._channels import ChannelAnalysis, ChannelGroup, analyze
from onnxlady._io._files import copy_model
from onnxlady._io._tensors import tensor_holders
from onnxlady._transforms._key import PermutationKey
from onnxlady._transforms._permute import _permute_tensor, draw_permutations, permute_model

__all__ = [
    "PRODUCER_ROLES",
    "constant_bytes",
    "copy_model",
    "group_at",
    "index_maps",
    "permute_copy",
    "permute_producer_only",
]

PRODUCER_ROLES = ("conv weight", "conv-transpose weight", "gemm weight", "matmul weight", "embedding table")
#: How the Einsum rule names a weight axis it binds to the neurons the Einsum makes (the role
#: carries the letter: ``"einsum weight, letter 'f'"``; an input axis is ``"einsum weight (input features), ..."``).
_EINSUM_PRODUCER_ROLE = "einsum weight, letter "


def _is_producer_role(role: str) -> bool:
    return role in PRODUCER_ROLES or role.startswith(_EINSUM_PRODUCER_ROLE)


def constant_bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every constant tensor of the main graph, serialised (initializers and Constant nodes)."""
    return {name: tensor.SerializeToString() for name, tensor in tensor_holders(model).items()}


def permute_producer_only(model: onnx.ModelProto, analysis: ChannelAnalysis) -> str:
    """Permute the output rows of one producer weight and nothing else: a wrong permutation.

    Returns the tensor it changed. The producer chosen is the first whose group is permutable
    and that the model holds: a copy that permuting would untie from a shared constant does not
    exist in the model yet, so it is passed over. An Einsum weight with a neuron letter counts
    (its role names the letter: ``"einsum weight, letter 'f'"``).
    """
    holders = tensor_holders(model)
    for plan in analysis.tensors:
        if not any(_is_producer_role(role) for role in plan.roles) or plan.tensor not in holders:
            continue
        for axis, expr in plan.axes:
            groups = analysis.neuron_labels(expr)
            if any(analysis.group(gid).permutable and gid for gid in groups):
                size = holders[plan.tensor].dims[axis]
                swap = np.arange(size)
                swap[[0, size - 1]] = swap[[size - 1, 0]]
                _permute_tensor(holders[plan.tensor], [(axis, swap)])
                return plan.tensor
    raise AssertionError("no permutable producer weight found")


def permute_copy(
    source: onnx.ModelProto, seed: int
) -> tuple[onnx.ModelProto, ChannelAnalysis, dict[str, np.ndarray], PermutationKey]:
    """A copy of ``source`` with every permutable group permuted: (model, analysis, perms, key)."""
    model = copy_model(source)
    analysis = analyze(model)
    perms = draw_permutations(analysis, seed)
    key = permute_model(analysis, perms, seed=seed)
    return model, analysis, perms, key


def index_maps(analysis: ChannelAnalysis, tensor: str, axis: int) -> dict[str, str]:
    """Group id -> index map of every group member naming axis ``axis`` of ``tensor``.

    A test reads from it which group moves an axis, and how (``"p"``, ``"I_4 (x) p"``...).
    """
    return {
        group.id: member.index_map
        for group in analysis.groups
        for member in group.members
        if member.tensor == tensor and member.axis == axis
    }


def group_at(analysis: ChannelAnalysis, tensor: str, axis: int) -> ChannelGroup:
    """The one group that moves axis ``axis`` of ``tensor`` (an assertion error names any other count)."""
    found = index_maps(analysis, tensor, axis)
    assert len(found) == 1, f"{tensor} axis {axis}: {found}"
    return analysis.group(next(iter(found)))
