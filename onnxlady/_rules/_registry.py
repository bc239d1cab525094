"""The rule registry: one small rule per operator family, each operator with at most one rule.

A rule says how an operator carries channel permutations from its inputs to its outputs and
onto its constant operands (see ``shared/design/op-rules.md``). Operators without a rule
freeze every channel space they touch: the tool never permutes on a guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, TypeVar

if TYPE_CHECKING:
    from onnxlady._rules._context import RuleContext


class OpRule:
    """Base class of a permutation rule for the operators listed in ``op_types``."""

    #: Operator types this rule handles.
    op_types: ClassVar[tuple[str, ...]] = ()
    #: Operator domain ("" is the default ai.onnx domain).
    domain: ClassVar[str] = ""
    #: Whether the rule reads joint spaces (``RuleContext.take_joint``); for the others the
    #: analysis splits joint spaces into one space per digit before the rule runs.
    joint_aware: ClassVar[bool] = False

    def propagate(self, ctx: RuleContext) -> None:
        """Couple the node's channel spaces through ``ctx``; raise ``RuleDoesNotApply`` to freeze."""
        raise NotImplementedError


class DuplicateRuleError(RuntimeError):
    """Two rules were registered for one operator: the table must stay unambiguous."""


_RULES: dict[tuple[str, str], OpRule] = {}

RuleType = TypeVar("RuleType", bound=type[OpRule])


def _domain_key(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register(rule_class: RuleType) -> RuleType:
    """Class decorator: add a rule to the table; a second rule for an operator is an error."""
    keys = [(_domain_key(rule_class.domain), op_type) for op_type in rule_class.op_types]
    for key in keys:  # check every operator first: a refused rule leaves no trace
        if key in _RULES or keys.count(key) > 1:
            holder = type(_RULES[key]).__name__ if key in _RULES else rule_class.__name__
            raise DuplicateRuleError(
                f"operator {key[0] or 'ai.onnx'}::{key[1]} already has rule {holder}; "
                f"{rule_class.__name__} would shadow it"
            )
    instance = rule_class()
    for key in keys:
        _RULES[key] = instance
    return rule_class


def rule_for(domain: str, op_type: str) -> OpRule | None:
    """The rule for an operator, or None when nobody wrote one."""
    return _RULES.get((_domain_key(domain), op_type))


def registered_operators() -> list[str]:
    """Every operator with a rule, as ``domain::op_type`` (ai.onnx shown as plain op_type)."""
    return sorted(f"{d}::{op}" if d else op for d, op in _RULES)
