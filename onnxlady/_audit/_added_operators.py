"""Operators a converted suspect has more of than its reference: an edit no converter makes.

A suspect matched across a conversion (fused, renamed, another layout or precision) is compared
on its weights; the operators between them are a converter's to rewrite, so the node-for-node
check (:mod:`onnxlady._audit._graph_edits`) does not apply. But converters fuse, fold and drop
operators; they do not add nonlinear ones. A ``Neg`` or ``Softmax`` appended behind the output
(``onnx.compose.merge_models``), or a ``Relu`` made an ``Abs`` inside an optimised graph, kept
every weight and was audited ``converted`` (held-out round 12, F5). Here the nonlinear operators
of both models are counted by kind, with what fusions carry (an ``activation`` attribute,
attention's softmax), and a kind of which the suspect has more is an edit. Fewer is no edit:
fusion into attention, and quantization absorbing a ``Relu`` into its range, remove them.

A fused activation counts as the pattern it replaces, not as that pattern's core: an ``Erf``
inside ``x * 0.5 * (1 + erf(x / sqrt 2))`` is a ``Gelu``, alone it is an ``Erf`` (likewise
``Tanh`` and ``FastGelu``, ``Sigmoid`` times its input and ``QuickGelu``, ``HardSigmoid`` times
its input and ``HardSwish``), and a ``Gelu`` left inside that arithmetic in the ``Erf``'s place is
neither. An ``Erf`` made a ``com.microsoft.Gelu`` kept the count of one "erf" kind and was
audited ``converted`` (held-out round 13, F3).

Within one kind, what the operator computes is compared too (:func:`changed_operators`): a
``Relu`` made a ``Clip(0, 6)`` or back, a ``LeakyRelu``'s slope, a ``Clip``'s bounds, a
normalization's epsilon, a ``Softmax``'s axis. Each is read as what it computes, not how it is
spelled: ``Relu`` is a clip to ``[0, inf)``, a ``FusedConv``'s ``activation_params`` are the
fused activation's, a bound stored in float16 is the same bound.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx

from onnxlady._audit._graph_edits import _Values, folded_tensors, graph_constants
from onnxlady._graph._fold import constant_attribute_value

__all__ = ["added_operators", "approximated_gelus", "changed_operators"]

#: Each nonlinear operator's kind. Operators converters rewrite into one another (``Relu`` for a
#: ``Clip`` at zero, ``BiasGelu`` for a ``Gelu`` after an ``Add``) are one kind. A fused activation
#: is the kind of its decomposed form (:data:`_DECOMPOSED`), not of the core that form applies: an
#: ``Erf`` alone made a ``Gelu`` computes something else. Arithmetic is left out: decompositions add it.
_KINDS: dict[str, str] = {
    "relu": "relu", "clip": "relu",
    "leakyrelu": "leakyrelu", "prelu": "prelu", "elu": "elu", "selu": "selu", "celu": "celu",
    "thresholdedrelu": "thresholdedrelu",
    "sigmoid": "sigmoid", "quickgelu": "swish",
    "hardsigmoid": "hardsigmoid", "hardswish": "hardswish",
    "erf": "erf", "gelu": "gelu", "biasgelu": "gelu",
    "tanh": "tanh", "fastgelu": "fastgelu", "gemmfastgelu": "fastgelu",
    "softplus": "softplus", "softsign": "softsign", "mish": "softplus",
    "neg": "neg", "abs": "abs", "sign": "sign",
    "softmax": "softmax", "logsoftmax": "logsoftmax", "hardmax": "hardmax",
    "argmax": "argmax", "argmin": "argmin", "topk": "topk",
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
    "biassplitgelu": ("gelu",), "swish": ("swish",), "silu": ("swish",),
}  # fmt: skip

#: Nonlinear cores of decomposed activations: the kind the core makes with the arithmetic around
#: it, and whether that arithmetic multiplies the core's output by the core's input (else it adds
#: one to it). ``x * 0.5 * (1 + erf(x / sqrt 2))`` is a ``Gelu``, ``0.5 x (1 + tanh(...))`` a
#: ``FastGelu``, ``x * sigmoid(a x)`` a ``QuickGelu`` (a SiLU at a = 1), ``x * hardsigmoid(x)`` a
#: ``HardSwish``: what ONNX Runtime fuses. The core alone is its own kind.
_DECOMPOSED: dict[str, tuple[str, bool]] = {
    "erf": ("gelu", False), "tanh": ("fastgelu", False), "sigmoid": ("swish", True), "hardsigmoid": ("hardswish", True),
}  # fmt: skip
#: Relative difference within which a pattern's constant is its ``1`` or ``0.5`` (stored quantized).
_PATTERN_RTOL = 2e-2
#: Each fused activation's core.
_CORES = {fused: core for core, (fused, _) in _DECOMPOSED.items()}
#: Operators that change how a value is stored, not what it is: patterns are read through them.
_STORAGE = frozenset({"Cast", "Identity", "QuantizeLinear", "DequantizeLinear"})

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


def _near(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _PATTERN_RTOL * abs(target)


class _Arithmetic:
    """The arithmetic around one graph's nonlinear operators: which are the core of a decomposed activation.

    Read liberally (a ``1`` added to the output, the input multiplied back in), so that every
    form ONNX Runtime fuses counts as the fused activation; a core used otherwise is its own kind.
    """

    def __init__(self, nodes: list[onnx.NodeProto], value: Callable[[str], np.ndarray | None]) -> None:
        self.value = value
        self.producers = {name: node for node in nodes for name in node.output if name}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def _source(self, name: str) -> str:
        """The tensor ``name`` stores anew (a ``Cast``, a quantize-dequantize pair)."""
        for _ in range(16):
            node = self.producers.get(name)
            if node is None or node.op_type not in _STORAGE or not node.input:
                break
            name = node.input[0]
        return name

    def _uses(self, name: str, depth: int = 0) -> Iterator[tuple[str, onnx.NodeProto]]:
        """(tensor read, operator) for each operator reading ``name``, past storage changes."""
        for node in self.consumers.get(name, []):
            if node.op_type in _STORAGE and node.output and depth < 16:
                yield from self._uses(node.output[0], depth + 1)
            else:
                yield name, node

    def _read(self, name: str, depth: int = 0) -> float | None:
        """The scalar constant ``name`` holds, read through casts and a quantized constant's dequantization."""
        value = self.value(name)
        if value is not None:
            return float(np.asarray(value).ravel()[0]) if value.size == 1 and value.dtype.kind in "fiu" else None
        node = self.producers.get(name)
        if node is None or depth >= 16 or not node.input or node.op_type not in _STORAGE:
            return None
        if node.op_type == "DequantizeLinear":
            return self._dequantized(node.input, 0, depth + 1)
        return self._read(node.input[0], depth + 1)

    def _dequantized(self, inputs: Sequence[str], slot: int, depth: int = 0) -> float | None:
        """The real value of the quantized scalar at ``inputs[slot]``, its scale and zero point following it."""
        stored = self._read(inputs[slot], depth)
        scale = self._read(inputs[slot + 1], depth) if len(inputs) > slot + 1 and inputs[slot + 1] else None
        zero = self._read(inputs[slot + 2], depth) if len(inputs) > slot + 2 and inputs[slot + 2] else 0.0
        return None if stored is None or scale is None or zero is None else (stored - zero) * scale

    def _operands(self, node: onnx.NodeProto) -> list[tuple[str, float | None]] | None:
        """A binary ``Add``, ``Mul`` or ``Div``'s operands (their ``QLinear`` forms' too), each with its scalar value if constant."""
        if node.op_type in ("Add", "Mul", "Div") and len(node.input) == 2:
            return [(name, self._read(name)) for name in node.input]
        if node.op_type in ("QLinearAdd", "QLinearMul") and len(node.input) >= 6:
            return [(node.input[slot], self._dequantized(node.input, slot)) for slot in (0, 3)]
        return None

    def _other(self, node: onnx.NodeProto, read: str) -> tuple[str, str, float | None] | None:
        """(operation, the other operand, its constant value) of a binary ``node`` reading ``read`` once."""
        operands = self._operands(node)
        if operands is None or [name for name, _ in operands].count(read) != 1:
            return None
        name, value = next(operand for operand in operands if operand[0] != read)
        return node.op_type.removeprefix("QLinear"), name, value

    def _adds(self, name: str, target: float) -> Iterator[onnx.NodeProto]:
        """The operators using ``name`` as ``target + name``."""
        for read, node in self._uses(name):
            other = self._other(node, read)
            if other is not None and other[0] == "Add" and _near(other[2], target):
                yield node

    def _adds_one(self, name: str) -> bool:
        """Whether ``name`` is used as ``1 + name`` (or ``0.5 + 0.5 name``)."""
        if any(True for _ in self._adds(name, 1.0)):
            return True
        for read, node in self._uses(name):
            other = self._other(node, read)
            if other is not None and other[0] == "Mul" and _near(other[2], 0.5) and node.output and any(
                    True for _ in self._adds(node.output[0], 0.5)):
                return True
        return False

    def input_factor(self, node: onnx.NodeProto) -> float | None:
        """``a`` where ``node``'s output is multiplied by ``x`` and its input is ``a x`` (1 for its input itself).

        ``x * sigmoid(1.702 x)`` is a ``QuickGelu`` of alpha 1.702, ``x * sigmoid(x)`` one of
        alpha 1; None where the output is not multiplied so.
        """
        source = self._source(node.input[0])
        multiplied = set()
        for read, use in self._uses(node.output[0]):
            other = self._other(use, read)
            if other is not None and other[0] == "Mul":
                multiplied.add(self._source(other[1]))
        if source in multiplied:
            return 1.0
        scaled = self.producers.get(source)
        operands = self._operands(scaled) if scaled is not None else None
        if scaled is None or operands is None or scaled.op_type.removeprefix("QLinear") not in ("Mul", "Div"):
            return None
        variable = [name for name, value in operands if value is None]
        factor = next((value for _, value in operands if value is not None), None)
        if len(variable) != 1 or factor is None or self._source(variable[0]) not in multiplied:
            return None
        if scaled.op_type.removeprefix("QLinear") == "Mul":
            return factor
        if operands[0][1] is not None:  # a / x is no scaling of x
            return None
        return 1.0 / factor if factor else math.inf

    def _multiplies_input(self, node: onnx.NodeProto) -> bool:
        """Whether ``node``'s output is multiplied by its input (or by ``x`` where its input is ``a x``)."""
        return self.input_factor(node) is not None

    def decomposed(self, node: onnx.NodeProto, core: str) -> bool:
        """Whether ``node`` sits where the decomposed form of ``core``'s activation has ``core``."""
        if not node.input or not node.output or not node.input[0] or not node.output[0]:
            return False
        return self._multiplies_input(node) if _DECOMPOSED[core][1] else self._adds_one(node.output[0])


def _node_kinds(node: onnx.NodeProto, arithmetic: _Arithmetic) -> Iterable[str]:
    kind = _kind(node.op_type)
    name = node.op_type.lower()
    if kind == "gelu" and name == "gelu" and any(a.name == "approximate" and a.s == b"tanh" for a in node.attribute):
        kind = "fastgelu"  # Gelu(approximate="tanh") is the tanh form FastGelu fuses
    if kind in _DECOMPOSED and arithmetic.decomposed(node, kind):
        kind = _DECOMPOSED[kind][0]  # the core of a decomposed activation: the activation a converter fuses
    elif kind in _CORES and arithmetic.decomposed(node, _CORES[kind]):
        kind = f"{kind} in place of {_CORES[kind]}"  # a fused activation inside a decomposed one's arithmetic
    if kind is not None:
        yield kind
    yield from _FUSED_KINDS.get(name, ())
    for attribute in node.attribute:  # FusedConv, FusedGemm, NCHWc Conv: the activation they carry
        if attribute.name == "activation" and attribute.type == onnx.AttributeProto.STRING:
            fused = _kind(attribute.s.decode("utf-8", "replace"))
            if fused is not None:
                yield fused
        elif attribute.name == "activation" and attribute.type == onnx.AttributeProto.INT and attribute.i == 1:
            yield "swish"  # GroupNorm / SkipGroupNorm's SiLU
        elif name == "groupqueryattention" and attribute.name == "do_rotary" and attribute.i:
            yield "rotary"


def _count(
    nodes: Iterable[onnx.NodeProto], functions: dict[tuple[str, str], onnx.FunctionProto], counts: Counter[str],
    names: dict[str, list[str]], value: Callable[[str], np.ndarray | None], depth: int = 0,
    around: list[onnx.NodeProto] | None = None,
) -> None:
    """Count ``nodes``' kinds into ``counts``; ``around``: all of their graph's nodes, folded ones too."""
    nodes = list(nodes)
    local = {node.output[0]: node for node in nodes if node.op_type == "Constant" and node.output}

    def scoped(name: str) -> np.ndarray | None:  # a body's own Constant nodes, else the main graph's constants
        return constant_attribute_value(local[name]) if name in local else value(name)

    arithmetic = _Arithmetic(nodes if around is None else around, scoped if depth else value)
    # ``Log(Softmax(x))`` is the log-softmax a converter may fuse into one ``LogSoftmax``: counted as one.
    logged = {node.input[0] for node in nodes if node.op_type == "Log" and node.domain in ("", "ai.onnx") and node.input}
    for node in nodes:
        kinds = list(_node_kinds(node, arithmetic))
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx") and node.output and node.output[0] in logged:
            kinds = ["logsoftmax"]
        for kind in kinds:
            counts[kind] += 1
            names.setdefault(kind, []).append(node.name or (node.output[0] if node.output else node.op_type))
        function = functions.get((node.domain, node.op_type))
        if function is not None and depth < 16:  # a call counts its body's operators
            _count(function.node, functions, counts, names, scoped, depth + 1)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _count(graph.node, functions, counts, names, scoped, depth + 1)


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
    _count(computing, functions, counts, names, _Values(model, constants), around=list(model.graph.node))
    return counts, names


def _quantized(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _QUANTIZING for node in model.graph.node)


def _gelu_input(node: onnx.NodeProto, arithmetic: _Arithmetic) -> str | None:
    """The tensor a Gelu computes on: a ``Gelu``'s input, or ``x`` of the ``Erf(x / sqrt 2)`` of its erf form."""
    if node.op_type != "Erf":
        return node.input[0] if node.input else None
    scaled = arithmetic.producers.get(arithmetic._source(node.input[0]))
    operands = arithmetic._operands(scaled) if scaled is not None else None
    if scaled is None or operands is None or scaled.op_type not in ("Mul", "Div"):
        return None
    variable = [name for name, value in operands if value is None]
    factor = next((value for _, value in operands if value is not None), None)
    root = factor if scaled.op_type == "Div" else (1.0 / factor if factor else None)
    return variable[0] if len(variable) == 1 and _near(root, math.sqrt(2.0)) else None


def _gelu_bias(node: onnx.NodeProto, arithmetic: _Arithmetic, source: str | None) -> np.ndarray | None:
    """The bias added to a Gelu's input, sorted (a permuted copy moves it): its bias input, or an ``Add`` of a constant before it.

    An empty array where none is added; None where the input is not known.
    """
    if source is None:
        return None
    names = [node.input[1]] if len(node.input) > 1 and node.input[1] else []
    producer = arithmetic.producers.get(arithmetic._source(source))
    if not names and producer is not None and producer.op_type == "Add" and len(producer.input) == 2:
        names = [name for name in producer.input if arithmetic.value(name) is not None]
    values = [arithmetic.value(name) for name in names]
    if len(values) > 1 or any(value is None or value.dtype.kind != "f" for value in values):
        return None
    return np.sort(np.asarray(values[0], dtype=np.float64).ravel()) if values else np.zeros(0)


def _gelus(model: onnx.ModelProto, kind: str) -> list[np.ndarray | None]:
    """The biases (:func:`_gelu_bias`) of the main graph's Gelus (``kind`` "gelu") or its ``FastGelu`` operators ("fastgelu")."""
    arithmetic = _Arithmetic(list(model.graph.node), _Values(model, graph_constants(model.graph)))
    found = []
    for node in model.graph.node:
        name = node.op_type.lower()
        if kind == "fastgelu" and node.domain == "com.microsoft" and name == "fastgelu":
            found.append(_gelu_bias(node, arithmetic, node.input[0] if node.input else None))
        elif kind == "gelu" and "fastgelu" not in list(_node_kinds(node, arithmetic)) and (
                name in ("gelu", "biasgelu") or (name == "erf" and arithmetic.decomposed(node, "erf"))):
            found.append(_gelu_bias(node, arithmetic, _gelu_input(node, arithmetic)))
    return found


def approximated_gelus(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> int:
    """How many of the suspect's ``FastGelu`` operators stand where the reference computes an exact Gelu.

    Called with the models swapped, how many of the reference's stand where the suspect does:
    the approximated copy given as the reference is the same pair of models.

    ONNX Runtime's transformer optimizer with gelu approximation (Optimum's O3 and O4 levels)
    writes each ``Gelu`` (erf form or operator, its bias fused in) as a ``FastGelu``: the tanh
    approximation, a converter's, not an edit (held-out round 15, F2). One counts where it adds
    the bias of a reference Gelu that the suspect no longer computes exactly: a ``Tanh`` written
    in an ``Erf``'s place, or a ``FastGelu`` in place of another operator, is no approximation.
    """
    if not any(node.op_type == "FastGelu" and node.domain == "com.microsoft" for node in suspect.graph.node):
        return 0
    fast = [bias for bias in _gelus(suspect, "fastgelu") if bias is not None]
    gelus = _gelus(reference, "gelu")
    exact = [bias for bias in gelus if bias is not None]
    gone = len(gelus) - len(_gelus(suspect, "gelu"))
    paired = 0
    for bias in fast:
        index = next((i for i, other in enumerate(exact) if other.size == bias.size
                      and np.allclose(other, bias, rtol=_RTOL, atol=1e-6 * float(np.abs(other).max(initial=1.0)))), None)
        if index is not None:
            exact.pop(index)
            paired += 1
    return min(paired, max(gone, 0))


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
    # The approximation either way: the approximated copy may be given as the reference, the
    # original as the suspect (its exact Gelus then stand where the reference's FastGelus are).
    approximated = {
        "fastgelu": approximated_gelus(reference, suspect)
        if sus_counts.get("fastgelu", 0) > ref_counts.get("fastgelu", 0) else 0,
        "gelu": approximated_gelus(suspect, reference) if sus_counts.get("gelu", 0) > ref_counts.get("gelu", 0) else 0,
    }
    lines = []
    for kind in sorted(sus_counts):
        extra = sus_counts[kind] - ref_counts.get(kind, 0) - approximated.get(kind, 0)
        if extra <= 0 or kind in skipped:
            continue
        shown = ", ".join(f"'{name}'" for name in sus_names[kind][-3:])
        lines.append(f"{extra} more {kind} operator{'s' if extra != 1 else ''} in the suspect than in the reference ({shown})")
    return lines


#: What an operator computes within its kind: its numbers in a fixed order (a clip's bounds, a
#: slope, an epsilon), or None where they are not known here (a bound computed at run time),
#: which matches any.
Parameters = tuple[float, ...] | None

_INF = math.inf
#: Attributes that set what an activation computes, with their defaults (ONNX's and ONNX
#: Runtime's schemas), by operator without its quantized or fused prefix.
_ATTRIBUTES: dict[str, tuple[tuple[str, float], ...]] = {
    "leakyrelu": (("alpha", 0.01),), "hardsigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "elu": (("alpha", 1.0),), "celu": (("alpha", 1.0),), "thresholdedrelu": (("alpha", 1.0),),
    "selu": (("alpha", 1.67326319217681884765625), ("gamma", 1.05070102214813232421875)),
}  # fmt: skip
#: Normalizations by family, with their epsilon's default: a fusion turns one into another of
#: its family (``Add`` + ``LayerNormalization`` into ``SkipLayerNormalization``).
_NORMALIZATIONS: dict[str, tuple[str, float]] = {
    "layernormalization": ("layer normalization", 1e-5), "simplifiedlayernormalization": ("layer normalization", 1e-5),
    "rmsnormalization": ("layer normalization", 1e-5), "skiplayernormalization": ("layer normalization", 1e-12),
    "skipsimplifiedlayernormalization": ("layer normalization", 1e-12),
    "embedlayernormalization": ("layer normalization", 1e-12),
    "batchnormalization": ("batch normalization", 1e-5), "instancenormalization": ("instance normalization", 1e-5),
    "groupnormalization": ("group normalization", 1e-5), "groupnorm": ("group normalization", 1e-5),
    "skipgroupnorm": ("group normalization", 1e-5),
}  # fmt: skip
#: ``HardSwish`` is ``x * HardSigmoid(x)`` with these alpha and beta (what ONNX Runtime fuses).
_HARD_SWISH = (1.0 / 6.0, 0.5)
#: Relative difference within which two parameters are one (a bound stored in float16).
_RTOL = 2e-3


def _float(attribute: onnx.AttributeProto) -> float:
    return float(attribute.f) if attribute.type == onnx.AttributeProto.FLOAT else float(attribute.i)


def _bound(value: float) -> float:
    """A clip bound, float32's largest magnitude read as infinite (``Clip``'s old default)."""
    return math.copysign(_INF, value) if abs(value) >= 3.4e38 else value


def _bare(op_type: str) -> str:
    name = op_type.lower()
    for prefix in _PREFIXES:
        if name.startswith(prefix) and (name[len(prefix):] in _KINDS or name[len(prefix):] in _NORMALIZATIONS):
            return name[len(prefix):]
    return name


def _fused_parameters(activation: str, node: onnx.NodeProto) -> Parameters:
    """A fused activation's parameters: ``activation_params`` (FusedConv) or ``activation_alpha``/``_beta`` (FusedGemm)."""
    attributes = {a.name: a for a in node.attribute}
    given = list(attributes["activation_params"].floats) if "activation_params" in attributes else [
        attributes[name].f for name in ("activation_alpha", "activation_beta") if name in attributes]
    if activation == "relu":
        return (0.0, _INF)
    if activation == "clip":
        return (_bound(given[0]), _bound(given[1])) if len(given) >= 2 else (-_INF, _INF)
    if activation == "hardswish":
        return _HARD_SWISH
    defaults = _ATTRIBUTES.get(activation)
    if defaults is None:
        return ()
    return tuple(given[i] if i < len(given) else default for i, (_, default) in enumerate(defaults))


#: Fused swish forms with their ``alpha`` (``x * sigmoid(alpha x)``) and its default: ONNX
#: Runtime's ``QuickGelu`` (CLIP's activation, fused from its decomposed form) and ONNX's ``Swish``.
_SWISH_ALPHA = {"quickgelu": 1.702, "swish": 1.0}


class _Reader:
    """Reads what each operator of a model computes (:data:`Parameters`), by kind."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.values = _Values(model, graph_constants(model.graph))
        # A decomposed swish's alpha is the arithmetic's around its Sigmoid (main graph only).
        self.arithmetic = _Arithmetic(list(model.graph.node), self.values)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        graph = model.graph
        self.ranks = {value.name: len(value.type.tensor_type.shape.dim)
                      for value in [*graph.input, *graph.output, *graph.value_info]
                      if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")}

    def _scalar(self, name: str, outer: bool) -> float | None:
        value = self.values(name) if outer and name else None
        if value is None or value.size != 1 or value.dtype.kind not in "fiu":
            return None
        return float(np.asarray(value).ravel()[0])

    def _clip(self, node: onnx.NodeProto, outer: bool) -> Parameters:
        attributes = {a.name: a for a in node.attribute}
        if "min" in attributes or "max" in attributes or self.opset < 11:  # Clip-6: bounds as attributes
            low = attributes["min"].f if "min" in attributes else -_INF
            high = attributes["max"].f if "max" in attributes else _INF
            return (_bound(low), _bound(high))
        bounds = []
        for slot, default in ((1, -_INF), (2, _INF)):
            name = node.input[slot] if len(node.input) > slot else ""
            value = self._scalar(name, outer) if name else default
            if value is None:
                return None
            bounds.append(_bound(value))
        return (bounds[0], bounds[1])

    def _softmax(self, node: onnx.NodeProto, outer: bool) -> Parameters:
        legacy = self.opset < 13  # a 2-D coercion at the axis: the same as opset 13's where the axis is the last
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1 if legacy else -1)
        rank = self.ranks.get(node.input[0]) if outer and node.input else None
        if axis >= 0:
            if rank is None:
                return None
            axis -= rank
        return (float(axis), float(legacy and axis != -1))

    def _decomposed_epsilon(self, node: onnx.NodeProto) -> tuple[bool, Parameters]:
        """Whether ``node`` adds an epsilon to a ``ReduceMean``'s variance under a square root, and that epsilon.

        ``ReduceMean(x^2) + eps`` (or of ``(x - mean)^2``) read by ``Sqrt`` or ``Pow(., +-0.5)``: the
        arithmetic of a normalization that ONNX Runtime's optimizers fuse into
        ``(Skip)(Simplified)LayerNormalization``, carrying ``eps`` as the attribute. An epsilon
        stored in a half type reads None (it rounds by more than :data:`_RTOL`; a wildcard).
        """
        if len(node.input) != 2 or not node.output or not node.output[0]:
            return False, None
        readers = self.arithmetic.consumers.get(node.output[0], [])
        if not readers or not all(reader.op_type == "Sqrt" or (
                reader.op_type == "Pow" and len(reader.input) == 2
                and any(_near(self._scalar(reader.input[1], True), root) for root in (0.5, -0.5))) for reader in readers):
            return False, None
        for slot in (0, 1):
            producer = self.arithmetic.producers.get(self.arithmetic._source(node.input[slot]))
            if producer is None or producer.op_type != "ReduceMean":
                continue
            other = node.input[1 - slot]
            epsilon = self._scalar(other, True)
            if epsilon is None:
                return False, None
            return True, None if self._half(other) else (epsilon,)
        return False, None

    def _half(self, name: str) -> bool:
        """Whether the constant ``name`` is stored (or cast) in float16 or bfloat16."""
        halves = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
        for _ in range(16):
            tensor = self.values.constants.get(name)
            if isinstance(tensor, onnx.TensorProto) and tensor.data_type in halves:
                return True
            node = self.arithmetic.producers.get(name)
            if node is None or (not node.input and node.op_type != "Constant"):
                return False
            if node.op_type == "Constant":
                return any(a.name == "value" and a.t.data_type in halves for a in node.attribute)
            if node.op_type == "Cast" and any(a.name == "to" and a.i in halves for a in node.attribute):
                return True
            name = node.input[0]
        return False

    def parameters(self, node: onnx.NodeProto, outer: bool) -> Iterable[tuple[str, Parameters]]:
        """(kind, parameters) of what ``node`` computes; ``outer``: it sits where the main graph's constants are read."""
        name = _bare(node.op_type)
        if name == "relu":
            yield "relu", (0.0, _INF)
        elif name == "clip":
            yield "relu", self._clip(node, outer)
        elif name == "hardswish":
            yield "hardsigmoid", _HARD_SWISH
        elif name in _ATTRIBUTES:
            attributes = {a.name: a for a in node.attribute}
            yield _KINDS[name], tuple(_float(attributes[key]) if key in attributes else default
                                      for key, default in _ATTRIBUTES[name])
        elif name in ("softmax", "logsoftmax", "hardmax"):
            yield name, self._softmax(node, outer)
        elif name in _SWISH_ALPHA:
            yield "swish", (next((a.f for a in node.attribute if a.name == "alpha"), _SWISH_ALPHA[name]),)
        elif name == "sigmoid" and outer and node.input and node.output and node.input[0] and node.output[0]:
            factor = self.arithmetic.input_factor(node)  # x * sigmoid(a x): the swish of alpha a (decomposed)
            if factor is not None:
                yield "swish", (factor,)
        elif name in _NORMALIZATIONS:
            family, default = _NORMALIZATIONS[name]
            yield family, (next((a.f for a in node.attribute if a.name == "epsilon"), default),)
        elif name == "add" and outer:
            found, epsilon = self._decomposed_epsilon(node)
            if found:  # a layer (or RMS) normalization left as arithmetic: what ONNX Runtime fuses into one
                yield "layer normalization", epsilon
        activation = next((a.s.decode("utf-8", "replace").lower() for a in node.attribute
                           if a.name == "activation" and a.type == onnx.AttributeProto.STRING), None)
        if activation is not None and activation in _KINDS:
            yield "hardsigmoid" if activation == "hardswish" else _KINDS[activation], _fused_parameters(activation, node)


def _same(first: tuple[float, ...], second: tuple[float, ...]) -> bool:
    return len(first) == len(second) and all(
        a == b or (math.isfinite(a - b) and abs(a - b) <= _RTOL * max(abs(a), abs(b))) for a, b in zip(first, second))


def _collect(
    nodes: Iterable[onnx.NodeProto], reader: _Reader, functions: dict[tuple[str, str], onnx.FunctionProto],
    found: dict[str, list[tuple[Parameters, str]]], outer: bool = True, depth: int = 0,
) -> None:
    for node in nodes:
        for kind, parameters in reader.parameters(node, outer):
            found.setdefault(kind, []).append((parameters, f"{node.op_type} '{node.name or (node.output[0] if node.output else '')}'"))
        function = functions.get((node.domain, node.op_type))
        if function is not None and depth < 16:  # a body reads its own constants: bounds there are not known
            _collect(function.node, reader, functions, found, False, depth + 1)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _collect(graph.node, reader, functions, found, outer, depth + 1)


def _parameters(model: onnx.ModelProto) -> dict[str, list[tuple[Parameters, str]]]:
    """What each nonlinear operator and normalization computes, by kind, with its label; folded arithmetic left out."""
    constants = graph_constants(model.graph)
    folded, _ = folded_tensors(model.graph, constants)
    computing = [node for node in model.graph.node if not node.output or not all(name in folded for name in node.output if name)]
    found: dict[str, list[tuple[Parameters, str]]] = {}
    _collect(computing, _Reader(model), {(f.domain, f.name): f for f in model.functions}, found)
    return found


def _unmatched(mine: list[Parameters], theirs: list[Parameters]) -> tuple[list[int], list[Parameters]]:
    """Which of ``theirs`` (the suspect's, by index) no operator of ``mine`` computes, and ``mine`` left over.

    Equal parameters pair first; unknown ones (None) on either side pair with anything left.
    """
    left = list(mine)
    unmatched = []
    for index, parameters in enumerate(theirs):
        if parameters is None:
            continue
        partner = next((i for i, other in enumerate(left) if other is not None and _same(other, parameters)), None)
        if partner is not None:
            left.pop(partner)
        else:
            unmatched.append(index)
    wildcards = sum(1 for other in left if other is None)
    left = [other for other in left if other is not None]
    return unmatched[wildcards:], left


def _composed_clip(parameters: tuple[float, ...], left: list[Parameters]) -> bool:
    """Whether a clip is a ``Relu`` and a ``Clip`` of the reference fused into one (ONNX Runtime's ReluClipFusion)."""
    if (0.0, _INF) not in left:
        return False
    return any(other is not None and other[1] == parameters[1] and max(other[0], 0.0) == parameters[0] for other in left)


def changed_operators(reference: onnx.ModelProto, suspect: onnx.ModelProto) -> list[str]:
    """The suspect's operators that compute, within their kind, what none of the reference's does; one line each.

    A ``Relu`` made a ``Clip(0, 6)``, a ``LeakyRelu``'s slope or a normalization's epsilon
    changed keep every weight and every count of operators (:func:`added_operators`). Each of
    the suspect's operators must find one of the reference's of its kind computing the same
    (:data:`Parameters`, within float16's rounding), each of the reference's used once. Only a
    suspect's operator left over while one of the reference's is too is an edit: fewer is a
    fusion's, and more of a kind where every one of the reference's is found is either
    :func:`added_operators`' or a converter's (a ``BatchNormalization`` the reference, optimized,
    folded into its ``Conv``; a ``LayerNormalization`` fused from the arithmetic the reference
    keeps, whose epsilon is a constant there).

    Returns:
        Empty when every operator is found; else lines such as ``"Clip 'c' computes relu (0, 6)
        in the suspect, which no relu operator of the reference computes"``.
    """
    ours, theirs = _parameters(reference), _parameters(suspect)
    skipped = {"relu"} if _quantized(reference) and not _quantized(suspect) else set()
    lines = []
    for kind in sorted(theirs):
        if kind in skipped:
            continue
        unmatched, left = _unmatched([parameters for parameters, _ in ours.get(kind, [])],
                                     [parameters for parameters, _ in theirs[kind]])
        if not left:
            continue  # every operator of the reference's found: more of the kind is added_operators'
        for index in unmatched:
            parameters, label = theirs[kind][index]
            if parameters is None or (kind == "relu" and _composed_clip(parameters, left)):
                continue
            shown = ", ".join(f"{value:g}" for value in parameters)
            lines.append(f"{label} computes {kind} ({shown}) in the suspect, which no {kind} operator of the reference computes")
    return lines
