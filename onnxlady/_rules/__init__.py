"""Per-operator permutation rules; importing this package fills the registry."""

from onnxlady._rules import (  # ruff: ignore[unused-import] - each module registers its rules
    blocking,
    contrib,
    elementwise,
    layout,
    normalization,
    pooling,
    producers,
    quantized,
    quantized_contrib,
    recurrent,
    reductions,
    structural,
)
from onnxlady._rules._registry import DuplicateRuleError, OpRule, register, registered_operators, rule_for

__all__ = ["DuplicateRuleError", "OpRule", "register", "registered_operators", "rule_for"]
