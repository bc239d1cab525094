"""Graph edits that keep every weight: an operator changed, inserted or removed.

The audit compares weights; a suspect whose weights are all the reference's (bit for bit, or
up to the neuron order) can still compute something else when its graph was edited: one
``Relu`` made an ``Abs``, a ``Sigmoid`` a ``HardSigmoid``, a residual ``Add`` a ``Sub``, a ``Neg``
inserted, a ``Gemm``'s ``alpha`` doubled (held-out round 10, finding F9: each was audited
``identical`` or ``permuted``, "functionally equivalent", while verify said NOT EQUIVALENT). It is
the cheapest tampering there is: a backdoor needs no weight changed.

For a node-for-node copy (the audit's ``identical`` and twin paths: permute, perturb, resync and
unpermute change constants only), every operator is compared with the reference's operator of
the same output name: its type, domain, attributes, and what it reads (constants count as
"a constant": untying renames them, and their values are the weights the audit compares). A
copy converted to another form (fused, renamed, another opset) is matched across conversions
instead, where operators legitimately change; it is not compared operator by operator, but the
operators a converter keeps keep their node names, and what they read is compared
(:func:`rewired_operators`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._fold import EVALUATE_LIMIT, constant_attribute_value, evaluate_node
from onnxlady._io._external import is_mapped, mapped_array

__all__ = ["folded_tensors", "graph_constants", "graph_edits", "rewired_operators"]

def _renamed_outputs(graph: onnx.GraphProto) -> dict[str, str]:
    """Graph outputs written by an ``Identity`` of a tensor nothing else reads, with the tensor they copy."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {value.name for value in graph.output}
    return {node.output[0]: node.input[0] for node in graph.node
            if node.op_type == "Identity" and len(node.input) == 1 and len(node.output) == 1
            and node.output[0] in outputs and node.input[0] not in outputs and readers.get(node.input[0], 0) == 1}


#: Below this share of operators found by output name in both graphs, the suspect is no
#: node-for-node copy and is not compared operator by operator.
_SAME_NAMES = 0.9
_CONSTANT = "<constant>"


#: Optional inputs that mean zeros when absent (slots by operator): a simplifier drops an
#: all-zero one (LSTM's initial states, a zero bias). Absent elsewhere means something else
#: (Clip without a bound, Resize without scales).
_ZERO_WHEN_ABSENT = {
    "Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,),
    "LSTM": (3, 5, 6, 7), "GRU": (3, 5), "RNN": (3, 5),
}  # fmt: skip
_ZEROS = "<zeros>"


def graph_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """The graph's constants by name, with their tensors where stored (None: a Constant of another kind)."""
    found: dict[str, onnx.TensorProto | None] = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            found[node.output[0]] = value
    return found


def _all_zeros(tensor: onnx.TensorProto | None) -> bool:
    if tensor is None:
        return False
    try:
        values = np.asarray(mapped_array(tensor)) if is_mapped(tensor) else numpy_helper.to_array(tensor)
    except (OnnxladyError, ValueError, TypeError):
        return False
    return values.dtype.kind in "fiub" and not np.any(values)


def _inputs(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto | None]) -> tuple[str, ...]:
    """What a node reads: activations by name, constants as one word, all-zero defaults as absent."""
    zero_slots = _ZERO_WHEN_ABSENT.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
    read: list[str] = []
    for slot, name in enumerate(node.input):
        if slot in zero_slots and (not name or (name in constants and _all_zeros(constants[name]))):
            read.append(_ZEROS)
        elif name in constants:
            read.append(_CONSTANT)
        else:
            read.append(name)
    while read and read[-1] in ("", _ZEROS):  # trailing absent inputs: written or not, the same
        read.pop()
    return tuple(read)


def _attribute(attribute: onnx.AttributeProto) -> str:
    if attribute.type == onnx.AttributeProto.TENSOR:
        # A tensor attribute's values are a constant's (ConstantOfShape's fill is compared whole).
        return f"{attribute.name}:tensor:{attribute.t.SerializeToString().hex()}"
    if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        # In any order: a simplifier sorts a body again (onnxslim); its operators are compared one by one.
        ops = ",".join(sorted(node.op_type for graph in graphs for node in graph.node))
        return f"{attribute.name}:graph:{ops}"
    return f"{attribute.name}:{attribute.SerializeToString().hex()}"


#: Operators whose output depends on their input's shape only: a constant folder with static
#: shapes replaces them (and what they feed) by stored constants.
_SHAPE_READERS = frozenset({"Shape", "Size"})


def folded_tensors(graph: onnx.GraphProto, constants: dict[str, onnx.TensorProto | None]) -> tuple[set[str], set[str]]:
    """Tensors a constant folder may store: computed from constants and shapes only; and of those, from constants alone.

    The second set (no ``Shape`` or ``Size`` among what they are computed from) holds values
    that are the same for every input: they can be computed here and compared.
    """
    known = set(constants)
    computed: set[str] = set()
    pure: set[str] = set()
    for node in graph.node:
        if node.op_type == "Constant" or node.op_type.startswith("Random") or any(a.type in (
            onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        outputs = [name for name in node.output if name]
        if node.op_type in _SHAPE_READERS or all(not name or name in known for name in node.input):
            computed.update(outputs)
            known.update(outputs)
            if node.op_type not in _SHAPE_READERS and all(not name or name not in computed or name in pure for name in node.input):
                pure.update(outputs)
    return computed, pure


class _Values:
    """Values of tensors computed from a graph's constants alone (:func:`~onnxlady._graph._fold.evaluate_node`)."""

    def __init__(self, model: onnx.ModelProto, constants: Mapping[str, onnx.TensorProto | None]) -> None:
        self.constants = constants
        self.producers = {name: node for node in model.graph.node for name in node.output if name}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.memo: dict[str, np.ndarray | None] = {}

    def __call__(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self.memo:
            return self.memo[name]
        value: np.ndarray | None = None
        node = self.producers.get(name)
        tensor = self.constants.get(name)
        if node is not None and node.op_type == "Constant":
            value = constant_attribute_value(node) if _element_count(tensor) <= EVALUATE_LIMIT else None
        elif tensor is not None:
            if _element_count(tensor) <= EVALUATE_LIMIT:
                value = np.asarray(mapped_array(tensor)) if is_mapped(tensor) else numpy_helper.to_array(tensor)
        elif node is not None and depth < 64:
            value = evaluate_node(node, [self(item, depth + 1) if item else None for item in node.input], self.opset)
        if value is not None:
            value = value.astype(np.float64) if value.dtype.kind == "f" else value
        self.memo[name] = value
        return value


class _Recipes:
    """How a tensor is computed from constants: operators, attributes and constant shapes, nested (not values)."""

    def __init__(self, model: onnx.ModelProto, constants: Mapping[str, onnx.TensorProto | None]) -> None:
        self.constants = constants
        self.producers = {name: node for node in model.graph.node for name in node.output if name}
        self.memo: dict[str, tuple[object, ...]] = {}

    def __call__(self, name: str, depth: int = 0) -> tuple[object, ...]:
        if name in self.memo:
            return self.memo[name]
        node = self.producers.get(name)
        tensor = self.constants.get(name)
        recipe: tuple[object, ...]
        if name in self.constants:
            # Values are the weight comparison's; a permuted copy moves them, its shapes stay.
            recipe = ("constant", tensor.data_type, tuple(tensor.dims)) if tensor is not None else ("constant",)
        elif node is None or depth >= 64:
            recipe = ("unknown", name)
        else:
            attributes = tuple(sorted(_attribute(a) for a in node.attribute))
            inputs = tuple(self(item, depth + 1) if item else () for item in node.input)
            recipe = (node.domain or "", node.op_type, attributes, list(node.output).index(name), inputs)
        self.memo[name] = recipe
        return recipe


def _element_count(tensor: onnx.TensorProto | None) -> int:
    return int(np.prod(tensor.dims)) if tensor is not None else 0


#: Relative difference of a sorted value beyond which a computed float constant differs (storage
#: rounding of the constants it is computed from, up to float16's).
_VALUE_RTOL = 1e-2


def _same_value(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two computed constants agree.

    Integers (shapes, indices, axes) exactly; real numbers up to their order (a permuted copy
    moves the weights they are computed from) and :data:`_VALUE_RTOL`.
    """
    if first.shape != second.shape or (first.dtype.kind == "f") != (second.dtype.kind == "f"):
        return False
    if first.dtype.kind != "f":
        return bool(np.array_equal(first, second))
    a, b = np.sort(first.ravel()), np.sort(second.ravel())
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return bool(np.all(np.abs(a - b) <= _VALUE_RTOL * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale))


def _operators(
    graph: onnx.GraphProto,
    outer: Mapping[str, onnx.TensorProto | None] | None = None,
    place: str = "",
) -> dict[str, tuple[onnx.NodeProto, tuple[object, ...]]]:
    """Each operator on computed tensors by its place and first output name, with what identifies its computation.

    Constants, and what is computed from constants and shapes only (which onnx-simplifier, ONNX
    Runtime and onnxslim fold into stored constants), are read as "a constant": folding is no edit.
    Operators inside subgraphs (``If`` branches, ``Loop`` and ``Scan`` bodies) are listed too,
    under the attribute that holds them, reading the outer graph's constants: branches swapped,
    or an operator in a branch rewired, compute something else (held-out round 12, F1).

    Args:
        graph: the graph.
        outer: the constants of the graphs enclosing it (a subgraph reads them by name).
        place: where the graph sits ("" for the main graph), prefixed to its operators' keys.
    """
    constants = dict(outer or {})
    constants.update(graph_constants(graph))
    folded, _ = folded_tensors(graph, constants)
    for name in folded:
        constants.setdefault(name, None)
    found: dict[str, tuple[onnx.NodeProto, tuple[object, ...]]] = {}
    for node in graph.node:
        if node.op_type == "Constant" or not node.output or node.output[0] in folded:
            continue
        inputs = _inputs(node, constants)
        attributes = tuple(sorted(_attribute(a) for a in node.attribute))
        found[place + node.output[0]] = (node, (node.domain or "", node.op_type, inputs, tuple(node.output), attributes))
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for position, subgraph in enumerate(subgraphs):
                inner = f"{place}{node.output[0]}/{attribute.name}/{position}/"
                found.update(_operators(subgraph, constants, inner))
    return found


def _function_operators(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, tuple[object, ...]]]:
    """The operators of the model's local functions, keyed by function.

    A function's body is shared by its call sites: one edit inside it (an ``Erf`` made a
    ``Tanh``, an epsilon changed) changes every call while the main graph stays untouched
    (held-out round 12, F2). Its inputs are activations; its ``Constant`` nodes are constants.
    """
    found: dict[str, tuple[onnx.NodeProto, tuple[object, ...]]] = {}
    for function in model.functions:
        body = onnx.GraphProto(node=function.node)
        place = f"function {function.domain}::{function.name}{'@' + function.overload if function.overload else ''}/"
        found.update(_operators(body, None, place))
        signature = (tuple(function.input), tuple(function.output), tuple(function.attribute),
                     tuple(a.SerializeToString().hex() for a in function.attribute_proto))
        # The signature as the "attributes": another signature reads "has other attributes".
        found[place] = (onnx.NodeProto(op_type="function", name=f"{function.domain}::{function.name}"),
                        ("", "function", (), (), signature))
    return found


def _all_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """The constants of a graph and of every subgraph in it, by name."""
    found = graph_constants(graph)
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                found.update(_all_constants(subgraph))
    return found


def _computed_reads(
    reference: onnx.ModelProto, suspect: onnx.ModelProto, *, by_recipe: bool = False
) -> Callable[[onnx.NodeProto, onnx.NodeProto], list[str]]:
    """A check of two operators of one output name: the inputs both compute from constants alone that differ in value.

    Folding reads what is computed from constants as "a constant" (:func:`_operators`), so a
    changed Reshape target computed by a ``Concat`` or ``Mul`` of constants, or the arithmetic
    itself edited, would pass. Where both models compute an input from constants alone, both
    values are computed and compared (:func:`_same_value`); what one model stores (folded) or
    computes from ``Shape`` (which depends on the input) is left as "a constant".

    A value too large to compute here, or computed by operators the evaluator lacks (a
    weight standardised in the graph by ``ReduceL2`` or a training-mode ``BatchNormalization``),
    is compared by its recipe instead when ``by_recipe`` (node-for-node copies, which fold
    nothing): the operators, attributes and constant shapes it is computed by (held-out round
    17, F4: a ``ReduceL2`` made ``ReduceL1`` in a weight-norm read ``identical``).
    """
    sides = []
    for model in (reference, suspect):
        constants = graph_constants(model.graph)
        _, pure = folded_tensors(model.graph, constants)
        sides.append((pure, _Values(model, constants), _Recipes(model, constants)))
    (ref_pure, ref_values, ref_recipes), (sus_pure, sus_values, sus_recipes) = sides

    def check(mine: onnx.NodeProto, theirs: onnx.NodeProto) -> list[str]:
        differing = []
        for slot, (first, second) in enumerate(zip(mine.input, theirs.input)):
            if first not in ref_pure or second not in sus_pure:
                continue
            ours, yours = ref_values(first), sus_values(second)
            if ours is not None and yours is not None:
                if not _same_value(ours, yours):
                    differing.append(f"input {slot} '{first}'")
            elif by_recipe and ref_recipes(first) != sus_recipes(second):
                differing.append(f"input {slot} '{first}', computed by other operators or attributes")
        return differing

    return check


def _rewired_reads(
    reference: onnx.ModelProto, suspect: onnx.ModelProto
) -> Callable[[onnx.NodeProto, onnx.NodeProto], list[str]]:
    """A check of two operators of one output name: the suspect's reads another of the reference's constants.

    Constants are read as "a constant" (:func:`_inputs`), since untying and converters rename
    them; but an operator that reads, under its name, a *different* constant of the reference
    (two layers swapping the weights they read: every constant still bit-identical, held-out
    round 11, F2) computes something else. A name the reference does not hold (an untied or
    renamed copy) is left to the weight comparison; two names of equal bytes (a simplifier's
    deduplication) are no edit.
    """
    ref_constants = _all_constants(reference.graph)
    sus_constants = _all_constants(suspect.graph)

    def same_bytes(first: str, second: str) -> bool:
        a, b = ref_constants[first], ref_constants[second]
        if a is None or b is None:
            return False
        try:
            ours = np.asarray(mapped_array(a)) if is_mapped(a) else numpy_helper.to_array(a)
            theirs = np.asarray(mapped_array(b)) if is_mapped(b) else numpy_helper.to_array(b)
        except (OnnxladyError, ValueError, TypeError):
            return False
        return ours.dtype == theirs.dtype and ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))

    def check(mine: onnx.NodeProto, theirs: onnx.NodeProto) -> list[str]:
        differing = []
        for slot, (first, second) in enumerate(zip(mine.input, theirs.input)):
            if first == second or first not in ref_constants or second not in sus_constants:
                continue
            if second in ref_constants and not same_bytes(first, second):
                differing.append(f"input {slot} reads '{second}' instead of '{first}'")
        return differing

    return check


def _first_output(node: onnx.NodeProto) -> str:
    return node.output[0] if node.output else ""


def _label(node: onnx.NodeProto, key: str) -> str:
    """An operator as the report names it, with the subgraph or function that holds it."""
    output = _first_output(node)
    place = key[: -len(output)].rstrip("/") if output and key != output and key.endswith(output) else ""
    return f"{node.op_type} '{node.name or output or key}'" + (f" (in {place})" if place else "")


#: Attributes a simplifier rewrites when it fuses a ``Pad`` into the operator that reads it.
_PAD_ATTRIBUTES = ("pads:", "auto_pad:")


def _changed_attributes(described: tuple[object, ...], other_described: tuple[object, ...]) -> set[str]:
    """The names of the attributes two operators' descriptions (:func:`_operators`) set differently."""
    ours, yours = set(described[4]), set(other_described[4])  # type: ignore[call-overload]
    return {item.split(":", 1)[0] for item in ours ^ yours}


def _simplified(
    mine: onnx.NodeProto, theirs: onnx.NodeProto, described: tuple[object, ...], other_described: tuple[object, ...],
    producers: tuple[dict[str, onnx.NodeProto], ...],
) -> bool:
    """Whether two operators of one output name differ as a simplifier leaves them (across forms only).

    onnx-simplifier and onnxslim drop an operator that computes nothing (a Slice of the whole
    tensor) and give its output name to the operator before it: another type under another
    node name. They fold a ``Pad`` into the Conv that reads it (its ``pads`` then differ), and
    simplify inside a ``Loop`` body (whose operators are compared on their own). Each was
    audited ``modified`` on the simplifier's own output. onnxoptimizer fuses two consecutive
    ``Transpose``s into the second, reading the first's input with the two ``perm`` composed
    (:func:`_fused_transposes`).
    """
    if described[:2] != other_described[:2]:  # the suspect's is the operator before the one dropped
        before = [producers[0].get(name) for name in mine.input if name]
        return bool(theirs.name) and any(
            item is not None and (item.name, item.op_type, item.domain) == (theirs.name, theirs.op_type, theirs.domain)
            for item in before)
    ours, yours = set(described[4]), set(other_described[4])  # type: ignore[call-overload]
    changed = {item.split(":", 1)[0] + ":" for item in ours ^ yours}
    graphs = {f"{a.name}:" for a in [*mine.attribute, *theirs.attribute]
              if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)}
    if changed <= graphs:
        return True
    padded = [
        item is not None and item.op_type == "Pad"
        for item in (producers[0].get(mine.input[0]) if mine.input else None,
                     producers[1].get(theirs.input[0]) if theirs.input else None)
    ]
    if changed == {"perm:"} and _fused_transposes(mine, theirs, producers[0]):
        return True
    return padded[0] != padded[1] and changed <= set(_PAD_ATTRIBUTES)  # one side reads the Pad the other folded


def _fused_transposes(mine: onnx.NodeProto, theirs: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether the suspect's ``Transpose`` is the reference's fused with the ``Transpose`` before it.

    ``Transpose(Transpose(x, p1), p2)`` is ``Transpose(x, q)`` with ``q[i] = p1[p2[i]]``: the
    suspect's reads the first one's input and its ``perm`` is that composition, the same function.
    """
    if (mine.op_type, theirs.op_type) != ("Transpose", "Transpose") or not mine.input or not theirs.input:
        return False
    first = producers.get(mine.input[0])
    if first is None or first.op_type != "Transpose" or not first.input or first.input[0] != theirs.input[0]:
        return False
    p1, p2, q = (list(node_attribute(node, "perm", []) or []) for node in (first, mine, theirs))
    if not p1 or len(p1) != len(p2) or len(q) != len(p2) or sorted(p2) != list(range(len(p2))):
        return False  # a default perm (reversed axes) needs the rank: not read here
    return q == [p1[axis] for axis in p2]


#: Arithmetic by a constant, and the constant that makes it do nothing.
_NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}


def _by_constant(
    node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto | None]
) -> tuple[str, np.ndarray] | None:
    """A standard ``Mul``/``Div``/``Add``/``Sub`` of one data input by one stored constant: (data input, constant's value).

    ``Div`` and ``Sub`` count only with the constant second (``x / c``, not ``c / x``).
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in _NEUTRAL or len(node.input) != 2:
        return None
    data = [name for name in node.input if name not in constants]
    constant = [name for name in node.input if name in constants]
    if len(data) != 1 or len(constant) != 1 or (node.op_type in ("Div", "Sub") and node.input[1] != constant[0]):
        return None
    tensor = constants[constant[0]]
    if tensor is None:
        return None
    try:
        return data[0], np.asarray(mapped_array(tensor)) if is_mapped(tensor) else numpy_helper.to_array(tensor)
    except (OnnxladyError, ValueError, TypeError):
        return None


def _neutral_input(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto | None]) -> str | None:
    """The data input of an operator that returns it unchanged (``Identity``, ``x * 1``, ``x + 0``), else None.

    Only a one-element constant counts: a larger one could broadcast the output to another shape.
    """
    if node.op_type in ("Identity", "Dropout") and node.domain in ("", "ai.onnx"):
        return node.input[0] if node.input and node.input[0] else None
    read = _by_constant(node, constants)
    if read is None:
        return None
    data, value = read
    neutral = value.size == 1 and value.dtype.kind == "f" and bool(np.all(value == _NEUTRAL[node.op_type]))
    return data if neutral else None


def _bypassed_arithmetic(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    ours: Mapping[str, tuple[onnx.NodeProto, tuple[object, ...]]],
    theirs: Mapping[str, tuple[onnx.NodeProto, tuple[object, ...]]],
) -> tuple[set[str], set[str]]:
    """The reference's arithmetic by a constant the suspect dropped, its readers reading its input instead.

    A simplifier drops a ``Mul`` by ones or an ``Add`` of zeros, or folds a scale into a
    neighbour (:func:`_holds`: the neighbour's constant then carries it). A ``Mul`` by 0.5 gone
    while the operators after it, kept under their names, read its input directly and hold
    nothing of it computes something else (held-out round 14: SegFormer's query scale deleted
    read ``converted``; so did a scale deleted before a MatMul whose weight was kept).
    Main-graph operators only.

    Returns:
        Those dropped with nothing holding them, and the attention operators whose ``scale``
        took one that was dropped (their changed ``scale`` is that factor's, no edit).
    """
    graph = reference.graph
    constants = graph_constants(graph)
    _, computed = folded_tensors(graph, dict(constants))
    held = set(constants) | computed  # a weight read through DequantizeLinear, a Transpose of one
    readers: dict[str, list[tuple[str, int]]] = {}
    for key, (node, _) in ours.items():
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((key, slot))
    values = (_Values(reference, constants), _Values(suspect, graph_constants(suspect.graph)))
    found: set[str] = set()
    scaled: set[str] = set()
    for key, (node, _) in ours.items():
        read = None if key in theirs else _by_constant(node, constants)
        if read is None:
            continue
        data, factor = read
        if factor.dtype.kind != "f" or np.all(factor == _NEUTRAL[node.op_type]):
            continue
        after = [(reader, slot) for reader, slot in readers.get(node.output[0], []) if reader in theirs]
        if not after or not all(slot < len(theirs[reader][0].input) and theirs[reader][0].input[slot] == data for reader, slot in after):
            continue
        step = (node.op_type, factor.astype(np.float64))
        holder = _holds(node.output[0], step, ours, theirs, readers, held, values)
        if holder is None:
            found.add(key)
        elif ours[holder][0].op_type in _ATTENDING:
            scaled.add(holder)
    return found, scaled


#: Operators that weigh their input with a constant: a factor on the input folds into it.
_WEIGHING = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMul", "Gemm", "MatMulInteger", "QLinearMatMul",
    "MatMulNBits", "FusedMatMul", "Einsum",
})  # fmt: skip
#: Normalizations that cancel a positive scalar factor on their input (a BatchNormalization's
#: fixed statistics do not: its constants must carry it, as a weighing operator's).
_NORMALIZING = frozenset({
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "SkipLayerNormalization",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
})  # fmt: skip
#: Of those, the ones that subtract the mean: they cancel a scalar shift too.
_CENTRING = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization", "SkipLayerNormalization"})
#: Attention operators: a factor on q may move into their ``scale``.
_ATTENDING = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
#: How far an attention's scale may be from the reference's times a dropped factor: float32 rounding, a float16 constant.
_SCALE_RTOL = 2.0**-10
#: The largest head size read from a scale (beyond it nearly any value is 1/sqrt of a whole number within rounding).
_MOST_HEAD = 512
#: Operators that move or relabel values without computing with them.
_SHAPE_ONLY = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast"})


def _holds(
    name: str,
    step: tuple[str, np.ndarray],
    ours: Mapping[str, tuple[onnx.NodeProto, tuple[object, ...]]],
    theirs: Mapping[str, tuple[onnx.NodeProto, tuple[object, ...]]],
    readers: Mapping[str, list[tuple[str, int]]],
    constants: set[str],
    values: tuple[_Values, _Values],
) -> str | None:
    """The reader of ``name``, past shape-only operators, that holds the dropped ``step`` (operator, constant), if any.

    On the evidence: a weighing operator (or a BatchNormalization) reading a constant holds it
    where the suspect's constant is the reference's times that factor (onnx-simplifier folds
    ``x * 0.5`` into the next Conv's weight), or, for a shift, differs from it; a normalization
    cancels a positive scalar factor (one that subtracts the mean, a scalar shift too); an
    attention operator holds it where its scale took it (:func:`_scale_holds`). A weight kept as
    it was holds nothing: the factor was deleted. A product of two activations holds none.
    """
    op, factor = step
    pending, seen = [name], set()
    while pending:
        tensor = pending.pop()
        for reader, _ in readers.get(tensor, []):
            node = ours[reader][0]
            if reader in seen:
                continue
            seen.add(reader)
            if node.op_type in _SHAPE_ONLY and node.output:
                pending.append(node.output[0])
            elif node.op_type in _ATTENDING:
                if reader in theirs and factor.size == 1 and _scale_holds(node, theirs[reader][0], op, factor):
                    return reader
            elif node.op_type in _NORMALIZING and factor.size == 1:
                if float(factor.reshape(-1)[0]) > 0.0 if op in ("Mul", "Div") else node.op_type in _CENTRING:
                    return reader
            elif (node.op_type in _WEIGHING or node.op_type == "BatchNormalization") and reader in theirs:
                other = theirs[reader][0]
                for slot, first in enumerate(node.input):
                    if first == tensor or first not in constants or slot >= len(other.input):
                        continue
                    mine, yours = _whole(values[0], first), _whole(values[1], other.input[slot])
                    if mine is not None and yours is not None and _carries(mine, yours, op, factor):
                        return reader
    return None


def _scale_holds(mine: onnx.NodeProto, yours: onnx.NodeProto, op: str, factor: np.ndarray) -> bool:
    """Whether the suspect's attention ``yours`` took a scalar factor dropped before the reference's ``mine`` in its scale.

    Its ``scale`` must be the reference's times the factor (divided by it, for a ``Div``). The
    reference's default (0: 1/sqrt(head size), a size neither node states) holds where the
    suspect's scale, the factor taken out, is 1/sqrt of a whole head size. A scale left as it
    was holds nothing: the factor was deleted (held-out round 14, F2; session 15).
    """
    value = float(factor.reshape(-1)[0])
    if op not in ("Mul", "Div") or not value or not math.isfinite(value):
        return False
    step = 1.0 / value if op == "Div" else value
    before, after = node_attribute(mine, "scale", 0.0), node_attribute(yours, "scale", 0.0)
    if not isinstance(before, float) or not isinstance(after, float) or not after:
        return False
    if before:  # set: the suspect's is it times the factor
        return math.isclose(after, before * step, rel_tol=_SCALE_RTOL)
    size = (step / after) ** 2  # the head size the reference's default would have used
    return 1.0 <= size <= _MOST_HEAD and abs(size - round(size)) <= min(0.1, _SCALE_RTOL * size)


def _whole(values: _Values, name: str) -> np.ndarray | None:
    """A constant's value, a stored one read whatever its size (one weight at a time: no cache)."""
    value = values(name)
    tensor = values.constants.get(name)
    if value is not None or tensor is None:
        return value
    try:
        read = np.asarray(mapped_array(tensor)) if is_mapped(tensor) else numpy_helper.to_array(tensor)
    except (OnnxladyError, ValueError, TypeError, OSError):
        return None
    return read.astype(np.float64) if read.dtype.kind == "f" else read


def _carries(mine: np.ndarray, yours: np.ndarray, op: str, factor: np.ndarray) -> bool:
    """Whether the suspect's constant ``yours`` is the reference's ``mine`` with the step folded in (in any order).

    A ``Mul`` or ``Div`` by a scalar: ``mine`` times (divided by) it, up to storage rounding and
    order (a permuted copy moves the weights). A vector has no such evidence here (a converter
    folding one into the next weight is caught by the resync, which compares that weight). A
    shift (``Add``, ``Sub``) folds into a bias through the weight: ``yours`` differs from
    ``mine``, and the resync compares what it holds.
    """
    if mine.shape != yours.shape or mine.dtype.kind != "f" or yours.dtype.kind != "f":
        return False
    if op in ("Add", "Sub"):
        return not _same_value(mine, yours)
    if factor.size != 1:
        return False
    scale = float(factor.reshape(-1)[0])
    return _same_value(mine * (1.0 / scale if op == "Div" else scale), yours)


def graph_edits(reference: onnx.ModelProto, suspect: onnx.ModelProto, *, node_for_node: bool = True) -> list[str]:
    """What differs between two node-for-node copies besides their constants, one line per operator.

    Args:
        reference: the reference model.
        suspect: the suspect.
        node_for_node: the suspect is a node-for-node copy (the audit's identical and twin
            paths): every operator is compared, inserted and removed ones included. Otherwise
            (matched across forms with no converter's signature) only operators found under the
            same output name in both with another type or other attributes count: a simplifier
            removes and rewires operators (a Mul by ones, a folded chain) but does not change
            what an operator it keeps computes.

    Returns:
        Empty when the graphs compute the same thing from their constants, or when the suspect is
        no node-for-node copy (other opsets, or fewer than 90 % of the operators found by output
        name): a conversion, compared across forms by the audit instead.
    """
    if {(o.domain or "ai.onnx", o.version) for o in reference.opset_import} != {
        (o.domain or "ai.onnx", o.version) for o in suspect.opset_import
    }:  # an import listed twice (onnx.compose.merge_models writes one per model) is one import
        return []
    ours = {**_operators(reference.graph), **_function_operators(reference)}
    theirs = {**_operators(suspect.graph), **_function_operators(suspect)}
    # Whether the suspect is a node-for-node copy is judged on the main graph's operators: an
    # edit inside a small model's branch would otherwise tip the share below the threshold.
    ours_main = [key for key, (node, _) in ours.items() if key == _first_output(node)]
    theirs_main = [key for key, (node, _) in theirs.items() if key == _first_output(node)]
    common = set(ours_main) & set(theirs_main)
    # A copy the audit already holds node for node is judged on the reference's operators only:
    # operators added to a small model must not tip it below the share and hide themselves.
    compared = len(ours_main) if node_for_node else max(len(ours_main), len(theirs_main))
    if not ours_main or len(common) < _SAME_NAMES * compared:
        return []
    computed = _computed_reads(reference, suspect, by_recipe=node_for_node)
    rewired = _rewired_reads(reference, suspect)
    producers = tuple({name: item for item in model.graph.node for name in item.output if name} for model in (reference, suspect))
    edits: list[str] = []
    bypassed, scaled = _bypassed_arithmetic(reference, suspect, ours, theirs) if not node_for_node else (set(), set())
    for key, (node, described) in ours.items():
        if key not in theirs:
            if node_for_node:
                edits.append(f"{_label(node, key)} removed")
            elif key in bypassed:
                edits.append(f"{_label(node, key)} removed: its readers read its input in the suspect")
            continue
        other, other_described = theirs[key]
        if described == other_described:
            differing = computed(node, other)
            if differing:
                edits.append(f"{_label(node, key)} reads other values computed from constants in the suspect ({', '.join(differing)})")
            swapped = rewired(node, other)
            if swapped:
                edits.append(f"{_label(node, key)} reads another of the reference's constants in the suspect ({', '.join(swapped)})")
            continue
        if not node_for_node and _simplified(node, other, described, other_described, producers):
            continue
        if key in scaled and _changed_attributes(described, other_described) == {"scale"}:
            continue  # the factor dropped before it, taken into its scale (checked by _scale_holds)
        if described[:2] != other_described[:2]:
            edits.append(f"{_label(node, key)} is {other.op_type} in the suspect")
        elif described[4] != other_described[4]:
            edits.append(f"{_label(node, key)} has other attributes in the suspect")
        elif node_for_node:
            edits.append(f"{_label(node, key)} reads or writes other tensors in the suspect")
    if not node_for_node:
        return edits
    # An Identity that only renames a graph output (onnx.compose.merge_models with a pass-through
    # model) computes nothing: the output is read as the tensor it copies.
    renamed, mine = _renamed_outputs(suspect.graph), _renamed_outputs(reference.graph)
    edits.extend(f"{_label(node, key)} inserted" for key, (node, _) in theirs.items()
                 if key not in ours and key not in renamed and key not in mine)
    # Outputs are read by name: listed in another order (as merge_models lists them) they are the
    # same; either model's output may be such an Identity's, or the tensor it copies.
    ref_outputs = [v.name for v in reference.graph.output]
    sus_outputs = [v.name for v in suspect.graph.output]
    ref_forms = {tuple(sorted(ref_outputs)), tuple(sorted(mine.get(name, name) for name in ref_outputs))}
    sus_forms = {tuple(sorted(sus_outputs)), tuple(sorted(renamed.get(name, name) for name in sus_outputs))}
    if [v.name for v in reference.graph.input] != [v.name for v in suspect.graph.input] or not ref_forms & sus_forms:
        edits.append("the graph's inputs or outputs differ")
    return edits


#: Below this share of the reference's operators found under their node name (with their type)
#: in a converted suspect, its wiring is said to be compared in part only (fused or renamed operators).
_WIRING_SHARE = 0.9
#: Beyond this many inputs read from other sources (and this share of those compared), node
#: names do not identify operators across the two models (a converter that renumbers them).
_RENAMED_EDGES = 8
_RENAMED_SHARE = 0.1
#: Operators a converter inserts to change a tensor's form, not what it holds (float16 with
#: ``keep_io_types``, a blocked operator kept in float32; an activation's QDQ pair): read
#: through where only one model has them.
_FORM_ONLY = frozenset({"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear"})


#: Operators that only move data: ONNX Runtime's transpose optimizer pushes a ``Transpose`` (and
#: what reshapes around it) past the operators that read it, which then read its input.
_LAYOUT = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"})


def _named_nodes(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The graph's operators by node name, names given once only."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    return {node.name: node for node in graph.node if node.name and counts[node.name] == 1 and node.op_type != "Constant"}


class _Sources:
    """Where a model's tensors come from: ``(node name, output slot)``, a graph input, or a constant."""

    def __init__(self, model: onnx.ModelProto, matched: set[str]) -> None:
        graph = model.graph
        self.producers = {name: (node, slot) for node in graph.node for slot, name in enumerate(node.output) if name}
        self.inputs = {value.name for value in graph.input}
        self.constants = set(graph_constants(graph))
        self.matched = matched

    def __call__(self, name: str) -> tuple[str, ...] | None:
        """The source of ``name`` through the Casts only this model has; None for constants and the unknown."""
        for _ in range(64):
            if name in self.constants or not name:
                return None
            produced = self.producers.get(name)
            if produced is None:
                return ("input", name) if name in self.inputs else None
            node, slot = produced
            if node.op_type in _FORM_ONLY and node.name not in self.matched and node.input:
                name = node.input[0]
                continue
            return ("node", node.name, str(slot), name)
        return None


def _upstream(
    producers: Mapping[str, onnx.NodeProto], start: str, removed: Callable[[onnx.NodeProto], bool]
) -> set[str]:
    """The operators (by name) and graph inputs reached from tensor ``start`` upstream through operators a converter removed."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [producers[start]] if start in producers else []
    while stack and len(seen) < 100_000:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in node.input:
            before = producers.get(name)
            if before is None:
                found.add(name)
            else:
                found.add(before.name)
                if removed(before):
                    stack.append(before)
    return found


def _value_numbers(model: onnx.ModelProto) -> dict[str, int]:
    """A number per tensor, equal for tensors computed alike (same operator, attributes and inputs' numbers).

    Converters merge operators that compute the same (ONNX Runtime's and the simplifiers'
    common subexpression elimination: two ``Shape`` of one tensor become one), so an operator
    may read another of the reference's operators that computes what its own did. Small
    constants are numbered by their bytes (a simplifier deduplicates them), others by name.
    """
    numbers: dict[object, int] = {}
    found: dict[str, int] = {}

    def number(key: object) -> int:
        return numbers.setdefault(key, len(numbers))

    for tensor in model.graph.initializer:
        if _element_count(tensor) <= EVALUATE_LIMIT and not tensor.external_data:
            unnamed = onnx.TensorProto()
            unnamed.CopyFrom(tensor)
            unnamed.ClearField("name")
            found[tensor.name] = number(("tensor", unnamed.SerializeToString()))
        else:
            found[tensor.name] = number(("tensor", tensor.name))
    for value in model.graph.input:
        found.setdefault(value.name, number(("input", value.name)))
    for node in model.graph.node:
        attributes = tuple(sorted(_attribute(a) for a in node.attribute))
        inputs = tuple(found.setdefault(name, number(("unknown", name))) if name else -1 for name in node.input)
        for slot, name in enumerate(node.output):
            if name:
                found[name] = number((node.domain or "", node.op_type, attributes, inputs, slot))
    return found


def _fused_sums(
    reference: onnx.ModelProto, ours: Mapping[str, onnx.NodeProto], theirs: Mapping[str, onnx.NodeProto]
) -> list[tuple[str, list[tuple[int, str, str]]]]:
    """Convolutions the suspect fused with the residual Add after them, with the inputs to compare.

    ONNX Runtime's ``ConvAddActivationFusion`` (``ORT_ENABLE_ALL``: the ORT-mobile converter)
    writes ``Add(Conv(x), z)`` as ``com.microsoft`` ``FusedConv(x, W, B, z)`` under the Conv's
    name. Its type differs, so it is not among the operators found in both; yet its data input
    reads what the Conv read and its sum input ``z`` what the Add's other input read (a BatchNorm
    between is folded). Returns ``(name, [(suspect slot, reference input, suspect input)])``.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in reference.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for name, fused in theirs.items():
        conv = ours.get(name)
        if (fused.op_type, fused.domain) != ("FusedConv", "com.microsoft") or len(fused.input) < 4 or not fused.input[3]:
            continue
        if conv is None or conv.op_type != "Conv" or (conv.domain or "") not in ("", "ai.onnx") or not conv.input:
            continue
        output = conv.output[0]
        after = readers.get(output, [])
        if len(after) == 1 and after[0].op_type == "BatchNormalization":
            output = after[0].output[0]
            after = readers.get(output, [])
        if len(after) != 1 or after[0].op_type != "Add" or list(after[0].input).count(output) != 1:
            continue
        other = next(tensor for tensor in after[0].input if tensor != output)
        found.append((name, [(0, conv.input[0], fused.input[0]), (3, other, fused.input[3])]))
    return found


def _wiring(
    reference: onnx.ModelProto,
    suspect: onnx.ModelProto,
    ours: Mapping[str, onnx.NodeProto],
    theirs: Mapping[str, onnx.NodeProto],
    common: set[str],
) -> Callable[[list[tuple[int, str, str]], set[str] | None, bool], tuple[int, list[tuple[int, str, str]]]]:
    """A check of what an operator reads in two models, each input traced to its source (:func:`rewired_operators`).

    ``ours`` and ``theirs``: each model's operators by node name; ``common``: the names found in
    both with one type. The reference's seat is the model with more operators (the converter
    removed some from the other): a fused model's sum input is compared in the plain model's
    terms, whichever of the two is audited.
    """
    ref_sources, sus_sources = _Sources(reference, common), _Sources(suspect, common)
    suspect_inputs = {value.name for value in suspect.graph.input}
    reference_inputs = {value.name for value in reference.graph.input}

    def known(source: tuple[str, ...]) -> bool:
        return source[1] in common if source[0] == "node" else source[1] in suspect_inputs and source[1] in reference_inputs

    numbers = _value_numbers(reference)

    def computed(source: tuple[str, ...], suspects: bool) -> int | None:
        """The reference's number for a source (the suspect's: its operator's output in the reference)."""
        if source[0] == "input":
            return numbers.get(source[1])
        if not suspects:
            return numbers.get(source[3])
        outputs = ours[source[1]].output if source[1] in ours else []
        slot = int(source[2])
        return numbers.get(outputs[slot]) if slot < len(outputs) else None

    def removed(node: onnx.NodeProto) -> bool:
        return node.name not in common or node.op_type in _FORM_ONLY or node.op_type in _LAYOUT

    def same(ref_source: tuple[str, ...], sus_source: tuple[str, ...]) -> bool:
        reached = computed(sus_source, True)
        return ref_source[:3] == sus_source[:3] or (reached is not None and reached == computed(ref_source, False))

    # Tensors computed from constants and shapes only (a shape's arithmetic) are a folder's to rewrite.
    shaped, _ = folded_tensors(reference.graph, graph_constants(reference.graph))
    ref_producers = {name: node for node in reference.graph.node for name in node.output if name}
    sus_producers = {name: node for node in suspect.graph.node for name in node.output if name}
    def moved(ref_source: tuple[str, ...], sus_source: tuple[str, ...]) -> bool:
        """Whether one source is upstream of the other through operators removed or that only move data.

        The reference's source gone from the suspect (a converter removed it, and maybe more), or
        a ``Transpose`` that ONNX Runtime's transpose optimizer pushed past its reader (which then
        reads the ``Transpose``'s input), either way round.
        """
        if removed(ref_producers[ref_source[3]]) and sus_source[1] in _upstream(ref_producers, ref_source[3], removed):
            return True
        if sus_source[0] != "node":
            return False
        later = ours[sus_source[1]]
        slot = int(sus_source[2])
        output = later.output[slot] if slot < len(later.output) else ""
        return (later.op_type in _LAYOUT or later.op_type in _FORM_ONLY) and ref_source[1] in _upstream(ref_producers, output, removed)

    def consistent(source: tuple[str, ...]) -> bool:
        """Whether a source found in both reads what it read: else its name was given to another operator."""
        if source[0] != "node":
            return True
        pairs = zip(ours[source[1]].input, theirs[source[1]].input)
        return all(first is None or second is None or not known(second) or same(first, second)
                   or (first[0] == "node" and moved(first, second))
                   for first, second in ((ref_sources(a), sus_sources(b)) for a, b in pairs))

    named = {id(node) for node in ours.values()}
    ref_constants = graph_constants(reference.graph)

    def by_tensor(source: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """A source only the suspect has (a fused operator), as the reference's operator of its output's name.

        Converters that fuse give the fused operator's output the name of the last one it
        replaces (onnxslim's Gemm and Reshape for MatMul, Add): a residual ``Add`` made to read
        a fused layer's output reads another of the reference's tensors.
        """
        if source is None or source[0] != "node" or known(source):
            return source
        produced = ref_producers.get(source[3])
        if produced is None or id(produced) not in named or produced.name in theirs:
            return source
        tensor = source[3]
        # A converter that drops an operator doing nothing (onnxslim: ``x * 1`` of a swish) gives
        # its output's name to the operator before it: the name then stands for that one's output.
        while (data := _neutral_input(produced, ref_constants)) is not None and data in ref_producers:
            tensor, produced = data, ref_producers[data]
        return ("node", produced.name, str(list(produced.output).index(tensor)), tensor)

    def layout(source: tuple[str, ...], producers: Mapping[str, onnx.NodeProto]) -> bool:
        """Whether a source is an operator that only moves data or changes its form (a converter pushes those past readers)."""
        node = producers.get(source[-1]) if source[0] == "node" else None
        return node is not None and (node.op_type in _LAYOUT or node.op_type in _FORM_ONLY)

    def compare(
        inputs: list[tuple[int, str, str]], kept: set[str] | None, fused_sum: bool = False
    ) -> tuple[int, list[tuple[int, str, str]]]:
        """Each ``(slot, reference input, suspect input)`` of one operator traced to its source.

        ``kept``: the suspect's tensors. Where the suspect still writes the reference's source
        tensor under its name but reads another one, the source is no operator a converter
        removed: the converter that fused it gave the fused operator its output's name (ONNX
        Runtime's FusedConv the residual Add's), and a reader of another tensor upstream was
        rewired (a residual made to skip a shortcut). What a fused convolution reads
        (``fused_sum``) is compared strictly; other readers unless either source only moves
        data or changes its form (a transpose optimizer pushes those past their readers).

        Returns:
            How many inputs were compared, and those read from another source:
            ``(slot, the suspect's source, the reference's source)``, quoted as the report names them.
        """
        compared, found = 0, []
        for slot, first, second in inputs:
            ref_source, sus_source = ref_sources(first), sus_sources(second)
            strict = kept is not None and ref_source is not None and sus_source is not None and (
                ref_source[-1] in kept and ref_source[-1] != sus_source[-1]) and (
                fused_sum or not (layout(ref_source, ref_producers) or layout(sus_source, sus_producers)))
            read = by_tensor(sus_source)
            fused, sus_source = read is not sus_source, read
            if ref_source is None or sus_source is None or not (fused or known(sus_source)) or first in shaped:
                continue
            compared += 1
            if same(ref_source, sus_source) or (not fused and not consistent(sus_source)):
                continue  # the same, or one of two operators computing the same merged by the converter
            if ref_source[0] == "node" and not strict and moved(ref_source, sus_source):
                continue
            shown = sus_source[1] if sus_source[0] == "node" else f"the graph input {sus_source[1]}"
            was = ref_source[1] if ref_source[0] == "node" else f"the graph input {ref_source[1]}"
            slot_text = f" output {sus_source[2]}" if sus_source[0] == "node" and sus_source[2] != "0" else ""
            found.append((slot, f"'{shown}'{slot_text}", f"'{was}'"))
        return compared, found

    return compare


def rewired_operators(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[list[str], str | None]:
    """The operators of a converted suspect that read another operator's output than the reference's, one line each.

    Converters fuse, fold and drop operators, and cast tensors; the operators they keep keep
    their node names (ONNX Runtime's optimizer, onnxslim, onnx-simplifier, float16 conversion),
    and each still reads what it read, or what an operator the converter removed read. An
    operator made to read another tensor (a residual ``Add`` reading the tensor before the
    previous residual, held-out round 13, F4) keeps every weight and every operator. Here each
    operator found under its node name and type in both models has each input traced to its
    source, through Casts only one model has: an operator found in both, or a graph input. A
    source the reference reads, or one it reaches upstream through operators the suspect no
    longer has, is no edit; another one found in both is. An upstream source while the suspect
    still writes the reference's source tensor under its name is an edit too: a converter that
    fuses gives the fused operator that output's name (a residual made to read a FusedConv's sum
    input rather than its output read ``converted``, both ways round). A source only the
    suspect has (a fused operator) is not compared. A FusedConv's inputs are compared with the
    plain Conv and residual Add they replace, whichever model is the fused one.

    Tensors computed from constants and shapes only are left out (a folder rewrites a shape's
    arithmetic), and so is a source whose own inputs disagree (its name given to another
    operator, as ONNX Runtime's transpose optimizer does).

    Returns:
        The lines, such as ``"Add 'Add_1' input 0 reads 'Gather_0' in the suspect, where the
        reference reads 'Add_0'"``; and a note where the wiring was compared in part or not at
        all (fewer than 90 % of the reference's computing operators found under their names, or
        names that do not follow the reference's), None where it was compared whole.
    """
    ours, theirs = _named_nodes(reference.graph), _named_nodes(suspect.graph)
    common = {name for name in set(ours) & set(theirs)
              if (ours[name].op_type, ours[name].domain or "") == (theirs[name].op_type, theirs[name].domain or "")}
    if not common:
        return [], "its wiring was not compared: no operator of the reference is found under its name in the suspect"
    compare = _wiring(reference, suspect, ours, theirs, common)
    lines: list[str] = []
    compared = 0
    order = {name: index for index, name in enumerate(ours)}
    # The suspect's tensors: a reference's source it still writes was no operator a converter removed.
    written = {output for node in suspect.graph.node for output in node.output if output}
    written |= {value.name for value in suspect.graph.input}
    for name in sorted(common, key=order.__getitem__):
        mine, other = ours[name], theirs[name]
        count, found = compare([(slot, *pair) for slot, pair in enumerate(zip(mine.input, other.input))], written, False)
        compared += count
        lines.extend(f"{mine.op_type} '{name}' input {slot} reads {shown} in the suspect, where the reference reads {was}"
                     for slot, shown, was in found)
    # The Add and activation fused with a convolution are gone, but what the reference's residual
    # read usually is not: a sum input reading a tensor upstream of it is an edit.
    for name, inputs in _fused_sums(reference, ours, theirs):
        count, found = compare(inputs, written, True)
        compared += count
        lines.extend(f"FusedConv '{name}' input {slot} reads {shown} in the suspect, where the reference reads {was}"
                     for slot, shown, was in found)
    # The other way round (the reference fused, the suspect plain): compared in the plain model's terms.
    unfused = _fused_sums(suspect, theirs, ours)
    if unfused:
        backward = _wiring(suspect, reference, theirs, ours, common)
        kept = {output for node in reference.graph.node for output in node.output if output}
        kept |= {value.name for value in reference.graph.input}
        for name, inputs in unfused:
            count, found = backward(inputs, kept, True)
            compared += count
            lines.extend(
                f"FusedConv '{name}' input {slot} reads {shown} in the reference, where the suspect's "
                f"{'residual Add after its Conv' if slot == 3 else 'Conv'} reads {was}"
                for slot, shown, was in found)
    if len(lines) > max(_RENAMED_EDGES, _RENAMED_SHARE * compared):
        # Edits are a few edges; this many is names reused for other operators (a converter renumbering them).
        return [], f"its wiring was not compared: the suspect's operator names do not follow the reference's ({len(lines)} of {compared} inputs differ)"
    # Shared by the operators that compute from activations: a folder stores the rest.
    folded, _ = folded_tensors(reference.graph, graph_constants(reference.graph))
    computing = {name for name, node in ours.items()
                 if node.op_type not in _FORM_ONLY and not all(output in folded for output in node.output if output)}
    share = len(common & computing) / max(len(computing), 1)
    return lines, None if share >= _WIRING_SHARE else (
        f"its wiring was compared only for the {share:.0%} of the reference's operators found under their names in the suspect")
