"""Constants an operator reads under a name the reference does not have: compared, never skipped.

The weight audit compares constants by name. An operator of a node-for-node copy that reads a
constant under a new name escaped it: a tied weight untied into a transposed copy (``Gemm`` g3
reading ``Wshared_T`` = ``Wshared``.T with ``transB`` kept, so computing ``r @ Wshared``) was
audited ``converted``, exit 0, comparing only the old name (held-out round 16, F3); a ``MatMul``
weight replaced by its transpose under a new name crashed the audit (F4).

Each such read is paired with the reference's operator of the same output name, slot by slot.
A constant the suspect no longer holds under its reference name (renamed) is given that name
back in a copy of the suspect, so that the audit compares its values in the layout the
operator reads them (its attributes are the reference's, else :func:`graph_edits` says so). A
new constant beside the one it replaces (untied) must hold the suspect's own values of that
one, bit for bit, or the operator computes something else.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnxlady._analysis._channels import COPY_SUFFIX
from onnxlady._audit._graph_edits import graph_constants
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import copy_model
from onnxlady._io._tensors import read_array

__all__ = ["renamed_constants"]


def _value(constants: Mapping[str, onnx.TensorProto | None], name: str) -> np.ndarray | None:
    tensor = constants.get(name)
    if tensor is None:
        return None
    try:
        return np.asarray(read_array(tensor, name))
    except (OnnxladyError, ValueError, TypeError):  # not read: not compared (no claim either way)
        return None


def _comparable(first: np.ndarray | None, second: np.ndarray | None) -> bool:
    """Both read, of one dtype and shape: a converter's re-layout or cast under a new name is left to the resync."""
    return first is not None and second is not None and first.dtype == second.dtype and first.shape == second.shape


def renamed_constants(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The suspect with renamed constants given their reference names, and the reads that differ.

    Args:
        reference: the reference model.
        suspect: the suspect (not changed).

    Returns:
        The suspect (a copy where a constant was renamed back, else itself) and, one line per
        operator, the constants it reads under a new name whose values are not what the
        reference's operator reads there (empty when every such read holds).
    """
    ours, theirs = reference.graph, suspect.graph
    ref_constants, sus_constants = graph_constants(ours), graph_constants(theirs)
    ref_nodes = {n.output[0]: n for n in ours.node if n.output and n.op_type != "Constant"}
    sus_nodes = {n.output[0]: n for n in theirs.node if n.output and n.op_type != "Constant"}
    common = set(ref_nodes) & set(sus_nodes)
    if not common or not len(common) == len(ref_nodes) == len(sus_nodes):
        return suspect, []  # no node-for-node copy: a conversion, which the resync matches across forms
    reads: dict[str, set[str]] = {}  # a new name -> the reference names read in its place
    readers: dict[str, list[str]] = {}
    for key in sorted(common):
        mine, yours = ref_nodes[key], sus_nodes[key]
        if (mine.domain, mine.op_type) != (yours.domain, yours.op_type):
            continue  # graph_edits names the operator
        if [i for i in mine.input if i not in ref_constants] != [i for i in yours.input if i not in sus_constants]:
            continue  # it reads other activations: graph_edits names it
        for old, new in zip(mine.input, yours.input):
            if new.split(COPY_SUFFIX)[0] == old:
                continue  # onnxlady's own untied copy, permuted on its own: the analysis pairs it
            if old != new and old in ref_constants and new in sus_constants and new not in ref_constants:
                reads.setdefault(new, set()).add(old)
                readers.setdefault(new, []).append(f"{yours.op_type} '{yours.name or key}'")
    if not reads:
        return suspect, []
    # A subgraph reads the outer graph's constants by name: renamed in the main graph only, it would dangle.
    nested = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in theirs.node for a in n.attribute
    )
    initializers = set() if nested else {t.name for t in theirs.initializer}
    renames: dict[str, str] = {}  # a new name -> the reference name it is given back
    found: list[str] = []
    for new, olds in sorted(reads.items()):
        value = _value(sus_constants, new)
        old = next(iter(olds))
        if (
            len(olds) == 1 and old not in sus_constants and old not in renames.values() and new in initializers
            and _comparable(value, _value(ref_constants, old))
        ):  # fmt: skip
            renames[new] = old  # renamed: its values compared by the audit under the old name
            continue
        # Untied (the old name kept beside it, or given back to another copy) or merged: the
        # suspect's own values of what it replaces, else (gone) the reference's.
        given = {o: n for n, o in renames.items()}
        replaced = [
            _value(sus_constants, o) if o in sus_constants else
            _value(sus_constants, given[o]) if o in given else _value(ref_constants, o)
            for o in olds
        ]  # fmt: skip
        if not all(_comparable(value, r) for r in replaced):
            continue  # another form (a cast, a reshape): no claim
        if all(np.asarray(value).tobytes() == np.asarray(r).tobytes() for r in replaced):
            continue
        listing = ", ".join(f"'{o}'" for o in sorted(olds))
        found.append(
            f"{readers[new][0]} reads '{new}' where the reference reads {listing}, with other values"
            + (f" (and {len(readers[new]) - 1} more)" if len(readers[new]) > 1 else "")
        )
    if not renames:
        return suspect, found
    copied = copy_model(suspect)
    for tensor in copied.graph.initializer:
        if tensor.name in renames:
            tensor.name = renames[tensor.name]
    for node in copied.graph.node:
        for slot, name in enumerate(node.input):
            if name in renames:
                node.input[slot] = renames[name]
    for value_info in list(copied.graph.input) + list(copied.graph.value_info):
        if value_info.name in renames:
            value_info.name = renames[value_info.name]
    return copied, found
