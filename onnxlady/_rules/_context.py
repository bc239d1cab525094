"""What a rule sees of the graph, and the only ways it may change the analysis.

A rule reads attributes, static shapes and constant values, *takes* the channel spaces of its
inputs, *emits* spaces on its outputs, *binds* constant operands to permutations and *unifies*
expressions. Everything a rule binds or emits is buffered and committed only when the rule
finishes, so a rule that gives up (``RuleDoesNotApply``) or fails leaves no half-permuted
operator behind. Any tracked input space a rule did not take is frozen: a rule that forgets an
axis can make the tool permute less, never wrongly.

A *joint space* (:class:`JointSpace`) is one permutation over several axes of a tensor read as
row-major digits: a Reshape that splits a permuted axis leaves it there, so that a channel
shuffle (split, Transpose, merge) gets its exact index map. Only rules that declare
``joint_aware`` see joint spaces; for any other rule the analysis first *materializes* them
(:func:`materialize_joint`): one permutation per digit, a restriction that is always valid.

A constant reached through ``(De)QuantizeLinear`` or ``Mul`` carries *companions* (per-axis scales
and zero points, multiplying factors; see :meth:`ModelGraph.chain_companions`). They are bound
at commit, next to every binding whatever code path made it, at their own use (the chain node's
input slot) and their own leaf axis; where one cannot follow, the binding's group is frozen.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import Atom, Expr, Fixed, FreezeReason, GroupSolver, direct_sum, product
from onnxlady._graph._model_graph import ChainAxisError, Companion, ConstantLeaf, ModelGraph, Shape, node_label
from onnxlady._graph._uniform import uniform_axes
from onnxlady._rules._derived import DerivedRead, block_partition, derived_uses

_PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
#: What an input without spaces carries (never changed).
_NOTHING: dict[int, Expr] = {}


class RuleDoesNotApply(Exception):  # ruff: ignore[error-suffix-on-exception-name] - a signal (like StopIteration) that a rule declines a node, not an error
    """Raised by a rule: this node cannot carry a permutation; freeze what it touches."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, init=False)
class Binding:
    """A constant operand's axis must take the permutation ``expr`` at one use."""

    node: int
    slot: int
    leaf: str
    axis: int
    expr: Expr
    role: str

    # One per weight axis: filled directly, at half the cost of the generated frozen __init__
    # (item by item: a keyword dict for ``update`` costs a third more).
    def __init__(self, node: int, slot: int, leaf: str, axis: int, expr: Expr, role: str) -> None:
        fields = self.__dict__
        fields["node"] = node
        fields["slot"] = slot
        fields["leaf"] = leaf
        fields["axis"] = axis
        fields["expr"] = expr
        fields["role"] = role


@dataclass(frozen=True)
class JointSpace:
    """One permutation ``expr`` of several axes of a tensor taken together.

    ``axes`` are the digits, most significant first (not necessarily in layout order: a
    Transpose may have swapped them), ``sizes`` their lengths; position
    ``sum(i_k * prod(sizes[k+1:]))`` of ``expr`` is the element with index ``i_k`` on
    ``axes[k]``. A permutation of the whole split axis need not be a product of one permutation
    per digit (a block sum is not), which is why the digits are kept together.
    """

    axes: tuple[int, ...]
    sizes: tuple[int, ...]
    expr: Expr


@dataclass
class AnalysisState:
    """Mutable state of one analysis pass, shared by the rule contexts."""

    graph: ModelGraph
    solver: GroupSolver = field(default_factory=GroupSolver)
    tracked: dict[str, dict[int, Expr]] = field(default_factory=dict)
    joint: dict[str, list[JointSpace]] = field(default_factory=dict)
    untracked_reason: dict[str, FreezeReason] = field(default_factory=dict)
    bindings: dict[tuple[int, int, int], Binding] = field(default_factory=dict)
    producers: list[tuple[int, Expr]] = field(default_factory=list)
    #: Axes of state inputs (KV caches, see ``analyze(kv_state=True)``) whose size only their one
    #: consumer knows: the first :meth:`RuleContext.take` of such an axis makes it a new group.
    open_state_axes: dict[str, set[int]] = field(default_factory=dict)
    #: Constant axes cut into blocks by Slice readers (see ``block_partition``): (name, axis) ->
    #: one expression per segment, shared by every reader so the blocks make one permutation.
    block_segments: dict[tuple[str, int], list[tuple[int, int, Expr]]] = field(default_factory=dict)
    #: The committed walks back from computed tensors to their constants (see ``derived_uses``):
    #: the group each made, the reads it accounts for, and why it freezes if another read is not.
    derived_walks: list[tuple[Atom, list[DerivedRead], FreezeReason]] = field(default_factory=list)
    #: Axes along which computed tensors hold equal slices (see :func:`uniform_axes`), by tensor.
    uniform: dict[str, frozenset[int]] = field(default_factory=dict)
    #: The bindings grouped by constant leaf, with the number of bindings they were made from
    #: (a memo of the analysis, see ``onnxlady._analysis._channels._bindings_by_leaf``).
    bindings_by_leaf: tuple[int, dict[str, dict[tuple[int, int], dict[int, Binding]]]] | None = None
    #: The rule (an ``OpRule``, which imports this module) of each ``(op_type, domain)`` met so
    #: far, None where there is none: a memo of ``rule_for`` for this analysis, one dict read per
    #: node instead of a call and a key made.
    rules: dict[tuple[str, str], Any] = field(default_factory=dict)


class RuleContext:
    """The view of one node that its rule works through."""

    # One per node: slots make it and its attribute reads cheaper.
    __slots__ = (
        "_bound", "_emitted", "_inputs", "_joint_emitted", "_joint_taken", "_outputs", "_producers", "_state",
        "_taken", "_walks", "graph", "index", "node", "op_type", "opset", "solver",
    )  # fmt: skip

    def __init__(self, state: AnalysisState, index: int) -> None:
        self._state = state
        graph = self.graph = state.graph
        self.solver = state.solver
        self.index = index
        self.node: onnx.NodeProto = graph.nodes[index]
        # Read once (by the graph): a rule asks for its inputs a dozen times, and each protobuf
        # read makes new strings.
        # (input_names, output_names and op_of, without their calls: one context per node)
        self._inputs: tuple[str, ...] = graph._node_inputs[index]
        self._outputs: tuple[str, ...] = graph._node_outputs[index]
        self.op_type, domain = graph._node_ops[index]
        opsets = graph.opsets
        self.opset = opsets.get(domain or "", opsets.get("", 1))
        self._taken: set[tuple[str, int]] = set()
        self._emitted: dict[tuple[int, int], Expr] = {}
        self._joint_taken: set[tuple[str, tuple[int, ...]]] = set()
        self._joint_emitted: dict[int, list[JointSpace]] = {}
        self._bound: list[Binding] = []
        self._producers: list[Expr] = []
        self._walks: list[tuple[Atom, list[DerivedRead], FreezeReason]] = []

    @property
    def label(self) -> str:
        """The node's label (:func:`~onnxlady._graph._model_graph.node_label`), for messages."""
        return self.graph.label(self.index)

    # -- reading -------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The node's attribute ``name`` (see :func:`~onnxlady._graph._attributes.node_attribute`)."""
        return node_attribute(self.node, name, default)

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Every input's name, in slot order ('' for an absent optional input)."""
        return self._inputs

    @property
    def state_tracked(self) -> dict[str, dict[int, Expr]]:
        """The spaces every tensor carries so far (read only: a rule takes them with :meth:`take`)."""
        return self._state.tracked

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def input(self, slot: int) -> str:
        """Name of input ``slot`` ('' when absent or optional and empty)."""
        return self._inputs[slot] if slot < len(self._inputs) else ""

    def output(self, slot: int) -> str:
        return self._outputs[slot] if slot < len(self._outputs) else ""

    def output_used(self, slot: int) -> bool:
        name = self.output(slot)
        return bool(name) and (name in self.graph.consumers or name in self.graph.graph_outputs)

    def shape_in(self, slot: int) -> Shape | None:
        inputs = self._inputs  # (input(slot), inlined: rules ask for every input's shape)
        name = inputs[slot] if slot < len(inputs) else ""
        return self.graph.shapes.get(name) if name else None

    def shape_out(self, slot: int) -> Shape | None:
        name = self.output(slot)
        return self.graph.shapes.get(name) if name else None

    def rank_in(self, slot: int) -> int:
        """Rank of input ``slot``; a rule that needs it and cannot know it does not apply."""
        shape = self.shape_in(slot)
        if shape is None:
            raise RuleDoesNotApply("unknown-shape", f"the rank of '{self.input(slot)}' is unknown")
        return len(shape)

    def rank_out(self, slot: int) -> int:
        shape = self.shape_out(slot)
        if shape is None:
            raise RuleDoesNotApply("unknown-shape", f"the rank of '{self.output(slot)}' is unknown")
        return len(shape)

    def is_const(self, slot: int) -> bool:
        inputs = self._inputs
        return self.graph.is_constant(inputs[slot] if slot < len(inputs) else "")

    def const(self, slot: int) -> np.ndarray | None:
        """Value of a constant input (after its Cast chain), or None."""
        return self.graph.constant_value(self.input(slot)) if self.input(slot) else None

    def require_const(self, slot: int, what: str) -> np.ndarray:
        value = self.const(slot)
        if value is None:
            raise RuleDoesNotApply("not-constant", f"{what} '{self.input(slot)}' is computed, not a constant")
        return value

    def const_shape(self, slot: int) -> tuple[int, ...]:
        shape = self.graph.constant_shape(self.input(slot))
        if shape is None:
            raise RuleDoesNotApply("not-constant", f"'{self.input(slot)}' is not a constant")
        return shape

    def tracked(self, slot: int) -> dict[int, Expr]:
        """Channel spaces carried by input ``slot`` (axis -> expression), without taking them."""
        inputs = self._inputs
        name = inputs[slot] if slot < len(inputs) else ""
        return dict(self._state.tracked.get(name, _NOTHING)) if name else {}

    # -- taking and emitting -------------------------------------------------------------
    def take(self, slot: int, axis: int, size: int | None = None) -> Expr:
        """The permutation of input ``slot`` on ``axis``: tracked, or the identity with its reason."""
        inputs = self._inputs
        name = inputs[slot] if slot < len(inputs) else ""
        tracked = self._state.tracked.get(name, _NOTHING) if name else _NOTHING
        if axis in tracked:
            self._taken.add((name, axis))
            return tracked[axis]
        if size is None:
            shape = self.shape_in(slot)
            dim = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
            if not isinstance(dim, int):
                raise RuleDoesNotApply("unknown-shape", f"the size of axis {axis} of '{name}' is unknown")
            size = dim
        if axis in self._state.open_state_axes.get(name, ()):
            # A state input's axis its one consumer reads: a group of its own, tracked at once
            # (so a rule that gives up freezes it like any other input space).
            self._state.open_state_axes[name].discard(axis)
            group = self.new_group(size)
            self._state.tracked.setdefault(name, {})[axis] = group
            self._taken.add((name, axis))
            return group
        derived = self._derived(name, slot, axis, size)
        if derived is not None:
            return derived
        if self.is_uniform(slot, axis, size):
            # Equal slices (a broadcast copy): any permutation leaves the tensor as it is, so
            # the rule may couple this axis with anything; nothing here needs to move.
            return self.new_group(size)
        return Fixed(size, self._untracked_reason(name, axis))

    def is_uniform(self, slot: int, axis: int, size: int) -> bool:
        """Whether untracked axis ``axis`` of input ``slot`` holds equal slices, so that any permutation fixes it.

        Only an axis no permutation is tracked on (alone or in a joint space) qualifies: the
        tensor is then the one the original model computes up to its tracked axes, and a
        broadcast copy stays one under permutations of other axes.
        """
        name = self.input(slot)
        if not name or size < 2:
            return False
        shape = self.shape_in(slot)
        if shape is None or not -len(shape) <= axis < len(shape):
            return False
        axis %= len(shape)
        state = self._state
        if axis in state.tracked.get(name, _NOTHING) or any(axis in space.axes for space in state.joint.get(name, ())):
            return False
        return axis in uniform_axes(self.graph, name, state.uniform)

    def _derived(self, name: str, slot: int, axis: int, size: int) -> Atom | None:
        """A new group for a tensor computed from constants only, bound to the constants it is made of.

        None where the constants cannot follow (see :func:`~onnxlady._rules._derived.derived_uses`).
        The bindings and the walk's reads are buffered like any other, so a rule that gives up
        leaves nothing behind (and a walk that shares a computed tensor with it then freezes).
        """
        if not name or size < 2 or name in self._state.untracked_reason or axis < 0:
            return None
        walk = derived_uses(self.graph, name, axis, self.index, slot)
        if walk is None:
            return None
        uses, reads = walk
        group = self.new_group(size)
        pieces = self._pieces(group, [use[4] for use in uses])
        bindings = []
        for node, slot, use_axis, block, piece in uses:
            expr: Expr = group if piece is None else pieces[piece]
            if block is not None:
                found = self._block_of(node, slot, use_axis, block, expr)
                if found is None:
                    return None
                expr = found
            binding = self._constant_binding(node, slot, use_axis, expr, "constant computed into another")
            if binding is None:
                return None
            bindings.append(binding)
        self._bound.extend(bindings)
        self._walks.append((group, reads, self._untracked_reason(name, axis)))
        return group

    def _pieces(self, group: Atom, pieces: list[tuple[int, int] | None]) -> dict[tuple[int, int], Expr]:
        """``group`` cut at every bound of the pieces a walk's Concats make (one group per segment), by piece.

        Q, K and V weights concatenated into one then each move by a permutation of their own
        neurons, which together are ``group``'s (a block sum).
        """
        bounds = {0, group.size} | {bound for piece in pieces if piece is not None for bound in piece}
        if len(bounds) == 2:
            return {(0, group.size): group}
        edges = sorted(bounds)
        segments = [(start, end, self.new_group(end - start)) for start, end in itertools.pairwise(edges)]
        self.unify(group, direct_sum([expr for _, _, expr in segments]))
        return {
            piece: direct_sum([expr for start, end, expr in segments if piece[0] <= start and end <= piece[1]])
            for piece in pieces
            if piece is not None
        }

    def _block_of(self, node: int, slot: int, axis: int, block: tuple[int, int], group: Expr) -> Expr | None:
        """The whole-axis permutation of a constant a Slice reads ``block`` of, with ``group`` as that block.

        The axis is cut at every bound of its Slice readers; each read segment is a group of its
        own, the same for every reader, so Q, K and V cut from one fused weight move it by one
        permutation (a block sum) and it needs no copy.
        """
        name = self.graph.nodes[node].input[slot]
        shape = self.graph.shape(name) or self.graph.constant_shape(name)
        dim = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
        if not isinstance(dim, int):
            return None
        key = (name, axis)
        if key not in self._state.block_segments:
            reason = self.reason("index-map", f"positions of '{name}' no Slice reads")
            self._state.block_segments[key] = [
                (start, end, self.new_group(end - start) if read else Fixed(end - start, reason))
                for start, end, read in block_partition(self.graph, name, axis, dim)
            ]
        segments = self._state.block_segments[key]
        inside = [expr for start, end, expr in segments if block[0] <= start and end <= block[1]]
        if sum(expr.size for expr in inside) != group.size:
            return None
        self.unify(group, direct_sum(inside))
        return direct_sum([expr for _, _, expr in segments])

    def _constant_binding(self, node: int, slot: int, axis: int, expr: Expr, role: str) -> Binding | None:
        """What :meth:`bind` would record for input ``slot`` of node ``node``, or None where it would refuse."""
        name = self.graph.nodes[node].input[slot]
        leaf = self.graph.constant_leaf(name)
        shape = self.graph.constant_shape(name) or ()
        if leaf is None or not 0 <= axis < len(shape) or shape[axis] != expr.size:
            return None
        leaf_axis = self.graph.leaf_axis(name, axis)
        if leaf_axis is None or self.graph.dtypes.get(leaf.name) in _PACKED:
            return None
        if leaf.constant_node is not None and not isinstance(self.graph.leaf_tensor_or_none(leaf), onnx.TensorProto):
            return None
        return Binding(node, slot, leaf.name, leaf_axis, expr, role)

    def take_all(self, slot: int) -> dict[int, Expr]:
        """Take every tracked space of input ``slot``."""
        name = self.input(slot)
        tracked = self._state.tracked.get(name, {}) if name else {}
        for axis in tracked:
            self._taken.add((name, axis))
        return dict(tracked)

    def take_joint(self, slot: int) -> list[JointSpace]:
        """Take the joint spaces of input ``slot`` (only for ``joint_aware`` rules)."""
        name = self.input(slot)
        spaces = list(self._state.joint.get(name, [])) if name else []
        for space in spaces:
            self._joint_taken.add((name, space.axes))
        return spaces

    def emit_joint(self, slot: int, space: JointSpace) -> None:
        """Output ``slot`` carries the joint space ``space``."""
        if self.output(slot) and space.expr.size > 1:
            self._joint_emitted.setdefault(slot, []).append(space)

    def materialize(self, space: JointSpace) -> dict[int, Expr]:
        """One permutation per digit of a taken joint space (axis -> expression).

        The joint permutation is restricted to the product of the digits' permutations; a
        digit the restriction freezes is left out (it is the identity).
        """
        return _split_digits(self.solver, space, self.reason("index-map", "the digits of a split axis are read one by one"))

    def emit(self, slot: int, axis: int, expr: Expr) -> None:
        """Output ``slot`` carries ``expr`` on ``axis``."""
        outputs = self._outputs
        if expr.size <= 1 or slot >= len(outputs) or not outputs[slot]:
            return
        key = (slot, axis)
        if key in self._emitted:
            self.unify(self._emitted[key], expr)
        else:
            self._emitted[key] = expr

    def bind(self, slot: int, axis: int, expr: Expr, role: str) -> None:
        """Constant input ``slot`` must be permuted by ``expr`` along ``axis`` at this use."""
        inputs, graph = self._inputs, self.graph
        name = inputs[slot] if slot < len(inputs) else ""
        leaf = graph.constant_leaf(name) if name else None
        if leaf is None:
            raise RuleDoesNotApply("not-constant", f"'{name}' ({role}) is computed, not a constant")
        shape = graph.constant_shape(name) or ()
        if axis < 0:
            axis += len(shape)
        if not 0 <= axis < len(shape) or shape[axis] != expr.size:
            raise RuleDoesNotApply(
                "index-map", f"constant '{name}' has shape {list(shape)}, not {expr.size} along axis {axis}"
            )
        leaf_axis = graph.leaf_axis(name, axis) if leaf.chain else axis  # (a leaf read directly: its own axis)
        if leaf_axis is None:
            raise RuleDoesNotApply("index-map", f"constant '{name}' is reshaped so that axis {axis} mixes with others")
        if leaf.constant_node is not None and not isinstance(graph.leaf_tensor_or_none(leaf), onnx.TensorProto):
            raise RuleDoesNotApply("not-constant", f"constant '{leaf.name}' is a list attribute, not a tensor")
        if graph.dtypes.get(leaf.name) in _PACKED:
            raise RuleDoesNotApply("blocking", f"constant '{leaf.name}' packs two values per byte")
        self._bound.append(Binding(self.index, slot, leaf.name, leaf_axis, expr, role))

    def attach(self, slot: int, axis: int, expr: Expr, role: str) -> None:
        """Bind a constant input, or couple a computed one, to ``expr`` along ``axis``."""
        if not self.input(slot):
            return
        if self.is_const(slot):
            self.bind(slot, axis, expr, role)
        else:
            if axis < 0:
                axis += self.rank_in(slot)
            self.unify(self.take(slot, axis, expr.size), expr)

    def declare_producer(self, expr: Expr) -> None:
        """The node's output neurons (for the producer-neuron figures of ``inspect``)."""
        self._producers.append(expr)

    # -- equations -----------------------------------------------------------------------
    def new_group(self, size: int) -> Atom:
        return self.solver.new_atom(size)

    def unify(self, left: Expr, right: Expr) -> None:
        if type(left) is Atom and type(right) is Atom and left.size == right.size:
            # Two undivided groups of one size (residual connections, most equations): joined
            # without making the mismatch reason, which only structured maps can need.
            solver = self.solver
            left, right = solver.resolve(left), solver.resolve(right)
            if type(left) is Atom and type(right) is Atom:
                solver.unify(left, right)
                return
        self.solver.unify(left, right, self.reason("index-map", "incompatible index maps meet here"))

    def reason(self, kind: str, message: str) -> FreezeReason:
        return FreezeReason(kind, f"{self.op_type} '{self.label}': {message}")

    def fixed(self, size: int, message: str) -> Fixed:
        """The identity on ``size`` positions that an index map keeps in place."""
        return Fixed(size, self.reason("index-map", message))

    def freeze(self, expr: Expr, kind: str, message: str) -> None:
        """The groups in ``expr`` keep the identity (freezing is always safe, so not buffered)."""
        self.solver.freeze(expr, self.reason(kind, message))

    def block(self, kind: str, message: str) -> None:
        """This node stops every permutation that reaches it (blocking operators)."""
        raise RuleDoesNotApply(kind, message)

    def _untracked_reason(self, name: str, axis: int) -> FreezeReason:
        if name in self.graph.graph_inputs:
            return FreezeReason("graph-input", f"graph input '{name}'")
        if name in self._state.untracked_reason:
            return self._state.untracked_reason[name]
        if self.graph.is_constant(name):
            return self.reason("blocking", f"constant '{name}' has no permutation on axis {axis}")
        return self.reason("index-map", f"axis {axis} of '{name}' carries no channel permutation")

    # -- commit --------------------------------------------------------------------------
    def commit(self) -> None:
        """Record what the rule produced and freeze every input space it did not take."""
        state = self._state
        tracked, joint, taken = state.tracked, state.joint, self._taken
        if self._emitted:
            outputs = self._outputs  # (emit keeps only named outputs' slots: output(slot), inlined)
            for (slot, axis), expr in self._emitted.items():
                spaces = tracked.get(outputs[slot])
                if spaces is None:
                    tracked[outputs[slot]] = {axis: expr}
                else:
                    spaces[axis] = expr
        if self._joint_emitted:
            for slot, joint_spaces in self._joint_emitted.items():
                joint.setdefault(self.output(slot), []).extend(joint_spaces)
        if self._bound:  # (_with_companions: nothing without a binding)
            bindings = state.bindings
            for binding in self._with_companions():
                key = (binding.node, binding.slot, binding.axis)
                previous = bindings.get(key)
                if previous is not None:
                    self.unify(previous.expr, binding.expr)
                else:
                    bindings[key] = binding
        for expr in self._producers:
            state.producers.append((self.index, expr))
        if self._walks:
            state.derived_walks.extend(self._walks)
        for slot, name in enumerate(self._inputs):  # (inputs_of's order, without its generator)
            if not name:
                continue
            carried = tracked.get(name)
            if carried:
                # (Most carried inputs were taken whole: nothing to freeze, no call made.)
                for axis in carried:
                    if (name, axis) not in taken:
                        self._freeze_untaken(slot, name, tracked, joint, taken)
                        break
                else:
                    if joint and name in joint:
                        self._freeze_untaken(slot, name, tracked, joint, taken)
            elif joint and name in joint:
                self._freeze_untaken(slot, name, tracked, joint, taken)
        for name in self.graph.implicit_inputs.get(self.index, ()):
            self._freeze_untaken(-1, name, tracked, joint, taken)

    def _freeze_untaken(
        self,
        slot: int,
        name: str,
        tracked: dict[str, dict[int, Expr]],
        joint: dict[str, list[JointSpace]],
        taken: set[tuple[str, int]],
    ) -> None:
        """Freeze the spaces of input ``name`` (at ``slot``, -1: a subgraph's read) the rule did not take."""
        carried = tracked.get(name)
        if carried:
            for axis, expr in carried.items():
                if (name, axis) not in taken:
                    where = "a subgraph" if slot < 0 else f"input {slot}"
                    self.solver.freeze(expr, self.reason("no-rule", f"no rule for axis {axis} of '{name}' ({where})"))
        for space in joint.get(name, ()) if joint else ():
            if (name, space.axes) not in self._joint_taken:
                self.solver.freeze(
                    space.expr, self.reason("no-rule", f"no rule for axes {list(space.axes)} of '{name}' taken together")
                )

    def _with_companions(self) -> list[Binding]:
        """The buffered bindings, each followed by the bindings of its companions (recursively).

        A companion that cannot take the permutation freezes the binding's expression instead:
        blocked quantization along the axis, or a chain node read by several operators (untying
        copies the weight and its chain for one use, but the copy would still read the shared
        scale, so the uses could not get different permutations).
        """
        if not self._bound:
            return []
        graph = self.graph
        node_inputs, constant_leaf = graph._node_inputs, graph.constant_leaf
        for binding in self._bound:
            if node_inputs[binding.node][binding.slot] != binding.leaf:
                break
        else:
            # Every leaf read directly, by its own name (most weights): no chain node, so no
            # companion (a name read through a chain is a chain node's output, never the leaf's).
            return list(self._bound)
        # A queue read in place: companions are appended behind the bindings still to visit,
        # and the list, once read through, is every binding in the order visited.
        result = list(self._bound)
        for binding in result:  # (the loop reads what is appended while it runs)
            name = node_inputs[binding.node][binding.slot]
            leaf = constant_leaf(name)
            if leaf is None or binding.expr.size <= 1 or not leaf.chain:
                continue  # a leaf read directly has no chain node, so no companion
            try:
                axis = graph.use_axis(name, binding.axis)
                if axis is None:
                    _require_passive_chain(graph, name, binding.axis, leaf)
                    continue
                for companion in graph.chain_companions(name, axis):
                    result.append(self._companion_binding(binding, companion))
            except ChainAxisError as exc:
                self.solver.freeze(binding.expr, self.reason("index-map", str(exc)))
        return result

    def _companion_binding(self, binding: Binding, companion: Companion) -> Binding:
        graph = self.graph
        chain_node = graph.nodes[companion.node]
        label = node_label(chain_node, companion.node)
        readers = graph.constant_uses(chain_node.output[0])
        if len(readers) > 1:
            raise ChainAxisError(
                f"{chain_node.op_type} '{label}' is read by {len(readers)} operators: "
                f"its {companion.kind} '{companion.name}' cannot follow each of them"
            )
        leaf = graph.constant_leaf(companion.name)
        shape = graph.constant_shape(companion.name) or ()
        if leaf is None or not 0 <= companion.axis < len(shape) or shape[companion.axis] != binding.expr.size:
            raise ChainAxisError(
                f"{companion.kind} '{companion.name}' of {chain_node.op_type} '{label}' is not a constant "
                f"with {binding.expr.size} entries along axis {companion.axis}"
            )
        leaf_axis = graph.leaf_axis(companion.name, companion.axis)
        if leaf_axis is None:
            raise ChainAxisError(f"{companion.kind} '{companion.name}' is reshaped so that its axes mix")
        if leaf.constant_node is not None and not isinstance(graph.leaf_tensor_or_none(leaf), onnx.TensorProto):
            raise ChainAxisError(f"{companion.kind} '{leaf.name}' is a list attribute, not a tensor")
        if graph.dtypes.get(leaf.name) in _PACKED:
            raise ChainAxisError(f"{companion.kind} '{leaf.name}' packs two values per byte")
        role = f"{binding.role}: {companion.kind}"
        return Binding(companion.node, companion.slot, leaf.name, leaf_axis, binding.expr, role)

    def abandon(self, reason: FreezeReason) -> None:
        """Drop what the rule produced; freeze every input space and mark the outputs."""
        state = self._state
        for _, name in self.graph.inputs_of(self.index):
            for expr in state.tracked.get(name, {}).values():
                self.solver.freeze(expr, reason)
            for space in state.joint.get(name, []):
                self.solver.freeze(space.expr, reason)
        for name in self._outputs:
            if name:
                state.untracked_reason[name] = reason


def freeze_partial_derived(state: AnalysisState) -> None:
    """Freeze the walks through a computed tensor some reader of which does not take the permuted axis.

    A walk (see :func:`~onnxlady._rules._derived.derived_uses`) permutes the constants a
    computed tensor is made of, so every reader of every computed tensor on its way sees that
    tensor permuted along the walked axis. That is sound only where each of those readers took
    the axis through a walk of its own (its rule then handles the permutation); a reader that
    gave up, took another axis only, or reads inside a subgraph would see moved values without
    knowing, so every walk through that tensor and axis keeps the identity, with the reason
    its reader would have given without the walk.
    """
    if not state.derived_walks:
        return
    graph, solver = state.graph, state.solver
    accounted: dict[tuple[str, int], set[tuple[int, int]]] = {}
    for _, reads, _ in state.derived_walks:
        for tensor, axis, node, slot in reads:
            accounted.setdefault((tensor, axis), set()).add((node, slot))
    partial = {
        key for key, readers in accounted.items() if any(read not in readers for read in graph.consumers.get(key[0], []))
    }
    if not partial:
        return
    for group, reads, reason in state.derived_walks:
        if any((tensor, axis) in partial for tensor, axis, _, _ in reads):
            solver.freeze(group, reason)


def _require_passive_chain(graph: ModelGraph, name: str, leaf_axis: int, leaf: ConstantLeaf) -> None:
    """Raise :class:`ChainAxisError` when the unknown axis of ``name`` meets a chain node with companions.

    A DequantizeLinear, QuantizeLinear or Mul on the chain may have a companion (scale, zero point,
    factor) along the axis, which cannot follow a permutation whose axis is unknown.
    """
    if any(graph.nodes[i].op_type in ("DequantizeLinear", "QuantizeLinear", "Mul") for i in leaf.chain):
        raise ChainAxisError(f"cannot tell which axis of '{name}' reads axis {leaf_axis} of '{leaf.name}'")


def materialize_joint(state: AnalysisState, name: str) -> None:
    """Turn the joint spaces of tensor ``name`` into one tracked space per digit.

    Used before a rule that does not read joint spaces: the joint permutation is restricted to
    a product of per-digit permutations (valid for every consumer, since refinement only
    restricts), and the digits become ordinary tracked axes of the tensor.
    """
    spaces = state.joint.pop(name, [])
    for space in spaces:
        reason = FreezeReason("index-map", f"the digits of axes {list(space.axes)} of '{name}' are read one by one")
        for axis, expr in _split_digits(state.solver, space, reason).items():
            state.tracked.setdefault(name, {})[axis] = expr


def _split_digits(solver: GroupSolver, space: JointSpace, reason: FreezeReason) -> dict[int, Expr]:
    digits = [solver.new_atom(size) for size in space.sizes]
    chain: Expr = digits[-1]
    for digit in reversed(digits[:-1]):
        chain = product(digit, chain)
    solver.unify(space.expr, chain, reason)
    result: dict[int, Expr] = {}
    for axis, digit in zip(space.axes, digits):
        resolved = solver.resolve(digit)
        moving = any(not solver.is_frozen(atom.id) for atom in solver.atoms(resolved))
        if resolved.size > 1 and moving:
            result[axis] = resolved
    return result
