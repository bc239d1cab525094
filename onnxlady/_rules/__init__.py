"""Per-operator permutation rules; importing this package fills the registry."""

from onnxlady._rules import (  # ruff: ignore[unused-import] - each module registers its rules
    blocking,
    contrib,
    contrib_unet,
    einsum,
    elementwise,
    layout,
    nchwc,
    normalization,
    normalization_groups,
    pooling,
    producers,
    quantized,
    quantized_contrib,
    quantized_recurrent,
    recurrent,
    reductions,
    structural,
)
from onnxlady._rules._registry import DuplicateRuleError, OpRule, register, registered_operators, rule_for

__all__ = ["DuplicateRuleError", "OpRule", "register", "registered_operators", "rule_for"]
