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
from onnx import numpy_helper

from onnxlady._analysis._channels import COPY_SUFFIX
from onnxlady._audit._graph_edits import graph_constants
from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
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


#: The flag of a ``Gemm`` input slot that says it is read transposed.
_TRANS_FLAGS = {0: "transA", 1: "transB"}


def _transposed_read(
    value: np.ndarray | None, replaced: np.ndarray | None, reads: list[tuple[onnx.NodeProto, onnx.NodeProto, int]]
) -> bool:
    """Whether every read of ``value`` is a Gemm reading the replaced matrix transposed, its flag flipped.

    ``Gemm(A, W.T, transB=0)`` computes ``Gemm(A, W, transB=1)``: a converter's re-layout of an
    untied copy (held-out round 16, F5), equivalent bit for bit, not an edit.
    """
    if value is None or replaced is None or value.ndim != 2 or value.dtype != replaced.dtype:
        return False
    if value.shape != replaced.shape[::-1] or value.tobytes() != np.ascontiguousarray(replaced.T).tobytes():
        return False
    return all(
        (mine.op_type, yours.op_type) == ("Gemm", "Gemm") and slot in _TRANS_FLAGS
        and int(node_attribute(yours, _TRANS_FLAGS[slot], 0)) == 1 - int(node_attribute(mine, _TRANS_FLAGS[slot], 0))
        for mine, yours, slot in reads
    )  # fmt: skip


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
    uses: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto, int]]] = {}  # (reference's node, suspect's, slot)
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
                uses.setdefault(new, []).append((mine, yours, list(yours.input).index(new)))
    if not reads:
        return suspect, []
    # A subgraph reads the outer graph's constants by name: renamed in the main graph only, it would dangle.
    nested = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in theirs.node for a in n.attribute
    )
    initializers = set() if nested else {t.name for t in theirs.initializer}
    graph_inputs = {value_info.name for value_info in theirs.input}
    renames: dict[str, str] = {}  # a new name -> the reference name it is given back
    relaid: dict[str, list[tuple[onnx.NodeProto, onnx.NodeProto, int]]] = {}
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
        if new in initializers and new not in graph_inputs and len(replaced) == 1 and _transposed_read(
            value, replaced[0], uses[new]
        ):
            relaid[new] = uses[new]  # the same operand, stored transposed and read with the flag flipped
            continue
        if not all(_comparable(value, r) for r in replaced):
            continue  # another form (a cast, a reshape): no claim
        if all(np.asarray(value).tobytes() == np.asarray(r).tobytes() for r in replaced):
            continue
        listing = ", ".join(f"'{o}'" for o in sorted(olds))
        found.append(
            f"{readers[new][0]} reads '{new}' where the reference reads {listing}, with other values"
            + (f" (and {len(readers[new]) - 1} more)" if len(readers[new]) > 1 else "")
        )
    if not renames and not relaid:
        return suspect, found
    copied = copy_model(suspect)
    for tensor in copied.graph.initializer:
        if tensor.name in relaid:  # back in the layout the reference's operator reads
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(read_array(tensor, tensor.name).T), tensor.name))
    stale = [info for info in copied.graph.value_info if info.name in relaid]  # its shape is transposed now
    for info in stale:
        copied.graph.value_info.remove(info)
    by_output = {node.output[0]: node for node in copied.graph.node if node.output}
    for mine, yours, slot in (read for reads_of in relaid.values() for read in reads_of):
        node, flag = by_output[yours.output[0]], _TRANS_FLAGS[slot]
        kept = [a for a in node.attribute if a.name != flag]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute(flag, int(node_attribute(mine, flag, 0)))])
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
