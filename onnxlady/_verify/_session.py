"""ONNX Runtime sessions for verify: execution providers, CUDA probing, running a model.

``"auto"`` runs on CUDA when its provider really loads here and falls back to the CPU with the
reason otherwise; CUDA always runs with TF32 off (TF32 rounds float32 matmul inputs to 10
mantissa bits, which would make a permuted model look different). A model given by path is
opened by path, so its external data resolves against its own folder; when intermediate
tensors must be compared too, the outputs are appended to the file's bytes and ONNX Runtime is
told where the weights live (a CPU session gets the bytes without the inline weights, which ORT
reads from the file: :mod:`onnxlady._verify._weightless`); CUDA sessions are built as before.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, final

import numpy as np
import onnx
from onnx import TensorProto

from onnxlady._errors import OnnxladyError
from onnxlady._io._files import copy_model
from onnxlady._io._skim import with_graph_outputs
from onnxlady._io._tensors import is_external
from onnxlady._verify._models import ModelLike, describe
from onnxlady._verify._weightless import weightless_bytes


class _LazyOnnxRuntime:
    """onnxruntime, imported on first use: commands that run no model skip its start-up cost."""

    def __getattr__(self, name: str) -> Any:
        import onnxruntime

        return getattr(onnxruntime, name)


ort: Any = _LazyOnnxRuntime()

PROVIDERS = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: TF32 would round float32 matmuls to 10 mantissa bits and make permuted models look different.
_CUDA_OPTIONS: dict[str, str] = {"use_tf32": "0"}
#: ORT's severity levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_ORT_LOG_SEVERITY = 3
#: Sessions log only fatal messages: ORT prints a failing kernel's error (severity 3) to stderr itself,
#: and the same text already reaches the user once, inside the OnnxladyError.
_SESSION_LOG_SEVERITY = 4
#: Where ORT finds the external data of a model handed over as bytes.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"

#: Outcome of the one CUDA probe per process: (loaded, reason it did not). None until probed.
_cuda_probe: tuple[bool, str | None] | None = None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without ORT's ``[ONNXRuntimeError] : 2 : CODE :`` prefix."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*", "", lines[0]) or lines[0]


def _session_options(external_folder: str | None = None, optimize: bool = True) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = _SESSION_LOG_SEVERITY
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if external_folder is not None:
        options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, external_folder)
    return options


@final
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


def probe_cuda() -> tuple[bool, str | None]:
    """Whether the CUDA execution provider really loads and runs here (cached for the process).

    Returns:
        ``(loaded, reason)``; ``reason`` says why it did not load, None when it did.
    """
    global _cuda_probe
    if _cuda_probe is not None:
        return _cuda_probe
    if CUDA not in ort.get_available_providers():
        _cuda_probe = (False, "this onnxruntime build has no CUDA support")
        return _cuda_probe
    ort.set_default_logger_severity(_ORT_LOG_SEVERITY)
    outcome: tuple[bool, str | None]
    with _CapturedStderr() as captured:
        try:
            session = ort.InferenceSession(
                _probe_tiny_model(), _session_options(), providers=[(CUDA, _CUDA_OPTIONS), CPU]
            )
            loaded = session.get_providers()[:1] == [CUDA]
            if loaded:
                session.run(None, {"x": np.ones((1, 4), dtype=np.float32)})
            outcome = (loaded, None)
        except Exception as exc:
            outcome = (False, first_line(exc))
    if not outcome[0]:
        reason = outcome[1] or _short_cuda_reason(captured.text, "the CUDA provider library failed to load")
        outcome = (False, reason)
    _cuda_probe = outcome
    return outcome


def _serialize(model: onnx.ModelProto, name: str) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        raise OnnxladyError(
            f"{name} is too large to serialize in memory ({first_line(exc)}); save it with external data "
            "and pass its path"
        ) from exc


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model``'s proto that also outputs the intermediate tensors ``names`` (types left to ORT)."""
    proto = copy_model(model)
    present = {value.name for value in proto.graph.output}
    for name in names:
        if name not in present:
            value = onnx.ValueInfoProto()
            value.name = name
            proto.graph.output.append(value)
            present.add(name)
    return proto


def _model_source(
    model: ModelLike, name: str, extra_outputs: Sequence[str] = (), weightless: bool = False
) -> tuple[str | bytes, str | None]:
    """What to give InferenceSession, and the folder its external data lives in when given as bytes.

    ``weightless``: a file whose weights are all inside it is given as its bytes without its
    large weights, ORT reading them from the file (see :mod:`onnxlady._verify._weightless`): it
    copies them once less, and keeps no copy of the bytes.
    """
    if isinstance(model, onnx.ModelProto):
        if any(is_external(init) for init in model.graph.initializer):
            raise OnnxladyError(
                f"{name} is an in-memory model whose weights live in external files; "
                "pass its path instead so they resolve against its folder"
            )
        return _serialize(_with_outputs(model, extra_outputs) if extra_outputs else model, name), None
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxladyError(f"{name}: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise OnnxladyError(f"{name}: no such file")
    if weightless:
        with contextlib.suppress(ValueError, OSError):  # unreadable or not protobuf: handled below, as before
            moved = weightless_bytes(path)
            if moved.moved and extra_outputs:
                return with_graph_outputs(moved.data, list(extra_outputs)), moved.folder
            if moved.moved and not moved.had_external:  # data files stay found from the path, as before
                return moved.data, moved.folder
    if not extra_outputs:
        return str(path), None
    try:
        stored = path.read_bytes()
    except OSError as exc:  # reported as bad input
        raise OnnxladyError(f"{name} cannot be read: {first_line(exc)}") from exc
    # The file's bytes with the outputs appended (protobuf merges them in): nothing is parsed or
    # re-serialized; external weights stay where they are, found through the folder.
    return with_graph_outputs(stored, list(extra_outputs)), str(path.resolve().parent)


def _new_session(
    source: str | bytes, providers: list[Any], name: str, external_folder: str | None, optimize: bool = True
) -> Any:
    return _build_session(source, providers, name, external_folder, optimize)


def _build_session(
    source: str | bytes, providers: list[Any], name: str, external_folder: str | None, optimize: bool
) -> Any:
    try:
        return ort.InferenceSession(source, _session_options(external_folder, optimize), providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        if not optimize:
            raise OnnxladyError(f"ONNX Runtime cannot run {name}: {first_line(exc)}") from exc
        # ONNX Runtime (1.31) cannot re-optimize some models its own offline optimizer wrote ("Attempt
        # to replace the existing tensor" at ORT_ENABLE_ALL): its optimizations keep the function,
        # so the model is run with the basic ones only.
        options = _session_options(external_folder)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except Exception:  # the model itself cannot run: the first failure says why
            raise OnnxladyError(f"ONNX Runtime cannot run {name}: {first_line(exc)}") from exc


def create_session(
    model: ModelLike,
    provider: str = "auto",
    *,
    name: str | None = None,
    extra_outputs: Sequence[str] = (),
    optimize: bool = True,
) -> tuple[Any, str, str | None]:
    """Open an ONNX Runtime session on ``model`` with the requested execution provider.

    Args:
        model: A path (given to ORT as a path so external data resolves against the model's
            folder) or an in-memory :class:`onnx.ModelProto`.
        provider: ``"cpu"``, ``"cuda"`` (CUDA or an error) or ``"auto"`` (CUDA when it really
            loads here, else the CPU).
        name: Labels the model in messages.
        extra_outputs: Intermediate tensors the session also returns, after the graph outputs.
        optimize: ONNX Runtime's graph optimizations on (all of them, the default) or off; off
            gives the same function with other kernels and roundings (the reference's noise floor).

    Returns:
        ``(session, provider_used, fallback_reason)``; ``fallback_reason`` says why ``"auto"``
        ended up on the CPU and is ``None`` otherwise.

    Raises:
        OnnxladyError: an unknown provider, CUDA asked for and not loading, or a model ONNX
            Runtime cannot open.
    """
    if provider not in PROVIDERS:
        raise OnnxladyError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    label = name or describe(model, "the model")
    ort.set_default_logger_severity(_ORT_LOG_SEVERITY)
    if provider == "cpu":
        source, folder = _model_source(model, label, extra_outputs, weightless=True)
        return _new_session(source, [CPU], label, folder, optimize), CPU, None

    loaded, reason = probe_cuda()
    if loaded:  # CUDA sessions get the file's bytes as they always did
        source, folder = _model_source(model, label, extra_outputs)
        session = _new_session(source, [(CUDA, _CUDA_OPTIONS), CPU], label, folder, optimize)
        if session.get_providers()[:1] == [CUDA]:
            return session, CUDA, None
        reason = f"it did not load for {label} (session providers: {', '.join(session.get_providers())})"
        del session, source  # freed before the CPU session is built
    if provider == "cuda":
        raise OnnxladyError(f"CUDA execution provider could not be loaded: {reason}")
    fallback = f"{CUDA} not available: {reason}"
    source, folder = _model_source(model, label, extra_outputs, weightless=True)
    return _new_session(source, [CPU], label, folder, optimize), CPU, fallback


def to_ort_feed(array: np.ndarray) -> Any:
    """Hand an array to ONNX Runtime: bfloat16 needs an OrtValue, because ORT does not know ml_dtypes."""
    if array.dtype == onnx.helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16):
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), onnx_element_type=TensorProto.BFLOAT16
        )
    return array


def run_session(session: Any, feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """Run every output of ``session`` on ``feeds``; ORT's exceptions pass through to the caller."""
    return session.run(None, {k: to_ort_feed(v) for k, v in feeds.items()})
