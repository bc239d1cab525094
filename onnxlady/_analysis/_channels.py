"""Channel analysis: from an ONNX model to the groups of neurons one permutation must move.

:func:`analyze` walks the graph in topological order and runs each operator's rule from the
registry; operators without a rule freeze what they touch. Spaces reaching a graph output
are frozen. The result lists every group with a stable id (``g0``, ``g1``... in the order the
graph first uses them), its members (weight slices and activations, with their index maps),
whether it is permutable and, if not, every reason, plus a plan for constants shared by uses
that need different permutations (each such use gets its own copy).
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxlady import _rules  # ruff: ignore[unused-import] - importing registers every rule
from onnxlady._analysis._control_flow import walk_control_flow
from onnxlady._analysis._state import StatePair, state_pairs
from onnxlady._graph._expr import (
    Atom,
    DirectSum,
    Expr,
    Fixed,
    FreezeReason,
    Grouped,
    GroupSolver,
    Interleave,
    Product,
    Transposed,
    canonical,
    describe,
    evaluate,
    labels,
)
from onnxlady._graph._functions import FunctionView, inlined_view
from onnxlady._graph._model_graph import ModelGraph, node_label
from onnxlady._io._collector import collector_paused
from onnxlady._io._node_table import NodeTable
from onnxlady._io._progress import advance, say
from onnxlady._rules._context import (
    AnalysisState,
    Binding,
    JointSpace,
    RuleContext,
    RuleDoesNotApply,
    freeze_partial_derived,
    materialize_joint,
)
from onnxlady._rules._registry import OpRule, rule_for

#: Operators whose output neurons are the "producer neurons" counted by ``inspect``.
PRODUCER_OPS = (
    "Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    # ONNX Runtime's contrib forms of the same layers (com.microsoft; Attention: its packed QKV weight).
    "FusedConv", "FusedGemm", "FusedMatMul", "MatMulNBits", "Attention", "NhwcConv",
    # Einsum: the neurons its constant operands make (letters only they and the output have).
    "Einsum",
    # Recurrent layers: their hidden units (DynamicQuantizeLSTM: quantize_dynamic's LSTM).
    "LSTM", "GRU", "RNN", "DynamicQuantizeLSTM",
)  # fmt: skip
COPY_SUFFIX = ".onnxlady_copy"


@dataclass(frozen=True, init=False)
class GroupMember:
    """One channel space in a group: a weight slice or an activation."""

    tensor: str
    axis: int
    role: str
    node: str
    index_map: str
    is_weight: bool

    # Several per node: filled directly, at half the cost of the generated frozen __init__
    # (item by item: a keyword dict for ``update`` costs a third more).
    def __init__(self, tensor: str, axis: int, role: str, node: str, index_map: str, is_weight: bool) -> None:
        fields = self.__dict__
        fields["tensor"] = tensor
        fields["axis"] = axis
        fields["role"] = role
        fields["node"] = node
        fields["index_map"] = index_map
        fields["is_weight"] = is_weight


@dataclass(frozen=True)
class ChannelGroup:
    """Neurons that must take one permutation."""

    id: str
    root: int
    size: int
    frozen: bool
    reasons: tuple[FreezeReason, ...]
    members: tuple[GroupMember, ...]

    @property
    def permutable(self) -> bool:
        """A non-identity permutation exists: not frozen and at least two neurons."""
        return not self.frozen and self.size > 1


@dataclass(frozen=True, init=False)
class TensorPermutation:
    """One constant tensor (after untying) and the permutation of each of its axes."""

    tensor: str  # name in the permuted model (a copy's name for untied uses)
    source: str  # leaf name in the source model
    copy: int  # 0: the source tensor itself; k: its k-th copy
    uses: tuple[tuple[int, int], ...]  # (node index, input slot) in the source model
    axes: tuple[tuple[int, Expr], ...]  # axis -> permutation, non-identity ones only
    roles: tuple[str, ...]

    # One per weight: filled directly, at half the cost of the generated frozen __init__.
    def __init__(
        self,
        tensor: str,
        source: str,
        copy: int,
        uses: tuple[tuple[int, int], ...],
        axes: tuple[tuple[int, Expr], ...],
        roles: tuple[str, ...],
    ) -> None:
        fields = self.__dict__
        fields["tensor"] = tensor
        fields["source"] = source
        fields["copy"] = copy
        fields["uses"] = uses
        fields["axes"] = axes
        fields["roles"] = roles


class _PermsByRoot(Mapping[int, np.ndarray]):
    """Group permutations given by group id, read by group root (as ``evaluate`` reads them).

    The mapping ``{group.root: np.asarray(perms[group.id])}`` over the groups ``perms`` names,
    with each entry made when it is looked up.
    """

    __slots__ = ("_by_root", "_perms")

    def __init__(self, by_root: Mapping[int, ChannelGroup], perms: Mapping[str, np.ndarray]) -> None:
        self._by_root = by_root
        self._perms = perms

    def __getitem__(self, root: int) -> np.ndarray:
        group = self._by_root.get(root)
        if group is None or group.id not in self._perms:
            raise KeyError(root)
        return np.asarray(self._perms[group.id])

    def get(self, root: int, default: np.ndarray | None = None) -> np.ndarray | None:  # type: ignore[override]
        # (Mapping's get raises and catches a KeyError per miss: most atoms of a plan have no entry)
        group = self._by_root.get(root)
        if group is None or group.id not in self._perms:
            return default
        return np.asarray(self._perms[group.id])

    def __iter__(self) -> Iterator[int]:
        return (root for root, group in self._by_root.items() if group.id in self._perms)

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class ChannelAnalysis:
    """Everything ``inspect`` reports and ``permute`` needs."""

    graph: ModelGraph
    state: AnalysisState
    groups: list[ChannelGroup]
    tensors: list[TensorPermutation]
    producers: list[tuple[str, str, Expr]]  # (node label, op type, output neurons)
    #: KV-cache pairs treated as permutable state (``analyze(kv_state=True)``); empty otherwise.
    states: list[StatePair] = field(default_factory=list)
    #: The model as given when the graph is an inlined view of its local functions (else None).
    source_model: onnx.ModelProto | None = None
    _by_id: dict[str, ChannelGroup] = field(default_factory=dict)
    _by_root: dict[int, ChannelGroup] = field(default_factory=dict)
    _block_orders: dict[str, tuple[str, ...]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id = {group.id: group for group in self.groups}
        self._by_root = {group.root: group for group in self.groups}

    @property
    def model(self) -> onnx.ModelProto:
        """The model the permutations are written into: the one analysed, never an inlined view of it."""
        return self.source_model if self.source_model is not None else self.graph.model

    @property
    def solver(self) -> GroupSolver:
        """The union-find solver the analysis ran; expressions resolve against it."""
        return self.state.solver

    def group(self, group_id: str) -> ChannelGroup:
        """The group with id ``group_id``.

        Args:
            group_id: a group id as the analysis names it (``"g0"``...).

        Returns:
            The group.

        Raises:
            KeyError: no group has that id.
        """
        return self._by_id[group_id]

    def group_of_root(self, root: int) -> ChannelGroup | None:
        """The group of an atom of the solver.

        Args:
            root: an atom id (resolved to its current root first).

        Returns:
            The group whose root the atom resolves to, or None when it belongs to no group.
        """
        return self._by_root.get(self.solver.find(root))

    @property
    def permutable_groups(self) -> list[ChannelGroup]:
        """The groups that can take a permutation other than the identity, in group order."""
        return [group for group in self.groups if group.permutable]

    def index_array(self, expr: Expr, perms: Mapping[str, np.ndarray]) -> np.ndarray:
        """Indices ``idx`` such that ``new = take(old, idx, axis)`` for group permutations by id.

        Args:
            expr: the index map of one tensor axis (a plan's or a member's expression).
            perms: group id -> permutation; groups left out keep the identity.

        Returns:
            The int64 gather indices along that axis.
        """
        # Only the groups ``expr`` holds are looked up: a dict of every group's permutation per
        # call made permuting a model quadratic in its size (a tensor per layer, a group per layer).
        return evaluate(self.solver, expr, _PermsByRoot(self._by_root, perms))

    def block_orders(self) -> dict[str, tuple[str, ...]]:
        """Groups that move whole blocks each holding its own order (``p (x) {q_g}``: GroupNorm's groups).

        Returns:
            Outer group id -> the group id of each source block's own order, block by block:
            the inner orders sit where the source holds its blocks, so they are matched after
            the outer group (and swapped with the blocks when the outer group changes).
        """
        if self._block_orders is not None:
            return self._block_orders
        found: dict[str, tuple[str, ...]] = {}
        for plan in self.tensors:
            for _, expr in plan.axes:
                for node in _grouped_nodes(self.solver.resolve(expr)):
                    outer = self.group_of_root(node.outer.id) if isinstance(node.outer, Atom) else None
                    inners = [self.group_of_root(i.id) if isinstance(i, Atom) else None for i in node.inners]
                    if outer is not None and all(inner is not None for inner in inners):
                        found[outer.id] = tuple(inner.id for inner in inners if inner is not None)
        self._block_orders = found
        return found

    def perms_from_match(self, match: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The group permutations (as :meth:`index_array` and ``permute_model`` take them) a resync's matches make.

        A match re-orders each group where the suspect holds it, one group at a time; a block's own
        order of ``p (x) {q_g}`` is matched where the block sits once ``p`` is aligned, whereas a
        permutation names each block's order by the block it orders: the order matched at
        position ``g`` belongs to the block ``p`` brings there.
        """
        perms = dict(match)
        for outer, inners in self.block_orders().items():
            step = match.get(outer)
            if step is not None:
                orders = [self._order_of(match, inner) for inner in inners]
                for position, order in enumerate(orders):
                    perms[inners[int(step[position])]] = order
        return perms

    def inverse_perms(self, perms: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Group permutations whose index maps undo those of ``perms`` (``argsort`` of each, blocks' orders re-named).

        Block ``b`` of the undone order is block ``p[b]`` of the permuted one: its order is the
        inverse of the order of that block.
        """
        inverse = {gid: np.argsort(np.asarray(perm)) for gid, perm in perms.items()}
        for outer, inners in self.block_orders().items():
            outer_perm = perms.get(outer)
            if outer_perm is not None:
                for block, inner in enumerate(inners):
                    inverse[inner] = np.argsort(self._order_of(perms, inners[int(outer_perm[block])]))
        return inverse

    def _order_of(self, perms: Mapping[str, np.ndarray], gid: str) -> np.ndarray:
        found = perms.get(gid)
        return np.asarray(found) if found is not None else np.arange(self.group(gid).size, dtype=np.int64)

    def neuron_labels(self, expr: Expr) -> dict[str, np.ndarray]:
        """For each group in ``expr`` (by id): which of its neurons governs each index (-1: none).

        Args:
            expr: the index map of one tensor axis.

        Returns:
            Group id -> an array as long as the axis, holding the group's neuron at each index.
        """
        result = {}
        for root, lab in labels(self.solver, expr).items():
            group = self.group_of_root(root)
            if group is not None:
                result[group.id] = lab
        return result

    @collector_paused  # its per-tensor table lives until it returns: no collections over it
    def group_edges(self) -> dict[tuple[str, str], set[str]]:
        """The group graph: which groups each operator type connects.

        (a, b) when an operator reads group a's neurons and writes group b's, with the operator types
        that do (for ``inspect --dot`` and the audit report).
        """
        edges: dict[tuple[str, str], set[str]] = {}
        graph, state = self.graph, self.state
        # Each tensor's groups, found once: a tensor is one node's output and others' input.
        # Only tensors carrying a space have any (weights and untracked activations: none).
        groups_of: dict[str, tuple[str, ...]] = {}
        solver, by_root = self.solver, self._by_root
        find, definitions = solver.find, solver._definition
        tracked, joint = state.tracked, state.joint
        # One tuple per group, shared by every tensor of that group alone (most): not one per tensor.
        alone: dict[int, tuple[str, ...]] = {}
        for name in (*tracked, *joint) if joint else tracked:
            if name in groups_of:
                continue
            spaces = tracked.get(name)
            if spaces and len(spaces) == 1 and name not in joint:
                # One space (most activations): its group found without _groups_in's set.
                (expr,) = spaces.values()
                root: int | None
                if type(expr) is not Atom or (root := find(expr.id)) in definitions:
                    # (Else an undivided group: its root is what resolve would give, without the Atom it makes.)
                    resolved = solver.resolve(expr)
                    root = resolved.id if type(resolved) is Atom else None  # type: ignore[union-attr]  # (a root already)
                if root is not None:
                    found_one = alone.get(root)
                    if found_one is None:
                        group = by_root.get(root)
                        if group is None:
                            continue
                        found_one = alone[root] = (group.id,)
                    groups_of[name] = found_one
                    continue
            found = tuple(self._groups_in(self._spaces_of(name)))
            if found:
                groups_of[name] = found
        # Only a node writing some group can start an edge: those nodes, in the graph's order.
        producer = graph.producer
        writers = sorted({produced[0] for name in groups_of if (produced := producer.get(name)) is not None})

        def carried(names: Iterable[str]) -> set[str]:
            found: set[str] = set()
            for name in names:
                groups = groups_of.get(name)
                if groups:
                    found.update(groups)
            return found

        node_inputs, node_outputs, node_ops = graph._node_inputs, graph._node_outputs, graph._node_ops
        for index in writers:
            names = node_outputs[index]  # (output_names and input_names, without their calls)
            if len(names) == 1:  # (most nodes: one output, one group, read from one input)
                outs_of = groups_of.get(names[0])
                if outs_of is None:
                    continue
                if len(outs_of) == 1:
                    for name in node_inputs[index]:
                        read = groups_of.get(name)
                        if read and read != outs_of:
                            break
                    else:  # nothing read, or only the written group: no edge (a group to itself is none)
                        continue
            ins = carried(node_inputs[index])
            outs = carried(names) if ins else None
            if not outs:
                continue
            op_type = node_ops[index][0]
            for a in ins:
                for b in outs - {a}:
                    edges.setdefault((a, b), set()).add(op_type)
        return edges

    def _spaces_of(self, name: str) -> list[Expr]:
        """Every permutation a tensor carries: per axis, and over axes taken together."""
        state = self.state
        return [*state.tracked.get(name, {}).values(), *(space.expr for space in state.joint.get(name, []))]

    def _groups_in(self, exprs: Iterable[Expr]) -> set[str]:
        found = set()
        for expr in exprs:
            for atom in self.solver.atoms(expr):
                group = self.group_of_root(atom.id)
                if group is not None:
                    found.add(group.id)
        return found

    def state_spaces(self) -> list[tuple[StatePair, dict[int, Expr]]]:
        """Each KV-cache state pair with the permutation of each axis it takes (moving axes only).

        Returns:
            (pair, axis -> expression) for every pair of :attr:`states`, in their order; the
            expressions hold for the past input and the present output alike.
        """
        result = []
        for pair in self.states:
            axes = {}
            for axis, expr in sorted(self.state.tracked.get(pair.input, {}).items()):
                resolved = self.solver.resolve(expr)
                groups = [self.group_of_root(atom.id) for atom in self.solver.atoms(resolved)]
                if any(group is not None and group.permutable for group in groups):
                    axes[axis] = resolved
            result.append((pair, axes))
        return result

    @property
    def closed_subgraphs(self) -> list[str]:
        """One line per If/Loop/Scan node whose bodies were not analysed, naming it and saying why.

        Nothing inside such a body is permuted, and what the node reads or returns is frozen
        (the groups' reasons name it); where a whole network sits in such a body, these lines
        are the only reason there is for finding nothing to permute.
        """
        nodes = self.graph.nodes
        return [
            f"{nodes[index].op_type} '{node_label(nodes[index], index)}': {why}"
            for index, why in sorted(self.graph.closed_subgraphs.items())
        ]

    @property
    def untie_reasons(self) -> list[str]:
        """One line per constant untied into copies: why its uses could not share one permutation.

        A shared constant takes one permutation (its uses' groups joined) wherever its uses bind
        the same axes with maps of the same form; it is untied only where they cannot (one use
        keeps the order, they bind other axes or maps of other forms), and each copy grows the
        model by the constant's size.
        """
        by_source: dict[str, list[TensorPermutation]] = {}
        for plan in self.tensors:
            by_source.setdefault(plan.source, []).append(plan)
        lines = []
        for source, plans in by_source.items():
            if not any(plan.copy for plan in plans):
                continue
            needs = []
            for plan in plans:
                where = ", ".join(sorted({node_label(self.graph.nodes[n], n) for n, _ in plan.uses if n >= 0}))
                axes = ", ".join(
                    f"axis {axis} takes {'+'.join(sorted(self.neuron_labels(expr))) or 'no group'}"
                    for axis, expr in plan.axes
                )
                needs.append(f"{where}: {axes}")
            moved = {use for plan in plans for use in plan.uses}
            kept = sorted({node_label(self.graph.nodes[n], n) for n, _ in self.graph.constant_uses(source)
                           if (n, _) not in moved and n >= 0})  # fmt: skip
            if kept:
                needs.append(f"{', '.join(kept)}: keeps its order")
            copies = sum(1 for plan in plans if plan.copy)
            lines.append(
                f"constant '{source}' untied into {copies} {'copy' if copies == 1 else 'copies'}: its uses need "
                f"different permutations ({'; '.join(needs)})"
            )
        return lines

    @property
    def untied(self) -> list[TensorPermutation]:
        """The copies of shared constants that permuting creates (uses that need their own order)."""
        return [t for t in self.tensors if t.copy > 0]

    def summary(self) -> dict[str, object]:
        """Counts for people and pipelines: groups, producer neurons, why things froze."""
        total = permutable = pinned_by_output = 0
        for _, _, expr in self.producers:
            resolved = self.solver.resolve(expr)
            if isinstance(resolved, (Atom, Fixed)):
                # Most layers' neurons are one group (or none): counted without index arrays.
                total += expr.size
                group = self.group_of_root(resolved.id) if isinstance(resolved, Atom) else None
                if group is None or group.size < 2:
                    continue
                if group.permutable:
                    permutable += expr.size
                elif all(r.kind == "graph-output" for r in group.reasons):
                    pinned_by_output += expr.size
                continue
            governed = np.zeros(expr.size, dtype=bool)
            only_output = np.zeros(expr.size, dtype=bool)
            for root, lab in labels(self.solver, expr).items():
                group = self.group_of_root(root)
                if group is None or group.size < 2:
                    continue
                if group.permutable:
                    governed |= lab >= 0
                elif all(r.kind == "graph-output" for r in group.reasons):
                    only_output |= lab >= 0
            total += expr.size
            permutable += int(governed.sum())
            pinned_by_output += int((only_output & ~governed).sum())
        kinds = Counter(reason.kind for group in self.groups if group.frozen for reason in group.reasons)
        return {
            "groups": len(self.groups),
            "permutable_groups": len(self.permutable_groups),
            "frozen_groups": sum(1 for g in self.groups if g.frozen),
            "producer_neurons": total,
            "permutable_producer_neurons": permutable,
            "permutable_fraction": (permutable / total) if total else 0.0,
            "producer_neurons_pinned_by_outputs": pinned_by_output,
            "freeze_reasons_by_kind": dict(sorted(kinds.items())),
            "untied_constants": sorted({t.source for t in self.untied}),
            "subgraphs_not_analysed": self.closed_subgraphs,
        }


@collector_paused  # a few hundred objects per node, none of them garbage until the end
def analyze(
    model: onnx.ModelProto,
    *,
    progress: Callable[[str], None] | None = None,
    kv_state: bool = False,
    nodes: NodeTable | None = None,
) -> ChannelAnalysis:
    """Find the coupled channel groups of ``model``: the neurons one permutation must move together.

    Args:
        model: the model to analyse (not modified).
        progress: called with one line per analysis step.
        kv_state: treat each KV-cache pair (a ``past_key_values.*`` input and its ``present.*``
            output, see :mod:`onnxlady._analysis._state`) as one recurrent state that may be
            permuted, instead of pinning both as graph interface: the input takes, on every
            axis but its sequence axis, the permutation the output carries there (heads and
            the dims inside a head, as far as the attention's rules allow).
        nodes: the main graph's nodes as the model's check just read them (see
            :mod:`onnxlady._io._node_table`), so that the graph does not read them again.

    Returns:
        The groups, the permutation each constant tensor takes, and a reason for every group
        that cannot move.

    Raises:
        OnnxladyError: the graph is malformed (a tensor used but never defined, a cycle).
    """
    say(progress, "analysing the graph")
    # Layers inside ONNX local functions are analysed through an inlined copy (the rules see
    # operators, not calls); what the commands write stays the model as given.
    view = inlined_view(model)
    graph = ModelGraph(view.model) if view is not None else ModelGraph(model, nodes=nodes)
    state = AnalysisState(graph)
    pairs = _open_states(state, graph.model) if kv_state else []
    total = len(graph.order)
    step = max(1, total // 200)  # a bar moves smoothly without a call per node
    subgraphs = graph.subgraphs
    for position, index in enumerate(graph.order):
        if position % step == 0:
            advance(progress, "analysing nodes", position, total)
        if index in subgraphs:  # (_visit, without its call for the nodes that hold no body)
            _visit(state, index)
        else:
            _run_rule(state, index)
    advance(progress, "analysing nodes", total, total)
    _close_states(state, pairs)
    state_outputs = {pair.output for pair in pairs}
    for name in graph.graph_outputs:
        if name in state_outputs:
            continue
        spaces = [*state.tracked.get(name, {}).values(), *(space.expr for space in state.joint.get(name, []))]
        for expr in spaces:
            state.solver.freeze(expr, FreezeReason("graph-output", f"graph output '{name}'"))
    _freeze_overridable(state)
    freeze_partial_derived(state)
    _join_shared_constants(state)
    _freeze_constant_only(state)
    analysis = _collect(state, view)
    analysis.states = pairs
    if view is not None:
        analysis.source_model = model
    return analysis


# -- KV-cache state: a past input and its present output take one permutation ---------------
def _open_states(state: AnalysisState, model: onnx.ModelProto) -> list[StatePair]:
    """Make the state inputs of ``model`` permutable; the pairs they belong to.

    Every axis of a past input but its sequence axis may move: a static one becomes a group now
    (every reader sees it), one of unknown size becomes a group when its reader takes it, which
    is sound only where there is one reader (else the axis stays pinned). A pair whose sequence
    axis the shapes do not tell is left as graph interface.
    """
    graph = state.graph
    pairs = []
    for pair in state_pairs(model):
        shape = graph.shape(pair.input)
        if pair.sequence_axis is None or shape is None or pair.input not in graph.graph_inputs:
            continue
        readers = {node for node, _ in graph.consumers.get(pair.input, ())}
        single = len(readers) == 1 and pair.input not in graph.graph_outputs
        for axis, dim in enumerate(shape):
            if axis == pair.sequence_axis:
                continue
            if isinstance(dim, int):
                if dim > 1:
                    state.tracked.setdefault(pair.input, {})[axis] = state.solver.new_atom(dim)
            elif single:
                state.open_state_axes.setdefault(pair.input, set()).add(axis)
        pairs.append(pair)
    return pairs


def _close_states(state: AnalysisState, pairs: list[StatePair]) -> None:
    """Each state input takes its output's permutation on every axis; what only one side carries freezes."""
    solver = state.solver
    for pair in pairs:
        state.open_state_axes.pop(pair.input, None)
        past = state.tracked.get(pair.input, {})
        present = state.tracked.get(pair.output, {})
        link = f"state '{pair.input}' -> '{pair.output}'"
        for space in state.joint.get(pair.output, []):
            solver.freeze(space.expr, FreezeReason("graph-output", f"{link}: axes {list(space.axes)} move together"))
        for axis in sorted(set(past) | set(present)):
            if axis in past and axis in present:
                solver.unify(past[axis], present[axis], FreezeReason("graph-output", f"{link}: axis {axis} differs"))
            else:
                side = past.get(axis, present.get(axis))
                assert side is not None
                solver.freeze(side, FreezeReason("graph-output", f"{link}: only one of them carries axis {axis}"))


def _grouped_nodes(expr: Expr) -> Iterator[Grouped]:
    """The ``p (x) {q_g}`` nodes of a resolved expression."""
    if isinstance(expr, Grouped):
        yield expr
    elif isinstance(expr, (DirectSum, Interleave)):
        for part in expr.parts:
            yield from _grouped_nodes(part)
    elif isinstance(expr, Transposed):
        yield from _grouped_nodes(expr.inner)
    elif isinstance(expr, Product):
        yield from _grouped_nodes(expr.outer)
        yield from _grouped_nodes(expr.inner)


# -- shared constants: joined where their uses agree, untied where they cannot ----------------
def _structure(expr: Expr) -> tuple[object, ...]:
    """An expression's shape with its groups left out: two uses agree when theirs are equal."""
    if isinstance(expr, Atom):
        return ("p", expr.size)
    if isinstance(expr, Fixed):
        return ("I", expr.size)
    if isinstance(expr, DirectSum):
        return ("+", tuple(_structure(part) for part in expr.parts))
    if isinstance(expr, Interleave):
        return ("~", tuple(_structure(part) for part in expr.parts))
    if isinstance(expr, Transposed):
        return ("T", expr.rows, expr.cols, _structure(expr.inner))
    if isinstance(expr, Grouped):
        return ("xg", _structure(expr.outer), tuple(_structure(inner) for inner in expr.inners))
    return ("x", _structure(expr.outer), _structure(expr.inner))


def _invariant_axes(graph: ModelGraph, leaf: str, axes: Iterable[int]) -> set[int]:
    """Axes along which every slice of a constant is the same (a zero bias): permuting them is a no-op."""
    value = graph.constant_value(leaf)
    if value is None:
        return set()
    found = set()
    for axis in axes:
        if 0 <= axis < value.ndim and value.shape[axis] > 1:
            first = np.take(value, [0], axis=axis)
            if np.array_equal(np.broadcast_to(first, value.shape), value):
                found.add(axis)
    return found


def _requirements(
    state: AnalysisState, leaf: str, bound: Mapping[tuple[int, int], Mapping[int, Binding]], uses: list[tuple[int, int]]
) -> list[tuple[Expr | None, ...]]:
    """Per use of a shared constant, the permutation each axis needs (None: its order kept).

    Axes along which the constant is the same everywhere need nothing, whatever their uses say.
    """
    solver = state.solver
    rank = len(state.graph.shape(leaf) or ())
    raw: list[tuple[Expr | None, ...]] = []
    for use in uses:
        axes = bound.get(use)
        if not axes:
            raw.append((None,) * rank)
            continue
        requirement: list[Expr | None] = [None] * rank
        for a in range(rank):
            binding = axes.get(a)
            if binding is not None:
                found = canonical(solver, binding.expr)
                if type(found) is not Fixed:  # the identity needs nothing
                    requirement[a] = found
        raw.append(tuple(requirement))
    if len(raw) < 2 or len(set(raw)) < 2:  # (one use, the common case: nothing to hash)
        return raw
    invariant = _invariant_axes(state.graph, leaf, {a for req in raw for a, r in enumerate(req) if r is not None})
    return [tuple(None if a in invariant else r for a, r in enumerate(req)) for req in raw]


#: The bindings of each constant leaf, by use and axis (see :func:`_bindings_by_leaf`).
_ByLeaf = dict[str, dict[tuple[int, int], dict[int, Binding]]]


def _bindings_by_leaf(state: AnalysisState) -> _ByLeaf:
    """The bindings of ``state`` grouped by leaf, then by use ``(node, slot)``, then by axis.

    Made once per number of bindings (joining shared constants and planning the tensors read
    the same grouping, and nothing adds a binding after the rules have run; a new binding
    makes it again). In the order of the bindings, as each reader expects.
    """
    cached = state.bindings_by_leaf
    if cached is not None and cached[0] == len(state.bindings):
        return cached[1]
    by_leaf: _ByLeaf = {}
    for (node, slot, axis), binding in state.bindings.items():
        by_leaf.setdefault(binding.leaf, {}).setdefault((node, slot), {})[axis] = binding
    state.bindings_by_leaf = (len(state.bindings), by_leaf)
    return by_leaf


def _join_shared_constants(state: AnalysisState) -> None:
    """Join the groups of a constant's uses where they agree, so that it needs no copies.

    A constant read by several operators that each bind it along the same axes, with index maps
    of the same form (ALBERT-style layers sharing their weights, a tied embedding, a weight read
    in the main graph and inside an If branch) takes one permutation: their groups become one.
    Where the uses disagree (one keeps the order, or they bind other axes, or maps of other
    forms) the constant is untied into copies instead (see :attr:`ChannelAnalysis.untie_reasons`).
    """
    graph, solver = state.graph, state.solver
    for leaf, bound in _bindings_by_leaf(state).items():
        if len(bound) < 2:
            continue
        uses = graph.constant_uses(leaf)
        distinct = list(dict.fromkeys(_requirements(state, leaf, bound, uses)))
        if len(distinct) < 2 or any(all(r is None for r in req) for req in distinct):
            continue
        if len({tuple(r is None for r in req) for req in distinct}) != 1:
            continue
        if len({tuple(_structure(r) if r is not None else None for r in req) for req in distinct}) != 1:
            continue
        reason = FreezeReason("index-map", f"the uses of shared constant '{leaf}' were joined")
        first = distinct[0]
        for other in distinct[1:]:
            for mine, theirs in zip(first, other):
                if mine is not None and theirs is not None:
                    solver.unify(mine, theirs, reason)


def overridable_initializers(graph: ModelGraph) -> set[str]:
    """The main graph's initializers that are also listed as its graph inputs."""
    initializers = graph.initializers
    return {value.name for value in graph.model.graph.input if value.name in initializers}


def _freeze_overridable(state: AnalysisState) -> None:
    """Freeze the groups of initializers also listed as graph inputs (IR version 4 on).

    From IR version 4 an initializer need not be a graph input; one listed as an input anyway
    is a default the caller may override (ONNX Runtime then does not treat it as a constant).
    It is part of the interface: a caller feeding the original values to a permuted model would
    get other outputs, so its groups keep the identity. IR version 3 lists every initializer as
    an input by rule, meaning no interface, and exporters that keep that rule later (torch's
    ``keep_initializers_as_inputs``) list them all too: those weights permute as any others
    (``permute`` names them, see :func:`overridable_initializers`).
    """
    graph = state.graph
    if graph.model.ir_version < 4 or not state.bindings:
        return
    listed = overridable_initializers(graph)
    if not listed or len(listed) == len(graph.initializers):
        return  # every one listed: IR 3's rule kept by the exporter (keep_initializers_as_inputs)
    for binding in state.bindings.values():
        if binding.leaf in listed:
            reason = FreezeReason(
                "graph-input", f"overridable: initializer '{binding.leaf}' is listed as a graph input (a caller may feed it)"
            )
            state.solver.freeze(binding.expr, reason)


def _freeze_constant_only(state: AnalysisState) -> None:
    """Freeze the groups that only constants and tensors computed from constants carry.

    Such a group, made by no producer (Conv, Gemm, MatMul...), moves no neuron: every tensor on
    it is the same for every input (weight statistics that a ReduceMean averages away, as
    weight-standardized convolutions export). Permuting it would copy and shuffle constants and
    claim neurons moved while every activation stays as it was, so it keeps the identity, with
    the reason.
    """
    graph, solver = state.graph, state.solver
    derived = graph.constant_derived_names()
    if derived.isdisjoint(state.tracked) and derived.isdisjoint(state.joint):
        return  # (most models: no tracked tensor is computed from constants only)
    candidates: dict[int, str] = {}  # group -> a tensor computed from constants that carries it
    carried: set[int] = set()
    exprs = [
        *((name, expr) for name, spaces in state.tracked.items() for expr in spaces.values()),
        *((name, space.expr) for name, joint in state.joint.items() for space in joint),
    ]
    for name, expr in exprs:
        if graph.constant_derived(name):
            for atom in solver.atoms(expr):
                candidates.setdefault(atom.id, name)
        else:
            carried.update(atom.id for atom in solver.atoms(expr))
    for _, expr in state.producers:  # a layer's neurons are neurons, even on a constant input
        carried.update(atom.id for atom in solver.atoms(expr))
    for root in sorted(set(candidates) - carried):
        if not solver.is_frozen(root):
            message = (
                f"only constants and '{candidates[root]}' (computed from constants) carry this axis; "
                "permuting it moves no neuron"
            )
            solver.freeze(Atom(root, solver._size[root]), FreezeReason("constant-only", message))


def _visit(state: AnalysisState, index: int) -> None:
    """Analyse one node: an opened If/Loop/Scan with its bodies, any other node by its rule."""
    if index in state.graph.subgraphs:
        walk_control_flow(state, index, lambda inner: _visit(state, inner))
    else:
        _run_rule(state, index)


def walk_order(graph: ModelGraph) -> list[int]:
    """Every analysed node in the order the analysis visits it.

    Each opened body's nodes come just before their control-flow node, so every node (main or
    body) has a position.
    """
    if not graph.subgraphs:  # (most graphs: no body to place)
        return list(graph.order)
    ordered: list[int] = []

    def add(index: int) -> None:
        for body in graph.subgraphs.get(index, ()):
            for inner in body.nodes:
                add(inner)
        ordered.append(index)

    for index in graph.order:
        add(index)
    return ordered


def _run_rule(state: AnalysisState, index: int) -> None:
    ctx = RuleContext(state, index)
    op = state.graph._node_ops[index]
    rules = state.rules
    rule: OpRule | None
    if op in rules:
        rule = rules[op]
    else:
        rule = rules[op] = rule_for(op[1], op[0])
    op_type, domain = op
    if rule is not None and not rule.joint_aware and state.joint:
        # Joint spaces reach only the rules that read them; the others see one axis per digit.
        for _, name in state.graph.inputs_of(index):
            materialize_joint(state, name)
    if rule is None:
        ctx.abandon(ctx.reason("no-rule", f"no rule for operator {domain or 'ai.onnx'}::{op_type}"))
        return
    try:
        rule.propagate(ctx)
    except RuleDoesNotApply as stop:
        ctx.abandon(ctx.reason(stop.kind, stop.message))
        return
    except Exception as exc:
        ctx.abandon(ctx.reason("rule-error", f"rule failed ({type(exc).__name__}: {exc})"))
        return
    ctx.commit()


def _joint_member(tensor: str, space: JointSpace, node: str, index_map: str) -> GroupMember:
    """The member for the joint space ``space`` of activation ``tensor`` (listed at its first axis)."""
    return GroupMember(tensor, space.axes[0], "activation", node, f"axes {list(space.axes)} together: {index_map}", False)


def _collect(state: AnalysisState, view: FunctionView | None = None) -> ChannelAnalysis:
    graph, solver = state.graph, state.solver
    position = {index: k for k, index in enumerate(walk_order(graph))}
    tensors = _plan_tensors(state, position, view)
    # A body's formal inputs (Loop/Scan) have no producer: they sit where their body starts.
    formal = {
        name: body.nodes[0] if body.nodes else owner
        for owner, bodies in graph.subgraphs.items()
        for body in bodies
        for name in body.inputs
    }
    members: dict[int, list[tuple[tuple[int, int, int], GroupMember]]] = {}

    def add_members(expr: Expr, order: tuple[int, int, int], make: Callable[[str], GroupMember]) -> None:
        resolved = solver.resolve(expr)
        if isinstance(resolved, Fixed):
            return
        if isinstance(resolved, Atom):
            members.setdefault(resolved.id, []).append((order, make(describe(resolved, resolved.id))))
            return
        for root in {atom.id for atom in solver.atoms(resolved)}:
            members.setdefault(root, []).append((order, make(describe(resolved, root))))

    find, definitions = solver.find, solver._definition

    def add_plain(expr: Expr, order: tuple[int, int, int], tensor: str, axis: int, role: str, label: str, weight: bool) -> None:
        """``add_members`` for a space of one axis, without a member factory per space."""
        if type(expr) is Atom and (root := find(expr.id)) not in definitions:
            # An undivided group (most spaces): its root is the atom resolve would make.
            found = members.get(root)
            if found is None:
                found = members[root] = []
            found.append((order, GroupMember(tensor, axis, role, label, "p", weight)))
            return
        resolved = solver.resolve(expr)
        kind = type(resolved)
        if kind is Fixed:
            return
        if kind is Atom:
            # Most spaces are one group, described as "p": no second resolution (solver.atoms).
            found = members.get(resolved.id)  # type: ignore[union-attr]
            if found is None:
                found = members[resolved.id] = []  # type: ignore[union-attr]
            found.append((order, GroupMember(tensor, axis, role, label, "p", weight)))
            return
        add_members(resolved, order, functools.partial(GroupMember, tensor, axis, role, label, is_weight=weight))

    for plan in tensors:
        # (One node, label and role per tensor, whatever the number of its permuted axes.)
        node_index = plan.uses[0][0]
        label = graph.label(node_index) if node_index >= 0 else ""
        role = ", ".join(plan.roles)
        where = position.get(node_index, -1)
        for axis, expr in plan.axes:
            if type(expr) is Atom and (root := find(expr.id)) not in definitions:
                # (add_plain's undivided group, without its call: most weights' axes)
                found = members.get(root)
                if found is None:
                    found = members[root] = []
                found.append(((where, 0, axis), GroupMember(plan.tensor, axis, role, label, "p", True)))
            else:
                add_plain(expr, (where, 0, axis), plan.tensor, axis, role, label, True)
    producer = graph.producer
    for name, spaces in state.tracked.items():
        produced = producer.get(name)
        node_index = produced[0] if produced else -1
        label = graph.label(node_index) if node_index >= 0 else ""
        where = position[node_index] if node_index in position else position.get(formal.get(name, -1), -1)
        for axis, expr in spaces.items():
            if type(expr) is Atom and (root := find(expr.id)) not in definitions:
                # (add_plain's undivided group, without its call: most activations)
                found = members.get(root)
                if found is None:
                    found = members[root] = []
                found.append(((where, 1, axis), GroupMember(name, axis, "activation", label, "p", False)))
            else:
                add_plain(expr, (where, 1, axis), name, axis, "activation", label, False)
    for name, joint in state.joint.items():
        produced = producer.get(name)
        node_index = produced[0] if produced else -1
        label = graph.label(node_index) if node_index >= 0 else ""
        for space in joint:
            add_members(
                space.expr,
                (position.get(node_index, -1), 1, space.axes[0]),
                functools.partial(_joint_member, name, space, label),
            )
    # Each group's members in order; the groups in the order of their first member.
    by_order = {root: sorted(found, key=_FIRST_ITEM) for root, found in members.items()}
    ordered_roots = sorted(by_order, key=lambda root: by_order[root][0][0])
    groups = []
    for number, root in enumerate(ordered_roots):
        groups.append(
            ChannelGroup(
                id=f"g{number}",
                root=root,
                size=solver._size[root],
                frozen=solver.is_frozen(root),
                reasons=solver.reasons(root),
                members=tuple([member for _, member in by_order[root]]),
            )
        )
    producers = [
        (graph.label(index), graph.op_of(index)[0], expr)
        for index, expr in state.producers
        if graph.op_of(index)[0] in PRODUCER_OPS
    ]
    return ChannelAnalysis(graph, state, groups, tensors, producers)


def _plan_tensors(
    state: AnalysisState, position: Mapping[int, int] | None = None, view: FunctionView | None = None
) -> list[TensorPermutation]:
    """Which physical tensors to permute, untying constants whose uses disagree.

    Copies are made in the main graph, for main-graph uses of main-graph constants. Where a copy
    would be needed anywhere else (a use inside an If/Loop/Scan body, a constant held by a body),
    the permutation that copy would carry is frozen instead, and the plan made again.
    ``position`` is each node's place in :func:`walk_order` (made here when not given).
    With ``view`` (the graph is a model's local functions inlined), only tensors the original
    model holds under the same name can move, and no copy is made (its uses are inlined nodes,
    which the original does not have): the permutations they would need are frozen.
    """
    graph = state.graph
    if position is None:
        position = {index: k for k, index in enumerate(walk_order(graph))}
    main_initializers = graph.main_initializer_names()  # (not every name read from the protobuf again)
    while True:
        plans = _plan_once(state, position, lambda leaf, uses: _copyable(graph, leaf, uses, main_initializers))
        blocked = [plan for plan in plans if plan.copy > 0 and not _copyable(graph, plan.source, plan.uses, main_initializers)]
        if view is not None and _freeze_unwritable(state, plans, view):
            continue
        if not blocked:
            return plans
        for plan in blocked:
            reason = FreezeReason(
                "index-map",
                f"constant '{plan.source}' is shared by uses that need different permutations, and the "
                "copy one of them needs would have to live inside an If/Loop/Scan body",
            )
            for _, expr in plan.axes:
                state.solver.freeze(expr, reason)


def _freeze_unwritable(state: AnalysisState, plans: list[TensorPermutation], view: FunctionView) -> bool:
    """Freeze what the plans would write that the original model (with its functions) cannot hold.

    A constant living in a function body is one tensor shared by every call site, and a copy
    would rewire inlined nodes the original does not have: either would be a guess. Returns
    whether anything was frozen (the plan must then be made again).
    """
    frozen = False
    for plan in plans:
        origin = view.internal_origin(plan.source)
        if origin is not None:
            why = f"constant '{plan.source}' lives inside local function {origin}, shared by its call sites"
        elif plan.copy > 0:
            why = (
                f"constant '{plan.source}' is shared by uses that need different permutations, and the copy "
                "one of them needs would rewire a local function's call"
            )
        else:
            continue
        for _, expr in plan.axes:
            state.solver.freeze(expr, FreezeReason("index-map", why))
        frozen = True
    return frozen


def _copyable(
    graph: ModelGraph, source: str, uses: Iterable[tuple[int, int]], main_initializers: Collection[str]
) -> bool:
    """Whether ``uses`` of constant ``source`` can get a copy of their own.

    They can when it is a main-graph constant read through main-graph chain nodes by main-graph
    nodes (copies are inserted in the main graph).
    """
    leaf = graph.constant_leaf(source)
    if leaf is None:
        return False
    if leaf.constant_node is None and source not in main_initializers:
        return False
    if leaf.constant_node is not None and leaf.constant_node >= graph.main_count:
        return False
    for node, slot in uses:
        if not 0 <= node < graph.main_count or slot < 0:
            return False
        used = graph.constant_leaf(graph.nodes[node].input[slot])
        if used is None or any(index >= graph.main_count for index in used.chain):
            return False
    return True


def _plan_once(
    state: AnalysisState, position: Mapping[int, int], copyable: Callable[[str, list[tuple[int, int]]], bool]
) -> list[TensorPermutation]:
    graph, solver = state.graph, state.solver
    find, definitions, frozen, sizes = solver.find, solver._definition, solver._reasons, solver._size
    by_leaf = _bindings_by_leaf(state)
    existing: set[str] | None = None  # the names a copy must not take (made for the first copy)
    plans: list[TensorPermutation] = []
    first_uses: dict[str, tuple[int, int]] = {}
    for leaf, bound_uses in by_leaf.items():
        if len(bound_uses) == 1:  # (most constants: _first_use's answer, without its call)
            ((node, slot),) = bound_uses
            first_uses[leaf] = (position.get(node, -1), slot)
        else:
            first_uses[leaf] = _first_use(position, bound_uses)
    shapes = graph.shapes
    for leaf in sorted(by_leaf, key=first_uses.__getitem__):
        bound = by_leaf[leaf]
        uses = graph.constant_uses(leaf)
        if len(uses) == 1:  # one use (most weights): the tensor itself, if it moves at all
            # (_requirements of one use, without its list of one requirement per use)
            use = uses[0]
            axes = bound.get(use)
            if not axes:
                continue
            permuted_axes = []
            for a in range(len(shapes.get(leaf) or ())):  # (graph.shape(leaf), without its call)
                axis_binding = axes.get(a)
                if axis_binding is not None:
                    expr = axis_binding.expr
                    if type(expr) is Atom and (root := find(expr.id)) not in definitions:
                        # (canonical of an undivided group, most weights' axes, without its calls:
                        # the identity when frozen, else the group's root atom)
                        if root in frozen:
                            continue
                        found: Expr = expr if root == expr.id else Atom(root, sizes[root])
                    else:
                        found = canonical(solver, expr)
                        if type(found) is Fixed:  # the identity needs nothing
                            continue
                    permuted_axes.append((a, found))
            if permuted_axes:
                if len(axes) == 1:  # (one bound axis, most biases: its role, without a set to sort)
                    leaf_roles: tuple[str, ...] = (next(iter(axes.values())).role,)
                else:
                    leaf_roles = tuple(sorted({axis_binding.role for axis_binding in axes.values()}))
                plans.append(TensorPermutation(leaf, leaf, 0, (use,), tuple(permuted_axes), leaf_roles))
            continue
        requirements = _requirements(state, leaf, bound, uses)
        classes: dict[tuple, list[tuple[int, int]]] = {}
        for use, requirement in zip(uses, requirements):
            classes.setdefault(requirement, []).append(use)
        # The uses that need no permutation keep the original tensor; the others get copies,
        # except that uses which cannot have a copy (inside a body) are served first.
        # (Sorted only when uses disagree: the copyability check walks constant chains.)
        ordered = (
            sorted(
                classes.items(),
                key=lambda item: (any(r is not None for r in item[0]), copyable(leaf, item[1]), item[1][0]),
            )
            if len(classes) > 1
            else list(classes.items())
        )
        original_taken = False
        copies = 0
        for requirement, uses in ordered:
            if all(r is None for r in requirement):
                original_taken = True
                continue
            if original_taken:
                copies += 1
                name = f"{leaf}{COPY_SUFFIX}{copies}"
                if existing is None:
                    existing = set(graph.initializers) | set(graph.producer)
                while name in existing:
                    name += "_"
                existing.add(name)
            else:
                name, original_taken = leaf, True
            roles = sorted({bound[use][a].role for use in uses if use in bound for a in bound[use]})
            permuted = tuple((a, r) for a, r in enumerate(requirement) if r is not None)
            plans.append(TensorPermutation(name, leaf, copies if name != leaf else 0, tuple(uses), permuted, tuple(roles)))
    return plans


#: A member's place (the first item of its ``(order, member)`` pair), read in C by the sorts.
_FIRST_ITEM: Callable[[tuple[tuple[int, int, int], GroupMember]], tuple[int, int, int]] = operator.itemgetter(0)


def _first_use(position: Mapping[int, int], uses: Mapping[tuple[int, int], object]) -> tuple[int, int]:
    if len(uses) == 1:  # (most constants: no generator for min)
        ((node, slot),) = uses
        return (position.get(node, -1), slot)
    return min((position.get(node, -1), slot) for node, slot in uses)
