"""Tensors a twin suspect stores bit for bit as the reference's, yet out of the order the resync found.

The resync gives each group one order. A suspect whose one group is held in two orders (one
layer's attention heads swapped while a stacked KV cache ties the heads of every layer into one
group; held-out round 17, F6) is put in the order most of its tensors take: the others, which the
suspect stores exactly as the reference does, then differ from the reference after the resync.
Naming those as changed or re-ordered would be false: the suspect did not touch them. They are
named for what they are, with the tensors the suspect did move (see :func:`two_orders`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxlady._analysis._channels import ChannelAnalysis
from onnxlady._io._tensors import read_array, tensor_holders
from onnxlady._resync._solver import ResyncResult

__all__ = ["kept_in_place", "two_orders"]


def kept_in_place(suspect: onnx.ModelProto, reference: Mapping[str, np.ndarray], names: list[str]) -> list[str]:
    """The tensors of ``names`` the suspect stores, under the same name, bit for bit as the reference does."""
    holders = tensor_holders(suspect)
    kept = []
    for name in names:
        holder = holders.get(name)
        if holder is None or name not in reference:
            continue
        stored, values = read_array(holder, f"tensor '{name}' of the suspect"), reference[name]
        if stored.shape != values.shape or stored.dtype != values.dtype:
            continue
        head = min(values.size, 64)  # a moved or perturbed tensor differs there: not compared whole
        if np.array_equal(stored.reshape(-1)[:head], values.reshape(-1)[:head]) and np.array_equal(stored, values):
            kept.append(name)
    return kept


def two_orders(
    suspect: onnx.ModelProto, reference: Mapping[str, np.ndarray], analysis: ChannelAnalysis, result: ResyncResult,
    kept: list[str],
) -> tuple[str, list[str]]:
    """What to say of ``kept`` (see :func:`kept_in_place`), and the tensors the suspect moved instead.

    The moved tensors are those carrying a group the resync moved and ``kept`` carries, stored
    otherwise than the reference's: the suspect's change, where it is.
    """
    moved = {gid for gid, perm in result.key.permutations().items() if not np.array_equal(perm, np.arange(perm.size))}
    carried: dict[str, set[str]] = {}
    for plan in analysis.tensors:
        for _, expr in plan.axes:
            carried.setdefault(plan.source, set()).update(set(analysis.neuron_labels(expr)) & moved)
    groups = sorted(set().union(*(carried.get(name, set()) for name in kept)))
    others = sorted(name for name, held in carried.items() if held & set(groups) and name not in kept)
    changed = [name for name in others if name not in set(kept_in_place(suspect, reference, others))]
    listing = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
    shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
    text = (
        f"a group held in two orders: {len(kept)} tensors the suspect stores bit for bit as the reference's "
        f"({listing}) keep the reference's order of group{'s' if len(groups) != 1 else ''} {', '.join(groups)}, "
        f"which {len(changed)} of its other tensors ({shown}) hold re-ordered: a re-ordering outside the "
        "permutations onnxlady models (verify tells whether it keeps the function)"
    )
    return text, changed
