"""Deterministic builder of small ONNX conv nets, for the demo model and the test fixtures.

:class:`GraphBuilder` wraps ``onnx.helper`` so that a model reads like a PyTorch ``forward``:
every method takes tensor names, emits one node (plus its weights) and returns the name of the
new tensor. The builder tracks the shape of every tensor itself, so callers never pass input
channel counts and a wrong wiring fails at build time with a clear message rather than later in
ONNX Runtime.

Why these choices:

* Weights come from one ``np.random.default_rng(seed)``, consumed in build order, so the same
  seed gives byte-identical models and tests can rely on exact files.
* Weights use He scaling (``std = sqrt(gain / fan_in)``, gain 2 ahead of a Relu-like activation)
  and every bias and normalisation parameter is non-trivial but O(1), so activations stay O(1)
  through the network: equivalence checks then compare outputs that neither vanish nor explode,
  and a wrongly permuted bias or BN statistic changes the output visibly.
* Models use opset 17 of ``ai.onnx`` and ``ir_version = 8``, which every ONNX Runtime from 1.17 on
  accepts (the newest IR version that ``onnx`` writes by default is rejected by older runtimes).
* Every node has a readable, unique name (``stage1.conv1``); a node's output tensor has the node's
  name, and its parameters are named after it (``stage1.conv1.weight``).

Block helpers (:func:`conv_bn_relu`, :func:`basic_block`, :func:`inverted_residual`,
:func:`se_gate`) sit at the end of the module so the demo model and the fixtures share them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET: int = 17
IR_VERSION: int = 8

Shape = tuple[int, ...]
Array = npt.NDArray[Any]
ParamStore = Literal["initializer", "constant"]


class GraphBuilder:
    """Build one ONNX graph node by node while tracking tensor shapes and dtypes.

    Parameters are stored as initializers, or as ``Constant`` nodes (the way Paddle exports)
    while :attr:`param_store` is ``"constant"`` (see :meth:`params_as`).
    """

    def __init__(self, name: str, seed: int = 0, *, opset: int = OPSET) -> None:
        self.graph_name = name
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.param_store: ParamStore = "initializer"
        self._nodes: list[onnx.NodeProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._shapes: dict[str, Shape] = {}
        self._dtypes: dict[str, int] = {}
        self._node_names: set[str] = set()
        self._counters: dict[str, int] = {}
        self._scope: list[str] = []
        self._domains: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping

    def shape(self, tensor: str) -> Shape:
        """Shape of a tensor built so far (KeyError names the tensor if it is unknown)."""
        if tensor not in self._shapes:
            raise KeyError(f"unknown tensor {tensor!r} in graph {self.graph_name!r}")
        return self._shapes[tensor]

    def dtype(self, tensor: str) -> int:
        """ONNX element type (``TensorProto.FLOAT`` ...) of a tensor built so far."""
        self.shape(tensor)
        return self._dtypes[tensor]

    def channels(self, tensor: str) -> int:
        """Size of axis 1, the channel axis of an NCHW activation."""
        return self.shape(tensor)[1]

    @contextlib.contextmanager
    def scope(self, prefix: str) -> Generator[None, None, None]:
        """Prefix the names of everything built inside the ``with`` block by ``prefix.``."""
        self._scope.append(prefix)
        try:
            yield
        finally:
            self._scope.pop()

    @contextlib.contextmanager
    def params_as(self, store: ParamStore) -> Generator[None, None, None]:
        """Store parameters created inside the ``with`` block as initializers or Constant nodes."""
        previous, self.param_store = self.param_store, store
        try:
            yield
        finally:
            self.param_store = previous

    def _scoped(self, name: str) -> str:
        return ".".join([*self._scope, name])

    def _claim(self, full: str) -> str:
        """Claim an exact (already scoped) node name; a clash is a bug in the caller."""
        if full in self._node_names or full in self._shapes:
            raise ValueError(f"name {full!r} is already used in graph {self.graph_name!r}")
        self._node_names.add(full)
        return full

    def _reserve(self, name: str | None, op_type: str) -> str:
        """Claim a unique node name: the scoped ``name``, or ``<op><k>`` when none is given."""
        if name is not None:
            return self._claim(self._scoped(name))
        base = op_type.lower()
        while True:
            # Counters are per op type, so auto names read "relu3" rather than "node57".
            self._counters[base] = self._counters.get(base, 0) + 1
            full = self._scoped(f"{base}{self._counters[base]}")
            if full not in self._node_names and full not in self._shapes:
                return self._claim(full)

    def _register(self, tensor: str, shape: Sequence[int], elem_type: int) -> None:
        if tensor in self._shapes:
            raise ValueError(f"tensor {tensor!r} is already defined in graph {self.graph_name!r}")
        self._shapes[tensor] = tuple(int(d) for d in shape)
        self._dtypes[tensor] = elem_type

    def _emit(
        self,
        node: str,
        op_type: str,
        inputs: Sequence[str],
        shape: Sequence[int],
        *,
        elem_type: int | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        """Append a node whose single output tensor is named like the node itself."""
        for tensor in inputs:
            if tensor:  # "" marks an omitted optional input
                self.shape(tensor)
        if elem_type is None:
            elem_type = self._dtypes[inputs[0]]
        self._register(node, shape, elem_type)
        self._nodes.append(
            helper.make_node(op_type, list(inputs), [node], name=node, domain=domain, **attrs)
        )
        return node

    # ------------------------------------------------------------------ tensors

    def input(self, name: str, shape: Sequence[int], elem_type: int = TensorProto.FLOAT) -> str:
        """Declare a graph input with a fully static shape."""
        self._register(name, shape, elem_type)
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def param(self, name: str, array: Array) -> str:
        """Store a constant under the scoped ``name`` (initializer or Constant node)."""
        return self._store(self._scoped(name), array)

    def _store(self, full_name: str, array: Array) -> str:
        array = np.asarray(array)
        elem_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = numpy_helper.from_array(array, full_name)
        if self.param_store == "initializer":
            self._register(full_name, array.shape, elem_type)
            self._initializers.append(tensor)
            return full_name
        node = self._claim(full_name)
        # A Constant node's output carries the parameter's name, so readers see "x.weight".
        self._register(full_name, array.shape, elem_type)
        self._nodes.append(
            helper.make_node("Constant", [], [full_name], name=node, value=tensor)
        )
        return full_name

    def he_normal(self, shape: Sequence[int], fan_in: int, gain: float = 2.0) -> Array:
        """Gaussian weights with variance ``gain / fan_in`` (He et al. for gain 2, Relu nets)."""
        scale = np.float32(math.sqrt(gain / fan_in))
        return self.rng.standard_normal(tuple(shape), dtype=np.float32) * scale

    def small_normal(self, shape: Sequence[int], std: float = 0.1) -> Array:
        """Small non-zero values for biases: visible when permuted wrongly, harmless to scale."""
        return self.rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)

    def uniform(self, shape: Sequence[int], low: float, high: float) -> Array:
        """Uniform float32 values, for positive parameters such as BN scale and variance."""
        return self.rng.uniform(low, high, size=tuple(shape)).astype(np.float32)

    def conv_weight(self, x: str, out_channels: int, kernel: int, group: int = 1,
                    gain: float = 2.0) -> Array:
        """He-scaled weight for ``conv(x, out_channels, kernel, group=group)``.

        For callers that route the weight through Identity, Cast or a Constant node themselves.
        """
        cin = self.channels(x)
        if cin % group or out_channels % group:
            raise ValueError(f"group {group} does not divide {cin} -> {out_channels} channels")
        fan_in = cin // group * kernel * kernel
        return self.he_normal((out_channels, cin // group, kernel, kernel), fan_in, gain)

    def _check_param(self, tensor: str, shape: Shape, what: str) -> None:
        if self.shape(tensor) != shape:
            raise ValueError(f"{what} {tensor!r} has shape {self.shape(tensor)}, expected {shape}")

    # ------------------------------------------------------------------ layers with weights

    def conv(
        self,
        x: str,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool | str = True,
        *,
        name: str | None = None,
        weight: str | None = None,
        gain: float = 2.0,
    ) -> str:
        """2-D Conv with square kernel; ``pad`` defaults to "same" (``kernel // 2``).

        ``weight`` / ``bias`` may name existing tensors (a Constant, a Cast output, a shared
        initializer) instead of letting the conv create its own.
        """
        n, cin, h, w = self.shape(x)
        pad = kernel // 2 if pad is None else pad
        node = self._reserve(name, "Conv")
        w_shape = (out_channels, cin // group, kernel, kernel)
        if weight is None:
            weight = self._store(f"{node}.weight",
                                 self.conv_weight(x, out_channels, kernel, group, gain))
        self._check_param(weight, w_shape, "conv weight")
        inputs = [x, weight]
        if bias is True:
            inputs.append(self._store(f"{node}.bias", self.small_normal((out_channels,))))
        elif isinstance(bias, str):
            self._check_param(bias, (out_channels,), "conv bias")
            inputs.append(bias)
        ho = (h + 2 * pad - kernel) // stride + 1
        wo = (w + 2 * pad - kernel) // stride + 1
        return self._emit(node, "Conv", inputs, (n, out_channels, ho, wo),
                          kernel_shape=[kernel, kernel], strides=[stride, stride],
                          pads=[pad] * 4, group=group)

    def conv_transpose(
        self,
        x: str,
        out_channels: int,
        kernel: int = 2,
        stride: int = 2,
        pad: int = 0,
        bias: bool = True,
        *,
        name: str | None = None,
        gain: float = 2.0,
        group: int = 1,
    ) -> str:
        """ConvTranspose (upsampling); its weight is ``[Cin, Cout / group, k, k]``, unlike Conv's."""
        n, cin, h, w = self.shape(x)
        node = self._reserve(name, "ConvTranspose")
        # Each output pixel sums about Cin / group * (k / stride)^2 taps.
        fan_in = cin // group * max(1, (kernel * kernel) // (stride * stride))
        inputs = [x, self._store(f"{node}.weight",
                                 self.he_normal((cin, out_channels // group, kernel, kernel), fan_in, gain))]
        if bias:
            inputs.append(self._store(f"{node}.bias", self.small_normal((out_channels,))))
        ho = (h - 1) * stride - 2 * pad + kernel
        wo = (w - 1) * stride - 2 * pad + kernel
        grouped: dict[str, Any] = {"group": group} if group != 1 else {}  # one group: written as before
        return self._emit(node, "ConvTranspose", inputs, (n, out_channels, ho, wo),
                          kernel_shape=[kernel, kernel], strides=[stride, stride],
                          pads=[pad] * 4, **grouped)

    def batchnorm(self, x: str, *, name: str | None = None, eps: float = 1e-5) -> str:
        """Inference BatchNormalization with non-trivial scale, bias, running mean and variance."""
        c = self.channels(x)
        node = self._reserve(name, "BatchNormalization")
        inputs = [
            x,
            self._store(f"{node}.scale", self.uniform((c,), 0.5, 1.5)),
            self._store(f"{node}.bias", self.small_normal((c,))),
            self._store(f"{node}.mean", self.small_normal((c,), std=0.2)),
            self._store(f"{node}.var", self.uniform((c,), 0.5, 2.0)),
        ]
        return self._emit(node, "BatchNormalization", inputs, self.shape(x), epsilon=eps)

    def instance_norm(self, x: str, *, name: str | None = None, eps: float = 1e-5) -> str:
        """InstanceNormalization with non-trivial per-channel scale and bias."""
        c = self.channels(x)
        node = self._reserve(name, "InstanceNormalization")
        inputs = [
            x,
            self._store(f"{node}.scale", self.uniform((c,), 0.5, 1.5)),
            self._store(f"{node}.bias", self.small_normal((c,))),
        ]
        return self._emit(node, "InstanceNormalization", inputs, self.shape(x), epsilon=eps)

    def gemm(
        self,
        x: str,
        out_features: int,
        trans_b: int = 1,
        bias: bool = True,
        *,
        name: str | None = None,
        gain: float = 2.0,
    ) -> str:
        """Gemm ``x @ B (+ C)``.

        B is ``[N, K]`` with ``trans_b=1`` (as PyTorch's Linear exports), else ``[K, N]``.
        """
        m, k = self.shape(x)
        node = self._reserve(name, "Gemm")
        b_shape = (out_features, k) if trans_b else (k, out_features)
        inputs = [x, self._store(f"{node}.weight", self.he_normal(b_shape, k, gain))]
        if bias:
            inputs.append(self._store(f"{node}.bias", self.small_normal((out_features,))))
        return self._emit(node, "Gemm", inputs, (m, out_features), transB=trans_b)

    def matmul(
        self,
        x: str,
        out_features: int,
        bias: bool = True,
        *,
        name: str | None = None,
        gain: float = 2.0,
    ) -> str:
        """MatMul with a constant ``[K, N]`` weight, then ``Add`` of a bias (PyTorch's export).

        The layer's last node carries ``name``: with a bias the MatMul is ``<name>.matmul`` and
        the Add is ``<name>``, so ``name="output"`` yields a tensor called ``output``.
        """
        *lead, k = self.shape(x)
        layer = self._reserve(name, "MatMul")
        weight = self._store(f"{layer}.weight", self.he_normal((k, out_features), k, gain))
        if not bias:
            return self._emit(layer, "MatMul", [x, weight], (*lead, out_features))
        y = self._emit(self._claim(f"{layer}.matmul"), "MatMul", [x, weight],
                       (*lead, out_features))
        bias_t = self._store(f"{layer}.bias", self.small_normal((out_features,)))
        return self._emit(layer, "Add", [y, bias_t], (*lead, out_features))

    # ------------------------------------------------------------------ element-wise

    def _unary(self, op_type: str, x: str, name: str | None, **attrs: Any) -> str:
        return self._emit(self._reserve(name, op_type), op_type, [x], self.shape(x), **attrs)

    def relu(self, x: str, *, name: str | None = None) -> str:
        """Relu."""
        return self._unary("Relu", x, name)

    def sigmoid(self, x: str, *, name: str | None = None) -> str:
        """Sigmoid."""
        return self._unary("Sigmoid", x, name)

    def hardswish(self, x: str, *, name: str | None = None) -> str:
        """HardSwish (MobileNetV3's activation)."""
        return self._unary("HardSwish", x, name)

    def hardsigmoid(self, x: str, *, name: str | None = None, alpha: float = 1.0 / 6.0,
                    beta: float = 0.5) -> str:
        """HardSigmoid with PyTorch's slope 1/6 (ONNX's default would be 0.2)."""
        return self._unary("HardSigmoid", x, name, alpha=alpha, beta=beta)

    def identity(self, x: str, *, name: str | None = None) -> str:
        """Identity (exporters leave these in front of weights)."""
        return self._unary("Identity", x, name)

    def cast(self, x: str, to: int, *, name: str | None = None) -> str:
        """Cast to the ONNX element type ``to`` (``TensorProto.FLOAT`` ...)."""
        node = self._reserve(name, "Cast")
        return self._emit(node, "Cast", [x], self.shape(x), elem_type=to, to=to)

    def clip(self, x: str, lo: float, hi: float, *, name: str | None = None) -> str:
        """Clip with scalar ``min``/``max`` given as constant inputs (opset 11+ style)."""
        node = self._reserve(name, "Clip")
        lo_t = self._store(f"{node}.min", np.array(lo, dtype=np.float32))
        hi_t = self._store(f"{node}.max", np.array(hi, dtype=np.float32))
        return self._emit(node, "Clip", [x, lo_t, hi_t], self.shape(x))

    def _binary(self, op_type: str, a: str, b: str | Array, name: str | None,
                const_name: str) -> str:
        node = self._reserve(name, op_type)
        if not isinstance(b, str):
            b = self._store(f"{node}.{const_name}", np.asarray(b, dtype=np.float32))
        shape = np.broadcast_shapes(self.shape(a), self.shape(b))
        return self._emit(node, op_type, [a, b], shape)

    def add(self, a: str, b: str | Array, *, name: str | None = None,
            const_name: str = "const") -> str:
        """Broadcasting Add.

        ``b`` is a tensor name, or an array stored as ``<node>.<const_name>``.
        """
        return self._binary("Add", a, b, name, const_name)

    def sub(self, a: str, b: str | Array, *, name: str | None = None,
            const_name: str = "const") -> str:
        """Broadcasting Sub (see :meth:`add`)."""
        return self._binary("Sub", a, b, name, const_name)

    def mul(self, a: str, b: str | Array, *, name: str | None = None,
            const_name: str = "const") -> str:
        """Broadcasting Mul (see :meth:`add`)."""
        return self._binary("Mul", a, b, name, const_name)

    def div(self, a: str, b: str | Array, *, name: str | None = None,
            const_name: str = "const") -> str:
        """Broadcasting Div (see :meth:`add`)."""
        return self._binary("Div", a, b, name, const_name)

    # ------------------------------------------------------------------ transformer pieces

    def pow(self, x: str, exponent: float, *, name: str | None = None) -> str:
        """``Pow(x, exponent)`` with a scalar float32 exponent stored as ``<node>.exponent``."""
        return self._binary("Pow", x, np.array(exponent, dtype=np.float32), name, "exponent")

    def erf(self, x: str, *, name: str | None = None) -> str:
        """Erf (decomposed exact Gelu)."""
        return self._unary("Erf", x, name)

    def tanh(self, x: str, *, name: str | None = None) -> str:
        """Tanh."""
        return self._unary("Tanh", x, name)

    def sqrt(self, x: str, *, name: str | None = None) -> str:
        """Sqrt."""
        return self._unary("Sqrt", x, name)

    def softmax(self, x: str, axis: int = -1, *, name: str | None = None) -> str:
        """Softmax along ``axis`` (opset 13+ semantics: one axis)."""
        return self._unary("Softmax", x, name, axis=axis)

    def gelu(self, x: str, approximate: str = "none", *, name: str | None = None) -> str:
        """The ``Gelu`` operator (opset 20+; build with ``GraphBuilder(..., opset=20)``)."""
        if self.opset < 20:
            raise ValueError(f"Gelu needs opset 20, graph {self.graph_name!r} has {self.opset}")
        return self._unary("Gelu", x, name, approximate=approximate)

    def layer_norm(self, x: str, axis: int = -1, *, name: str | None = None,
                   eps: float = 1e-5) -> str:
        """LayerNormalization over the axes from ``axis`` on, with non-trivial Scale and B."""
        normalized = self.shape(x)[axis % len(self.shape(x)):]
        node = self._reserve(name, "LayerNormalization")
        inputs = [
            x,
            self._store(f"{node}.weight", self.uniform(normalized, 0.5, 1.5)),
            self._store(f"{node}.bias", self.small_normal(normalized)),
        ]
        return self._emit(node, "LayerNormalization", inputs, self.shape(x), axis=axis,
                          epsilon=eps)

    def gather(self, data: str, indices: str, axis: int = 0, *,
               name: str | None = None) -> str:
        """Gather ``data`` along ``axis`` at ``indices`` (an embedding look-up for axis 0)."""
        s = self.shape(data)
        ax = axis % len(s)
        shape = (*s[:ax], *self.shape(indices), *s[ax + 1:])
        return self._emit(self._reserve(name, "Gather"), "Gather", [data, indices], shape,
                          elem_type=self._dtypes[data], axis=axis)

    def embedding(self, ids: str, num: int, dim: int, *, name: str | None = None,
                  std: float = 1.0) -> str:
        """``nn.Embedding``: a ``[num, dim]`` table ``<name>.weight`` read by ``Gather(ids)``."""
        node = self._reserve(name, "Gather")
        table = self._store(f"{node}.weight", self.small_normal((num, dim), std=std))
        s = self.shape(table)
        return self._emit(node, "Gather", [table, ids], (*self.shape(ids), s[1]),
                          elem_type=self._dtypes[table], axis=0)

    def matmul_tensors(self, a: str, b: str, *, name: str | None = None) -> str:
        """``MatMul(a, b)`` of two tensors (numpy semantics: batch axes broadcast)."""
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) < 2 or len(sb) < 2 or sa[-1] != sb[-2]:
            raise ValueError(f"cannot MatMul shapes {sa} and {sb}")
        batch = np.broadcast_shapes(sa[:-2], sb[:-2])
        return self._emit(self._reserve(name, "MatMul"), "MatMul", [a, b],
                          (*batch, sa[-2], sb[-1]))

    def positions(self, x: str, axis: int = 1, *, name: str | None = None) -> str:
        """``arange(x.shape[axis])`` as PyTorch exports it with a dynamic sequence length.

        ``Shape -> Gather(axis) -> Range(0, n, 1)``; the int64 ``[n]`` output is ``<name>``.
        """
        n = self.shape(x)[axis]
        node = self._reserve(name, "Range")
        shape_t = self._emit(self._claim(f"{node}.shape"), "Shape", [x], (len(self.shape(x)),),
                             elem_type=TensorProto.INT64)
        index = self._store(f"{node}.axis", np.array(axis, dtype=np.int64))
        length = self._emit(self._claim(f"{node}.length"), "Gather", [shape_t, index], (),
                            elem_type=TensorProto.INT64, axis=0)
        start = self._store(f"{node}.start", np.array(0, dtype=np.int64))
        delta = self._store(f"{node}.delta", np.array(1, dtype=np.int64))
        return self._emit(node, "Range", [start, length, delta], (n,), elem_type=TensorProto.INT64)

    # ------------------------------------------------------------------ shape and pooling

    def concat(self, xs: Sequence[str], axis: int = 1, *, name: str | None = None) -> str:
        """Concat along ``axis`` (all other dimensions must agree)."""
        shapes = [self.shape(x) for x in xs]
        rank = len(shapes[0])
        ax = axis % rank
        for s in shapes[1:]:
            if len(s) != rank or any(s[i] != shapes[0][i] for i in range(rank) if i != ax):
                raise ValueError(f"concat shapes disagree off axis {axis}: {shapes}")
        shape = list(shapes[0])
        shape[ax] = sum(s[ax] for s in shapes)
        return self._emit(self._reserve(name, "Concat"), "Concat", list(xs), shape, axis=axis)

    def maxpool(self, x: str, kernel: int = 2, stride: int | None = None, pad: int = 0, *,
                name: str | None = None) -> str:
        """MaxPool with a square kernel; ``stride`` defaults to ``kernel``."""
        n, c, h, w = self.shape(x)
        stride = kernel if stride is None else stride
        ho = (h + 2 * pad - kernel) // stride + 1
        wo = (w + 2 * pad - kernel) // stride + 1
        return self._emit(self._reserve(name, "MaxPool"), "MaxPool", [x], (n, c, ho, wo),
                          kernel_shape=[kernel, kernel], strides=[stride, stride],
                          pads=[pad] * 4)

    def global_avg_pool(self, x: str, *, name: str | None = None) -> str:
        """GlobalAveragePool: ``[N, C, H, W] -> [N, C, 1, 1]``."""
        n, c, *spatial = self.shape(x)
        return self._emit(self._reserve(name, "GlobalAveragePool"), "GlobalAveragePool", [x],
                          (n, c, *[1] * len(spatial)))

    def flatten(self, x: str, axis: int = 1, *, name: str | None = None) -> str:
        """Flatten to 2-D: dims before ``axis`` become rows, the rest (C major) columns."""
        s = self.shape(x)
        shape = (math.prod(s[:axis]), math.prod(s[axis:]))
        return self._emit(self._reserve(name, "Flatten"), "Flatten", [x], shape, axis=axis)

    def transpose(self, x: str, perm: Sequence[int], *, name: str | None = None) -> str:
        """Transpose by ``perm`` (e.g. ``[0, 2, 3, 1]`` for NCHW -> NHWC)."""
        s = self.shape(x)
        return self._emit(self._reserve(name, "Transpose"), "Transpose", [x],
                          [s[p] for p in perm], perm=list(perm))

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: bool = True, *,
                    name: str | None = None) -> str:
        """ReduceMean with ``axes`` as an attribute (opset <= 17 form)."""
        s = self.shape(x)
        ax = {a % len(s) for a in axes}
        shape = [1 if i in ax else d for i, d in enumerate(s) if keepdims or i not in ax]
        return self._emit(self._reserve(name, "ReduceMean"), "ReduceMean", [x], shape,
                          axes=list(axes), keepdims=int(keepdims))

    def resize(self, x: str, scale: int = 2, *, name: str | None = None) -> str:
        """Nearest-neighbour Resize by ``scale`` on H and W only (scale 1 on N and C)."""
        n, c, h, w = self.shape(x)
        node = self._reserve(name, "Resize")
        scales = self._store(f"{node}.scales", np.array([1, 1, scale, scale], dtype=np.float32))
        return self._emit(node, "Resize", [x, "", scales], (n, c, h * scale, w * scale),
                          mode="nearest")

    def pad(self, x: str, pads: Sequence[int], *, name: str | None = None) -> str:
        """Zero Pad; ``pads`` is ONNX's ``[begin_0, ..., begin_r, end_0, ..., end_r]``."""
        s = self.shape(x)
        r = len(s)
        if len(pads) != 2 * r:
            raise ValueError(f"pads needs {2 * r} entries for rank {r}, got {list(pads)}")
        node = self._reserve(name, "Pad")
        pads_t = self._store(f"{node}.pads", np.array(pads, dtype=np.int64))
        shape = [d + pads[i] + pads[i + r] for i, d in enumerate(s)]
        return self._emit(node, "Pad", [x, pads_t], shape, mode="constant")

    def lrn(self, x: str, size: int = 3, *, name: str | None = None) -> str:
        """LocalResponseNormalization across ``size`` neighbouring channels."""
        return self._unary("LRN", x, name, size=size, alpha=1e-4, beta=0.75, bias=1.0)

    def cumsum(self, x: str, axis: int = 1, *, name: str | None = None) -> str:
        """CumSum along ``axis`` (given as a 0-D int64 constant input)."""
        node = self._reserve(name, "CumSum")
        axis_t = self._store(f"{node}.axis", np.array(axis, dtype=np.int64))
        return self._emit(node, "CumSum", [x, axis_t], self.shape(x))

    def reshape(self, x: str, shape: Sequence[int] | str, *, name: str | None = None) -> str:
        """Reshape to ``shape`` (ONNX rules: ``0`` copies a dim, one ``-1`` is inferred).

        ``shape`` is a list stored as ``<node>.shape`` (int64), or the name of an existing
        int64 constant.
        """
        node = self._reserve(name, "Reshape")
        if isinstance(shape, str):
            shape_t = shape
            target = [int(d) for d in self._constant_array(shape).reshape(-1)]
        else:
            target = [int(d) for d in shape]
            shape_t = self._store(f"{node}.shape", np.array(target, dtype=np.int64))
        out = self._reshaped(self.shape(x), target)
        return self._emit(node, "Reshape", [x, shape_t], out)

    def unsqueeze(self, x: str, axes: Sequence[int], *, name: str | None = None) -> str:
        """Unsqueeze (opset 13+: ``axes`` is an int64 input stored as ``<node>.axes``)."""
        node = self._reserve(name, "Unsqueeze")
        s = list(self.shape(x))
        rank = len(s) + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            s.insert(a, 1)
        axes_t = self._store(f"{node}.axes", np.array(list(axes), dtype=np.int64))
        return self._emit(node, "Unsqueeze", [x, axes_t], s)

    def split(self, x: str, sizes: Sequence[int], axis: int = 1, *,
              name: str | None = None) -> list[str]:
        """Split along ``axis`` into pieces of ``sizes`` (an int64 input, opset 13+).

        The outputs are named ``<node>.out0``, ``<node>.out1``...
        """
        s = self.shape(x)
        ax = axis % len(s)
        if sum(sizes) != s[ax]:
            raise ValueError(f"split sizes {list(sizes)} do not cover {s[ax]} along axis {axis}")
        node = self._reserve(name, "Split")
        split_t = self._store(f"{node}.split", np.array(list(sizes), dtype=np.int64))
        outputs = [self._claim(f"{node}.out{k}") for k in range(len(sizes))]
        for out, size in zip(outputs, sizes):
            piece = list(s)
            piece[ax] = int(size)
            self._register(out, piece, self._dtypes[x])
        self._nodes.append(helper.make_node("Split", [x, split_t], outputs, name=node, axis=axis))
        return outputs

    def slice(self, x: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], *,
              name: str | None = None) -> str:
        """Slice with step 1 (starts/ends/axes stored as int64 inputs; ends may be INT64_MAX)."""
        s = list(self.shape(x))
        for start, end, axis in zip(starts, ends, axes):
            ax = axis % len(s)
            lo, hi, _ = slice(int(start), int(end)).indices(s[ax])
            s[ax] = max(0, hi - lo)
        node = self._reserve(name, "Slice")
        inputs = [
            x,
            self._store(f"{node}.starts", np.array(list(starts), dtype=np.int64)),
            self._store(f"{node}.ends", np.array(list(ends), dtype=np.int64)),
            self._store(f"{node}.axes", np.array(list(axes), dtype=np.int64)),
        ]
        return self._emit(node, "Slice", inputs, s)

    # ------------------------------------------------------------------ layout and control flow

    def squeeze(self, x: str, axes: Sequence[int], *, name: str | None = None) -> str:
        """Squeeze size-1 ``axes`` (opset 13+: an int64 input stored as ``<node>.axes``)."""
        s = self.shape(x)
        drop = {int(a) % len(s) for a in axes}
        if any(s[a] != 1 for a in drop):
            raise ValueError(f"cannot squeeze axes {sorted(drop)} of shape {s}")
        node = self._reserve(name, "Squeeze")
        axes_t = self._store(f"{node}.axes", np.array(list(axes), dtype=np.int64))
        return self._emit(node, "Squeeze", [x, axes_t], [d for i, d in enumerate(s) if i not in drop])

    def expand(self, x: str, shape: Sequence[int], *, name: str | None = None) -> str:
        """Expand (numpy broadcasting to ``shape``, stored as ``<node>.shape``)."""
        out = np.broadcast_shapes(self.shape(x), tuple(int(d) for d in shape))
        node = self._reserve(name, "Expand")
        shape_t = self._store(f"{node}.shape", np.array(list(shape), dtype=np.int64))
        return self._emit(node, "Expand", [x, shape_t], out)

    def tile(self, x: str, repeats: Sequence[int], *, name: str | None = None) -> str:
        """Tile: axis ``i`` repeated ``repeats[i]`` times (stored as ``<node>.repeats``)."""
        s = self.shape(x)
        if len(repeats) != len(s):
            raise ValueError(f"tile needs {len(s)} repeats, got {list(repeats)}")
        node = self._reserve(name, "Tile")
        repeats_t = self._store(f"{node}.repeats", np.array(list(repeats), dtype=np.int64))
        return self._emit(node, "Tile", [x, repeats_t], [d * int(r) for d, r in zip(s, repeats)])

    def depth_to_space(self, x: str, blocksize: int, mode: str = "DCR", *,
                       name: str | None = None) -> str:
        """DepthToSpace: ``[N, C, H, W] -> [N, C / b^2, H * b, W * b]`` (``mode`` DCR or CRD)."""
        n, c, h, w = self.shape(x)
        if c % (blocksize * blocksize):
            raise ValueError(f"{c} channels do not split into blocks of {blocksize}x{blocksize}")
        return self._emit(self._reserve(name, "DepthToSpace"), "DepthToSpace", [x],
                          (n, c // (blocksize * blocksize), h * blocksize, w * blocksize),
                          blocksize=blocksize, mode=mode)

    def space_to_depth(self, x: str, blocksize: int, *, name: str | None = None) -> str:
        """SpaceToDepth: ``[N, C, H, W] -> [N, C * b^2, H / b, W / b]``."""
        n, c, h, w = self.shape(x)
        if h % blocksize or w % blocksize:
            raise ValueError(f"{h}x{w} does not split into blocks of {blocksize}x{blocksize}")
        return self._emit(self._reserve(name, "SpaceToDepth"), "SpaceToDepth", [x],
                          (n, c * blocksize * blocksize, h // blocksize, w // blocksize),
                          blocksize=blocksize)

    def conv1d(self, x: str, out_channels: int, kernel: int = 3, stride: int = 1,
               pad: int | None = None, bias: bool = True, *, name: str | None = None,
               gain: float = 2.0) -> str:
        """1-D Conv on ``[N, C, L]`` (weight ``[M, C, k]``); ``pad`` defaults to ``kernel // 2``."""
        n, cin, length = self.shape(x)
        pad = kernel // 2 if pad is None else pad
        node = self._reserve(name, "Conv")
        inputs = [x, self._store(f"{node}.weight",
                                 self.he_normal((out_channels, cin, kernel), cin * kernel, gain))]
        if bias:
            inputs.append(self._store(f"{node}.bias", self.small_normal((out_channels,))))
        out = (length + 2 * pad - kernel) // stride + 1
        return self._emit(node, "Conv", inputs, (n, out_channels, out), kernel_shape=[kernel],
                          strides=[stride], pads=[pad, pad])

    def greater(self, a: str, b: str | Array, *, name: str | None = None,
                const_name: str = "const") -> str:
        """Broadcasting ``Greater`` (a bool tensor); ``b`` may be an array (see :meth:`add`)."""
        node = self._reserve(name, "Greater")
        if not isinstance(b, str):
            b = self._store(f"{node}.{const_name}", np.asarray(b, dtype=np.float32))
        shape = np.broadcast_shapes(self.shape(a), self.shape(b))
        return self._emit(node, "Greater", [a, b], shape, elem_type=TensorProto.BOOL)

    def _body_builder(self, name: str) -> GraphBuilder:
        """A builder for a subgraph (If branch, Loop body) named ``name``.

        It can read every tensor built so far (outer scope), draws weights from this builder's
        generator and shares its names, so names stay unique across scopes, as ONNX requires.
        """
        body = GraphBuilder(name, opset=self.opset)
        body.rng = self.rng
        body.param_store = self.param_store
        body._shapes = dict(self._shapes)
        body._dtypes = dict(self._dtypes)
        body._node_names = self._node_names
        body._counters = self._counters
        body._scope = [name]
        return body

    def _body_graph(self, body: GraphBuilder, inputs: Sequence[str],
                    outputs: Sequence[str]) -> onnx.GraphProto:
        """Finish a subgraph; its tensor names are reserved in this (outer) graph."""
        self._node_names.update(t for t in body._shapes if t not in self._shapes)
        infos = [helper.make_tensor_value_info(t, body._dtypes[t], list(body._shapes[t]))
                 for t in (*inputs, *outputs)]
        return helper.make_graph(body._nodes, body.graph_name, infos[: len(inputs)],
                                 infos[len(inputs):], initializer=body._initializers)

    def if_else(self, cond: str, then_branch: Callable[[GraphBuilder], str],
                else_branch: Callable[[GraphBuilder], str], *, name: str | None = None) -> str:
        """``If(cond)`` with a branch function per branch.

        Each branch function builds its subgraph with the builder it is given (reading outer tensors
        by name) and returns its output; both must have one shape.
        """
        node = self._reserve(name, "If")
        graphs, shapes = {}, []
        for label, branch in (("then_branch", then_branch), ("else_branch", else_branch)):
            body = self._body_builder(f"{node}.{label.split('_')[0]}")
            out = branch(body)
            shapes.append((body.shape(out), body.dtype(out)))
            graphs[label] = self._body_graph(body, [], [out])
        if shapes[0] != shapes[1]:
            raise ValueError(f"If branches disagree on their output: {shapes}")
        (shape, elem_type), _ = shapes
        return self._emit(node, "If", [cond], shape, elem_type=elem_type, **graphs)

    def loop(self, trip_count: int, initial: str, body_fn: Callable[[GraphBuilder, str], str], *,
             name: str | None = None) -> str:
        """``Loop`` run ``trip_count`` times over one loop-carried tensor starting at ``initial``.

        ``body_fn(body_builder, x)`` returns the next value (same shape).
        """
        node = self._reserve(name, "Loop")
        body = self._body_builder(f"{node}.body")
        iteration = body._claim(f"{node}.body.iteration")
        body._register(iteration, (), TensorProto.INT64)
        cond_in = body._claim(f"{node}.body.cond_in")
        body._register(cond_in, (), TensorProto.BOOL)
        carried = body._claim(f"{node}.body.x")
        body._register(carried, self.shape(initial), self.dtype(initial))
        out = body_fn(body, carried)
        if body.shape(out) != self.shape(initial):
            raise ValueError(f"loop body changes the shape {self.shape(initial)} to {body.shape(out)}")
        cond_out = body.identity(cond_in, name="cond_out")
        graph = self._body_graph(body, [iteration, cond_in, carried], [cond_out, out])
        trips = self._store(f"{node}.trip_count", np.array(trip_count, dtype=np.int64))
        keep_going = self._store(f"{node}.cond", np.array(True))
        return self._emit(node, "Loop", [trips, keep_going, initial], self.shape(initial),
                          elem_type=self.dtype(initial), body=graph)

    def lstm(self, x: str, hidden: int, *, name: str | None = None) -> str:
        """Forward LSTM over ``x`` ``[seq, batch, input]``; returns Y ``[seq, 1, batch, hidden]``.

        W ``[1, 4h, input]``, R ``[1, 4h, h]`` and B ``[1, 8h]`` are ``<node>.W/.R/.B``.
        """
        seq, batch, features = self.shape(x)
        node = self._reserve(name, "LSTM")
        inputs = [
            x,
            self._store(f"{node}.W", self.he_normal((1, 4 * hidden, features), features, 1.0)),
            self._store(f"{node}.R", self.he_normal((1, 4 * hidden, hidden), hidden, 1.0)),
            self._store(f"{node}.B", self.small_normal((1, 8 * hidden))),
        ]
        return self._emit(node, "LSTM", inputs, (seq, 1, batch, hidden), hidden_size=hidden)

    @staticmethod
    def _reshaped(shape: Shape, target: Sequence[int]) -> Shape:
        """The output shape of ``Reshape(shape -> target)`` (``allowzero=0``)."""
        dims = [shape[i] if d == 0 else int(d) for i, d in enumerate(target)]
        total = math.prod(shape)
        if dims.count(-1) > 1:
            raise ValueError(f"reshape target {list(target)} has more than one -1")
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            if known == 0 or total % known:
                raise ValueError(f"cannot reshape {shape} to {list(target)}")
            dims[dims.index(-1)] = total // known
        if math.prod(dims) != total:
            raise ValueError(f"cannot reshape {shape} to {list(target)}")
        return tuple(dims)

    def _constant_array(self, tensor: str) -> Array:
        """The value of a constant built so far (initializer or Constant node)."""
        for init in self._initializers:
            if init.name == tensor:
                return numpy_helper.to_array(init)
        for node in self._nodes:
            if node.op_type == "Constant" and node.output[0] == tensor:
                return numpy_helper.to_array(node.attribute[0].t)
        raise KeyError(f"{tensor!r} is not a constant of graph {self.graph_name!r}")

    def custom(
        self,
        op_type: str,
        domain: str,
        inputs: Sequence[str],
        shape: Sequence[int],
        *,
        name: str | None = None,
        version: int = 1,
        **attrs: Any,
    ) -> str:
        """A node of any op and domain; its output shape is the caller's word.

        The domain gets an opset import at :meth:`build`, as a real exporter would write.
        """
        if domain not in ("", "ai.onnx"):
            self._domains[domain] = version
        return self._emit(self._reserve(name, op_type), op_type, inputs, shape, domain=domain,
                          **attrs)

    # ------------------------------------------------------------------ quantization

    def _operand(self, node: str, value: str | Array, suffix: str) -> str:
        """A tensor name as given, or an array stored as ``<node>.<suffix>`` (dtype kept)."""
        return value if isinstance(value, str) else self._store(f"{node}.{suffix}", np.asarray(value))

    def quantize(self, x: str, scale: str | Array, zero_point: str | Array, *,
                 axis: int | None = None, name: str | None = None) -> str:
        """QuantizeLinear; per-axis when ``scale`` is 1-D with ``axis``.

        Arrays are stored as ``<node>.scale`` / ``<node>.zero_point``; the output has the zero point's
        type.
        """
        node = self._reserve(name, "QuantizeLinear")
        scale_t = self._operand(node, scale, "scale")
        zero_t = self._operand(node, zero_point, "zero_point")
        attrs: dict[str, Any] = {} if axis is None else {"axis": axis}  # node attributes, not _emit's keywords
        return self._emit(node, "QuantizeLinear", [x, scale_t, zero_t], self.shape(x),
                          elem_type=self._dtypes[zero_t], **attrs)

    def dequantize(self, x: str, scale: str | Array, zero_point: str | Array | None = None, *,
                   axis: int | None = None, block_size: int = 0,
                   name: str | None = None) -> str:
        """DequantizeLinear to the scale's float type (see :meth:`quantize`).

        ``block_size`` (opset 21+) for blocked quantization along ``axis``.
        """
        node = self._reserve(name, "DequantizeLinear")
        inputs = [x, self._operand(node, scale, "scale")]
        if zero_point is not None:
            inputs.append(self._operand(node, zero_point, "zero_point"))
        attrs: dict[str, Any] = {} if axis is None else {"axis": axis}  # node attributes, not _emit's keywords
        if block_size:
            attrs["block_size"] = block_size
        return self._emit(node, "DequantizeLinear", inputs, self.shape(x),
                          elem_type=self._dtypes[inputs[1]], **attrs)

    def quantize_array(self, array: Array, axis: int | None = 0, *, dtype: Any = np.int8,
                       zero_points: bool = True, levels: int = 120) -> tuple[Array, Array, Array]:
        """Linear quantization of a float array: ``(q, scale, zero_point)``.

        Per channel along ``axis`` (per tensor when None) with scale ``max|w| / levels``; with
        ``zero_points`` each channel gets a small random zero point in [-6, 6] (asymmetric
        int8, or 128 +- 6 for uint8), else 0 (128 for uint8). ``levels=60`` is ONNX Runtime's
        ``reduce_range`` (7-bit weights, so u8s8 kernels cannot saturate).
        """
        array = np.asarray(array, dtype=np.float32)
        info = np.iinfo(dtype)
        centre = 0 if info.min < 0 else 128
        if axis is None:
            amax = np.abs(array).max(keepdims=True).reshape(())
        else:
            others = tuple(a for a in range(array.ndim) if a != axis % array.ndim)
            amax = np.abs(array).max(axis=others)
        scale = (np.maximum(amax, 1e-6) / levels).astype(np.float32)
        shape = [1] * array.ndim
        if axis is not None:
            shape[axis] = -1
        zero = np.full(scale.shape, centre, dtype=np.int64)
        if zero_points:
            zero = zero + self.rng.integers(-6, 7, size=scale.shape)
        q = np.rint(array / scale.reshape(shape)) + zero.reshape(shape)
        q = np.clip(q, info.min, info.max).astype(dtype)
        return q, scale, zero.astype(dtype)

    def quantized_param(self, name: str, array: Array, axis: int | None = 0, *,
                        dtype: Any = np.int8, zero_points: bool = True,
                        levels: int = 120) -> tuple[str, str, str]:
        """Store ``quantize_array(array)`` as three initializers and return their names.

        The names are ``<name>.quantized``, ``<name>.scale`` and ``<name>.zero_point``.
        """
        q, scale, zero = self.quantize_array(array, axis, dtype=dtype, zero_points=zero_points,
                                             levels=levels)
        return (self.param(f"{name}.quantized", q), self.param(f"{name}.scale", scale),
                self.param(f"{name}.zero_point", zero))

    def dequantized_param(self, name: str, array: Array, axis: int | None = 0, *,
                          dtype: Any = np.int8, zero_points: bool = True,
                          levels: int = 120) -> str:
        """A QDQ weight: :meth:`quantized_param` read through ``DequantizeLinear``.

        The node is ``<name>.dequantize``; returns the float tensor.
        """
        q, scale, zero = self.quantized_param(name, array, axis, dtype=dtype,
                                              zero_points=zero_points, levels=levels)
        attrs = {} if axis is None else {"axis": axis}
        return self.dequantize(q, scale, zero, name=f"{name}.dequantize", **attrs)

    def _conv_shape(self, x: str, weight: str, stride: int, pad: int) -> Shape:
        n, _, h, w = self.shape(x)
        m, _, kh, kw = self.shape(weight)
        return (n, m, (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1)

    def qlinear_conv(self, x: str, x_scale: str, x_zero_point: str, weight: str, w_scale: str,
                     w_zero_point: str, y_scale: str | Array, y_zero_point: str | Array,
                     bias: str | None = None, *, stride: int = 1, pad: int | None = None,
                     group: int = 1, name: str | None = None) -> str:
        """QLinearConv (square kernel taken from ``weight``; ``pad`` defaults to "same").

        The output has ``y_zero_point``'s type.
        """
        node = self._reserve(name, "QLinearConv")
        kernel = self.shape(weight)[2]
        pad = kernel // 2 if pad is None else pad
        y_scale = self._operand(node, y_scale, "y_scale")
        y_zero_point = self._operand(node, y_zero_point, "y_zero_point")
        inputs = [x, x_scale, x_zero_point, weight, w_scale, w_zero_point, y_scale, y_zero_point]
        if bias is not None:
            inputs.append(bias)
        return self._emit(node, "QLinearConv", inputs, self._conv_shape(x, weight, stride, pad),
                          elem_type=self._dtypes[y_zero_point], kernel_shape=[kernel, kernel],
                          strides=[stride, stride], pads=[pad] * 4, group=group)

    def conv_integer(self, x: str, weight: str, x_zero_point: str | None = None,
                     w_zero_point: str | None = None, *, stride: int = 1,
                     pad: int | None = None, name: str | None = None) -> str:
        """ConvInteger: int32 accumulators of a quantized conv."""
        node = self._reserve(name, "ConvInteger")
        kernel = self.shape(weight)[2]
        pad = kernel // 2 if pad is None else pad
        inputs = [x, weight, x_zero_point or "", w_zero_point or ""]
        while inputs[-1] == "":
            inputs.pop()
        return self._emit(node, "ConvInteger", inputs, self._conv_shape(x, weight, stride, pad),
                          elem_type=TensorProto.INT32, kernel_shape=[kernel, kernel],
                          strides=[stride, stride], pads=[pad] * 4)

    def qlinear_matmul(self, a: str, a_scale: str, a_zero_point: str, b: str, b_scale: str,
                       b_zero_point: str, y_scale: str | Array, y_zero_point: str | Array, *,
                       name: str | None = None) -> str:
        """QLinearMatMul of ``a [..., M, K]`` by a 2-D ``b [K, N]``."""
        node = self._reserve(name, "QLinearMatMul")
        y_scale = self._operand(node, y_scale, "y_scale")
        y_zero_point = self._operand(node, y_zero_point, "y_zero_point")
        shape = (*self.shape(a)[:-1], self.shape(b)[-1])
        return self._emit(node, "QLinearMatMul",
                          [a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale,
                           y_zero_point], shape, elem_type=self._dtypes[y_zero_point])

    def matmul_integer(self, a: str, b: str, a_zero_point: str | None = None,
                       b_zero_point: str | None = None, *, name: str | None = None) -> str:
        """MatMulInteger of ``a [..., M, K]`` by a 2-D ``b [K, N]``: int32 accumulators."""
        node = self._reserve(name, "MatMulInteger")
        inputs = [a, b, a_zero_point or "", b_zero_point or ""]
        while inputs[-1] == "":
            inputs.pop()
        shape = (*self.shape(a)[:-1], self.shape(b)[-1])
        return self._emit(node, "MatMulInteger", inputs, shape, elem_type=TensorProto.INT32)

    def constant_array(self, tensor: str) -> Array:
        """The value of a constant built so far (initializer or Constant node)."""
        return self._constant_array(tensor)

    def param_proto(self, tensor: onnx.TensorProto) -> str:
        """Store a ready-made TensorProto (packed int4, a special storage field) under its name."""
        self._register(tensor.name, tuple(tensor.dims), tensor.data_type)
        self._initializers.append(tensor)
        return tensor.name

    def typed_param(self, name: str, array: Array, data_type: int) -> str:
        """Store a 16-bit float initializer in the typed ``int32_data`` field.

        ``array`` is float16 or bfloat16, stored one element per entry instead of raw bytes.
        """
        full = self._scoped(name)
        tensor = onnx.TensorProto(name=full, data_type=data_type, dims=list(array.shape))
        tensor.int32_data.extend(np.ascontiguousarray(array).view(np.uint16).reshape(-1).tolist())
        self._register(full, array.shape, data_type)
        self._initializers.append(tensor)
        return full

    def gemm_on(self, x: str, weight: str, bias: str | None = None, *, trans_b: int = 1,
                name: str | None = None) -> str:
        """Gemm of ``x [M, K]`` by a given weight tensor (``[N, K]`` with ``trans_b=1``)."""
        m, _ = self.shape(x)
        n = self.shape(weight)[0 if trans_b else 1]
        inputs = [x, weight] + ([bias] if bias else [])
        return self._emit(self._reserve(name, "Gemm"), "Gemm", inputs, (m, n), transB=trans_b)

    def matmul_on(self, x: str, weight: str, *, name: str | None = None) -> str:
        """MatMul of ``x [..., K]`` by a given 2-D weight tensor ``[K, N]``."""
        shape = (*self.shape(x)[:-1], self.shape(weight)[-1])
        return self._emit(self._reserve(name, "MatMul"), "MatMul", [x, weight], shape)

    def dynamic_quantize(self, x: str, *, name: str | None = None) -> tuple[str, str, str]:
        """DynamicQuantizeLinear: ``(y uint8, y_scale, y_zero_point)`` named ``<node>.y`` etc."""
        node = self._reserve(name, "DynamicQuantizeLinear")
        outputs = [self._claim(f"{node}.{part}") for part in ("y", "scale", "zero_point")]
        self._register(outputs[0], self.shape(x), TensorProto.UINT8)
        self._register(outputs[1], (), TensorProto.FLOAT)
        self._register(outputs[2], (), TensorProto.UINT8)
        self._nodes.append(helper.make_node("DynamicQuantizeLinear", [x], outputs, name=node))
        return outputs[0], outputs[1], outputs[2]

    # ------------------------------------------------------------------ model

    def build(self, outputs: str | Sequence[str], *, value_info: bool = False) -> onnx.ModelProto:
        """Finish the graph with the given outputs and wrap it in an opset-17, IR-8 model.

        ``value_info=True`` also records the shape of every intermediate tensor.
        """
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        outs = [helper.make_tensor_value_info(o, self.dtype(o), list(self.shape(o)))
                for o in names]
        inner: list[onnx.ValueInfoProto] = []
        if value_info:
            produced = [o for node in self._nodes for o in node.output]
            inner = [helper.make_tensor_value_info(t, self._dtypes[t], list(self._shapes[t]))
                     for t in produced if t not in names]
        graph = helper.make_graph(self._nodes, self.graph_name, self._inputs, outs,
                                  initializer=self._initializers, value_info=inner)
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in sorted(self._domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxlady",
                                  doc_string=f"onnxlady test model {self.graph_name!r}")
        model.ir_version = IR_VERSION
        return model


# ---------------------------------------------------------------------- shared blocks


def conv_bn_relu(b: GraphBuilder, x: str, out_channels: int, kernel: int = 3, stride: int = 1,
                 *, name: str, relu: bool = True, group: int = 1) -> str:
    """Conv without bias -> BatchNormalization (unfolded, as exported) -> optional Relu."""
    with b.scope(name):
        y = b.conv(x, out_channels, kernel, stride, group=group, bias=False, name="conv")
        y = b.batchnorm(y, name="bn")
        return b.relu(y, name="relu") if relu else y


def basic_block(b: GraphBuilder, x: str, out_channels: int, stride: int = 1, *,
                name: str) -> str:
    """ResNet basic block; a 1x1 strided conv + BN shortcut when the shape changes."""
    with b.scope(name):
        y = conv_bn_relu(b, x, out_channels, 3, stride, name="conv1")
        y = conv_bn_relu(b, y, out_channels, 3, 1, name="conv2", relu=False)
        shortcut = x
        if stride != 1 or b.channels(x) != out_channels:
            shortcut = conv_bn_relu(b, x, out_channels, 1, stride, name="shortcut", relu=False)
        return b.relu(b.add(y, shortcut, name="add"), name="relu")


def inverted_residual(b: GraphBuilder, x: str, expand: int, out_channels: int, stride: int = 1,
                      *, name: str) -> str:
    """MobileNetV2 block: 1x1 expand, depthwise 3x3, Clip(0, 6), 1x1 project, residual Add."""
    with b.scope(name):
        y = b.conv(x, expand, 1, bias=False, name="expand")
        y = b.clip(b.batchnorm(y, name="expand_bn"), 0.0, 6.0, name="expand_clip")
        y = b.conv(y, expand, 3, stride, group=expand, bias=False, name="depthwise")
        y = b.clip(b.batchnorm(y, name="depthwise_bn"), 0.0, 6.0, name="depthwise_clip")
        y = b.conv(y, out_channels, 1, bias=False, name="project", gain=1.0)
        y = b.batchnorm(y, name="project_bn")
        if stride == 1 and b.channels(x) == out_channels:
            y = b.add(y, x, name="add")
        return y


def se_gate(b: GraphBuilder, x: str, squeeze: int, *, name: str) -> str:
    """Squeeze-and-excitation: GAP -> 1x1 Conv -> Relu -> 1x1 Conv -> HardSigmoid -> Mul."""
    with b.scope(name):
        s = b.global_avg_pool(x, name="pool")
        s = b.relu(b.conv(s, squeeze, 1, name="reduce"), name="relu")
        s = b.hardsigmoid(b.conv(s, b.channels(x), 1, name="expand"), name="gate")
        return b.mul(x, s, name="mul")
