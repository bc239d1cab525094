"""ONNX Runtime's contrib operators (``com.microsoft``), as its optimizers and the genai builder write them.

Each rule states exactly which permutations the operator carries (definitions from ONNX Runtime's
``docs/ContribOperators.md`` and its CPU kernels; each is checked against ONNX Runtime in
``tests/test_contrib.py``):

- ``FusedConv`` / ``FusedGemm``: ``Conv`` / ``Gemm`` followed by an element-wise activation with
  scalar parameters; ``FusedConv``'s ``Z`` (added before the activation) takes the output channels.
- ``FusedMatMul``: ``alpha * op(A) @ op(B)`` with ``transA`` / ``transB`` (batch transposition
  freezes): a linear layer when one operand is a constant matrix, else a contraction.
- ``Gelu`` / ``FastGelu`` / ``BiasGelu`` / ``QuickGelu``: element-wise; a bias broadcasts like an
  ``Add`` (a per-channel constant on the last axis follows it).
- ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: ``norm(input + skip + bias)``
  over the last axis; gamma, beta and bias follow it; ``input_skip_bias_sum`` carries every axis,
  the mean and inverse-std outputs every axis but the reduced one.
- ``SimplifiedLayerNormalization`` (RMSNorm): ONNX Runtime registers it in the *ONNX* domain
  (``com.microsoft::SimplifiedLayerNormalization`` is no operator there), so the rule is in ``""``.
- ``Attention`` (packed ``[hidden, q + k + v]`` weight), ``MultiHeadAttention`` (separate Q, K, V)
  and ``GroupQueryAttention``: see :func:`_attention_spaces`. ONNX's own ``Attention`` (opset 23,
  what torch's dynamo exporter writes at that opset) shares GroupQueryAttention's head algebra.
- ``RotaryEmbedding`` and the rotary inside ``GroupQueryAttention``: see :func:`_rotary_head`.
- ``MatMulNBits``: see :class:`MatMulNBitsRule`.
- ``EmbedLayerNormalization``: a new hidden axis made by the word, position and segment tables,
  normalised with gamma and beta.
"""

from __future__ import annotations

import math

import onnx

from onnxlady._graph._expr import Expr, direct_sum, grouped, product
from onnxlady._rules._context import RuleContext, RuleDoesNotApply
from onnxlady._rules._registry import OpRule, register
from onnxlady._rules.elementwise import BroadcastRule, UnaryRule
from onnxlady._rules.producers import ConvRule, GemmRule

MICROSOFT = "com.microsoft"

#: Activations a FusedConv / FusedGemm may apply: element-wise, with scalar parameters only.
_ACTIVATIONS = frozenset({"", "Relu", "LeakyRelu", "Tanh", "Sigmoid", "HardSigmoid", "Clip", "Elu", "Selu",
                          "Softplus", "ThresholdedRelu", "HardSwish", "QuickGelu", "Gelu"})


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _check_activation(ctx: RuleContext) -> None:
    activation = _text(ctx.attr("activation", ""))
    if activation not in _ACTIVATIONS:
        raise RuleDoesNotApply("blocking", f"activation '{activation}' is not known to be element-wise")


def _int(ctx: RuleContext, name: str, default: int = 0) -> int:
    return int(ctx.attr(name, default))


@register
class FusedConvRule(ConvRule):
    """FusedConv: ``activation(Conv(X, W, B) + Z)``; W, B and Z follow the output channels."""

    op_types = ("FusedConv",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        _check_activation(ctx)
        super().propagate(ctx)
        if ctx.input(3):
            # Z is added before the activation: its channels are the conv's outputs.
            out_channels = ctx.const_shape(1)[0]
            ctx.emit(0, 1, ctx.take(3, 1, out_channels))


@register
class FusedGemmRule(GemmRule):
    """FusedGemm: ``activation(alpha A' B' + beta C)``, the Gemm rule with an element-wise activation."""

    op_types = ("FusedGemm",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        _check_activation(ctx)
        super().propagate(ctx)


@register
class FusedMatMulRule(OpRule):
    """FusedMatMul: ``alpha * op(A) @ op(B)``, ``op`` transposing the last two axes when asked.

    ONNX Runtime writes it for ``MatMul`` by a scale (``alpha``) and for a ``Transpose`` folded
    into a ``MatMul`` (``transA`` / ``transB``: attention's ``Q @ K^T``). With a constant 2-D
    operand it is a linear layer (the weight's contracted axis reads the data, its other axis
    makes new neurons); with both computed, the contracted axes are coupled, the kept ones carried
    and batch axes broadcast. ``transBatchA`` / ``transBatchB`` (ONNX Runtime's fusion of a
    ``Transpose`` that moves the first axis behind the batch axes, as in torch's
    ``nn.MultiheadAttention``) read the operand as ``transpose(X, [1, ..., r-2, 0, r-1])``: the
    axes are mapped back to the stored ones, with both operands computed; with a constant
    operand, frozen.
    """

    op_types = ("FusedMatMul",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        trans = (_int(ctx, "transA"), _int(ctx, "transB"))
        moved = (_int(ctx, "transBatchA"), _int(ctx, "transBatchB"))
        a_const, b_const = ctx.is_const(0), ctx.is_const(1)
        if a_const and b_const:
            return
        if a_const or b_const:
            if any(moved):
                raise RuleDoesNotApply("index-map", "transBatchA/transBatchB with a constant operand: not supported")
            self._linear(ctx, weight=1 if b_const else 0, trans=trans)
        else:
            self._contraction(ctx, trans, moved)

    @staticmethod
    def _stored(rank: int, moved: int) -> list[int]:
        """The stored axis of each axis the product reads (``transBatch``: the first axis moved behind the batch)."""
        return [*range(1, rank - 1), 0, rank - 1] if moved else list(range(rank))

    @staticmethod
    def _axes(rank: int, slot: int, transposed: int) -> tuple[int, int]:
        """(contracted axis, kept axis) of operand ``slot`` of the given rank."""
        last, second = rank - 1, rank - 2
        if slot == 0:
            return (second, last) if transposed else (last, second)
        return (last, second) if transposed else (second, last)

    def _linear(self, ctx: RuleContext, weight: int, trans: tuple[int, int]) -> None:
        data = 1 - weight
        weight_shape = ctx.const_shape(weight)
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"batched FusedMatMul weight of shape {list(weight_shape)}")
        rank = ctx.rank_in(data)
        if rank < 2:
            raise RuleDoesNotApply("index-map", "FusedMatMul of a vector")
        w_contracted, w_kept = self._axes(2, weight, trans[weight])
        d_contracted, d_kept = self._axes(rank, data, trans[data])
        features = ctx.take(data, d_contracted, weight_shape[w_contracted])
        ctx.bind(weight, w_contracted, features, "matmul weight (input features)")
        outputs = ctx.new_group(weight_shape[w_kept])
        ctx.bind(weight, w_kept, outputs, "matmul weight")
        spaces = ctx.take_all(data)
        # Y[..., M, N]: A's kept axis lands on M, B's on N.
        data_out, weight_out = (rank - 2, rank - 1) if data == 0 else (rank - 1, rank - 2)
        if d_kept in spaces:
            ctx.emit(0, data_out, spaces[d_kept])
        for axis, expr in spaces.items():
            if axis < rank - 2:
                ctx.emit(0, axis, expr)  # batch axes pass through a 2-D weight
        ctx.declare_producer(outputs)
        ctx.emit(0, weight_out, outputs)

    def _contraction(self, ctx: RuleContext, trans: tuple[int, int], moved: tuple[int, int] = (0, 0)) -> None:
        stored_a, stored_b = ctx.tracked(0), ctx.tracked(1)
        if not stored_a and not stored_b:
            return
        rank_a, rank_b = ctx.rank_in(0), ctx.rank_in(1)
        if rank_a < 2 or rank_b < 2:
            raise RuleDoesNotApply("index-map", "FusedMatMul of a vector")
        ctx.take_all(0)
        ctx.take_all(1)
        # Below, axes are those the product reads; ``where`` maps them to the stored ones.
        where = (self._stored(rank_a, moved[0]), self._stored(rank_b, moved[1]))
        a_spaces = {logical: stored_a[axis] for logical, axis in enumerate(where[0]) if axis in stored_a}
        b_spaces = {logical: stored_b[axis] for logical, axis in enumerate(where[1]) if axis in stored_b}
        k_a, m_a = self._axes(rank_a, 0, trans[0])
        k_b, n_b = self._axes(rank_b, 1, trans[1])
        if k_a in a_spaces or k_b in b_spaces:
            known = a_spaces[k_a] if k_a in a_spaces else b_spaces[k_b]
            ctx.unify(ctx.take(0, where[0][k_a], known.size), ctx.take(1, where[1][k_b], known.size))
        batch = max(rank_a, rank_b) - 2
        if m_a in a_spaces:
            ctx.emit(0, batch, a_spaces[m_a])
        if n_b in b_spaces:
            ctx.emit(0, batch + 1, b_spaces[n_b])
        for out_axis in range(batch):
            operands = [
                (slot, where[slot][axis])
                for slot, rank in ((0, rank_a), (1, rank_b))
                if (axis := out_axis - (batch - (rank - 2))) >= 0
            ]
            tracked = [ctx.tracked(slot)[axis] for slot, axis in operands if axis in ctx.tracked(slot)]
            if not tracked:
                continue
            expr = tracked[0]
            for slot, axis in operands:
                if axis in ctx.tracked(slot):
                    ctx.unify(expr, ctx.tracked(slot)[axis])
                    continue
                dim = (ctx.shape_in(slot) or ())[axis]
                if dim == 1:
                    continue  # broadcast
                if not isinstance(dim, int):
                    raise RuleDoesNotApply("unknown-shape", f"cannot tell whether '{ctx.input(slot)}' broadcasts")
                ctx.unify(expr, ctx.take(slot, axis, expr.size))
            ctx.emit(0, out_axis, expr)


@register
class GeluRule(OpRule):
    """Gelu / FastGelu / BiasGelu / QuickGelu: element-wise; ``f(x + bias)`` broadcasts like ``Add``."""

    op_types = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")
    domain = MICROSOFT

    _unary = UnaryRule()
    _broadcast = BroadcastRule()

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.num_inputs > 1 and ctx.input(1):
            self._broadcast.propagate(ctx)
        else:
            self._unary.propagate(ctx)


def _couple(ctx: RuleContext, slots: list[int], out_rank: int, out_axis: int) -> Expr | None:
    """The permutation of output axis ``out_axis`` of operands that broadcast together (like ``Add``).

    Tracked spaces are unified; a computed operand that does not broadcast there (size > 1) and
    carries nothing pins the axis (:meth:`RuleContext.take` gives the identity with its reason);
    a constant operand is bound. None when no operand carries a permutation on that axis.
    """
    tracked: list[Expr] = []
    others: list[tuple[int, int]] = []
    for slot in slots:
        shape = ctx.shape_in(slot)
        if shape is None:
            shape = ctx.graph.constant_shape(ctx.input(slot))
        if shape is None:
            raise RuleDoesNotApply("unknown-shape", f"the shape of '{ctx.input(slot)}' is unknown")
        axis = out_axis - (out_rank - len(shape))
        if axis < 0:
            continue
        spaces = ctx.tracked(slot)
        if axis in spaces:
            tracked.append(ctx.take(slot, axis))
        elif shape[axis] != 1:
            others.append((slot, axis))
    if not tracked:
        return None
    expr = tracked[0]
    for other in tracked[1:]:
        ctx.unify(expr, other)
    for slot, axis in others:
        if ctx.is_const(slot):
            ctx.bind(slot, axis, expr, f"{ctx.op_type} operand")
        else:
            ctx.unify(expr, ctx.take(slot, axis, expr.size))
    return expr


def _attach_vector(ctx: RuleContext, slot: int, expr: Expr, role: str) -> None:
    """A per-channel parameter (shape ``[..., C]`` with leading ones) follows ``expr`` on its last axis."""
    if not ctx.input(slot):
        return
    shape = ctx.shape_in(slot) or ctx.graph.constant_shape(ctx.input(slot))
    if shape is None or not shape or shape[-1] != expr.size or any(d != 1 for d in shape[:-1]):
        raise RuleDoesNotApply("index-map", f"{role} '{ctx.input(slot)}' is not one value per channel ({expr.size})")
    ctx.attach(slot, len(shape) - 1, expr, role)


@register
class SkipLayerNormRule(OpRule):
    """SkipLayerNormalization / SkipSimplifiedLayerNormalization over the last axis of ``input + skip + bias``.

    Inputs: input, skip (broadcasts like ``Add``), gamma, beta (SkipLayerNormalization only) and
    bias, all three one value per channel. Outputs: the normalised tensor and
    ``input_skip_bias_sum`` carry every axis; mean and inverse standard deviation (``[..., 1]``)
    reduce the channel axis, so they carry every other axis and no channel permutation.
    """

    op_types = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        rank = ctx.rank_in(0)
        parameters: tuple[tuple[int, str], ...] = ((2, "gamma"), (3, "beta"), (4, "bias"))
        if ctx.op_type == "SkipSimplifiedLayerNormalization":
            parameters = ((2, "gamma"), (3, "bias"))
        for out_axis in range(rank):
            expr = _couple(ctx, [0, 1], rank, out_axis)
            if expr is None:
                continue
            if out_axis == rank - 1:
                for slot, what in parameters:
                    _attach_vector(ctx, slot, expr, f"{ctx.op_type} {what}")
            else:
                ctx.emit(1, out_axis, expr)  # mean [..., 1]
                ctx.emit(2, out_axis, expr)  # inverse standard deviation [..., 1]
            ctx.emit(0, out_axis, expr)
            ctx.emit(3, out_axis, expr)  # input + skip + bias


@register
class SimplifiedLayerNormRule(OpRule):
    """RMSNorm: ONNX Runtime's SimplifiedLayerNormalization (ONNX domain) and ONNX's RMSNormalization (opset 23).

    ``Y = X / sqrt(mean(X^2) + eps) * scale`` over the axes from ``axis`` on: a permutation of a
    normalised axis leaves the mean alone if ``scale`` follows it; the optional ``inv_std_var``
    output of ONNX Runtime's operator (size 1 on the normalised axes) carries only the other
    axes. ONNX's operator has the same inputs and attributes and no second output.
    """

    op_types = ("SimplifiedLayerNormalization", "RMSNormalization")

    def propagate(self, ctx: RuleContext) -> None:
        spaces = ctx.take_all(0)
        if not spaces:
            return
        rank = ctx.rank_in(0)
        first = _int(ctx, "axis", -1)
        first += rank if first < 0 else 0
        scale_shape = ctx.shape_in(1) or ctx.graph.constant_shape(ctx.input(1)) or ()
        for axis, expr in spaces.items():
            if axis >= first:
                param_axis = axis - (rank - len(scale_shape))
                if param_axis >= 0 and scale_shape[param_axis] != 1:
                    ctx.attach(1, param_axis, expr, f"{ctx.op_type} scale")
            else:
                ctx.emit(1, axis, expr)
            ctx.emit(0, axis, expr)


def _rotary_head(ctx: RuleContext, head_size: int, rotary_dim: int, interleaved: bool,
                 cos_slot: int, sin_slot: int) -> Expr:
    """The permutations of one head's dims that commute with rotary embedding, as one expression.

    Rotary embedding rotates pairs of dims by an angle that depends on the position and on the
    pair's frequency ``i`` (column ``i`` of the cos/sin caches): pair ``i`` is ``(i, i + R/2)``, or
    ``(2i, 2i + 1)`` when interleaved, among the first ``R`` dims; the dims from ``R`` on pass
    through. A permutation is exact when it moves whole pairs, keeps each pair's order, and moves
    the caches' frequency columns with them: ``I_2 (x) f`` (or ``f (x) I_2`` interleaved) with
    ``f`` bound to the caches' last axis; the pass-through dims permute freely. Where the caches are
    computed (not constants) the frequencies cannot follow and the pairs keep their places.
    """
    if rotary_dim % 2 or not 0 < rotary_dim <= head_size:
        raise RuleDoesNotApply("index-map", f"rotary dimension {rotary_dim} does not fit a head of {head_size}")
    half = rotary_dim // 2
    if ctx.is_const(cos_slot) and ctx.is_const(sin_slot):
        frequencies: Expr = ctx.new_group(half)
        for slot, what in ((cos_slot, "cos"), (sin_slot, "sin")):
            ctx.bind(slot, len(ctx.const_shape(slot)) - 1, frequencies, f"rotary {what} cache (frequencies)")
    else:
        frequencies = ctx.fixed(half, "rotary pairs: the cos/sin caches are computed, their frequencies cannot follow")
    halves = ctx.fixed(2, "rotary pairs keep their order (x1, x2)")
    rotated = product(frequencies, halves) if interleaved else product(halves, frequencies)
    if rotary_dim == head_size:
        return rotated
    return direct_sum([rotated, ctx.new_group(head_size - rotary_dim)])


def _cache_half(ctx: RuleContext, slot: int) -> int:
    shape = ctx.const_shape(slot) if ctx.is_const(slot) else ctx.shape_in(slot)
    if not shape or not isinstance(shape[-1], int):
        raise RuleDoesNotApply("unknown-shape", f"the size of rotary cache '{ctx.input(slot)}' is unknown")
    return int(shape[-1])


@register
class RotaryEmbeddingRule(OpRule):
    """RotaryEmbedding: heads permute freely; inside a head only what :func:`_rotary_head` allows.

    Input ``[B, S, N * H]`` (heads of ``H`` dims, ``N`` from ``num_heads``, or one head of
    ``2 * cache width`` when unset) or ``[B, N, S, H]``. The output carries the input's
    permutation, refined to ``heads (x) within-head``; the batch and sequence axes are frozen
    (positions index the caches).
    """

    op_types = ("RotaryEmbedding",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        rank = ctx.rank_in(0)
        shape = ctx.shape_in(0) or ()
        half = _cache_half(ctx, 2)
        rotary_dim = _int(ctx, "rotary_embedding_dim") or 2 * half
        interleaved = bool(_int(ctx, "interleaved"))
        if rank == 4:
            heads_size, head_size = shape[1], shape[3]
        elif rank == 3:
            hidden, num_heads = shape[2], _int(ctx, "num_heads")
            if not isinstance(hidden, int):
                raise RuleDoesNotApply("unknown-shape", "the hidden size is unknown")
            head_size = hidden // num_heads if num_heads else 2 * half
            heads_size = hidden // head_size if head_size and hidden % head_size == 0 else None
        else:
            raise RuleDoesNotApply("index-map", f"RotaryEmbedding of a rank-{rank} tensor")
        if not isinstance(heads_size, int) or not isinstance(head_size, int):
            raise RuleDoesNotApply("unknown-shape", "the number of heads or the head size is unknown")
        if 2 * half != rotary_dim:
            raise RuleDoesNotApply("index-map", f"rotary dimension {rotary_dim} does not match caches of {half} frequencies")
        inner = _rotary_head(ctx, head_size, rotary_dim, interleaved, 2, 3)
        if rank == 4:
            heads = ctx.take(0, 1, heads_size)
            ctx.unify(ctx.take(0, 3, head_size), inner)
            ctx.emit(0, 1, heads)
            ctx.emit(0, 3, inner)
        else:
            layout = product(ctx.new_group(heads_size), inner)
            ctx.unify(ctx.take(0, 2, heads_size * head_size), layout)
            ctx.emit(0, 2, layout)


def _head_bias(ctx: RuleContext, slot: int, heads: Expr) -> None:
    """An additive attention bias ``[B|1, N|1, S, T]`` follows the heads on axis 1 (unless broadcast)."""
    if not ctx.input(slot):
        return
    shape = ctx.shape_in(slot) or ctx.graph.constant_shape(ctx.input(slot))
    if shape is None or len(shape) != 4:
        raise RuleDoesNotApply("unknown-shape", f"attention bias '{ctx.input(slot)}' is not [B, N, S, T]")
    if shape[1] != 1:
        ctx.attach(slot, 1, heads, "attention bias (heads)")


def _cache(ctx: RuleContext, slot: int, heads: Expr, inner: Expr, what: str) -> None:
    """A past key or value ``[B, N, P, H]``: its heads and head dims are the attention's."""
    if not ctx.input(slot):
        return
    if ctx.rank_in(slot) != 4:
        raise RuleDoesNotApply("index-map", f"{what} '{ctx.input(slot)}' is not [B, N, P, H]")
    ctx.unify(ctx.take(slot, 1, heads.size), heads)
    ctx.unify(ctx.take(slot, 3, inner.size), inner)


def _emit_cache(ctx: RuleContext, slot: int, heads: Expr, inner: Expr) -> None:
    ctx.emit(slot, 1, heads)
    ctx.emit(slot, 3, inner)


def _attention_spaces(ctx: RuleContext, heads: int, qk_size: int, v_size: int,
                      qk_inner: Expr | None = None) -> tuple[Expr, Expr, Expr]:
    """(heads, within-head Q/K, within-head V) for multi-head attention.

    ``softmax(q_h . k_h / s) v_h`` for each head ``h``: the heads may be permuted (the same for
    Q, K, V and the output, whose head-major channels are ``heads (x) within-head V``); the dot
    product is invariant to one permutation of the Q/K dims, applied to both; V's dims and the
    output's permute together, independently. (Each head could take its own within-head
    permutation; the expressions keep one for all, a restriction that is always valid.)
    """
    if heads <= 0:
        raise RuleDoesNotApply("index-map", "num_heads is missing")
    if qk_size % heads or v_size % heads:
        raise RuleDoesNotApply("index-map", f"hidden sizes {qk_size}/{v_size} do not split into {heads} heads")
    head_group = ctx.new_group(heads)
    qk = qk_inner if qk_inner is not None else ctx.new_group(qk_size // heads)
    return head_group, qk, ctx.new_group(v_size // heads)


@register
class AttentionRule(OpRule):
    """Attention: ``input [B, S, In] @ weights [In, q + k + v] + bias``, then multi-head attention.

    The weight's columns are Q, K and V laid end to end, each head-major (``h * D + d``): they are
    ``heads (x) qk`` + ``heads (x) qk`` + ``heads (x) v`` (:func:`_attention_spaces`), the new
    neurons; its rows read the input's channels. The output ``[B, S, v]`` carries ``heads (x) v``.
    With ``do_rotary`` the rotary frequencies are computed inside the operator and cannot follow,
    so the Q/K dims inside a head keep their order. A past state ``[2, B, N, P, H]`` holds K and V
    dims on one axis (so they must permute alike); ``attention_bias`` follows the heads.
    """

    op_types = ("Attention",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.rank_in(0) != 3:
            raise RuleDoesNotApply("index-map", "Attention input is not [B, S, hidden]")
        weight_shape = ctx.const_shape(1)
        if len(weight_shape) != 2:
            raise RuleDoesNotApply("index-map", f"Attention weight of shape {list(weight_shape)}")
        sizes = [int(s) for s in ctx.attr("qkv_hidden_sizes", [])] or [weight_shape[1] // 3] * 3
        if sum(sizes) != weight_shape[1] or sizes[0] != sizes[1]:
            raise RuleDoesNotApply("index-map", f"qkv sizes {sizes} do not match the weight {list(weight_shape)}")
        heads = _int(ctx, "num_heads")
        qk_inner = None
        if _int(ctx, "do_rotary"):
            qk_inner = ctx.fixed(sizes[0] // max(heads, 1), "rotary embedding computed inside Attention pins the Q/K dims")
        head_group, qk, v = _attention_spaces(ctx, heads, sizes[0], sizes[2], qk_inner)
        q_layout, v_layout = product(head_group, qk), product(head_group, v)
        columns = direct_sum([q_layout, q_layout, v_layout])
        features = ctx.take(0, 2, weight_shape[0])
        ctx.bind(1, 0, features, "attention qkv matmul weight (input features)")
        ctx.bind(1, 1, columns, "attention qkv matmul weight")
        if ctx.input(2):
            ctx.attach(2, 0, columns, "attention qkv bias")
        if ctx.input(4) or ctx.output_used(1):
            if qk.size != v.size:
                raise RuleDoesNotApply("index-map", "a past/present state with different Q/K and V head sizes")
            ctx.unify(qk, v)  # K and V dims share the state's last axis
            if ctx.input(4):
                ctx.unify(ctx.take(4, 2, head_group.size), head_group)
                ctx.unify(ctx.take(4, 4, qk.size), qk)
            ctx.emit(1, 2, head_group)
            ctx.emit(1, 4, qk)
        _head_bias(ctx, 5, head_group)
        ctx.declare_producer(columns)
        ctx.emit(0, 2, v_layout)


@register
class MultiHeadAttentionRule(OpRule):
    """MultiHeadAttention with separate Q ``[B, S, q]``, K and V (``[B, L, k]`` or ``[B, N, L, H]``).

    Q and K take ``heads (x) qk``, V and the output ``heads (x) v`` (:func:`_attention_spaces`);
    the bias ``[q + k + v]`` follows all three; past and present key/value ``[B, N, P, H]``
    follow the heads and their dims; ``attention_bias`` and the ``qk`` output follow the heads.
    Packed QKV / KV layouts freeze (ONNX Runtime's CPU provider has no kernel for them).
    """

    op_types = ("MultiHeadAttention",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        if ctx.rank_in(0) != 3 or not ctx.input(1) or not ctx.input(2):
            raise RuleDoesNotApply("index-map", "packed QKV/KV MultiHeadAttention is not supported")
        key_rank, value_rank = ctx.rank_in(1), ctx.rank_in(2)
        if key_rank != value_rank or key_rank not in (3, 4):
            raise RuleDoesNotApply("index-map", "packed KV MultiHeadAttention is not supported")
        heads = _int(ctx, "num_heads")
        q_size = self._size(ctx, 0)
        v_size = self._size(ctx, 2)
        head_group, qk, v = _attention_spaces(ctx, heads, q_size, v_size)
        q_layout, v_layout = product(head_group, qk), product(head_group, v)
        ctx.unify(ctx.take(0, 2, q_size), q_layout)
        if key_rank == 3:
            ctx.unify(ctx.take(1, 2, q_size), q_layout)
            ctx.unify(ctx.take(2, 2, v_size), v_layout)
            if ctx.input(3):
                ctx.attach(3, 0, direct_sum([q_layout, q_layout, v_layout]), "attention qkv bias")
        else:
            _cache(ctx, 1, head_group, qk, "key")
            _cache(ctx, 2, head_group, v, "value")
            if ctx.input(3):
                raise RuleDoesNotApply("index-map", "a bias with keys and values in [B, N, L, H]")
        _head_bias(ctx, 5, head_group)
        _cache(ctx, 6, head_group, qk, "past key")
        _cache(ctx, 7, head_group, v, "past value")
        ctx.emit(0, 2, v_layout)
        _emit_cache(ctx, 1, head_group, qk)
        _emit_cache(ctx, 2, head_group, v)
        ctx.emit(3, 1, head_group)

    @staticmethod
    def _size(ctx: RuleContext, slot: int) -> int:
        shape = ctx.shape_in(slot) or ()
        dims = shape[2:] if len(shape) == 3 else (shape[1], shape[3]) if len(shape) == 4 else (None,)
        sizes = [d for d in dims if isinstance(d, int)]
        if len(sizes) != len(dims):
            raise RuleDoesNotApply("unknown-shape", f"the hidden size of '{ctx.input(slot)}' is unknown")
        return math.prod(sizes)


def _query_heads(ctx: RuleContext, kv: Expr, group: int) -> Expr:
    """The query heads ``kv (x) {g_k}``: KV head ``k``'s group of ``group`` query heads in its own order.

    Query head ``k * group + g`` reads KV head ``k`` only, so the heads of one group may be
    re-ordered among themselves independently of the other groups' (the groups move whole with
    their KV heads).
    """
    return grouped(kv, [ctx.new_group(group) for _ in range(kv.size)])


@register
class GroupQueryAttentionRule(OpRule):
    """GroupQueryAttention: ``num_heads`` query heads over ``kv_num_heads`` key/value heads.

    Query head ``h`` reads KV head ``h // G`` (``G = num_heads / kv_num_heads``), so query head
    ``k * G + g`` is member ``g`` of KV head ``k``'s group. Allowed, exactly: a permutation of the
    KV heads, moving each KV head's K, V and its whole group of query heads together; a
    permutation of the query heads inside each group (its own for every group: :func:`_query_heads`); one
    permutation of the Q/K dims inside a head (shared by Q and K) and another of the V dims
    (shared with the output). Layouts: Q ``kv (x) group (x) qk``, K ``kv (x) qk``, V
    ``kv (x) v``, output ``kv (x) group (x) v``; packed QKV is their block sum. With
    ``do_rotary`` the Q/K dims are restricted to what :func:`_rotary_head` allows (whole rotary
    pairs, with the cos/sin caches' frequencies). Past and present key/value ``[B, kv, P, H]``
    follow the KV heads and their dims; ``attention_bias`` and ``head_sink`` follow the query heads.
    """

    op_types = ("GroupQueryAttention",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        heads, kv_heads = _int(ctx, "num_heads"), _int(ctx, "kv_num_heads")
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise RuleDoesNotApply("index-map", f"{heads} query heads do not group over {kv_heads} KV heads")
        if ctx.rank_in(0) != 3:
            raise RuleDoesNotApply("index-map", "GroupQueryAttention query is not [B, S, hidden]")
        packed = not ctx.input(1)
        query_shape = ctx.shape_in(0) or ()
        hidden = query_shape[2]
        if packed:
            width = hidden if isinstance(hidden, int) else None
            head_size = width // (heads + 2 * kv_heads) if width and width % (heads + 2 * kv_heads) == 0 else None
        else:
            key_hidden = (ctx.shape_in(1) or (None,) * 3)[-1]
            head_size = key_hidden // kv_heads if isinstance(key_hidden, int) and key_hidden % kv_heads == 0 else None
        if head_size is None:
            raise RuleDoesNotApply("unknown-shape", "the head size is unknown")
        kv = ctx.new_group(kv_heads)
        query_heads = _query_heads(ctx, kv, heads // kv_heads)
        if _int(ctx, "do_rotary"):
            if not ctx.input(7) or not ctx.input(8):
                raise RuleDoesNotApply("index-map", "do_rotary without cos/sin caches")
            qk = _rotary_head(ctx, head_size, 2 * _cache_half(ctx, 7), bool(_int(ctx, "rotary_interleaved")), 7, 8)
        else:
            qk = ctx.new_group(head_size)
        v = ctx.new_group(head_size)
        q_layout, k_layout, v_layout = product(query_heads, qk), product(kv, qk), product(kv, v)
        if packed:
            ctx.unify(ctx.take(0, 2, head_size * (heads + 2 * kv_heads)), direct_sum([q_layout, k_layout, v_layout]))
        else:
            ctx.unify(ctx.take(0, 2, q_layout.size), q_layout)
            ctx.unify(ctx.take(1, 2, k_layout.size), k_layout)
            ctx.unify(ctx.take(2, 2, v_layout.size), v_layout)
        _cache(ctx, 3, kv, qk, "past key")
        _cache(ctx, 4, kv, v, "past value")
        _head_bias(ctx, 10, query_heads)
        if ctx.input(11):
            ctx.attach(11, 0, query_heads, "attention head sink")
        ctx.emit(0, 2, product(query_heads, v))
        _emit_cache(ctx, 1, kv, qk)
        _emit_cache(ctx, 2, kv, v)
        ctx.emit(3, 1, query_heads)


@register
class OnnxAttentionRule(OpRule):
    """ONNX's ``Attention`` (opset 23): ``softmax(Q K^T * scale + mask) V`` over ``q_num_heads`` query heads.

    Q ``[B, Hq, S, D]``, K ``[B, Hkv, L, D]``, V ``[B, Hkv, L, Dv]`` (or all three ``[B, S, heads * size]``
    with ``q_num_heads`` / ``kv_num_heads``): query head ``h`` reads KV head ``h // (Hq / Hkv)``, as in
    GroupQueryAttention, so the same permutations hold: the KV heads with their groups of query
    heads, the query heads inside each group (its own order per group), one permutation of the
    Q/K dims shared by Q and K, another of the V dims shared with the output. The mask broadcasts
    to ``[B, Hq, S, T]`` from the right: an axis of it that meets the query heads follows them. Past
    and present key/value ``[B, Hkv, P, H]`` follow the KV heads and their dims; the optional
    ``qk_matmul_output`` ``[B, Hq, S, T]`` the query heads. Scale, softcap and causality act on
    scores, position by position: no channel is involved.
    """

    op_types = ("Attention",)

    def propagate(self, ctx: RuleContext) -> None:
        rank = ctx.rank_in(0)
        if rank not in (3, 4) or ctx.rank_in(1) != rank or ctx.rank_in(2) != rank:
            raise RuleDoesNotApply("index-map", "Attention's Q, K and V are not all [B, S, hidden] or all [B, N, S, H]")
        q_shape, k_shape, v_shape = (ctx.shape_in(slot) or () for slot in range(3))
        if rank == 4:
            heads, kv_heads, head_size, v_head_size = q_shape[1], k_shape[1], q_shape[3], v_shape[3]
        else:
            heads, kv_heads = _int(ctx, "q_num_heads"), _int(ctx, "kv_num_heads")
            q_hidden, v_hidden = q_shape[2], v_shape[2]
            head_size = q_hidden // heads if isinstance(q_hidden, int) and heads > 0 and q_hidden % heads == 0 else None
            v_head_size = v_hidden // kv_heads if isinstance(v_hidden, int) and kv_heads > 0 and v_hidden % kv_heads == 0 else None
        sizes = (heads, kv_heads, head_size, v_head_size)
        if not all(isinstance(size, int) and size > 0 for size in sizes):
            raise RuleDoesNotApply("unknown-shape", "the number of heads or the head sizes are unknown")
        heads, kv_heads, head_size, v_head_size = (int(size) for size in sizes)  # type: ignore[arg-type]
        if heads % kv_heads:
            raise RuleDoesNotApply("index-map", f"{heads} query heads do not group over {kv_heads} KV heads")
        kv = ctx.new_group(kv_heads)
        query_heads = _query_heads(ctx, kv, heads // kv_heads)
        qk, v = ctx.new_group(head_size), ctx.new_group(v_head_size)
        if rank == 4:
            for slot, slot_heads, inner in ((0, query_heads, qk), (1, kv, qk), (2, kv, v)):
                ctx.unify(ctx.take(slot, 1, slot_heads.size), slot_heads)
                ctx.unify(ctx.take(slot, 3, inner.size), inner)
        else:
            for slot, layout in ((0, product(query_heads, qk)), (1, product(kv, qk)), (2, product(kv, v))):
                ctx.unify(ctx.take(slot, 2, layout.size), layout)
        self._mask(ctx, query_heads)
        _cache(ctx, 4, kv, qk, "past key")
        _cache(ctx, 5, kv, v, "past value")
        if rank == 4:
            ctx.emit(0, 1, query_heads)
            ctx.emit(0, 3, v)
        else:
            ctx.emit(0, 2, product(query_heads, v))
        _emit_cache(ctx, 1, kv, qk)
        _emit_cache(ctx, 2, kv, v)
        ctx.emit(3, 1, query_heads)

    @staticmethod
    def _mask(ctx: RuleContext, query_heads: Expr) -> None:
        """The mask's axis that broadcasts against the query heads (the third from the right) follows them."""
        if not ctx.input(3):
            return
        shape = ctx.shape_in(3) or ctx.graph.constant_shape(ctx.input(3))
        if shape is None:
            raise RuleDoesNotApply("unknown-shape", f"the shape of attention mask '{ctx.input(3)}' is unknown")
        if len(shape) < 3 or shape[-3] == 1:
            return  # the same mask for every head
        if shape[-3] != query_heads.size:
            raise RuleDoesNotApply("unknown-shape", f"attention mask '{ctx.input(3)}' has {shape[-3]} heads")
        ctx.attach(3, len(shape) - 3, query_heads, "attention mask (heads)")


@register
class MatMulNBitsRule(OpRule):
    """MatMulNBits: ``Y[..., N] = A[..., K] @ dequantize(B)^T``, B blockwise-quantized along K.

    ``B`` is ``[N, n_blocks, blob]`` bytes: row ``n``, block ``j`` holds K elements
    ``j * block_size ...`` packed ``8 / bits`` to a byte; ``scales`` (and ``zero_points``) hold one
    value per (row, block), flat ``[N * n_blocks]`` or ``[N, n_blocks]``; uint8 zero points of
    fewer than 8 bits pack several blocks into a byte (``[N * ceil(n_blocks * bits / 8)]``).

    - Output rows ``N``: new neurons, moving B's rows with their scales, zero points and ``bias``.
    - Input axis ``K``: permuted only in whole quantization blocks and, inside every block, by
      one permutation of its bytes (the values sharing a byte stay together): ``blocks (x) bytes
      (x) I_{8/bits}``; blocks move B's axis 1 with their scales and zero points. Where zero
      points pack several blocks per byte, blocks move only as whole zero-point bytes (runs of
      ``8 / bits`` blocks; a trailing incomplete run stays). Where ``K`` is not a multiple of
      ``block_size``, the whole blocks still move but the last, partial block stays in place, and
      so do the bytes inside every block (B's axis 2 is shared with the padded partial block).
      With ``g_idx`` (act-order) ``K`` is frozen.
    """

    op_types = ("MatMulNBits",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        k, n, bits, block = _int(ctx, "K"), _int(ctx, "N"), _int(ctx, "bits", 4), _int(ctx, "block_size")
        if ctx.is_const(0) or not ctx.is_const(1):
            raise RuleDoesNotApply("not-constant", "MatMulNBits needs a computed A and a constant B")
        weight_shape = ctx.const_shape(1)
        n_blocks = -(-k // block) if block > 0 else 0
        if len(weight_shape) != 3 or weight_shape[0] != n or weight_shape[1] != n_blocks or bits not in (2, 4, 8):
            raise RuleDoesNotApply("index-map", f"MatMulNBits weight of shape {list(weight_shape)} with {bits} bits")
        rank = ctx.rank_in(0)
        features = ctx.take(0, rank - 1, k)
        outputs = ctx.new_group(n)
        per_byte = 8 // bits
        zero_packed = bool(ctx.input(3)) and bits < 8 and self._is_bytes(ctx, 3)
        zero_per_byte = 8 // bits if zero_packed else 1  # blocks sharing a zero-point byte
        zero_row = -(-n_blocks // zero_per_byte)  # zero-point bytes of one row
        zero_bytes: Expr = ctx.fixed(zero_row, "act-order g_idx maps K to blocks")
        if ctx.input(4):
            blocks: Expr = ctx.fixed(n_blocks, "act-order g_idx maps K to blocks")
            in_block: Expr = ctx.fixed(weight_shape[2], "act-order g_idx maps K to blocks")
            ctx.unify(features, ctx.fixed(k, "act-order g_idx maps K to blocks"))
        else:
            whole = k // block  # the blocks holding block_size values of K; a partial one stays
            partial = f"K = {k} is not a multiple of block_size {block}: the last, partial block stays"
            packed = f"{bits}-bit zero points pack {8 // bits} blocks into a byte: blocks move as whole bytes"
            runs = whole // zero_per_byte  # zero-point bytes whose blocks are all whole
            zero_run: Expr = ctx.new_group(runs) if runs else ctx.fixed(0, packed)
            moving = product(zero_run, ctx.fixed(zero_per_byte, packed)) if runs else zero_run
            whole_blocks = direct_sum([moving, ctx.fixed(whole - moving.size, packed)])
            blocks = direct_sum([whole_blocks, ctx.fixed(n_blocks - whole, partial)])
            zero_bytes = direct_sum([zero_run, ctx.fixed(zero_row - runs, packed)])
            in_block = ctx.fixed(weight_shape[2], partial) if k % block else ctx.new_group(weight_shape[2])
            values = product(in_block, ctx.fixed(per_byte, f"{per_byte} values share a byte"))
            ctx.unify(features, direct_sum([product(whole_blocks, values), ctx.fixed(k - whole * block, partial)]))
        ctx.bind(1, 0, outputs, "matmul weight")
        ctx.bind(1, 1, blocks, "matmul weight (input feature blocks)")
        ctx.bind(1, 2, in_block, "matmul weight (input features inside a block)")
        self._per_block(ctx, 2, outputs, blocks, "scales")
        if ctx.input(3):
            if zero_packed:
                shape = ctx.const_shape(3)
                if len(shape) == 1:
                    ctx.bind(3, 0, product(outputs, zero_bytes), "zero points")
                elif len(shape) == 2:
                    ctx.bind(3, 0, outputs, "zero points")
                    ctx.bind(3, 1, zero_bytes, "zero points")
                else:
                    raise RuleDoesNotApply("index-map", f"MatMulNBits zero points of shape {list(shape)}")
            else:
                self._per_block(ctx, 3, outputs, blocks, "zero points")
        if ctx.input(5):
            ctx.attach(5, 0, outputs, "matmul bias")
        for axis, expr in ctx.take_all(0).items():
            if axis != rank - 1:
                ctx.emit(0, axis, expr)  # row (token) axes pass through
        ctx.declare_producer(outputs)
        ctx.emit(0, rank - 1, outputs)

    @staticmethod
    def _is_bytes(ctx: RuleContext, slot: int) -> bool:
        leaf = ctx.graph.constant_leaf(ctx.input(slot))
        return leaf is not None and ctx.graph.dtypes.get(leaf.name) == onnx.TensorProto.UINT8

    @staticmethod
    def _per_block(ctx: RuleContext, slot: int, outputs: Expr, blocks: Expr, what: str) -> None:
        """One value per (row, block): flat ``[N * n_blocks]`` or ``[N, n_blocks]``."""
        shape = ctx.const_shape(slot)
        if len(shape) == 1:
            ctx.bind(slot, 0, product(outputs, blocks), what)
        elif len(shape) == 2:
            ctx.bind(slot, 0, outputs, what)
            ctx.bind(slot, 1, blocks, what)
        else:
            raise RuleDoesNotApply("index-map", f"MatMulNBits {what} of shape {list(shape)}")


@register
class EmbedLayerNormRule(OpRule):
    """EmbedLayerNormalization: ``LayerNorm(word[ids] + position[pos] + segment[seg]) * gamma + beta``.

    The hidden axis is new here (like a ``Gather`` from an embedding table): the three tables'
    columns, gamma and beta move together; the output and the optional ``embedding_sum`` carry
    it; ``mask_index`` carries nothing.
    """

    op_types = ("EmbedLayerNormalization",)
    domain = MICROSOFT

    def propagate(self, ctx: RuleContext) -> None:
        table_shape = ctx.const_shape(2)
        if len(table_shape) != 2:
            raise RuleDoesNotApply("index-map", f"word embedding of shape {list(table_shape)}")
        hidden = ctx.new_group(table_shape[1])
        for slot, what in ((2, "word"), (3, "position"), (4, "segment")):
            if ctx.input(slot):
                ctx.bind(slot, 1, hidden, f"embedding table ({what})")
        ctx.attach(5, 0, hidden, "EmbedLayerNormalization gamma")
        ctx.attach(6, 0, hidden, "EmbedLayerNormalization beta")
        ctx.declare_producer(hidden)
        ctx.emit(0, 2, hidden)
        ctx.emit(2, 2, hidden)
