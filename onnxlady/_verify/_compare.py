"""Check that two ONNX models compute the same function, by running both in ONNX Runtime.

Permuting neurons reorders floating-point accumulations, so a permuted model is not
bit-identical to its original: it is *equivalent* within a tolerance. This module runs the
reference and the candidate model on the same seeded random inputs and compares every output
element-wise, the way Polygraphy's comparison does: an element fails only where its absolute
error exceeds ``atol`` *and* its relative error exceeds ``rtol``. Integer and boolean outputs must
match exactly. Outputs whose reference values are all tiny or non-finite are flagged as
*degenerate*, because agreeing on them proves nothing about the weights.

Everything a user can get wrong (a path that is not a model, models with different inputs or
outputs, a malformed ``--shape`` override, a CUDA provider that does not load when it was asked
for, a model ONNX Runtime cannot run) is raised as :class:`~onnxlady._errors.OnnxladyError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
from onnx import TensorProto

from onnxlady._errors import OnnxladyError
from onnxlady._io._tensors import is_external


class _LazyOnnxRuntime:
    """onnxruntime, imported on first use: commands that run no model skip its start-up cost."""

    def __getattr__(self, name: str) -> Any:
        import onnxruntime

        return getattr(onnxruntime, name)


ort: Any = _LazyOnnxRuntime()

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "DEGENERATE_THRESHOLD",
    "OutputComparison",
    "VerifyReport",
    "create_session",
    "generate_inputs",
    "parse_shape_overrides",
    "verify_models",
]

#: Absolute tolerance: an element passes when ``|a - b| <= atol`` (or when the relative test passes).
DEFAULT_ATOL: float = 1e-4
#: Relative tolerance: an element passes when ``|a - b| <= rtol * |b|`` (or when the absolute test passes).
DEFAULT_RTOL: float = 1e-3
#: An output whose reference values all lie below this magnitude is flagged as degenerate.
DEGENERATE_THRESHOLD: float = 1e-6

#: Denominator floor for relative errors, so that a zero reference value gives a large but finite error.
_TINY: float = float(np.finfo(np.float32).tiny)
#: Default for an unknown (symbolic) dimension other than the first one.
_UNKNOWN_DIM: int = 64
#: Integer inputs not recognised as Gather indices are drawn from [0, _INT_HIGH).
_INT_HIGH: int = 16

_PROVIDERS = ("auto", "cuda", "cpu")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: TF32 would round float32 matmuls to 10 mantissa bits and make permuted models look different.
_CUDA_OPTIONS: dict[str, str] = {"use_tf32": "0"}
#: ORT's severity levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_LOG_SEVERITY = 3
#: Sessions log only fatal messages: ORT prints a failing kernel's error (severity 3) to stderr itself,
#: and the same text already reaches the user once, inside the OnnxladyError.
_SESSION_LOG_SEVERITY = 4

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_INT_TYPES = {
    TensorProto.INT8,
    TensorProto.INT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.UINT8,
    TensorProto.UINT16,
    TensorProto.UINT32,
    TensorProto.UINT64,
}
#: Element types onnxlady can generate as inputs.
_INPUT_TYPES = _FLOAT_TYPES | _INT_TYPES | {TensorProto.BOOL}
#: Element types ONNX Runtime's Python API can hand back as NumPy arrays (no bfloat16, no float8).
_OUTPUT_TYPES = (_FLOAT_TYPES - {TensorProto.BFLOAT16}) | _INT_TYPES | {TensorProto.BOOL, TensorProto.STRING}
#: Ops through which an integer input keeps its values on the way to a Gather's indices.
_INDEX_PASS_THROUGH = {"Cast", "Unsqueeze", "Reshape", "Squeeze", "Identity", "Flatten"}

ModelLike = Union[str, "os.PathLike[str]", onnx.ModelProto]


# --------------------------------------------------------------------------------------------
# Report types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the candidate model compares with the same output of the reference.

    Errors are aggregated over all iterations: maxima are maxima over every compared element,
    counts are summed, and ``mean_abs_error`` is the mean over every finite element pair.
    ``passed`` says whether no element failed; ``degenerate``, when set, says why this output's
    agreement proves nothing (for example, every reference value is nearly zero), so a caller can
    warn even though the output passed.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    #: Largest finite ``|b|`` in the reference output, to judge the scale of the errors.
    reference_max_abs: float
    mismatched_elements: int
    total_elements: int
    passed: bool
    degenerate: str | None


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_models`: settings used and one comparison per output."""

    #: What the caller asked for: ``"auto"``, ``"cuda"`` or ``"cpu"``.
    provider_requested: str
    #: The execution provider that actually ran both models, e.g. ``"CPUExecutionProvider"``.
    provider_used: str
    #: Why ``"auto"`` fell back to the CPU, when it did; ``None`` otherwise.
    fallback_reason: str | None
    atol: float
    rtol: float
    iterations: int
    seed: int
    #: The concrete shape fed to each graph input (after overrides and unknown-dim defaults).
    input_shapes: dict[str, tuple[int, ...]]
    #: One entry per graph output, in the models' output order, aggregated over all iterations.
    outputs: tuple[OutputComparison, ...]

    @property
    def equivalent(self) -> bool:
        """True when every output passed the element-wise check."""
        return all(o.passed for o in self.outputs)

    @property
    def degenerate_outputs(self) -> tuple[OutputComparison, ...]:
        """Outputs whose comparison proves nothing (see :attr:`OutputComparison.degenerate`)."""
        return tuple(o for o in self.outputs if o.degenerate is not None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (for ``--json``); non-finite floats become ``"inf"``/``"nan"`` strings.

        Strict JSON has no infinities or NaNs, so they are written as strings to keep the output
        parseable by any JSON reader.
        """
        data = _jsonable(dataclasses.asdict(self))
        data["equivalent"] = self.equivalent
        return data


def _jsonable(value: Any) -> Any:
    """Turn tuples into lists and non-finite floats into strings, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


# --------------------------------------------------------------------------------------------
# Shape overrides
# --------------------------------------------------------------------------------------------


def parse_shape_overrides(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` shape overrides for graph inputs.

    The name is everything before the *last* colon, so input names that contain colons (as
    exported by TensorFlow, e.g. ``input:0``) work. Dimensions are positive integers separated by
    ``x`` (``,`` is accepted too, as are surrounding brackets: ``NAME:[1,3,224,224]``).
    Raises :class:`OnnxladyError` for a malformed spec or a name given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = str(spec).rpartition(":")
        if not sep or not name:
            raise OnnxladyError(f"bad shape override {spec!r}: expected NAME:DIMS, e.g. input:1x3x224x224")
        text = dims_text.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = [p.strip() for p in re.split(r"[x,]", text)] if text else []
        if not parts or any(not re.fullmatch(r"[0-9]+", p) for p in parts):
            raise OnnxladyError(
                f"bad shape override {spec!r}: dimensions must be positive integers separated by 'x', "
                "e.g. input:1x3x224x224"
            )
        dims = tuple(int(p) for p in parts)
        if any(d < 1 for d in dims):
            raise OnnxladyError(f"bad shape override {spec!r}: every dimension must be at least 1")
        if name in shapes:
            raise OnnxladyError(f"shape override for input {name!r} given more than once")
        shapes[name] = dims
    return shapes


# --------------------------------------------------------------------------------------------
# Loading models and describing their interfaces
# --------------------------------------------------------------------------------------------


def _describe(model: ModelLike, fallback: str) -> str:
    """A short name for messages: the file path, or ``fallback`` for an in-memory model."""
    if isinstance(model, onnx.ModelProto):
        return fallback
    return str(model)


def _load_graph(model: ModelLike, name: str) -> onnx.ModelProto:
    """The model's protobuf without its external weights (only the graph structure is needed)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxladyError(f"{name}: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise OnnxladyError(f"{name}: no such file")
    try:
        loaded = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...: the file is not an ONNX model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxladyError(f"{name} is not a readable ONNX model: {first}") from exc
    if not loaded.HasField("graph"):
        raise OnnxladyError(f"{name} is not an ONNX model (it holds no graph)")
    return loaded


def _fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed: those that are not also initializers (old IR versions list both)."""
    initializers = {init.name for init in model.graph.initializer}
    initializers.update(init.values.name for init in model.graph.sparse_initializer)
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _elem_type(vi: onnx.ValueInfoProto) -> int | None:
    """The element type of a tensor value, or None for sequences, maps and other non-tensors."""
    if vi.type.WhichOneof("value") != "tensor_type":
        return None
    return vi.type.tensor_type.elem_type


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def _check_interfaces(ref: onnx.ModelProto, cand: onnx.ModelProto, ref_name: str, cand_name: str) -> None:
    """Raise OnnxladyError naming the first difference between the two models' inputs or outputs."""
    ref_inputs = {vi.name: vi for vi in _fed_inputs(ref)}
    cand_inputs = {vi.name: vi for vi in _fed_inputs(cand)}
    for input_name, vi in ref_inputs.items():
        other = cand_inputs.get(input_name)
        if other is None:
            raise OnnxladyError(f"input {input_name!r} of {ref_name} is missing from {cand_name}")
        if _elem_type(vi) != _elem_type(other):
            raise OnnxladyError(
                f"input {input_name!r} is {_vi_type(vi)} in {ref_name} but {_vi_type(other)} in {cand_name}"
            )
        ref_dims, cand_dims = _declared_dims(vi), _declared_dims(other)
        if ref_dims is not None and cand_dims is not None:
            if len(ref_dims) != len(cand_dims):
                raise OnnxladyError(
                    f"input {input_name!r} has rank {len(ref_dims)} in {ref_name} but {len(cand_dims)} in {cand_name}"
                )
            for axis, (a, b) in enumerate(zip(ref_dims, cand_dims)):
                if a is not None and b is not None and a != b:
                    raise OnnxladyError(
                        f"input {input_name!r} has dimension {axis} = {a} in {ref_name} but {b} in {cand_name}"
                    )
    for input_name in cand_inputs:
        if input_name not in ref_inputs:
            raise OnnxladyError(f"input {input_name!r} of {cand_name} is missing from {ref_name}")

    ref_outputs, cand_outputs = list(ref.graph.output), list(cand.graph.output)
    for index in range(max(len(ref_outputs), len(cand_outputs))):
        if index >= len(cand_outputs):
            raise OnnxladyError(
                f"{ref_name} has {len(ref_outputs)} outputs but {cand_name} has {len(cand_outputs)}: "
                f"output {ref_outputs[index].name!r} is missing"
            )
        if index >= len(ref_outputs):
            raise OnnxladyError(
                f"{ref_name} has {len(ref_outputs)} outputs but {cand_name} has {len(cand_outputs)}: "
                f"extra output {cand_outputs[index].name!r}"
            )
        a, b = ref_outputs[index], cand_outputs[index]
        if a.name != b.name:
            raise OnnxladyError(f"output #{index} is {a.name!r} in {ref_name} but {b.name!r} in {cand_name}")
        if _elem_type(a) != _elem_type(b):
            raise OnnxladyError(f"output {a.name!r} is {_vi_type(a)} in {ref_name} but {_vi_type(b)} in {cand_name}")
        elem = _elem_type(a)
        if elem is None or elem not in _OUTPUT_TYPES:
            raise OnnxladyError(
                f"output {a.name!r} is {_vi_type(a)}: verify can compare only tensors of numeric, "
                "boolean or string elements (ONNX Runtime's Python API cannot return this type)"
            )


def _vi_type(vi: onnx.ValueInfoProto) -> str:
    elem = _elem_type(vi)
    if elem is None:
        kind = vi.type.WhichOneof("value") or "untyped"
        return f"a non-tensor ({kind.replace('_type', '')})"
    return _type_name(elem)


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """Declared dimensions (None for symbolic/unknown ones), or None when the rank is unknown."""
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    # Some exporters write -1 (or 0) as a dim_value for a dynamic axis: treat it as unknown.
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]


# --------------------------------------------------------------------------------------------
# Input generation
# --------------------------------------------------------------------------------------------


def _resolve_shapes(
    inputs: Sequence[onnx.ValueInfoProto], shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the fed inputs: user overrides first, then 1 for dim 0 and 64 elsewhere."""
    overrides = {str(k): tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    known = {vi.name for vi in inputs}
    for name in overrides:
        if name not in known:
            listing = ", ".join(repr(n) for n in sorted(known)) or "none"
            raise OnnxladyError(f"shape override for unknown input {name!r} (the model's inputs: {listing})")
    resolved: dict[str, tuple[int, ...]] = {}
    for vi in inputs:
        dims = _declared_dims(vi)
        override = overrides.get(vi.name)
        if override is not None:
            if any(d < 0 for d in override):
                raise OnnxladyError(f"shape override for input {vi.name!r} has a negative dimension: {override}")
            if dims is not None:
                if len(override) != len(dims):
                    raise OnnxladyError(
                        f"shape override for input {vi.name!r} has rank {len(override)} "
                        f"but the model declares rank {len(dims)}"
                    )
                for axis, (want, fixed) in enumerate(zip(override, dims)):
                    if fixed is not None and want != fixed:
                        raise OnnxladyError(
                            f"shape override for input {vi.name!r} sets dimension {axis} to {want} "
                            f"but the model fixes it at {fixed}"
                        )
            resolved[vi.name] = override
            continue
        if dims is None:
            raise OnnxladyError(f"input {vi.name!r} has no declared shape: give one with a shape override")
        resolved[vi.name] = tuple(
            d if d is not None else (1 if axis == 0 else _UNKNOWN_DIM) for axis, d in enumerate(dims)
        )
    return resolved


def _constant_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the graph's constant tensors: initializers and Constant nodes holding a tensor."""
    found = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        found[sparse.values.name] = tuple(sparse.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = tuple(attr.t.dims)
    return found


def _gather_bounds(model: onnx.ModelProto, input_names: Sequence[str]) -> dict[str, int]:
    """For each integer input used as Gather indices into a constant table: the table's size on the gather axis.

    The indices may pass through Cast, Unsqueeze, Reshape, Squeeze, Identity or Flatten first
    (as token ids usually do). When several Gathers read one input, the smallest bound wins, so
    every drawn index is valid for all of them.
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for position, tensor in enumerate(node.input):
            if tensor:
                consumers.setdefault(tensor, []).append((node, position))
    constants = _constant_shapes(model)

    bounds: dict[str, int] = {}
    for name in input_names:
        best: int | None = None
        frontier, seen = [name], {name}
        while frontier:
            tensor = frontier.pop()
            for node, position in consumers.get(tensor, []):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Gather" and position == 1:
                    data_shape = constants.get(node.input[0])
                    if data_shape is None or not data_shape:
                        continue
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    if axis < 0:
                        axis += len(data_shape)
                    if 0 <= axis < len(data_shape):
                        size = int(data_shape[axis])
                        best = size if best is None else min(best, size)
                elif node.op_type in _INDEX_PASS_THROUGH and position == 0:
                    for out in node.output:
                        if out and out not in seen:
                            seen.add(out)
                            frontier.append(out)
        if best is not None:
            bounds[name] = max(best, 1)
    return bounds


def generate_inputs(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None,
    rng: np.random.Generator,
    input_range: tuple[float, float] = (-1.0, 1.0),
) -> dict[str, np.ndarray]:
    """Draw one random feed for every input the model must be fed.

    Floating-point inputs are uniform in ``input_range``. Integer inputs used (directly or via
    Cast/Unsqueeze/Reshape/...) as the indices of a ``Gather`` into a constant table are drawn in
    ``[0, table size)`` so embedding look-ups stay in range; other integer inputs in ``[0, 16)``.
    Boolean inputs are fair coin flips. ``shapes`` overrides declared shapes; unknown dimensions
    default to 1 (first axis, the batch) and 64 (others). Inputs are drawn in graph order, so one
    generator seeded the same way always produces the same feeds.

    A ``bfloat16`` input is returned as an array of ``ml_dtypes.bfloat16`` (NumPy has no native
    bfloat16); :func:`verify_models` wraps it for ONNX Runtime.
    """
    inputs = _fed_inputs(model)
    low, high = _check_range(input_range)
    resolved = _resolve_shapes(inputs, shapes)
    int_inputs = [vi.name for vi in inputs if _elem_type(vi) in _INT_TYPES]
    bounds = _gather_bounds(model, int_inputs)

    feeds: dict[str, np.ndarray] = {}
    for vi in inputs:
        elem = _elem_type(vi)
        if elem is None or elem not in _INPUT_TYPES:
            raise OnnxladyError(
                f"input {vi.name!r} is {_vi_type(vi)}: verify can generate only float, integer and bool tensors"
            )
        shape = resolved[vi.name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if elem in _FLOAT_TYPES:
            feeds[vi.name] = rng.uniform(low, high, size=shape).astype(dtype)
        elif elem == TensorProto.BOOL:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            high_int = min(bounds.get(vi.name, _INT_HIGH), int(np.iinfo(dtype).max) + 1)
            feeds[vi.name] = rng.integers(0, high_int, size=shape).astype(dtype)
    return feeds


def _check_range(input_range: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError) as exc:
        raise OnnxladyError(f"input range must be two numbers (low, high), got {input_range!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise OnnxladyError(f"input range must be finite with low <= high, got ({low}, {high})")
    return low, high


def _to_ort_feed(array: np.ndarray) -> Any:
    """Hand an array to ONNX Runtime: bfloat16 needs an OrtValue, because ORT does not know ml_dtypes."""
    if array.dtype == onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), onnx_element_type=TensorProto.BFLOAT16
        )
    return array


# --------------------------------------------------------------------------------------------
# Sessions and execution providers
# --------------------------------------------------------------------------------------------

#: Outcome of the one CUDA probe per process: (loaded, reason it did not). None until probed.
_cuda_probe: tuple[bool, str | None] | None = None


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = _SESSION_LOG_SEVERITY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without ORT's ``[ONNXRuntimeError] : 2 : CODE :`` prefix."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", lines[0]) or lines[0]


class _CapturedStderr:
    """Redirect file descriptor 2 to a temporary file while ORT probes CUDA.

    ORT writes its "failed to load libonnxruntime_providers_cuda.so" error straight to the C++
    stderr even at log severity 3; capturing it keeps the console clean and gives the reason.
    """

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> _CapturedStderr:
        self._file = tempfile.TemporaryFile(mode="w+b")
        try:
            self._saved: int | None = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except OSError:  # no usable fd 2: probe uncaptured
            self._saved = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()


def _short_cuda_reason(log: str, fallback: str) -> str:
    """Boil ORT's provider-loading log down to its cause, e.g. ``libcublasLt.so.13: cannot open ...``."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", log)
    match = re.search(r"with error:\s*(.+)", clean)
    if match:
        return match.group(1).strip()
    errors = [line for line in clean.splitlines() if "[E:" in line or "error" in line.lower()]
    if errors:
        line = errors[0]
        return line.rsplit("] ", 1)[-1].strip() or fallback
    return fallback


def _probe_tiny_model() -> bytes:
    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "cuda_probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _probe_cuda() -> tuple[bool, str | None]:
    """Whether the CUDA execution provider really loads and runs here (cached for the process)."""
    global _cuda_probe
    if _cuda_probe is not None:
        return _cuda_probe
    if _CUDA not in ort.get_available_providers():
        _cuda_probe = (False, "this onnxruntime build has no CUDA support")
        return _cuda_probe
    ort.set_default_logger_severity(_ORT_LOG_SEVERITY)
    outcome: tuple[bool, str | None]
    with _CapturedStderr() as captured:
        try:
            session = ort.InferenceSession(
                _probe_tiny_model(), _session_options(), providers=[(_CUDA, _CUDA_OPTIONS), _CPU]
            )
            loaded = session.get_providers()[:1] == [_CUDA]
            if loaded:
                session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})
            outcome = (loaded, None)
        except Exception as exc:  # a broken CUDA install can raise instead of falling back
            outcome = (False, _first_line(exc))
    if not outcome[0]:
        reason = outcome[1] or _short_cuda_reason(captured.text, "the CUDA provider library failed to load")
        outcome = (False, reason)
    _cuda_probe = outcome
    return outcome


def _model_source(model: ModelLike, name: str) -> str | bytes:
    """What to give InferenceSession: the path (so external data resolves), or serialized bytes."""
    if isinstance(model, onnx.ModelProto):
        if any(is_external(init) for init in model.graph.initializer):
            raise OnnxladyError(
                f"{name} is an in-memory model whose weights live in external files; "
                "pass its path instead so they resolve against its folder"
            )
        try:
            return model.SerializeToString()
        except ValueError as exc:  # protobuf refuses messages over 2 GiB
            raise OnnxladyError(
                f"{name} is too large to serialize in memory ({_first_line(exc)}); save it with external data "
                "and pass its path"
            ) from exc
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxladyError(f"{name}: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise OnnxladyError(f"{name}: no such file")
    return str(path)


def _new_session(source: str | bytes, providers: list[Any], name: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, _session_options(), providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        raise OnnxladyError(f"ONNX Runtime cannot run {name}: {_first_line(exc)}") from exc


def create_session(
    model: ModelLike, provider: str = "auto", *, name: str | None = None
) -> tuple[ort.InferenceSession, str, str | None]:
    """Open an ONNX Runtime session on ``model`` with the requested execution provider.

    ``provider`` is ``"cpu"``, ``"cuda"`` (CUDA or an :class:`OnnxladyError`) or ``"auto"`` (CUDA
    when it really loads here, else the CPU). CUDA always runs with TF32 off: TF32 rounds float32
    matmul inputs to 10 mantissa bits, which would make a permuted model look non-equivalent.
    ``model`` is a path (given to ORT as a path so external data resolves against the model's
    folder) or an in-memory :class:`onnx.ModelProto`. ``name`` labels the model in messages.

    Returns ``(session, provider_used, fallback_reason)``; ``fallback_reason`` says why ``"auto"``
    ended up on the CPU and is ``None`` otherwise.
    """
    if provider not in _PROVIDERS:
        raise OnnxladyError(f"unknown provider {provider!r}: choose one of {', '.join(_PROVIDERS)}")
    label = name or _describe(model, "the model")
    source = _model_source(model, label)
    ort.set_default_logger_severity(_ORT_LOG_SEVERITY)
    if provider == "cpu":
        return _new_session(source, [_CPU], label), _CPU, None

    loaded, reason = _probe_cuda()
    if loaded:
        session = _new_session(source, [(_CUDA, _CUDA_OPTIONS), _CPU], label)
        if session.get_providers()[:1] == [_CUDA]:
            return session, _CUDA, None
        reason = f"it did not load for {label} (session providers: {', '.join(session.get_providers())})"
    if provider == "cuda":
        raise OnnxladyError(f"CUDA execution provider could not be loaded: {reason}")
    fallback = f"{_CUDA} not available: {reason}"
    return _new_session(source, [_CPU], label), _CPU, fallback


def _run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], name: str) -> list[Any]:
    try:
        return session.run(None, {k: _to_ort_feed(v) for k, v in feeds.items()})
    except Exception as exc:
        raise OnnxladyError(f"ONNX Runtime cannot run {name}: {_first_line(exc)}") from exc


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


class _Accumulator:
    """Running statistics of one output over all iterations."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.dtype = ""
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.sum_abs = 0.0
        self.finite_pairs = 0
        self.ref_max_abs = 0.0
        self.ref_nonfinite = False
        self.mismatched = 0
        self.total = 0
        self.atol = 0.0  # the last comparison's: what "vanishing" reference outputs are measured by

    def add(self, a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> None:
        """Compare candidate ``a`` with reference ``b`` and fold the result in."""
        self.atol = atol
        if self.shape is None:
            self.shape, self.dtype = tuple(int(d) for d in b.shape), str(b.dtype)
        self.total += int(b.size)
        if b.size == 0:
            return
        if b.dtype.kind in "OUS":  # strings: exact match, no numeric error
            self.mismatched += int(np.count_nonzero(a != b))
            return

        exact = b.dtype.kind in "biu"
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        finite_b = np.isfinite(b64)
        both_finite = np.isfinite(a64) & finite_b
        if not finite_b.all():
            self.ref_nonfinite = True
        if finite_b.any():
            self.ref_max_abs = max(self.ref_max_abs, float(np.max(np.abs(b64[finite_b]))))

        # Non-finite values: equal only when the same non-finite value sits at the same place.
        either_nonfinite = ~both_finite
        same_nonfinite = either_nonfinite & ((np.isnan(a64) & np.isnan(b64)) | (a64 == b64))
        nonfinite_mismatch = int(np.count_nonzero(either_nonfinite & ~same_nonfinite))

        diff = np.abs(a64[both_finite] - b64[both_finite])
        if exact:
            failed = int(np.count_nonzero(a != b))
        else:
            ref_abs = np.abs(b64[both_finite])
            failed = int(np.count_nonzero((diff > atol) & (diff > rtol * ref_abs))) + nonfinite_mismatch
        self.mismatched += failed
        if diff.size:
            rel = diff / np.maximum(np.abs(b64[both_finite]), _TINY)
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_rel = max(self.max_rel, float(rel.max()))
            self.sum_abs += float(diff.sum())
            self.finite_pairs += int(diff.size)
        if nonfinite_mismatch:
            self.max_abs = self.max_rel = math.inf

    def _vanishing(self) -> float:
        return max(DEGENERATE_THRESHOLD, 10.0 * self.atol)

    def result(self) -> OutputComparison:
        if self.total == 0:
            degenerate: str | None = "empty output (no elements to compare)"
        elif self.ref_nonfinite:
            degenerate = "non-finite values in the reference output"
        elif self.dtype and np.dtype(self.dtype).kind not in "OUS" and self.ref_max_abs < self._vanishing():
            # Within a few atol of zero, any candidate near zero passes: the check cannot fail.
            degenerate = f"all reference values below {self._vanishing():g} in magnitude (10 x atol)"
        else:
            degenerate = None
        return OutputComparison(
            name=self.name,
            shape=self.shape or (),
            dtype=self.dtype,
            max_abs_error=self.max_abs,
            max_rel_error=self.max_rel,
            mean_abs_error=self.sum_abs / self.finite_pairs if self.finite_pairs else 0.0,
            reference_max_abs=self.ref_max_abs,
            mismatched_elements=self.mismatched,
            total_elements=self.total,
            passed=self.mismatched == 0,
            degenerate=degenerate,
        )


def _check_tolerance(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise OnnxladyError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(number) or number < 0:
        raise OnnxladyError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def _with_outputs(model: ModelLike, names: Sequence[str], label: str) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names``."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        try:
            proto = onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - reported as bad input
            raise OnnxladyError(f"cannot load {label}: {exc}") from exc
    from onnxlady._graph._model_graph import ModelGraph  # local: verify stays usable without the analysis

    produced = {name for node in proto.graph.node for name in node.output}
    present = {value.name for value in proto.graph.output}
    missing = [name for name in names if name not in produced]
    if missing:
        raise OnnxladyError(f"{label} has no tensor '{missing[0]}' to compare")
    dtypes = ModelGraph(proto).dtypes
    for name in names:
        if name not in present:
            elem_type = dtypes.get(name) or onnx.TensorProto.FLOAT
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return proto


def verify_models(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    provider: str = "auto",
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    iterations: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_range: tuple[float, float] = (-1.0, 1.0),
    progress: Callable[[str], None] | None = None,
    extra_outputs: Sequence[str] = (),
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same random inputs and compare their outputs.

    Both models must have the same fed inputs (names, element types) and the same outputs (names,
    order, element types); otherwise an :class:`OnnxladyError` names the first difference. Each of
    ``iterations`` rounds draws fresh inputs from one ``np.random.default_rng(seed)`` (see
    :func:`generate_inputs`) and feeds the same arrays to both models. A floating-point element
    fails only where ``|a - b| > atol`` and ``|a - b| > rtol * |b|`` (``b`` from the reference);
    matching NaN/Inf count as equal; integer and boolean outputs must be identical. ``progress``,
    when given, receives one line per iteration. ``extra_outputs`` names intermediate tensors
    (present in both models) to compare as well, for models whose final outputs saturate.
    """
    atol = _check_tolerance(atol, "atol")
    rtol = _check_tolerance(rtol, "rtol")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise OnnxladyError(f"iterations must be a whole number >= 1, got {iterations!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OnnxladyError(f"seed must be a whole number >= 0, got {seed!r}")
    if provider not in _PROVIDERS:
        raise OnnxladyError(f"unknown provider {provider!r}: choose one of {', '.join(_PROVIDERS)}")
    _check_range(input_range)

    ref_name = _describe(reference, "the reference model")
    cand_name = _describe(candidate, "the candidate model")
    if extra_outputs:
        reference = _with_outputs(reference, extra_outputs, ref_name)
        candidate = _with_outputs(candidate, extra_outputs, cand_name)
    if ref_name == cand_name and not isinstance(reference, onnx.ModelProto):
        ref_name, cand_name = f"reference {ref_name}", f"candidate {cand_name}"
    ref_graph = _load_graph(reference, ref_name)
    cand_graph = _load_graph(candidate, cand_name)
    _check_interfaces(ref_graph, cand_graph, ref_name, cand_name)
    input_shapes = _resolve_shapes(_fed_inputs(ref_graph), shapes)

    ref_session, provider_used, fallback = create_session(reference, provider, name=ref_name)
    if provider_used == _CPU:
        cand_session, _, _ = create_session(candidate, "cpu", name=cand_name)
    else:
        cand_session, cand_provider, _ = create_session(candidate, provider, name=cand_name)
        if cand_provider != provider_used:  # never compare a GPU run with a CPU run
            ref_session, provider_used, _ = create_session(reference, "cpu", name=ref_name)
            fallback = f"{_CUDA} not available: it did not load for {cand_name}"

    output_names = [o.name for o in ref_graph.graph.output]
    accumulators = [_Accumulator(n) for n in output_names]
    rng = np.random.default_rng(int(seed))
    for iteration in range(int(iterations)):
        feeds = generate_inputs(ref_graph, input_shapes, rng, input_range)
        ref_out = _run(ref_session, feeds, ref_name)
        cand_out = _run(cand_session, feeds, cand_name)
        for acc, a, b in zip(accumulators, cand_out, ref_out):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                raise OnnxladyError(
                    f"output {acc.name!r} has shape {tuple(b.shape)} in {ref_name} but {tuple(a.shape)} in {cand_name}"
                )
            if a.dtype != b.dtype:
                raise OnnxladyError(f"output {acc.name!r} is {b.dtype} in {ref_name} but {a.dtype} in {cand_name}")
            acc.add(a, b, atol, rtol)
        if progress is not None:
            mismatched = sum(acc.mismatched for acc in accumulators)
            progress(f"iteration {iteration + 1}/{iterations}: {mismatched} mismatched element(s) so far")

    return VerifyReport(
        provider_requested=provider,
        provider_used=provider_used,
        fallback_reason=fallback,
        atol=atol,
        rtol=rtol,
        iterations=int(iterations),
        seed=int(seed),
        input_shapes=input_shapes,
        outputs=tuple(acc.result() for acc in accumulators),
    )
