"""Operators a converted suspect has more of than its reference: an edit no converter makes.

A suspect matched across a conversion (fused, renamed, another layout or precision) is compared
on its weights; the operators between them are a converter's to rewrite, so the node-for-node
check (:mod:`onnxlady._audit._graph_edits`) does not apply. But converters fuse, fold and drop
operators; they do not add nonlinear ones. A ``Neg`` or ``Softmax`` appended behind the output
(``onnx.compose.merge_models``), or a ``Relu`` made an ``Abs`` inside an optimised graph, kept
every weight and was audited ``converted`` (held-out round 12, F5). Here the nonlinear operators
of both models are counted by kind, with what fusions carry (an ``activation`` attribute, a
``Gelu`` for the ``Erf`` form it replaces, ``FastGelu`` for the ``Tanh`` one), and a kind of which the suspect has more is an
edit. Fewer is no edit: fusion into attention, and quantization absorbing a ``Relu`` into its
range, remove them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import onnx

from onnxlady._audit._graph_edits import folded_tensors, graph_constants

__all__ = ["added_operators"]

#: Each nonlinear operator's kind. Operators converters rewrite into one another (a ``Gelu`` for
#: the ``Erf`` form it fuses, ``FastGelu`` for the ``Tanh`` one, ``Relu`` for a ``Clip`` at zero,
#: ``HardSwish`` for ``HardSigmoid`` times x) are one kind. Arithmetic is left out: decompositions add it.
_KINDS: dict[str, str] = {
    "relu": "relu", "clip": "relu",
    "leakyrelu": "leakyrelu", "prelu": "prelu", "elu": "elu", "selu": "selu", "celu": "celu",
    "thresholdedrelu": "thresholdedrelu",
    "sigmoid": "sigmoid", "quickgelu": "sigmoid",
    "hardsigmoid": "hardsigmoid", "hardswish": "hardsigmoid",
    "erf": "erf", "gelu": "erf", "biasgelu": "erf",
    "tanh": "tanh", "fastgelu": "tanh", "gemmfastgelu": "tanh",
    "softplus": "softplus", "softsign": "softsign", "mish": "softplus",
    "neg": "neg", "abs": "abs", "sign": "sign",
    "softmax": "softmax", "logsoftmax": "softmax", "hardmax": "softmax",
    "argmax": "argmax", "argmin": "argmax", "topk": "topk",
    "not": "not",
}  # fmt: skip

#: Fused operators and the kinds they compute inside: attention holds its softmax; a rotary
#: embedding (fused alone or into attention) holds the rotation's negations, as many as its
#: decomposed form writes (one or two per head layout): where either model fuses one, ``Neg``
#: is not counted.
_FUSED_KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("softmax",), "multiheadattention": ("softmax",), "packedattention": ("softmax",),
    "packedmultiheadattention": ("softmax",), "decoderattention": ("softmax",),
    "decodermaskedmultiheadattention": ("softmax",), "decodermaskedselfattention": ("softmax",),
    "qattention": ("softmax",), "sparseattention": ("softmax",), "pagedattention": ("softmax",),
    "longformerattention": ("softmax",), "groupqueryattention": ("softmax",), "biassoftmax": ("softmax",),
    "rotaryembedding": ("rotary",), "gemmarotaryembedding": ("rotary",),
    "biassplitgelu": ("erf",), "swish": ("sigmoid",), "silu": ("sigmoid",),
}  # fmt: skip

#: Quantized operators that make ``Relu``/``Clip`` part of an activation's range.
_QUANTIZING = frozenset({
    "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "QGemm", "QAttention",
})  # fmt: skip

#: Quantized forms of an operator: ``QLinearSigmoid`` is a ``Sigmoid``.
_PREFIXES = ("qlinear", "nhwc", "fused")


def _kind(op_type: str) -> str | None:
    name = op_type.lower()
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in _KINDS:
            return _KINDS[name[len(prefix):]]
    return _KINDS.get(name)


def _node_kinds(node: onnx.NodeProto) -> Iterable[str]:
    kind = _kind(node.op_type)
    name = node.op_type.lower()
    if kind == "erf" and name == "gelu" and any(a.name == "approximate" and a.s == b"tanh" for a in node.attribute):
        kind = "tanh"  # Gelu(approximate="tanh") is the tanh form FastGelu fuses
    if kind is not None:
        yield kind
    yield from _FUSED_KINDS.get(name, ())
    for attribute in node.attribute:  # FusedConv, FusedGemm, NCHWc Conv: the activation they carry
        if attribute.name == "activation" and attribute.type == onnx.AttributeProto.STRING:
            fused = _kind(attribute.s.decode("utf-8", "replace"))
            if fused is not None:
                yield fused
        elif attribute.name == "activation" and attribute.type == onnx.AttributeProto.INT and attribute.i == 1:
            yield "sigmoid"  # GroupNorm / SkipGroupNorm's SiLU
        elif name == "groupqueryattention" and attribute.name == "do_rotary" and attribute.i:
            yield "rotary"


def _count(
    nodes: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto], counts: Counter[str],
    names: dict[str, list[str]], depth: int = 0,
) -> None:
    for node in nodes:
        for kind in _node_kinds(node):
            counts[kind] += 1
            names.setdefault(kind, []).append(node.name or (node.output[0] if node.output else node.op_type))
        function = functions.get((node.domain, node.op_type))
        if function is not None and depth < 16:  # a call counts its body's operators
            _count(function.node, functions, counts, names, depth + 1)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _count(graph.node, functions, counts, names, depth + 1)


def _kinds(model: onnx.ModelProto) -> tuple[Counter[str], dict[str, list[str]]]:
    """Nonlinear operators by kind, and their names; arithmetic on constants alone left out.

    What is computed from constants alone (``-exp(A_log)``) is a constant a folder stores: its
    operators are compared by value (:mod:`onnxlady._audit._derived_values`), not counted.
    """
    counts: Counter[str] = Counter()
    names: dict[str, list[str]] = {}
    functions = {(function.domain, function.name): function for function in model.functions}
    constants = graph_constants(model.graph)
    folded, _ = folded_tensors(model.graph, constants)
    computing = [node for node in model.graph.node if not node.output or not all(name in folded for name in node.output if name)]
    _count(computing, functions, counts, names)
    return counts, names


def _quantized(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _QUANTIZING for node in model.graph.node)


def added_operators(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> list[str]:
    """The kinds of nonlinear operator the suspect has more of than the reference, one line each.

    Returns:
        Empty when the suspect has no kind more often (the usual conversion); else lines such as
        ``"1 more neg operator in the suspect (Neg 'y_neg')"``. With a quantized reference and a
        suspect that is not, ``Relu``/``Clip`` are not compared (the quantized form absorbed them).
    """
    ref_counts, _ = _kinds(reference)
    sus_counts, sus_names = _kinds(suspect)
    skipped = {"relu"} if _quantized(reference) and not _quantized(suspect) else set()
    if ref_counts.get("rotary") or sus_counts.get("rotary"):
        skipped |= {"neg", "rotary"}
    lines = []
    for kind in sorted(sus_counts):
        extra = sus_counts[kind] - ref_counts.get(kind, 0)
        if extra <= 0 or kind in skipped:
            continue
        shown = ", ".join(f"'{name}'" for name in sus_names[kind][-3:])
        lines.append(f"{extra} more {kind} operator{'s' if extra != 1 else ''} in the suspect than in the reference ({shown})")
    return lines
