"""An inlined view of a model whose layers sit in ONNX local functions.

Exporters (torch's ``export_modules_as_functions``, the dynamo exporter) and optimisers put
whole layers into ``model.functions``: the main graph holds call nodes whose op type is the
function's name, and the weights usually come in from outer initializers as call inputs. The
rules see operators, not calls, so the analysis runs on a copy with every call inlined
(:func:`onnx.inliner.inline_local_functions`, which keeps the outer names a call reads and
renames only the names internal to a function body). Every command still writes the original
model: only tensors that exist under the same name in it (its initializers and main-graph
``Constant`` nodes) can be permuted; a constant living inside a function body is shared by all
the call sites and is frozen instead (see :meth:`FunctionView.internal_origin`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
import onnx.inliner

from onnxlady._errors import OnnxladyError
from onnxlady._io._tensors import tensor_holders

#: The suffix onnx's inliner gives the names internal to one inlined call (``name__3``).
_CALL_SUFFIX = re.compile(r"__\d+$")


@dataclass(frozen=True)
class FunctionView:
    """A model with its local-function calls inlined, and what of it the original can hold.

    Attributes:
        model: the inlined copy the analysis reads (never written out).
        writable: names of the tensors that exist under the same name in the original model
            (its initializers and ``Constant`` outputs), the only ones a command may rewrite.
    """

    model: onnx.ModelProto
    writable: frozenset[str]
    _internal: dict[str, str]  # a function body's output or Constant name -> "domain::name"

    def internal_origin(self, name: str) -> str | None:
        """The local function whose body defines ``name`` of the inlined view, or None.

        Args:
            name: a tensor name of the inlined view.

        Returns:
            ``domain::name`` of the function whose body produces it (its inlined copies carry
            a ``__k`` suffix), or None when the name is the original model's own.
        """
        if name in self.writable:
            return None
        return self._internal.get(_CALL_SUFFIX.sub("", name), self._internal.get(name, "a local function"))


def calls_local_functions(model: onnx.ModelProto) -> bool:
    """Whether any node of ``model`` (main graph or a body) calls one of its local functions.

    Args:
        model: the model to look at (not changed).

    Returns:
        True when inlining would change the graph the rules see.
    """
    if not len(model.functions):
        return False
    local = {(function.domain, function.name) for function in model.functions}

    def calls(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if (node.domain, node.op_type) in local:
                return True
            for attribute in node.attribute:
                bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
                if any(calls(body) for body in bodies):
                    return True
        return False

    return calls(model.graph)


def inlined_view(model: onnx.ModelProto) -> FunctionView | None:
    """The inlined view of ``model`` when it calls local functions, else None.

    Args:
        model: the model as loaded (not changed: the view is a copy).

    Returns:
        The view, or None for a model without local-function calls (analysed as it is).

    Raises:
        OnnxladyError: onnx cannot inline the functions (a malformed function).
    """
    if not calls_local_functions(model):
        return None
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # onnx raises its C++ errors as several types
        raise OnnxladyError(f"cannot inline the model's local functions ({exc})") from exc
    internal: dict[str, str] = {}
    for function in model.functions:
        label = f"{function.domain}::{function.name}" if function.domain else function.name
        for node in function.node:
            for output in node.output:
                internal.setdefault(output, label)
    return FunctionView(inlined, frozenset(tensor_holders(model)), internal)
