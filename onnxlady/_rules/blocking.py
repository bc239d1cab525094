"""Operators known to mix or index channels: they freeze every group they touch, with a reason."""

from __future__ import annotations

from onnxlady._rules._context import RuleContext
from onnxlady._rules._registry import OpRule, register

_WHY = {
    "LRN": "normalises across neighbouring channels",
    "LSTM": "recurrent gates have no permutation rule",
    "GRU": "recurrent gates have no permutation rule",
    "RNN": "recurrent gates have no permutation rule",
    "If": "control flow: branches are not analysed",
    "Loop": "control flow: the loop body is not analysed",
    "Scan": "control flow: the scan body is not analysed",
    "NonZero": "returns positions",
    "Compress": "selects positions",
    "Unique": "reorders values",
    "MaxUnpool": "scatters by flattened positions",
    "GatherElements": "indexes by computed positions",
    "GatherND": "indexes by computed positions",
    "ScatterElements": "scatters by computed positions",
    "ScatterND": "scatters by computed positions",
    "Einsum": "contracts axes given by an equation that has no rule yet",
    "GroupNormalization": "normalises groups of channels (no rule yet)",
}


@register
class BlockingRule(OpRule):
    """Freeze every channel space that reaches these operators."""

    op_types = tuple(_WHY)

    def propagate(self, ctx: RuleContext) -> None:
        ctx.block("blocking", _WHY[ctx.op_type])
