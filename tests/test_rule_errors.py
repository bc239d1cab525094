"""No rule crashes on a fixture model, on any conversion of one, or on a fetched real model.

A rule that raises does not stop the analysis: the node is abandoned and its spaces freeze with
a ``rule-error`` reason (``onnxlady._analysis._channels._run_rule``). That is safe, but silent:
the model only loses permutable neurons. So a ``rule-error`` on a model we build ourselves is a
bug in a rule, and this test names the fixture, the conversion and the node. The real models
of ``tools.fetch_models`` are checked where they have been fetched (``python3 -m
tools.fetch_models``; the test says which are missing).
"""

from __future__ import annotations

import onnx
import pytest

from fixtures import FIXTURES, RUNNABLE
from fixtures.conversions import CONVERSIONS
from onnxlady import ChannelAnalysis, analyze, load_model
from onnxlady._rules._registry import rule_for
from tools.fetch_models import DEFAULT_OUT, MODELS, ModelSpec

#: Conversions that run the model (QDQ calibrates its activations in ONNX Runtime).
NEEDS_RUNTIME = ("qdq",)


def rule_errors(analysis: ChannelAnalysis) -> list[str]:
    """Every ``rule-error`` freeze reason of an analysis, as text, without repeats.

    An abandoned node records its reason on each output it leaves untracked, and on the groups
    of its inputs; both are read, so a crash on a node whose inputs carry no group is seen too.
    """
    reasons = [reason for group in analysis.groups for reason in group.reasons]
    reasons += analysis.state.untracked_reason.values()
    return sorted({str(reason) for reason in reasons if reason.kind == "rule-error"})


def _variants(name: str) -> dict[str, onnx.ModelProto]:
    """The fixture as built, and each conversion of it that applies ("" names the original)."""
    model = FIXTURES[name](0)
    variants = {"": model}
    for conversion, convert in CONVERSIONS.items():
        if conversion in NEEDS_RUNTIME and name not in RUNNABLE:
            continue
        try:
            variants[conversion] = convert(model)
        except (ValueError, RuntimeError):  # the conversion refuses this model (nothing to fold...)
            continue
    return variants


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_no_rule_raises_on_a_fixture_or_its_conversions(name: str) -> None:
    found = {
        conversion or "as built": errors
        for conversion, model in _variants(name).items()
        if (errors := rule_errors(analyze(model)))
    }
    assert not found, f"rules crashed on fixture {name!r}: {found}"


@pytest.mark.parametrize("spec", MODELS, ids=[spec.name for spec in MODELS])
def test_no_rule_raises_on_a_real_model(spec: ModelSpec) -> None:
    path = DEFAULT_OUT / spec.file
    if not path.exists():
        pytest.skip(f"{spec.name} not fetched (python3 -m tools.fetch_models)")
    errors = rule_errors(analyze(load_model(path).model))
    assert not errors, f"rules crashed on real model {spec.name!r}: {errors}"


def test_every_conversion_applies_to_some_fixture() -> None:
    """The conversions are really analysed: each one converts at least one fixture."""
    applied = {conversion for name in FIXTURES for conversion in _variants(name)}
    assert applied == {"", *CONVERSIONS}


def test_a_crashing_rule_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check sees a crash: with the Relu rule raising, ``rule_errors`` names the Relu nodes."""
    model = FIXTURES["vgg"](0)
    assert not rule_errors(analyze(model))
    rule = rule_for("", "Relu")
    assert rule is not None

    def crash(*_: object) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(type(rule), "propagate", crash)
    errors = rule_errors(analyze(model))
    relus = [node.name for node in model.graph.node if node.op_type == "Relu"]
    assert relus
    assert all(any(f"Relu '{relu}'" in error for error in errors) for relu in relus), errors
    assert all("ZeroDivisionError: planted" in error for error in errors)
