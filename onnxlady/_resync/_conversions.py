"""Conversions recognised in a match: differences of form, not of function, and the side that has them.

Storage types and quantization of paired weights, NCHWc layouts, BatchNorms and per-channel
scales folded, operators fused, the tools that sign their output (ONNX Runtime's optimizers),
the opset, renamed and reordered operators and pass-through operators removed: reported apart
from integrity.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._tensors import read_array
from onnxlady._resync._match_results import ConversionFinding
from onnxlady._resync._nchwc_forms import nchwc_block
from onnxlady._resync._quantized_forms import quantized_form
from onnxlady._resync._sites import Operand, Site

__all__ = ["FLOAT16_IN_FLOAT32", "LINEAR_FAMILIES", "find_conversions"]

#: Operators a converter or simplifier adds or removes without changing the computation.
_PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
_DTYPE_KIND: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}
LINEAR_FAMILIES = ("dense", "conv", "conv-transpose")
#: Opset domains only ONNX Runtime's offline optimizer writes into a saved model (it imports
#: every domain it registers).
_ORT_DOMAINS = frozenset({"com.microsoft.nchwc", "org.pytorch.aten", "ai.onnx.training"})


def _stored_type(graph: ModelGraph, operand: Operand) -> int | None:
    if operand.nbits:
        return None
    leaf = graph.constant_leaf(graph.nodes[operand.node].input[operand.slot])
    tensor = graph.leaf_tensor_or_none(leaf) if leaf is not None else None
    return None if tensor is None else tensor.data_type


def _float16_values(graph: ModelGraph, operand: Operand) -> bool | None:
    """Whether a float32 weight holds float16 numbers only: each value exactly a float16's.

    ONNX Runtime runs a float16 model's operators that its CPU provider has in float32 only
    (Conv, BatchNorm folded into it, NCHWc) between inserted Casts, which ``ORT_ENABLE_ALL``
    folds into the weights: float32 tensors of the float16 values, the float16 roundings of its
    own folds included. Float32 weights of a float32 model are never all float16 numbers: the
    first values read say so (the rest is read only where those are). None: not float32.
    """
    leaf = graph.constant_leaf(graph.nodes[operand.node].input[operand.slot])
    tensor = graph.leaf_tensor_or_none(leaf) if leaf is not None else None
    if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    if tensor.raw_data and not _exact(np.frombuffer(tensor.raw_data[:1024], dtype="<f4")):
        return False
    return _exact(read_array(tensor, f"tensor '{tensor.name}'"))


def _exact(values: np.ndarray) -> bool:
    return bool(values.size) and bool(np.array_equal(values.astype(np.float16).astype(values.dtype), values))


def _float16_held(side: ModelGraph, other: ModelGraph, pairs: list[tuple[Site, Site]], suspect: bool) -> int:
    """How many paired weights ``side`` holds as float32 float16 numbers where ``other``'s are not.

    Counted where the counterpart is stored as float16, or, where it is a float32 of other
    numbers, only when every float32 weight of ``side`` is float16 numbers (the whole model went
    through float16; one layer rounded so is no conversion's evidence).
    """
    beside_float16, beside_float32, every = 0, 0, True
    for pair in pairs:
        mine, theirs = (pair[1], pair[0]) if suspect else pair
        weight, counterpart = mine.operand("weight"), theirs.operand("weight")
        if mine.family not in LINEAR_FAMILIES or weight is None or counterpart is None:
            continue
        exact = _float16_values(side, weight)
        if exact is None:
            continue
        every = every and exact
        if not exact:
            continue
        if _stored_type(other, counterpart) == onnx.TensorProto.FLOAT16:
            beside_float16 += 1
        elif _float16_values(other, counterpart) is False:
            beside_float32 += 1
    return beside_float16 + (beside_float32 if every else 0)


#: The conversion kind of float16 weights held as float32 (:func:`_float16_values`): the audit
#: allows their values float16's storage error.
FLOAT16_IN_FLOAT32 = "float16-as-float32"


def _quantized_form(graph: ModelGraph, operand: Operand) -> str | None:
    if operand.nbits:
        return f"{int(node_attribute(graph.nodes[operand.node], 'bits', 4))}-bit MatMulNBits"
    if operand.quantized:
        return quantized_form(graph, operand.node)
    leaf = graph.constant_leaf(graph.nodes[operand.node].input[operand.slot])
    if leaf is not None and any(graph.nodes[i].op_type == "DequantizeLinear" for i in leaf.chain):
        return "read through DequantizeLinear"
    return None


def _fused_form(graph: ModelGraph, site: Site) -> str:
    """How a site writes its layer, naming a residual Add fused into a ``FusedConv``'s sum input ``Z``.

    ONNX Runtime's ``ConvAddActivationFusion`` (``ORT_ENABLE_ALL``, the ORT-mobile converter's
    level) writes ``Add(Conv(x), z)`` as ``FusedConv(x, W, B, z)``: an operator gone that the
    listing says where it went.
    """
    form = "+".join(op for op in site.ops if op != "BatchNormalization")
    node = graph.nodes[site.node]
    if node.op_type == "FusedConv" and len(node.input) > 3 and node.input[3]:
        form += " with the residual Add as its sum input Z"
    return form


def find_conversions(
    reference: ModelGraph, suspect: ModelGraph, pairs: list[tuple[Site, Site]], methods: Counter[str]
) -> list[ConversionFinding]:
    """What converters did to either model, read from the paired sites (``methods``: pairs made by each method)."""
    findings: list[ConversionFinding] = []
    graphs = {"reference": reference, "suspect": suspect}
    # Storage types and quantization of paired weights.
    types: dict[str, Counter[int]] = {"reference": Counter(), "suspect": Counter()}
    quantized: dict[str, Counter[str]] = {"reference": Counter(), "suspect": Counter()}
    weights = 0
    for mine, theirs in pairs:
        if mine.family not in LINEAR_FAMILIES:
            continue
        weights += 1
        for side, site in (("reference", mine), ("suspect", theirs)):
            weight = site.operand("weight")
            assert weight is not None
            form = _quantized_form(graphs[side], weight)
            if form is not None:
                quantized[side][form] += 1
            stored = _stored_type(graphs[side], weight)
            if stored is not None and stored in _FLOAT_TYPES:
                types[side][stored] += 1
    for side in ("reference", "suspect"):
        other = "suspect" if side == "reference" else "reference"
        for dtype, count in sorted(types[side].items()):
            if dtype in _DTYPE_KIND and types[other][dtype] < count:
                findings.append(
                    ConversionFinding(
                        _DTYPE_KIND[dtype], side, f"{count} of {weights} paired weights stored as {_DTYPE_KIND[dtype]}"
                    )
                )
        if types[side][onnx.TensorProto.FLOAT]:
            held = _float16_held(graphs[side], graphs[other], pairs, side == "suspect")
            if held:
                findings.append(ConversionFinding(
                    FLOAT16_IN_FLOAT32, side,
                    f"{held} of {weights} paired weights float16 numbers stored as float32 (the float16 model run "
                    "in float32, as ONNX Runtime runs the operators its CPU provider lacks in float16)",
                ))  # fmt: skip
        if sum(quantized[side].values()) > sum(quantized[other].values()):
            listed = ", ".join(f"{count} {form}" for form, count in sorted(quantized[side].items()))
            findings.append(ConversionFinding("quantized", side, f"of {weights} paired weights, quantized: {listed}"))
    # Convolutions re-laid out in ONNX Runtime's NCHWc blocks on one side.
    blocked = {side: sum(1 for pair in pairs if (w := pair[n].operand("weight")) is not None and w.blocked)
               for n, side in enumerate(("reference", "suspect"))}  # fmt: skip
    for side, count in blocked.items():
        if count:
            block = nchwc_block(graphs[side])
            findings.append(ConversionFinding(
                "nchwc", side, f"{count} paired convolutions in ONNX Runtime's NCHWc layout (weights in blocks of {block} channels)"
            ))  # fmt: skip
    # BatchNorm folded on one side.
    folded = {"reference": 0, "suspect": 0}
    as_conv = {"reference": 0, "suspect": 0}  # a BatchNorm of its own written as a 1x1 convolution
    for mine, theirs in pairs:
        if mine.batchnorm is not None and theirs.batchnorm is None and theirs.family in LINEAR_FAMILIES:
            (as_conv if mine.lone_batchnorm else folded)["suspect"] += 1
        elif theirs.batchnorm is not None and mine.batchnorm is None and mine.family in LINEAR_FAMILIES:
            (as_conv if theirs.lone_batchnorm else folded)["reference"] += 1
    for side, count in folded.items():
        if count:
            findings.append(
                ConversionFinding(
                    "batchnorm-folded", side, f"{count} BatchNormalization folded into the preceding layer's weights"
                )
            )
    for side, count in as_conv.items():
        if count:
            findings.append(ConversionFinding(
                "batchnorm-folded", side, f"{count} BatchNormalization written as a per-channel 1x1 convolution"
            ))  # fmt: skip
    # Weights computed in the graph (standardized, normalized, a BatchNorm folded by arithmetic)
    # on one side, stored as the constants they compute on the other: a constant-folding pass.
    computed = {"reference": 0, "suspect": 0}
    for mine, theirs in pairs:
        mine_weight, theirs_weight = mine.operand("weight"), theirs.operand("weight")
        if mine_weight is None or theirs_weight is None or mine_weight.computed == theirs_weight.computed:
            continue
        if mine.batchnorm is not None or theirs.batchnorm is not None:  # onnxoptimizer's fold: named above
            continue
        computed["suspect" if mine_weight.computed else "reference"] += 1
    for side, count in computed.items():
        if count:
            findings.append(ConversionFinding(
                "constants-folded", side, f"{count} weights computed in the graph from constants stored as the values they compute"
            ))  # fmt: skip
    # Parallel branches (RepVGG's 3x3, 1x1 and identity) re-parameterised into one kernel on one side.
    merged = {"reference": 0, "suspect": 0}
    branches = {"reference": 0, "suspect": 0}
    for mine, theirs in pairs:
        for side, site in (("suspect", mine), ("reference", theirs)):  # the other side holds the merged form
            if site.branches or site.identity is not None:
                merged[side] += 1
                branches[side] += len(site.branches) + 1 + (site.identity is not None)
    for side, count in merged.items():
        if count:
            findings.append(ConversionFinding(
                "branches-merged", side,
                f"{count} convolutions hold {branches[side]} parallel branches (convolutions, identity) re-parameterised "
                "into one kernel each (RepVGG's deploy form), compared with the branches' kernels summed",
            ))  # fmt: skip
    # A per-channel scale after a layer (timm's layer scale) folded on one side.
    scaled = {"reference": 0, "suspect": 0}
    for mine, theirs in pairs:
        mine_scaled, theirs_scaled = mine.operand("post") is not None, theirs.operand("post") is not None
        if mine_scaled and not theirs_scaled and theirs.family in LINEAR_FAMILIES:
            scaled["suspect"] += 1
        elif theirs_scaled and not mine_scaled and mine.family in LINEAR_FAMILIES:
            scaled["reference"] += 1
    for side, count in scaled.items():
        if count:
            findings.append(
                ConversionFinding("scale-folded", side, f"{count} per-channel scales (Mul) folded into the preceding layer's weights")
            )
    # Operators fused: the same weights held by other operators.
    fused: Counter[tuple[str, str]] = Counter()
    for mine, theirs in pairs:
        forms = tuple(_fused_form(graph, site) for graph, site in ((reference, mine), (suspect, theirs)))
        if forms[0] != forms[1] and all(forms):  # (a BatchNorm written as a convolution: named above)
            fused[forms] += 1  # type: ignore[index]
    if fused:
        side = "suspect" if len(suspect.nodes) <= len(reference.nodes) else "reference"
        listing = ", ".join(f"{count} {a} as {b}" for (a, b), count in sorted(fused.items(), key=lambda kv: -kv[1]))
        findings.append(ConversionFinding("fused", side, f"weights held by other operators (reference as suspect): {listing}"))
    # The tools that did it, where they sign their output.
    for side, graph in graphs.items():
        other_graph = suspect if side == "reference" else reference
        if _ORT_DOMAINS & set(graph.opsets) and not _ORT_DOMAINS & set(other_graph.opsets):
            findings.append(
                ConversionFinding(
                    "ort-optimized", side, "saved by ONNX Runtime's offline optimizer (optimized_model_filepath)"
                )
            )
        if graph.model.producer_name == "onnxruntime.transformers" and other_graph.model.producer_name != graph.model.producer_name:
            findings.append(
                ConversionFinding("ort-transformer-optimized", side, "written by onnxruntime.transformers.optimizer")
            )
    # Opset.
    ref_opset, sus_opset = reference.opsets.get("", 0), suspect.opsets.get("", 0)
    if ref_opset != sus_opset:
        newer = "suspect" if sus_opset > ref_opset else "reference"
        findings.append(ConversionFinding("opset", newer, f"opset {ref_opset} in the reference, {sus_opset} in the suspect"))
    # Renamed sites (a site is named by what it finally writes: folding moves names around).
    renamed = sum(
        1
        for mine, theirs in pairs
        if list(reference.nodes[mine.tail].output) != list(suspect.nodes[theirs.tail].output)
    )
    if renamed:
        findings.append(ConversionFinding("renamed", "suspect", f"{renamed} of {len(pairs)} paired operators renamed"))
    moved = methods["content"] + methods["order"]
    if moved:
        findings.append(
            ConversionFinding("reordered", "suspect", f"{moved} of {len(pairs)} paired operators in another order")
        )
    # Operators added or removed that do not compute anything new.
    ref_ops = Counter(node.op_type for node in reference.nodes if node.op_type in _PASS_THROUGH_OPS)
    sus_ops = Counter(node.op_type for node in suspect.nodes if node.op_type in _PASS_THROUGH_OPS)
    for side, mine_ops, theirs_ops in (("suspect", sus_ops, ref_ops), ("reference", ref_ops, sus_ops)):
        removed = theirs_ops - mine_ops
        if removed:
            listing = ", ".join(f"{count} {op}" for op, count in sorted(removed.items()))
            findings.append(ConversionFinding("simplified", side, f"fewer pass-through operators: {listing}"))
    return findings
