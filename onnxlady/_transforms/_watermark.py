"""White-box weight watermark in the style of Uchida et al. (2017), embedded without retraining.

Extraction reads one ``Conv``'s kernel ``W[out, in, kh, kw]``: it averages the kernel over the
output filters (``W.mean(axis=0)``), flattens it to ``w[in*kh*kw]``, projects it with a secret
standard-normal matrix ``X[N, in*kh*kw]`` drawn from the key's seed and thresholds at 0:
``bits = X @ w > 0``.

Embedding looks for the smallest change of ``w`` that gives every projection the wanted sign
with a margin (``s_i * x_i.(w + d) >= margin``, ``s_i = +1`` for a 1 bit and ``-1`` for a 0),
a least-norm problem under linear inequalities solved exactly through its dual (a
non-negative least-squares problem). The mean over filters is linear, so adding ``d`` to every
output filter moves the mean by exactly ``d``.

Because the mark lives in the mean over the output filters, permuting the layer's own output
neurons leaves it intact; permuting the group that feeds the layer (its input channels)
scrambles ``w`` and with it about half the bits; re-synchronization restores them.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.random import default_rng  # with the module: numpy loads it lazily, on a command's first draw
from onnx import numpy_helper

from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._io._tensors import require_loaded, tensor_holders

#: Default margin on every projection ``|x_i . w|``. The rows of ``X`` have norm about
#: ``sqrt(in*kh*kw)``, so float32 rounding of the kernel moves a projection by about
#: ``1e-7 * |W| * sqrt(in*kh*kw)``: orders of magnitude below this for any sane kernel.
#: Embedding checks the stored kernel afterwards and doubles the margin if rounding ever
#: flipped a bit.
DEFAULT_MARGIN = 1e-3

_FLOAT_TYPES: dict[int, type[np.floating]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}
_KEY_FORMAT = "onnxlady-watermark-1"
_MAX_MARGIN_RETRIES = 8


@dataclass
class WatermarkKey:
    """What extraction needs: the layer, the secret projection and the embedded bits."""

    layer: str  # name of the Conv node
    weight: str  # name of the kernel tensor (initializer or Constant output) at embedding
    bits: np.ndarray  # uint8 0/1, [N]
    projection: np.ndarray  # float64 [N, in*kh*kw]
    seed: int
    margin: float

    @property
    def length(self) -> int:
        """The number of watermark bits."""
        return int(self.bits.size)


# -- secrets ---------------------------------------------------------------------------------
def projection_matrix(seed: int, n_bits: int, width: int) -> np.ndarray:
    """The secret matrix X [n_bits, width], standard normal from ``seed``."""
    return default_rng([int(seed), 0]).standard_normal((n_bits, width))


def message_bits(seed: int, n_bits: int) -> np.ndarray:
    """A random message of ``n_bits`` bits from ``seed`` (another stream than the matrix)."""
    return default_rng([int(seed), 1]).integers(0, 2, n_bits).astype(np.uint8)


# -- locating the kernel ---------------------------------------------------------------------
#: Operators that hold a kernel as their input 1 in Conv's layout ``[out, in/group, kh, kw]``.
#: Embedding marks a plain Conv; extraction also reads ONNX Runtime's FusedConv (its extended
#: optimizer writes Conv + activation as one), which keeps that layout. A channels-last or
#: quantized kernel (NhwcConv, QLinearConv) is not read: its values are not the marked ones.
_PLAIN_CONV: frozenset[tuple[str, str]] = frozenset({("", "Conv"), ("ai.onnx", "Conv")})
_CONV_LAYOUT: frozenset[tuple[str, str]] = _PLAIN_CONV | {("com.microsoft", "FusedConv")}


def _find_conv(
    graph: ModelGraph, layer: str, kinds: frozenset[tuple[str, str]] = _PLAIN_CONV
) -> tuple[int, onnx.NodeProto]:
    for index, node in enumerate(graph.nodes):
        if node.name == layer:
            if (node.domain, node.op_type) not in kinds:
                held_by = "a Conv" if kinds == _PLAIN_CONV else "a Conv or FusedConv"
                raise OnnxladyError(f"layer '{layer}' is a {node.op_type}, not {held_by}: cannot hold a watermark")
            return index, node
    convs = [n.name for n in _conv_layout_nodes(graph, kinds) if n.name]
    hint = f" (Conv layers: {', '.join(convs[:8])}{', ...' if len(convs) > 8 else ''})" if convs else ""
    raise OnnxladyError(f"no node named '{layer}' in this model{hint}")


def _conv_layout_nodes(graph: ModelGraph, kinds: frozenset[tuple[str, str]] = _CONV_LAYOUT) -> list[onnx.NodeProto]:
    """The nodes of ``kinds`` that read a kernel, in graph order."""
    return [node for node in graph.nodes if (node.domain, node.op_type) in kinds and len(node.input) > 1]


def _kernel(graph: ModelGraph, node: onnx.NodeProto, layer: str) -> np.ndarray:
    """The kernel the Conv reads (through its cast/dequantize chain), as float64 [out, in, kh, kw]."""
    name = node.input[1] if len(node.input) > 1 else ""
    value = graph.constant_value(name) if name else None
    if value is None:
        raise OnnxladyError(f"layer '{layer}': its weight '{name}' is not a constant tensor")
    if value.ndim < 3 or not np.issubdtype(value.dtype, np.floating):
        raise OnnxladyError(f"layer '{layer}': weight '{name}' has shape {list(value.shape)} / {value.dtype}, not a float Conv kernel")
    return value.astype(np.float64)


def _writable_leaf(graph: ModelGraph, node: onnx.NodeProto, layer: str) -> onnx.TensorProto:
    """The TensorProto to change: the kernel itself, reached at most through Identity nodes."""
    leaf = graph.constant_leaf(node.input[1])
    assert leaf is not None  # _kernel checked it is constant
    if any(graph.nodes[i].op_type != "Identity" for i in leaf.chain):
        ops = ", ".join(graph.nodes[i].op_type for i in leaf.chain)
        raise OnnxladyError(f"layer '{layer}': weight reaches the Conv through {ops}; only a plain float kernel can be marked")
    tensor = tensor_holders(graph.model).get(leaf.name)
    if tensor is None:
        raise OnnxladyError(f"layer '{layer}': weight '{leaf.name}' is not a tensor that can be rewritten")
    require_loaded(tensor, f"layer '{layer}': weight '{leaf.name}'")
    if tensor.data_type not in _FLOAT_TYPES:
        raise OnnxladyError(f"layer '{layer}': weight '{leaf.name}' is not float32/float16/float64")
    return tensor


def _write(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Replace the tensor's data by ``values``, keeping its name, type and storage field."""
    dtype = _FLOAT_TYPES[tensor.data_type]
    array = values.astype(dtype)
    if tensor.HasField("raw_data"):
        tensor.raw_data = array.tobytes()
        return
    fresh = numpy_helper.from_array(array, tensor.name)
    keep_raw = fresh.raw_data
    del tensor.float_data[:]
    del tensor.double_data[:]
    del tensor.int32_data[:]
    if tensor.data_type == onnx.TensorProto.FLOAT:
        tensor.float_data.extend(array.reshape(-1).tolist())
    elif tensor.data_type == onnx.TensorProto.DOUBLE:
        tensor.double_data.extend(array.reshape(-1).tolist())
    else:  # float16 lives as its bit patterns in int32_data
        tensor.raw_data = keep_raw


def _flat_mean(kernel: np.ndarray) -> np.ndarray:
    return kernel.mean(axis=0).reshape(-1)


# -- the least-norm change -------------------------------------------------------------------
def least_norm_shift(projection: np.ndarray, w: np.ndarray, signs: np.ndarray, margin: float) -> np.ndarray:
    """The smallest ``d`` with ``signs_i * x_i.(w + d) >= margin`` for every row ``x_i``.

    Primal: min |d|^2 / 2 s.t. A d >= b with A = signs[:, None] * X, b = margin - A w.
    Dual: min l^T G l / 2 - b^T l over l >= 0 with G = A A^T, and d = A^T l. With G = L L^T
    that dual is the NNLS problem min |L^T l - L^{-1} b| over l >= 0.
    """
    from scipy.linalg import solve_triangular
    from scipy.optimize import nnls

    a = signs[:, None] * projection
    b = margin - a @ w
    if np.all(b <= 0):
        return np.zeros_like(w)
    gram = a @ a.T
    try:
        lower = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) / len(gram) * np.eye(len(gram)))
        rhs = solve_triangular(lower, b, lower=True)
        dual, _ = nnls(lower.T, rhs, maxiter=50 * len(gram))
        shift = a.T @ dual
    except (np.linalg.LinAlgError, RuntimeError):
        shift = np.zeros_like(w)
    # Safety net (degenerate X): close any remaining gap on the violated rows by least norm.
    gap = b - a @ shift
    if np.any(gap > 0):
        violated = gap > 1e-12 * max(1.0, float(np.abs(b).max()))
        if np.any(violated):
            rows = a[violated]
            shift = shift + np.linalg.pinv(rows) @ (gap[violated] * 1.001)
    return shift


# -- public API ------------------------------------------------------------------------------
def embed_watermark(
    model: onnx.ModelProto,
    layer: str,
    bits: int | np.ndarray,
    seed: int,
    margin: float = DEFAULT_MARGIN,
) -> tuple[WatermarkKey, dict[str, Any]]:
    """Embed a watermark into the kernel of Conv ``layer``; ``model`` is changed in place.

    ``bits``: how many random bits to embed (drawn from ``seed``), or the 0/1 bits themselves.
    Returns the key and a report: ``relative_weight_change`` (|dW| / |W|),
    ``ber_before`` (bit error rate the unmarked kernel had), ``bits``, ``margin`` (the one
    finally used), ``min_projection`` (smallest ``s_i x_i.w`` after storing) and
    ``relative_output_change`` (None here: the public API measures it by running both models,
    :func:`onnxlady._verify._output_change.relative_output_change`).
    """
    if not np.isfinite(margin) or margin <= 0:
        raise OnnxladyError(f"watermark margin must be a positive number, got {margin}")
    graph = ModelGraph(model, infer_shapes=False, fold=False)
    _, node = _find_conv(graph, layer)
    kernel = _kernel(graph, node, layer)
    tensor = _writable_leaf(graph, node, layer)
    width = int(np.prod(kernel.shape[1:]))
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        n_bits = int(bits)
        if n_bits < 1:
            raise OnnxladyError(f"watermark length must be at least 1 bit, got {n_bits}")
        message = None
    else:
        message = np.asarray(bits).reshape(-1)
        if message.size == 0 or not np.all((message == 0) | (message == 1)):
            raise OnnxladyError("watermark bits must be a non-empty sequence of 0 and 1")
        message = message.astype(np.uint8)
        n_bits = int(message.size)
    if n_bits > width:
        raise OnnxladyError(
            f"layer '{layer}': {n_bits} bits do not fit a kernel of in*kh*kw = {width} values (at most {width})"
        )
    if message is None:
        message = message_bits(seed, n_bits)
    projection = projection_matrix(seed, n_bits, width)
    signs = np.where(message == 1, 1.0, -1.0)
    w = _flat_mean(kernel)
    ber_before = float(np.mean((projection @ w > 0).astype(np.uint8) != message))
    used = float(margin)
    for _ in range(_MAX_MARGIN_RETRIES):
        shift = least_norm_shift(projection, w, signs, used)
        marked = kernel + shift.reshape(kernel.shape[1:])[None]
        stored = marked.astype(_FLOAT_TYPES[tensor.data_type]).astype(np.float64)
        achieved = signs * (projection @ _flat_mean(stored))
        if np.all(achieved > 0):
            break
        used *= 2.0
    else:
        raise OnnxladyError(f"layer '{layer}': the kernel's precision cannot hold {n_bits} bits")
    _write(tensor, stored.reshape(tuple(int(d) for d in tensor.dims)))
    key = WatermarkKey(
        layer=layer,
        weight=graph.constant_leaf(node.input[1]).name,  # type: ignore[union-attr]
        bits=message,
        projection=projection,
        seed=int(seed),
        margin=used,
    )
    report = {
        "layer": layer,
        "weight": key.weight,
        "bits": n_bits,
        "margin": used,
        "ber_before": ber_before,
        "relative_weight_change": float(np.linalg.norm(stored - kernel) / max(float(np.linalg.norm(kernel)), 1e-300)),
        "min_projection": float(achieved.min()),
        "relative_output_change": None,
    }
    return key, report


@dataclass(frozen=True)
class Extraction:
    """The bits read from the marked kernel, where it was found, and how likely such a read is by chance."""

    bits: np.ndarray  # uint8 0/1, [N]
    bit_error_rate: float
    layer: str  # the Conv node read
    located_by: str  # "name", "weight" or "search" (see :func:`extract_watermark`)
    candidates: int  # Conv layers read (1 unless searched)
    chance: float  # probability that an unmarked layer (any of the candidates) reads this well


def _read_bits(kernel: np.ndarray, key: WatermarkKey) -> np.ndarray:
    return (key.projection @ _flat_mean(kernel) > 0).astype(np.uint8)


def _chance(errors: int, n_bits: int, candidates: int) -> float:
    """P(some of ``candidates`` unmarked layers reads at most ``errors`` wrong bits of ``n_bits``).

    An unmarked kernel's projections fall on either side of zero like coin flips, so its
    error count is Binomial(n, 1/2); the search keeps the best of ``candidates`` such reads.
    """
    tail = math.fsum(math.comb(n_bits, k) for k in range(errors + 1)) / 2.0**n_bits
    if tail >= 1.0:
        return 1.0
    return float(min(1.0, -math.expm1(candidates * math.log1p(-tail))))  # exact for tiny tails


def extract_watermark(model: onnx.ModelProto, key: WatermarkKey) -> Extraction:
    """Read the mark back and measure its bit error rate against the key.

    The layer is found by the key's node name; failing that, by the kernel tensor it read at
    embedding (node names change freely: ``onnx.compose.add_prefix``, optimisers); failing that,
    every Conv (or FusedConv) whose kernel has the key's width per filter is read and the best read kept: a
    search, so :attr:`Extraction.chance` counts every candidate (the chance that the best of
    that many unmarked layers reads as well).

    Raises:
        OnnxladyError: the node of the key's name is no Conv or FusedConv, or none has the key's kernel width.
    """
    graph = ModelGraph(model, infer_shapes=False, fold=False)
    n_bits = key.length
    named = [node for node in graph.nodes if node.name == key.layer]
    if named:
        _, node = _find_conv(graph, key.layer, _CONV_LAYOUT)
        located = [(node, "name")]
    else:
        located = [(node, "weight") for node in _conv_layout_nodes(graph) if node.input[1] == key.weight][:1]
    if located:
        node, how = located[0]
        label = node.name or node.output[0]
        kernel = _kernel(graph, node, label)
        if key.projection.shape[1] != _flat_mean(kernel).size:
            raise OnnxladyError(
                f"layer '{label}': the key projects {key.projection.shape[-1]} values, the kernel has {_flat_mean(kernel).size} per filter"
            )
        bits = _read_bits(kernel, key)
        errors = int(np.sum(bits != key.bits))
        return Extraction(bits, errors / n_bits, label, how, 1, _chance(errors, n_bits, 1))
    reads = []
    for node in _conv_layout_nodes(graph):
        value = graph.constant_value(node.input[1])
        if value is None or value.ndim < 3 or not np.issubdtype(value.dtype, np.floating):
            continue
        kernel = value.astype(np.float64)
        if _flat_mean(kernel).size == key.projection.shape[1]:
            bits = _read_bits(kernel, key)
            reads.append((int(np.sum(bits != key.bits)), node.name or node.output[0], bits))
    if not reads:
        convs = [node.name for node in _conv_layout_nodes(graph) if node.name]
        hint = f" (Conv layers: {', '.join(convs[:8])}{', ...' if len(convs) > 8 else ''})" if convs else ""
        raise OnnxladyError(
            f"no node named '{key.layer}' and no Conv reading '{key.weight}' or with {key.projection.shape[1]} "
            f"kernel values per filter in this model{hint}"
        )
    errors, label, bits = min(reads, key=lambda read: read[0])
    return Extraction(bits, errors / n_bits, label, "search", len(reads), _chance(errors, n_bits, len(reads)))


# -- key files -------------------------------------------------------------------------------
def save_key(key: WatermarkKey, path: str | os.PathLike[str]) -> None:
    """Write the key as .npz, atomically (temporary file in the same folder + os.replace)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxladyError(f"{path}: folder '{path.parent}' does not exist")
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(
                handle,
                format=np.array(_KEY_FORMAT),
                layer=np.array(key.layer),
                weight=np.array(key.weight),
                bits=np.asarray(key.bits, dtype=np.uint8),
                projection=np.asarray(key.projection, dtype=np.float64),
                seed=np.array(int(key.seed), dtype=np.int64),
                margin=np.array(float(key.margin), dtype=np.float64),
            )
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Read a key written by :func:`save_key`; anything else raises :class:`OnnxladyError`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            key_format = str(data["format"])
            key = None
            if key_format == _KEY_FORMAT:
                key = WatermarkKey(
                    layer=str(data["layer"]),
                    weight=str(data["weight"]),
                    bits=np.asarray(data["bits"], dtype=np.uint8),
                    projection=np.asarray(data["projection"], dtype=np.float64),
                    seed=int(data["seed"]),
                    margin=float(data["margin"]),
                )
    except FileNotFoundError:
        raise OnnxladyError(f"{path}: no such watermark key file") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxladyError(f"{path}: not a readable watermark key ({type(exc).__name__}: {exc})") from None
    if key is None:
        raise OnnxladyError(f"{path}: not an onnxlady watermark key (format {key_format!r})")
    if (
        key.bits.ndim != 1
        or key.projection.ndim != 2
        or key.projection.shape[0] != key.bits.size
        or not np.all(key.bits <= 1)
        or not np.all(np.isfinite(key.projection))
    ):
        raise OnnxladyError(f"{path}: watermark key is inconsistent (bits {key.bits.shape}, projection {key.projection.shape})")
    return key
