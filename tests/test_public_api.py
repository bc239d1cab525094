"""The public API is documented: every name in ``onnxlady.__all__``, in Google style.

Functions need an ``Args:`` section naming every parameter when they take any, and a
``Returns:`` (or ``Yields:``) section when they return a value; every public method of a
re-exported class has a docstring; every public object says it comes from ``onnxlady`` (what
``help()`` and tracebacks show), not from the private module it lives in.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import onnxlady

_PUBLIC = sorted(onnxlady.__all__)
_FUNCTIONS = [name for name in _PUBLIC if inspect.isfunction(getattr(onnxlady, name))]
_CLASSES = [name for name in _PUBLIC if inspect.isclass(getattr(onnxlady, name))]
#: Return annotations (strings: the package uses postponed annotations) that return nothing.
_NO_VALUE = {"None", "NoReturn", "typing.NoReturn", "Never"}
#: An entry of an ``Args:`` section: ``name:``, ``*args:`` or ``name (type):``, indented once.
_ARG_ENTRY = re.compile(r"^ {4}\*{0,2}(\w+)(?: \([^)]*\))?:")


def _section(doc: str, title: str) -> list[str] | None:
    """The lines of section ``title`` (``"Args"``...) of a dedented docstring, or None if absent."""
    lines = doc.splitlines()
    if f"{title}:" not in lines:
        return None
    body = []
    for line in lines[lines.index(f"{title}:") + 1 :]:
        if line and not line.startswith(" "):
            break
        body.append(line)
    return body


def _documented_args(doc: str) -> set[str]:
    section = _section(doc, "Args") or []
    return {match.group(1) for line in section if (match := _ARG_ENTRY.match(line))}


def function_problems(function: Callable[..., Any]) -> list[str]:
    """What the docstring of a public function lacks (empty when it is complete)."""
    doc = inspect.getdoc(function) or ""
    if not (function.__doc__ or "").strip():
        return ["no docstring"]
    problems = []
    signature = inspect.signature(function)
    parameters = [name for name in signature.parameters if name not in ("self", "cls")]
    if parameters:
        if _section(doc, "Args") is None:
            problems.append("no Args section")
        else:
            missing = [name for name in parameters if name not in _documented_args(doc)]
            if missing:
                problems.append(f"Args does not name {missing}")
    returned = signature.return_annotation
    if returned is inspect.Signature.empty:
        problems.append("no return annotation")
    elif str(returned) not in _NO_VALUE and _section(doc, "Returns") is None and _section(doc, "Yields") is None:
        problems.append(f"returns {returned} but has no Returns section")
    return problems


def _public_methods(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    """(name, function) of every public method and property getter ``cls`` has outside builtins."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        owner = next((klass for klass in cls.__mro__ if name in vars(klass)), None)
        if owner is None or owner.__module__ == "builtins":
            continue  # Exception.add_note and the like: documented by Python
        member = vars(owner)[name]
        if isinstance(member, (staticmethod, classmethod)):
            yield name, member.__func__
        elif isinstance(member, property) and member.fget is not None:
            yield name, member.fget
        elif inspect.isfunction(member):
            yield name, member


def test_public_api_is_not_empty() -> None:
    assert len(_FUNCTIONS) >= 10 and len(_CLASSES) >= 10
    assert {"permute", "unpermute", "verify", "resync", "audit", "inspect"} <= set(_FUNCTIONS)


@pytest.mark.parametrize("name", _PUBLIC)
def test_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(onnxlady, name)
    assert (obj.__doc__ or "").strip(), f"onnxlady.{name} has no docstring"


@pytest.mark.parametrize("name", _PUBLIC)
def test_public_name_belongs_to_the_package(name: str) -> None:
    assert getattr(onnxlady, name).__module__ == "onnxlady"


@pytest.mark.parametrize("name", _FUNCTIONS)
def test_public_function_documents_arguments_and_result(name: str) -> None:
    assert function_problems(getattr(onnxlady, name)) == []


@pytest.mark.parametrize("name", _CLASSES)
def test_public_methods_have_docstrings(name: str) -> None:
    cls = getattr(onnxlady, name)
    undocumented = [method for method, function in _public_methods(cls) if not (function.__doc__ or "").strip()]
    assert undocumented == [], f"onnxlady.{name}: methods without a docstring: {undocumented}"


# -- the checks themselves catch what they look for --------------------------------------------
def _bare(model: str, seed: int = 0) -> int:
    return seed


def _no_sections(model: str, seed: int = 0) -> int:
    """Shuffle ``model`` with ``seed``."""
    return seed


def _one_argument_missing(model: str, seed: int = 0) -> int:  # ruff: ignore[undocumented-param] - the gap under test
    """Shuffle a model.

    Args:
        model: the model file.

    Returns:
        The seed.
    """
    return seed


def _complete(model: str, *, seed: int = 0) -> None:
    """Shuffle a model.

    Args:
        model: the model file.
        seed (int): where the permutations start.
    """


def test_function_problems_catches_gaps() -> None:
    assert function_problems(_bare) == ["no docstring"]
    assert function_problems(_no_sections) == ["no Args section", "returns int but has no Returns section"]
    assert function_problems(_one_argument_missing) == ["Args does not name ['seed']"]
    assert function_problems(_complete) == []


def test_method_check_catches_an_undocumented_method() -> None:
    class Documented:
        """A class."""

        def shown(self) -> None:
            """Shown."""

        @property
        def hidden(self) -> int:
            return 1

    assert [name for name, function in _public_methods(Documented) if not function.__doc__] == ["hidden"]
