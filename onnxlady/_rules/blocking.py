"""Operators known to mix or index channels: they freeze every group they touch, with a reason."""

from __future__ import annotations

from onnxlady._rules._context import RuleContext
from onnxlady._rules._registry import OpRule, register

_WHY = {
    "LRN": "normalises across neighbouring channels",
    "NonZero": "returns positions",
    "Compress": "selects positions",
    "Unique": "reorders values",
    "MaxUnpool": "scatters by flattened positions",
    "GatherElements": "indexes by computed positions",
    "GatherND": "indexes by computed positions",
    "ScatterElements": "scatters by computed positions",
    "ScatterND": "scatters by computed positions",
}


@register
class BlockingRule(OpRule):
    """Freeze every channel space that reaches these operators."""

    op_types = tuple(_WHY)

    def propagate(self, ctx: RuleContext) -> None:
        ctx.block("blocking", _WHY[ctx.op_type])


@register
class ClosedControlFlowRule(OpRule):
    """If/Loop/Scan whose bodies stay closed: the reason comes from the graph.

    Opened bodies never reach a rule (the analysis walks them, see
    :mod:`onnxlady._analysis._control_flow`); a closed node freezes what it reads and returns.
    """

    op_types = ("If", "Loop", "Scan")

    def propagate(self, ctx: RuleContext) -> None:
        why = ctx.graph.closed_subgraphs.get(ctx.index, "its bodies are not analysed")
        ctx.block("blocking", f"control flow: {why}")
