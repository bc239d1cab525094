"""Output shapes of ONNX Runtime's contrib operators, which ONNX's own shape inference does not know.

ONNX Runtime's offline optimizer and its transformer optimizer write ``com.microsoft`` operators
(``FusedConv``, ``SkipLayerNormalization``, ``Attention``, ``MatMulNBits``...) and save no
``value_info``: ONNX shape inference stops at the first of them, and every rule after it would
freeze for want of a rank. :func:`contrib_output_shapes` gives the output shapes of the contrib
operators that onnxlady has rules for, from their inputs' shapes and attributes, as ONNX Runtime
defines them (``docs/ContribOperators.md``); :class:`ModelGraph` feeds them to the per-node
inference pass so the shapes after them are found too. Anything not understood gives nothing
(a best effort: rules freeze where shapes are missing, never guess).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx

from onnxlady._graph._attributes import node_attribute
from onnxlady._graph._quantized_shapes import (
    MICROSOFT,
    QUANTIZED_SHAPES,
    Dim,
    Found,
    Shape,
    input_name,
    same_as_first_input,
)

_FLOAT = onnx.TensorProto.FLOAT
_INT32 = onnx.TensorProto.INT32


_ML = "ai.onnx.ml"


def _float_same_shape(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """ai.onnx.ml Scaler / Normalizer: element-wise (row-wise), the input's shape, always float."""
    shape = shapes.get(input_name(node, 0))
    return {} if shape is None or not node.output[0] else {node.output[0]: (shape, _FLOAT)}


def _output(node: onnx.NodeProto, slot: int) -> str:
    return node.output[slot] if slot < len(node.output) else ""


def _conv(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """FusedConv: Conv's output shape (explicit pads, or auto_pad)."""
    x, w = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 1))
    if x is None or w is None or len(x) != len(w) or len(x) < 3:
        return {}
    spatial = len(x) - 2
    kernel = [int(k) for k in node_attribute(node, "kernel_shape", w[2:])]
    strides = [int(s) for s in node_attribute(node, "strides", [1] * spatial)]
    dilations = [int(d) for d in node_attribute(node, "dilations", [1] * spatial)]
    pads = [int(p) for p in node_attribute(node, "pads", [0] * (2 * spatial))]
    auto_pad = node_attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    out: list[Dim] = [x[0], w[0]]
    for axis in range(spatial):
        size = x[2 + axis]
        if not isinstance(size, int) or not isinstance(kernel[axis], int):
            out.append(None)
            continue
        extent = dilations[axis] * (kernel[axis] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[axis]))
        elif auto_pad == "VALID":
            out.append((size - extent) // strides[axis] + 1)
        else:
            out.append((size + pads[axis] + pads[axis + spatial] - extent) // strides[axis] + 1)
    return {node.output[0]: (tuple(out), 0)}


def _gemm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """FusedGemm: ``(M, N)`` from A and B with their transposition flags."""
    a, b = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 1))
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return {}
    m = a[1] if int(node_attribute(node, "transA", 0)) else a[0]
    n = b[0] if int(node_attribute(node, "transB", 0)) else b[1]
    return {node.output[0]: ((m, n), 0)}


def _fused_matmul(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """FusedMatMul: numpy MatMul of ``op(A)`` and ``op(B)``.

    ``transBatchA`` / ``transBatchB`` first move the operand's first axis behind its batch axes.
    """
    a, b = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 1))
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return {}
    if int(node_attribute(node, "transBatchA", 0)):
        a = (*a[1:-1], a[0], a[-1])
    if int(node_attribute(node, "transBatchB", 0)):
        b = (*b[1:-1], b[0], b[-1])
    m = a[-1] if int(node_attribute(node, "transA", 0)) else a[-2]
    n = b[-2] if int(node_attribute(node, "transB", 0)) else b[-1]
    width = max(len(a), len(b)) - 2
    ones: tuple[Dim, ...] = (1,) * width
    batch_a = (ones + a[:-2])[-width:] if width else ()
    batch_b = (ones + b[:-2])[-width:] if width else ()
    batch: list[Dim] = []
    for da, db in zip(batch_a, batch_b):
        if da == 1:
            batch.append(db)
        elif db == 1 or da == db:
            batch.append(da)
        else:
            batch.append(None)
    return {node.output[0]: ((*batch, m, n), 0)}


def _skip_layer_norm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """Skip(Simplified)LayerNormalization: output and sum like the input; mean and inv_std [..., 1]."""
    x = shapes.get(input_name(node, 0))
    if x is None or not x:
        return {}
    stats = (*x[:-1], 1)
    found: Found = {}
    for slot, shape, dtype in ((0, x, 0), (1, stats, _FLOAT), (2, stats, _FLOAT), (3, x, 0)):
        if _output(node, slot):
            found[_output(node, slot)] = (shape, dtype)
    return found


def _simplified_layer_norm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """SimplifiedLayerNormalization (ONNX domain in ONNX Runtime): Y like X, inv_std_var 1 on the normalised axes."""
    x = shapes.get(input_name(node, 0))
    if x is None:
        return {}
    axis = int(node_attribute(node, "axis", -1))
    axis += len(x) if axis < 0 else 0
    found: Found = {node.output[0]: (x, 0)}
    if _output(node, 1):
        found[_output(node, 1)] = ((*x[:axis], *([1] * (len(x) - axis))), _FLOAT)
    return found


def _attention(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """Attention (packed QKV weight): ``[B, S, v_hidden]``."""
    x, w = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 1))
    if x is None or w is None or len(x) != 3 or len(w) != 2:
        return {}
    sizes = [int(s) for s in node_attribute(node, "qkv_hidden_sizes", [])]
    if sizes:
        v_hidden: Dim = sizes[2]
    elif isinstance(w[1], int) and w[1] % 3 == 0:
        v_hidden = w[1] // 3
    else:
        return {}
    return {node.output[0]: ((x[0], x[1], v_hidden), 0)}


def _multi_head_attention(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """MultiHeadAttention with separate 3-D query and 3-D (or BNSH 4-D) value: ``[B, S, v_hidden]``."""
    q, v = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 2))
    if q is None or v is None or len(q) != 3:
        return {}
    if len(v) == 3:
        v_hidden = v[2]
    elif len(v) == 4 and isinstance(v[1], int) and isinstance(v[3], int):
        v_hidden = v[1] * v[3]
    else:
        return {}
    return {node.output[0]: ((q[0], q[1], v_hidden), 0)}


def _group_query_attention(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """GroupQueryAttention (separate or packed QKV): ``[B, S, num_heads * head_size]``; present ``[B, kv, ?, H]``."""
    q = shapes.get(input_name(node, 0))
    heads, kv_heads = int(node_attribute(node, "num_heads", 0)), int(node_attribute(node, "kv_num_heads", 0))
    if q is None or len(q) != 3 or not heads or not kv_heads:
        return {}
    if input_name(node, 1):
        k = shapes.get(input_name(node, 1))
        width, parts = (k[2], kv_heads) if k is not None and len(k) == 3 else (None, 1)
    else:
        width, parts = q[2], heads + 2 * kv_heads  # packed QKV
    if not isinstance(width, int) or width % parts:
        return {}
    head_size = width // parts
    found: Found = {node.output[0]: ((q[0], q[1], heads * head_size), 0)}
    for slot in (1, 2):
        if _output(node, slot):
            found[_output(node, slot)] = ((q[0], kv_heads, None, head_size), 0)
    return found


def _matmul_nbits(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """MatMulNBits: ``[..., N]`` with ``N`` the attribute."""
    x = shapes.get(input_name(node, 0))
    n = int(node_attribute(node, "N", 0))
    if x is None or not x or n <= 0:
        return {}
    return {node.output[0]: ((*x[:-1], n), 0)}


def _embed_layer_norm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """EmbedLayerNormalization: ``[B, S, hidden]`` outputs (the embeddings' type), mask_index ``[B]`` int32."""
    ids, table = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 2))
    if ids is None or table is None or len(ids) != 2 or len(table) != 2:
        return {}
    out: Shape = (ids[0], ids[1], table[1])
    found: Found = {node.output[0]: (out, -2)}  # -2: the word embedding table's type
    if _output(node, 1):
        found[_output(node, 1)] = ((ids[0],), _INT32)
    if _output(node, 2):
        found[_output(node, 2)] = (out, -2)
    return found


def _dynamic_quantize_lstm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """DynamicQuantizeLSTM (no ``layout``): Y ``[seq, dirs, batch, H]``, Y_h and Y_c ``[dirs, batch, H]``."""
    x = shapes.get(input_name(node, 0))
    hidden = int(node_attribute(node, "hidden_size", 0))
    if x is None or len(x) != 3 or hidden <= 0:
        return {}
    direction = node_attribute(node, "direction", b"forward")
    dirs = 2 if direction in (b"bidirectional", "bidirectional") else 1
    found: Found = {}
    if _output(node, 0):
        found[_output(node, 0)] = ((x[0], dirs, x[1], hidden), 0)
    for slot in (1, 2):
        if _output(node, slot):
            found[_output(node, slot)] = ((dirs, x[1], hidden), 0)
    return found


def _nhwc_conv(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """NhwcConv: Conv's output shape with the channels last (X ``[N, H, W, C]``, W ``[M, kh, kw, C/g]``)."""
    x, w = shapes.get(input_name(node, 0)), shapes.get(input_name(node, 1))
    if x is None or w is None or len(x) != len(w) or len(x) < 3:
        return {}
    as_nchw = {input_name(node, 0): (x[0], x[-1], *x[1:-1]), input_name(node, 1): (w[0], w[-1], *w[1:-1])}
    found = _conv(node, as_nchw)
    if not found:
        return {}
    out = found[node.output[0]][0]
    return {node.output[0]: ((out[0], *out[2:], out[1]), 0)}


def _skip_group_norm(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """SkipGroupNorm: the output and the sum ``S`` like the input."""
    x = shapes.get(input_name(node, 0))
    if x is None:
        return {}
    return {name: (x, 0) for name in node.output[:2] if name}


def _bias_split_gelu(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> Found:
    """BiasSplitGelu: ``[N, S, D]`` -> ``[N, S, D / 2]``."""
    x = shapes.get(input_name(node, 0))
    if x is None or not x or not node.output[0]:
        return {}
    last = x[-1]
    return {node.output[0]: ((*x[:-1], last // 2 if isinstance(last, int) else None), 0)}


_SHAPES: dict[tuple[str, str], Callable[[onnx.NodeProto, Mapping[str, Shape]], Found]] = {
    (MICROSOFT, "FusedConv"): _conv,
    (MICROSOFT, "FusedGemm"): _gemm,
    (MICROSOFT, "FusedMatMul"): _fused_matmul,
    (MICROSOFT, "Gelu"): same_as_first_input,
    (MICROSOFT, "FastGelu"): same_as_first_input,
    (MICROSOFT, "BiasGelu"): same_as_first_input,
    (MICROSOFT, "QuickGelu"): same_as_first_input,
    (MICROSOFT, "RotaryEmbedding"): same_as_first_input,
    (MICROSOFT, "SkipLayerNormalization"): _skip_layer_norm,
    (MICROSOFT, "SkipSimplifiedLayerNormalization"): _skip_layer_norm,
    ("", "SimplifiedLayerNormalization"): _simplified_layer_norm,
    (MICROSOFT, "Attention"): _attention,
    (MICROSOFT, "MultiHeadAttention"): _multi_head_attention,
    (MICROSOFT, "GroupQueryAttention"): _group_query_attention,
    (MICROSOFT, "MatMulNBits"): _matmul_nbits,
    (MICROSOFT, "EmbedLayerNormalization"): _embed_layer_norm,
    (MICROSOFT, "DynamicQuantizeLSTM"): _dynamic_quantize_lstm,
    # Diffusion (ORT's transformer optimizer, model_type="unet") and ONNX's GroupNormalization,
    # which ONNX's inference leaves without a shape.
    (MICROSOFT, "NhwcConv"): _nhwc_conv,
    (MICROSOFT, "GroupNorm"): same_as_first_input,
    (MICROSOFT, "SkipGroupNorm"): _skip_group_norm,
    (MICROSOFT, "BiasAdd"): same_as_first_input,
    (MICROSOFT, "BiasSplitGelu"): _bias_split_gelu,
    ("", "GroupNormalization"): same_as_first_input,
    # scikit-learn exports (skl2onnx, onnxmltools): ONNX's inference types these ai.onnx.ml
    # operators' outputs but gives them no shape, and the MLP behind them would lose its ranks.
    (_ML, "Scaler"): _float_same_shape,
    (_ML, "Normalizer"): _float_same_shape,
    (_ML, "Binarizer"): same_as_first_input,
    (_ML, "Imputer"): same_as_first_input,
    **QUANTIZED_SHAPES,  # ONNX Runtime's QOperator activations
}


def knows(node: onnx.NodeProto) -> bool:
    """Whether :func:`contrib_output_shapes` has a shape function for ``node``'s operator."""
    return knows_operator(node.domain, node.op_type)


def knows_operator(domain: str, op_type: str) -> bool:
    """Whether :func:`contrib_output_shapes` has a shape function for operator ``domain::op_type``."""
    return ("" if domain in ("", "ai.onnx") else domain, op_type) in _SHAPES


def contrib_output_shapes(
    node: onnx.NodeProto, shapes: Mapping[str, Shape], dtypes: Mapping[str, int]
) -> dict[str, tuple[Shape, int]]:
    """Output name -> (shape, element type) for a contrib operator's outputs that can be told.

    Args:
        node: the operator.
        shapes: known shapes of tensors (its inputs' are read).
        dtypes: known element types of tensors.

    Returns:
        The outputs whose shapes follow from the inputs' (empty when the operator is unknown or
        its inputs' shapes are missing); an element type that cannot be told is left out (0).
    """
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    function = _SHAPES.get((domain, node.op_type))
    if function is None:
        return {}
    try:
        found = function(node, shapes)
    except (TypeError, ValueError, IndexError):  # malformed attributes: no shape rather than a crash
        return {}
    first = dtypes.get(input_name(node, 0), 0)
    table = dtypes.get(input_name(node, 2), 0)
    result: dict[str, tuple[Shape, int]] = {}
    for name, (shape, dtype) in found.items():
        if dtype < -2:  # -(slot + 3): the type of input slot (see _quantized_shapes)
            dtype = dtypes.get(input_name(node, -dtype - 3), 0) or 0
        result[name] = (shape, first if dtype == 0 else table if dtype == -2 else dtype)
    return result
