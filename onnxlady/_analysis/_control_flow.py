"""Channel analysis through opened ``If``, ``Loop`` and ``Scan`` bodies.

The nodes of an opened body (see :mod:`onnxlady._graph._subgraphs`) are analysed by their own
rules, like the main graph's: they read outer-scope tensors by name, with whatever channel
spaces those carry, and their constants are bound where they are used. What the control-flow
node itself adds are the equations between its inputs and outputs and its bodies' formal inputs
and outputs:

- ``If``: output ``k`` is branch output ``k`` of whichever branch runs, so each output axis
  carries a permutation only where both branches' outputs carry one, and the same one;
- ``Loop``: loop-carried value ``k`` enters the body as the initial value (iteration 1) and as
  the body's previous output (later iterations), and leaves as either (zero iterations leave the
  initial value): the initial value, the body's input and output, and the Loop's output share
  one permutation per axis. Scan outputs stack the body's per-iteration values along a new
  axis 0: body axis ``a`` is output axis ``a + 1``;
- ``Scan``: states are loop-carried like ``Loop``'s; scan input ``i`` is sliced along
  ``scan_input_axes[i]`` (that axis must not be permuted; the others shift past it), scan
  output ``j`` stacks along ``scan_output_axes[j]``.

An axis that one side carries and another does not is frozen, with the reason. The walk is
recursive: a body's own control-flow nodes are walked the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._expr import Expr, FreezeReason
from onnxlady._graph._model_graph import node_label
from onnxlady._graph._subgraphs import Subgraph
from onnxlady._rules._context import AnalysisState, materialize_joint

__all__ = ["walk_control_flow"]


def walk_control_flow(state: AnalysisState, index: int, visit: Callable[[int], None]) -> None:
    """Analyse the opened control-flow node ``index``: its bodies' nodes (by ``visit``), then its outputs."""
    graph = state.graph
    node = graph.nodes[index]
    walker = _Walker(state, index, visit)
    if node.op_type == "If":
        walker.run_if()
    elif node.op_type == "Loop":
        walker.run_loop()
    else:
        walker.run_scan()


class _Walker:
    """One control-flow node: maps its inputs into its bodies and their outputs out of them."""

    def __init__(self, state: AnalysisState, index: int, visit: Callable[[int], None]) -> None:
        self.state = state
        self.graph = state.graph
        self.solver = state.solver
        self.index = index
        self.node: onnx.NodeProto = self.graph.nodes[index]
        self.what = f"{self.node.op_type} '{node_label(self.node, index)}'"
        self.bodies: tuple[Subgraph, ...] = self.graph.subgraphs[index]
        self.visit = visit
        self.mapped: set[tuple[str, int]] = set()  # input spaces carried into a body

    def reason(self, message: str) -> FreezeReason:
        return FreezeReason("index-map", f"{self.what}: {message}")

    # -- operators -----------------------------------------------------------------------
    def run_if(self) -> None:
        for body in self.bodies:
            self._walk(body)
        for k, name in enumerate(self.node.output):
            returned = [body.outputs[k] for body in self.bodies]
            spaces = self._agree(returned, f"output {k} ('{name}')")
            self._emit(name, spaces)
        self._finish()

    def run_loop(self) -> None:
        (body,) = self.bodies
        carried = len(self.node.input) - 2
        for k in range(carried):
            self._enter(self.node.input[2 + k], body.inputs[2 + k], None)
        self._walk(body)
        for k in range(carried):
            formal, returned = body.inputs[2 + k], body.outputs[1 + k]
            spaces = self._agree([formal, returned], f"loop-carried value {k} ('{formal}' -> '{returned}')")
            self._emit(self.node.output[k], spaces)
        for j, returned in enumerate(body.outputs[1 + carried :]):
            self._stack(returned, self.node.output[carried + j], 0)
        self._finish()

    def run_scan(self) -> None:
        (body,) = self.bodies
        scans = int(node_attribute(self.node, "num_scan_inputs", 0))
        states = len(self.node.input) - scans
        input_axes = list(node_attribute(self.node, "scan_input_axes", [0] * scans))
        output_axes = list(node_attribute(self.node, "scan_output_axes", [0] * (len(self.node.output) - states)))
        for k in range(states):
            self._enter(self.node.input[k], body.inputs[k], None)
        for i in range(scans):
            actual = self.node.input[states + i]
            rank = self.graph.rank(actual)
            axis = input_axes[i]
            if axis < 0:
                if rank is None:
                    self._freeze_input(actual, "its scan axis is negative and its rank unknown")
                    continue
                axis += rank
            shift = {a: (a if a < axis else a - 1) for a in self._spaces(actual) if a != axis}
            self._enter(actual, body.inputs[states + i], shift)
        self._walk(body)
        for k in range(states):
            formal, returned = body.inputs[k], body.outputs[k]
            spaces = self._agree([formal, returned], f"state {k} ('{formal}' -> '{returned}')")
            self._emit(self.node.output[k], spaces)
        for j, returned in enumerate(body.outputs[states:]):
            self._stack(returned, self.node.output[states + j], output_axes[j])
        self._finish()

    # -- pieces --------------------------------------------------------------------------
    def _walk(self, body: Subgraph) -> None:
        for position in body.nodes:
            self.visit(position)

    def _spaces(self, name: str) -> dict[int, Expr]:
        """The tensor's spaces, one per axis (joint spaces split into digits first)."""
        if not name:
            return {}
        materialize_joint(self.state, name)
        return dict(self.state.tracked.get(name, {}))

    def _enter(self, actual: str, formal: str, axes: dict[int, int] | None) -> None:
        """The body's formal input ``formal`` is ``actual``.

        The same spaces, axis ``a`` of ``actual`` at axis ``axes[a]`` of ``formal`` (all axes kept when
        ``axes`` is None; an axis missing from ``axes``, a scan axis, is frozen).
        """
        if not formal:
            return
        for axis, expr in self._spaces(actual).items():
            self.mapped.add((actual, axis))
            if axes is not None and axis not in axes:
                self.solver.freeze(expr, self.reason(f"'{actual}' is sliced along its permuted axis {axis}"))
                continue
            self.state.tracked.setdefault(formal, {})[axis if axes is None else axes[axis]] = expr
        if actual in self.graph.graph_inputs:
            why = FreezeReason("graph-input", f"graph input '{actual}' (read as '{formal}' by {self.what})")
        elif actual in self.state.untracked_reason:
            why = self.state.untracked_reason[actual]
        else:
            why = self.reason(f"'{formal}' is '{actual}', which carries no channel permutation on that axis")
        self.state.untracked_reason[formal] = why

    def _agree(self, names: list[str], what: str) -> dict[int, Expr]:
        """The spaces every tensor in ``names`` carries alike; axes only some carry are frozen."""
        spaces = [self._spaces(name) for name in names]
        ranks = {self.graph.rank(name) for name in names if name}
        axes = sorted({axis for found in spaces for axis in found})
        agreed: dict[int, Expr] = {}
        if len(ranks - {None}) > 1:
            for found in spaces:
                for expr in found.values():
                    self.solver.freeze(expr, self.reason(f"{what} has different ranks in its bodies"))
            return agreed
        for axis in axes:
            present = [found[axis] for found in spaces if axis in found]
            if len(present) < len(spaces):
                lacking = next(name for name, found in zip(names, spaces, strict=True) if axis not in found)
                for expr in present:
                    self.solver.freeze(
                        expr, self.reason(f"{what}: axis {axis} carries a permutation that '{lacking}' does not")
                    )
                continue
            for expr in present[1:]:
                self.solver.unify(present[0], expr, self.reason(f"{what}: incompatible index maps meet here"))
            agreed[axis] = present[0]
        return agreed

    def _stack(self, returned: str, output: str, axis: int) -> None:
        """Scan output ``output`` stacks ``returned`` along ``axis``: body axis ``a`` moves past it."""
        spaces = self._spaces(returned)
        if not spaces:
            return
        if axis < 0:
            rank = self.graph.rank(returned)
            if rank is None:
                why = self.reason(f"scan output '{output}' stacks on a negative axis of unknown rank")
                for expr in spaces.values():
                    self.solver.freeze(expr, why)
                return
            axis += rank + 1
        self._emit(output, {(a if a < axis else a + 1): expr for a, expr in spaces.items()})

    def _emit(self, name: str, spaces: dict[int, Expr]) -> None:
        if not name:
            return
        for axis, expr in spaces.items():
            if expr.size > 1:
                self.state.tracked.setdefault(name, {})[axis] = expr

    def _freeze_input(self, name: str, message: str) -> None:
        for axis, expr in self._spaces(name).items():
            self.solver.freeze(expr, self.reason(f"'{name}': {message}"))
            self.mapped.add((name, axis))

    def _finish(self) -> None:
        """Freeze every space of the node's own inputs that no body received (If's condition...)."""
        for slot, name in enumerate(self.node.input):
            for axis, expr in self._spaces(name).items():
                if (name, axis) not in self.mapped:
                    self.solver.freeze(expr, self.reason(f"no rule for axis {axis} of '{name}' (input {slot})"))
