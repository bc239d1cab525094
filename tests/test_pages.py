"""Large arrays on ordinary pages while an audit runs (onnxlady._io._pages), numpy's setting restored after."""

from __future__ import annotations

from typing import Any

import pytest

import onnxlady._audit._verdicts as verdicts
from fixtures import FIXTURES
from onnxlady._io._pages import _switch, ordinary_pages
from onnxlady.testing import copy_model


def _huge_pages_requested() -> bool:
    """Whether numpy requests huge pages now (read by setting it and putting it back)."""
    switch = _switch()
    assert switch is not None  # numpy has had it since 1.20
    current = bool(switch(True))
    switch(current)
    return current


@pytest.mark.parametrize("before", [True, False])
def test_ordinary_pages_inside_and_the_setting_restored_after(before: bool) -> None:
    switch = _switch()
    assert switch is not None
    original = switch(before)
    try:
        with ordinary_pages():
            assert not _huge_pages_requested()
        assert _huge_pages_requested() is before
        with pytest.raises(RuntimeError), ordinary_pages():
            raise RuntimeError("restored on the way out too")
        assert _huge_pages_requested() is before
    finally:
        switch(original)


def test_the_audit_allocates_on_ordinary_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    original = verdicts._audit_weights

    def audit_weights(*args: Any, **kwargs: Any) -> verdicts.AuditReport:
        seen.append(_huge_pages_requested())
        return original(*args, **kwargs)

    monkeypatch.setattr(verdicts, "_audit_weights", audit_weights)
    switch = _switch()
    assert switch is not None
    original_setting = switch(True)
    try:
        reference = FIXTURES["vgg"](0)
        assert verdicts.audit_models(reference, copy_model(reference)).verdict == "identical"
        assert _huge_pages_requested()  # as it was
    finally:
        switch(original_setting)
    assert seen == [False]
