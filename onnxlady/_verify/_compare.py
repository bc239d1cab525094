"""Check that two ONNX models compute the same function, by running both in ONNX Runtime.

Permuting neurons reorders floating-point accumulations, so a permuted model is not
bit-identical to its original: it is *equivalent* within a tolerance. :func:`verify_models` runs
the reference and the candidate on the same inputs (drawn the way a real model accepts them, see
:mod:`onnxlady._verify._inputs`, or given by the user) and compares every output element-wise,
the way Polygraphy does (see :mod:`onnxlady._verify._stats`). Where a squashing op (Sigmoid,
Softmax, Tanh, Clip) makes a graph output, its input is compared too. The verdict is
three-valued (see :mod:`onnxlady._verify._evidence`): ``equivalent`` only when no element fails
and every comparison carries evidence, ``inconclusive`` when some comparison proves nothing,
``not-equivalent`` when an element fails.

Everything a user can get wrong (a path that is not a model, models with different inputs or
outputs, a malformed ``--shape`` override, an input file that does not fit the model, a CUDA
provider that does not load when it was asked for, a model ONNX Runtime cannot run) is raised as
:class:`~onnxlady._errors.OnnxladyError`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from onnxlady._errors import OnnxladyError
from onnxlady._io._progress import advance, say
from onnxlady._verify._decoding import DecodingPlan, first_step, next_step, plan_decoding, state_view, step_length
from onnxlady._verify._evidence import EQUIVALENT, INCONCLUSIVE, NOT_EQUIVALENT, find_squashes, judge, match_squashes
from onnxlady._verify._feed_stream import FeedStream
from onnxlady._verify._feeds import load_input_file, script_feeds
from onnxlady._verify._inputs import check_range, generate_inputs, parse_value_ranges, plan_inputs
from onnxlady._verify._models import GraphIndex, ModelLike, check_interfaces, describe, load_graph
from onnxlady._verify._noise_floor import judge_with_noise, measure_reference_noise
from onnxlady._verify._reference_runs import CheckNotRunError, ReferenceRuns
from onnxlady._verify._report import InputRecord, OutputComparison, VerifyReport
from onnxlady._verify._session import CPU, CUDA, PROVIDERS, create_session, first_line, run_session
from onnxlady._verify._session import _model_source as _session_source
from onnxlady._verify._shapes import parse_shape_overrides
from onnxlady._verify._state_loop import StateLoop, next_feed, plan_state_loop
from onnxlady._verify._stats import DEGENERATE_THRESHOLD, Accumulator

__all__ = [
    "DEGENERATE_THRESHOLD",
    "EQUIVALENT",
    "INCONCLUSIVE",
    "NOT_EQUIVALENT",
    "REDUCED_PRECISION_TOLERANCES",
    "VERIFY_ATOL",
    "VERIFY_RTOL",
    "arithmetic_precision",
    "default_tolerances",
    "CheckNotRunError",
    "InputRecord",
    "OutputComparison",
    "VerifyReport",
    "create_session",
    "generate_inputs",
    "parse_shape_overrides",
    "parse_value_ranges",
    "verify_models",
]

#: Absolute tolerance: an element passes when ``|a - b| <= atol`` (or when the relative test passes).
VERIFY_ATOL: float = 1e-4
#: Relative tolerance: an element passes when ``|a - b| <= rtol * |b|`` (or when the absolute test passes).
VERIFY_RTOL: float = 1e-3
#: Default (atol, rtol) for models that compute in a narrower float type: re-ordering the terms
#: of a float16 sum may flip its last bit (a unit in the last place is 2e-3 at 4), and every
#: later layer carries that on; a wrong permutation moves outputs by far more.
REDUCED_PRECISION_TOLERANCES: dict[str, tuple[float, float]] = {"float16": (4e-3, 1e-2), "bfloat16": (3e-2, 8e-2)}
_NARROW_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}


def arithmetic_precision(model: onnx.ModelProto) -> str:
    """The narrowest float type ``model`` computes in: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    A model computes in a narrow type when a graph input or output has it or an operator other
    than a Cast reads a constant stored in it (weights behind a Cast to float32 are only stored
    narrow: the arithmetic stays float32).
    """
    found: set[str] = set()
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        kind = _NARROW_TYPES.get(value.type.tensor_type.elem_type)
        if kind is not None:
            found.add(kind)
    narrow = {t.name: _NARROW_TYPES[t.data_type] for t in graph.initializer if t.data_type in _NARROW_TYPES}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type in _NARROW_TYPES:
                    narrow[node.output[0]] = _NARROW_TYPES[attribute.t.data_type]
    for node in graph.node:
        if node.op_type not in ("Cast", "Constant"):
            found.update(narrow[name] for name in node.input if name in narrow)
    if "bfloat16" in found:
        return "bfloat16"
    return "float16" if "float16" in found else "float32"


def default_tolerances(*models: onnx.ModelProto) -> tuple[float, float, str]:
    """``(atol, rtol, precision)`` for comparing ``models``: the narrowest arithmetic among them decides."""
    precisions = {arithmetic_precision(model) for model in models}
    for precision in ("bfloat16", "float16"):
        if precision in precisions:
            return (*REDUCED_PRECISION_TOLERANCES[precision], precision)
    return VERIFY_ATOL, VERIFY_RTOL, "float32"


def _model_source(model: ModelLike, name: str) -> str | bytes:
    """What InferenceSession is given for ``model``: its path, or its serialized bytes."""
    return _session_source(model, name)[0]


def _check_tolerance(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise OnnxladyError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(number) or number < 0:
        raise OnnxladyError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def _whole(value: Any, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise OnnxladyError(f"{what} must be a whole number >= {least}, got {value!r}")
    return int(value)


class _Fetch:
    """The tensors each session returns (graph outputs first), and one accumulator per compared pair."""

    def __init__(self, graph_outputs: Sequence[str]) -> None:
        self.ref: list[str] = list(graph_outputs)
        self.cand: list[str] = list(graph_outputs)
        self.pairs: list[tuple[Accumulator, int, int]] = []

    def add(self, accumulator: Accumulator, ref_name: str, cand_name: str) -> None:
        for names, name in ((self.ref, ref_name), (self.cand, cand_name)):
            if name not in names:
                names.append(name)
        self.pairs.append((accumulator, self.ref.index(ref_name), self.cand.index(cand_name)))


def _plan_compared(
    ref_graph: onnx.ModelProto,
    cand_graph: onnx.ModelProto,
    ref_index: GraphIndex,
    cand_index: GraphIndex,
    names: tuple[str, str],
    extra_outputs: Sequence[str],
    compare_squash_inputs: bool,
) -> tuple[_Fetch, list[Accumulator], list[Accumulator], list[str]]:
    """What to fetch and compare: graph outputs, the tensors asked for, the inputs of squashing outputs."""
    output_names = [o.name for o in ref_graph.graph.output]
    # The bounds of a squashing output judge its own saturation, whether or not its input is compared.
    made_by = find_squashes(ref_index)
    squashes, notes = match_squashes(ref_index, cand_index) if compare_squash_inputs else ({}, [])
    fetch = _Fetch(output_names)
    outputs: list[Accumulator] = []
    for name in output_names:
        squash = made_by.get(name)
        accumulator = Accumulator(name, op=squash.op if squash else None, bounds=squash.bounds if squash else ())
        fetch.add(accumulator, name, name)
        outputs.append(accumulator)
    for name in dict.fromkeys(extra_outputs):
        if name in output_names:
            continue
        for index, label in ((ref_index, names[0]), (cand_index, names[1])):
            if name not in index.producer:
                raise OnnxladyError(f"{label} has no tensor '{name}' to compare")
        accumulator = Accumulator(name, kind="added")
        fetch.add(accumulator, name, name)
        outputs.append(accumulator)
    squash_inputs = []
    for output, (squash, cand_tensor) in squashes.items():
        accumulator = Accumulator(squash.tensor, kind="squash-input", op=squash.op, stands_for=output)
        fetch.add(accumulator, squash.tensor, cand_tensor)
        squash_inputs.append(accumulator)
    return fetch, outputs, squash_inputs, notes


def _open_sessions(
    reference: ModelLike, candidate: ModelLike, provider: str, names: tuple[str, str], fetch: _Fetch, outputs: int
) -> tuple[Any, Any, str, str | None]:
    """Both sessions on the same execution provider: never compare a GPU run with a CPU run.

    On the CPU the candidate's session is not opened here (it is None): verify opens it once the
    reference's session has run and been freed (see :mod:`onnxlady._verify._reference_runs`).
    """
    ref_name, cand_name = names
    ref_extra, cand_extra = fetch.ref[outputs:], fetch.cand[outputs:]
    try:
        ref_session, provider_used, fallback = create_session(
            reference, provider, name=ref_name, extra_outputs=ref_extra
        )
    except OnnxladyError as exc:  # the reference does not load (or CUDA asked for does not): nothing checked
        raise CheckNotRunError(str(exc)) from exc
    if provider_used == CPU:
        cand_session = None
    else:
        cand_session, cand_provider, _ = create_session(candidate, provider, name=cand_name, extra_outputs=cand_extra)
        if cand_provider != provider_used:
            ref_session, provider_used, _ = create_session(reference, "cpu", name=ref_name, extra_outputs=ref_extra)
            fallback = f"{CUDA} not available: it did not load for {cand_name}"
    return ref_session, cand_session, provider_used, fallback


def _inputs_or_not_run(stream: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The feeds, with a feed that cannot be made (a file's array that does not fit) as :class:`CheckNotRunError`."""
    try:
        yield from stream
    except CheckNotRunError:
        raise
    except OnnxladyError as exc:
        raise CheckNotRunError(str(exc)) from exc


#: Both models' runs: the reference's (recorded or replayed) and the candidate's session
#: (None in the first pass, which runs the reference alone), each with its label.
Sessions = tuple[tuple[ReferenceRuns, str], tuple[Any, str]]


def _run_step(
    sessions: Sessions,
    fetch: _Fetch,
    feeds: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    key: tuple[Any, ...],
    state_outputs: Mapping[str, int],
    tolerances: tuple[float, float],
) -> tuple[list[Any], list[Any] | None]:
    """Run both sessions on their feeds and add every compared pair to its accumulator.

    ``key`` names the run (feed number and step) in the reference's record. ``state_outputs``
    (present output -> sequence axis) are compared as :func:`state_view` sees them. Returns
    both sessions' outputs (in ``fetch.ref`` / ``fetch.cand`` order); the candidate's are None
    in the first pass, which runs the reference alone.
    """
    (ref_runs, ref_name), (cand_session, cand_name) = sessions
    ref_feed, cand_feed = feeds
    ref_out = ref_runs.run(key, ref_feed)
    if cand_session is None:
        return ref_out, None
    try:
        cand_out = run_session(cand_session, cand_feed)
    except Exception as exc:
        raise OnnxladyError(f"ONNX Runtime cannot run {cand_name}: {first_line(exc)}") from exc
    atol, rtol = tolerances
    for accumulator, ref_position, cand_position in fetch.pairs:
        a, b = (np.asarray(cand_out[cand_position]), np.asarray(ref_out[ref_position]))
        if a.shape != b.shape:
            raise OnnxladyError(
                f"output {accumulator.name!r} has shape {tuple(b.shape)} in {ref_name} but {tuple(a.shape)} "
                f"in {cand_name}"
            )
        if a.dtype != b.dtype:
            raise OnnxladyError(f"output {accumulator.name!r} is {b.dtype} in {ref_name} but {a.dtype} in {cand_name}")
        if accumulator.name in state_outputs and accumulator.kind != "added":
            axis = state_outputs[accumulator.name]
            a, b = state_view(a, axis), state_view(b, axis)
        accumulator.add(a, b, atol, rtol)
    return list(ref_out), list(cand_out)


def _decode(
    sessions: Sessions,
    fetch: _Fetch,
    feed: dict[str, np.ndarray],
    number: int,
    plan: DecodingPlan,
    tokens: int,
    tolerances: tuple[float, float],
    record: list[tuple[dict[str, np.ndarray], dict[str, Any]]] | None = None,
) -> str | None:
    """Run ``feed`` as two decoding steps of ``tokens`` tokens (see :mod:`onnxlady._verify._decoding`).

    With ``record``, each step's reference feed and outputs are appended to it (the reference's
    noise floor is measured on them).

    Returns:
        None when both steps ran; why not when the reference cannot run the prefill from an
        empty cache (nothing was compared then).
    """
    prefill = first_step(plan, feed, tokens)
    try:
        ref_out, cand_out = _run_step(
            sessions, fetch, (prefill, prefill), (number, "prefill"), plan.state_outputs, tolerances
        )
    except CheckNotRunError as exc:
        return str(exc)
    # Each model reads the cache it wrote: a permuted cache is fed back in its own order.
    ref_next = next_step(plan, feed, tokens, dict(zip(fetch.ref, ref_out)))
    cand_next = next_step(plan, feed, tokens, dict(zip(fetch.cand, cand_out))) if cand_out is not None else ref_next
    next_out, _ = _run_step(sessions, fetch, (ref_next, cand_next), (number, "next"), plan.state_outputs, tolerances)
    if record is not None:
        record.extend([(prefill, dict(zip(fetch.ref, ref_out))), (ref_next, dict(zip(fetch.ref, next_out)))])
    return None


def _loop_state(
    sessions: Sessions,
    fetch: _Fetch,
    feed: dict[str, np.ndarray],
    number: int,
    loop: StateLoop,
    first: tuple[list[Any], list[Any] | None],
    tolerances: tuple[float, float],
) -> None:
    """The steps after the first of a state loop: each model reads back the state it wrote."""
    ref_out, cand_out = first
    for step in range(1, loop.steps):
        ref_next = next_feed(loop, feed, dict(zip(fetch.ref, ref_out)))
        # The first pass (no candidate) runs the reference's steps: those the candidate ends sooner go unused.
        cand_next = next_feed(loop, feed, dict(zip(fetch.cand, cand_out))) if cand_out is not None else ref_next
        if ref_next is None or cand_next is None:  # a state of another shape: nothing to feed back
            return
        ref_out, cand_out = _run_step(sessions, fetch, (ref_next, cand_next), (number, "loop", step), {}, tolerances)


#: The reference's first pass holds up to this many bytes of outputs and feeds (or the model's
#: size, when larger: holding them then costs no more than the session it frees).
_RECORD_BUDGET = 64 << 20


def _stored_size(model: ModelLike) -> int:
    """The model file's size in bytes (0 for a model in memory or a file that cannot be read)."""
    if isinstance(model, (str, os.PathLike)):
        with contextlib.suppress(OSError):
            return os.stat(model).st_size
    return 0


@dataclass(frozen=True)
class _FeedPlan:
    """How each feed runs: what is compared, as decoding steps or a state loop, and the tolerances."""

    fetch: _Fetch
    decoding: DecodingPlan | None
    loop: StateLoop | None
    tolerances: tuple[float, float]


def _run_feeds(
    sessions: Sessions,
    plan: _FeedPlan,
    stream: Iterator[dict[str, np.ndarray]],
    progress: Callable[[str], None] | None,
    feeds: FeedStream,
    iterations: int,
) -> tuple[
    int,
    dict[str, tuple[int, ...]],
    dict[str, np.ndarray] | None,
    dict[str, Any],
    list[str],
    list[tuple[dict[str, np.ndarray], dict[str, Any]]],
]:
    """Run every feed of ``stream`` on both models (the reference alone in the first pass).

    Returns:
        The number of feeds, the first feed's shapes, the first feed run as one step (or the
        first decoding step) and the reference's outputs on it (its noise floor is measured
        there), the notes on how the feeds ran (decoding steps, state loop), and the first
        decoded feed's later steps with the reference's outputs (measured there too).
    """
    fetch, decoding, loop, tolerances = plan.fetch, plan.decoding, plan.loop, plan.tolerances
    first_pass = sessions[1][0] is None
    runs = sessions[0][0]
    decoding_notes: list[str] = [loop.describe()] if loop is not None else []
    count = 0
    first_shapes: dict[str, tuple[int, ...]] = {}
    first_feed: dict[str, np.ndarray] | None = None  # kept: the reference's noise floor is measured on it
    first_outputs: dict[str, Any] = {}
    decoded: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []  # the first decoded feed's steps, likewise
    for feed in stream:
        count += 1
        first_shapes = first_shapes or {name: tuple(int(d) for d in array.shape) for name, array in feed.items()}
        tokens = step_length(decoding, feed) if decoding is not None else None
        if decoding is not None and tokens is not None:
            record = decoded if not decoded and not first_pass else None
            failure = _decode(sessions, fetch, feed, count, decoding, tokens, tolerances, record)
            decoding_notes = [decoding.describe(tokens)]
            if failure is not None:  # the reference does not start from an empty cache: one step each
                why = f"KV cache: the reference does not run from an empty cache ({failure})"
                decoding_notes = [why + "; each feed ran as one step with the generated cache"]
                decoding = None
        if decoding is None or tokens is None:
            ref_out, cand_out = _run_step(sessions, fetch, (feed, feed), (count, "one"), {}, tolerances)
            if first_feed is None:
                first_feed, first_outputs = feed, dict(zip(fetch.ref, ref_out))
            if loop is not None:
                _loop_state(sessions, fetch, feed, count, loop, (ref_out, cand_out), tolerances)
        if first_pass:
            if runs.over_budget:  # the rest runs with both sessions alive
                break
            continue
        if progress is not None and feeds.given_by is None and callable(getattr(progress, "update", None)):
            advance(progress, "verify: comparing outputs", count, iterations)  # a bar: the count is known
        elif progress is not None:
            mismatched = sum(pair[0].mismatched for pair in fetch.pairs)
            total = f"/{iterations}" if feeds.given_by is None else ""
            progress(f"iteration {count}{total}: {mismatched} mismatched element(s) so far")
    if first_feed is None and decoded:
        first_feed, first_outputs = decoded[0]
    return count, first_shapes, first_feed, first_outputs, decoding_notes, decoded[1:]


def verify_models(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    iterations: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    input_range: tuple[float, float] = (-1.0, 1.0),
    progress: Callable[[str], None] | None = None,
    extra_outputs: Sequence[str] = (),
    value_ranges: Mapping[str, Sequence[float]] | None = None,
    load_inputs: str | os.PathLike[str] | None = None,
    data_loader_script: str | None = None,
    compare_squash_inputs: bool = True,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare their outputs.

    Both models must have the same fed inputs (names, element types) and the same outputs (names,
    order, element types). A floating-point element fails only where ``|a - b| > atol`` and
    ``|a - b| > rtol * |b|`` (``b`` from the reference); matching NaN/Inf count as equal; integer
    and boolean outputs must be identical. The verdict (:attr:`VerifyReport.verdict`) is
    ``equivalent`` only when no element fails and every compared tensor carries evidence (finite,
    not vanishing, not constant, not saturated); ``inconclusive`` when some comparison proves
    nothing; ``not-equivalent`` when an element fails.

    Args:
        reference: The model taken as right: a path (external data resolves against its folder)
            or an ``onnx.ModelProto``.
        candidate: The model checked against it.
        provider: ``"auto"`` (CUDA when it loads, else CPU), ``"cuda"`` or ``"cpu"``.
        atol: Absolute tolerance; ``None``: :data:`VERIFY_ATOL`, or for models that compute in
            float16/bfloat16 the wider :data:`REDUCED_PRECISION_TOLERANCES` (said in a note).
        rtol: Relative tolerance; ``None``: :data:`VERIFY_RTOL`, or as ``atol`` for float16/bfloat16.
        iterations: Number of generated feeds (user-given feeds are all run, whatever this says).
        seed: Seed of the generated inputs: one ``np.random.default_rng(seed)``, drawn in graph order.
        shapes: Shapes of inputs with dynamic dimensions, by name; the graph pins the others
            where it can (see :mod:`onnxlady._verify._shapes`).
        input_range: ``(low, high)`` for floating-point inputs no other rule covers.
        progress: Receives one line per feed.
        extra_outputs: Intermediate tensors (present in both models) to compare as well.
        value_ranges: ``{input name: (low, high)}``; integers drawn in ``[low, high]`` inclusive.
        load_inputs: A Polygraphy JSON file of feeds (``polygraphy run --save-inputs``) or a
            ``.npz`` archive with one array per input name; inputs a feed lacks are drawn.
        data_loader_script: ``"file.py:function"`` (function ``load_data`` when omitted): called
            without arguments, it returns an iterable of ``{input name: array}`` feeds.
        compare_squash_inputs: Also compare the input of each squashing op (Sigmoid, Softmax,
            LogSoftmax, Tanh, HardSigmoid, Clip) that makes a graph output, and judge that
            output's evidence on it.

    Returns:
        The report: settings, one comparison per compared tensor, how each input was fed, and
        the verdict with its reasons.

    Raises:
        OnnxladyError: bad settings, a model that cannot be read or run (for the reference on
            generated inputs, the message names the input or shape to give), models with
            different inputs or outputs, unusable user inputs, or a CUDA provider asked for and
            not loading. Those that say nothing about the candidate (the inputs cannot be made,
            the reference cannot be loaded or run) are the subclass :class:`CheckNotRunError`.
    """
    atol = None if atol is None else _check_tolerance(atol, "atol")
    rtol = None if rtol is None else _check_tolerance(rtol, "rtol")
    iterations = _whole(iterations, "iterations", 1)
    seed = _whole(seed, "seed", 0)
    if provider not in PROVIDERS:
        raise OnnxladyError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    input_range = check_range(input_range)
    if load_inputs is not None and data_loader_script is not None:
        raise OnnxladyError("give the inputs either as a file (load_inputs) or by a data loader script, not both")

    ref_name = describe(reference, "the reference model")
    cand_name = describe(candidate, "the candidate model")
    if ref_name == cand_name and not isinstance(reference, onnx.ModelProto):
        ref_name, cand_name = f"reference {ref_name}", f"candidate {cand_name}"
    say(progress, "verify: reading the models' graphs")
    ref_graph = load_graph(reference, ref_name)
    cand_graph = load_graph(candidate, cand_name)
    check_interfaces(ref_graph, cand_graph, ref_name, cand_name)
    default_atol, default_rtol, precision = default_tolerances(ref_graph, cand_graph)
    precision_notes: tuple[str, ...] = ()
    if precision != "float32" and (atol is None or rtol is None):
        note = (
            f"the models compute in {precision}: default tolerances atol {default_atol:g}, rtol {default_rtol:g} "
            "(re-ordered sums may round differently there); give atol/rtol to choose others"
        )
        precision_notes = (note,)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    ref_index, cand_index = GraphIndex(ref_graph), GraphIndex(cand_graph)
    try:
        plans = plan_inputs(ref_graph, shapes, input_range, value_ranges, ref_index)
    except OnnxladyError as exc:  # inputs that cannot be made say nothing about the candidate
        raise CheckNotRunError(str(exc)) from exc
    fetch, outputs, squash_inputs, notes = _plan_compared(
        ref_graph, cand_graph, ref_index, cand_index, (ref_name, cand_name), extra_outputs, compare_squash_inputs
    )
    output_count = len(ref_graph.graph.output)
    say(progress, "verify: opening ONNX Runtime sessions")
    ref_session, cand_session, provider_used, fallback = _open_sessions(
        reference, candidate, provider, (ref_name, cand_name), fetch, output_count
    )

    def open_candidate() -> Any:
        return create_session(candidate, "cpu", name=cand_name, extra_outputs=fetch.cand[output_count:])[0]

    def reopen_reference() -> Any:
        again = "cpu" if provider_used == CPU else provider
        return create_session(reference, again, name=ref_name, extra_outputs=fetch.ref[output_count:])[0]

    rng = np.random.default_rng(seed)
    feeds = FeedStream(ref_graph, ref_index, plans, shapes, input_range, value_ranges)
    try:
        if load_inputs is not None:
            stream = feeds.given(iter(load_input_file(load_inputs)), f"input file {os.fspath(load_inputs)}", rng)
        elif data_loader_script is not None:
            label, raw = script_feeds(data_loader_script)
            stream = feeds.given(raw, label, rng)
        else:
            stream = feeds.generated(rng, iterations)
    except OnnxladyError as exc:
        if cand_session is None:  # the candidate's own failure to load is said first, as it always was
            cand_session = open_candidate()
        raise CheckNotRunError(str(exc)) from exc

    # Generated feeds of a model with a KV cache run as two decoding steps (see _decoding).
    generated = load_inputs is None and data_loader_script is None
    decoding = plan_decoding(ref_graph, [plan.name for plan in plans]) if generated else None
    # Fixed-shape recurrent state (a streaming model's state -> stateN): a loop of steps (see _state_loop).
    loop = plan_state_loop(ref_graph, [plan.name for plan in plans]) if generated and decoding is None else None
    say(progress, "verify: running both models")
    # On the CPU the reference runs alone first and its session is freed before the candidate's
    # opens: one session at a time (see _reference_runs).
    budget = max(_RECORD_BUDGET, _stored_size(reference)) if cand_session is None else 0
    runs = ReferenceRuns(ref_session, reopen_reference, ref_name, feeds, budget)
    del ref_session  # the runs hold the only reference to it: releasing them frees it
    wrapped = _inputs_or_not_run(stream)
    plan = _FeedPlan(fetch, decoding, loop, (atol, rtol))
    if cand_session is None:
        runs.recording = True
        with contextlib.suppress(Exception):  # whatever stopped the first pass, the second meets it again
            _run_feeds(((runs, ref_name), (None, cand_name)), plan, runs.feeds(wrapped), None, feeds, iterations)
        runs.recording = False
        if not runs.over_budget:
            runs.release()
        cand_session = open_candidate()
    sessions: Sessions = ((runs, ref_name), (cand_session, cand_name))
    count, first_shapes, first_feed, first_outputs, decoding_notes, later_steps = _run_feeds(
        sessions, plan, runs.feeds(wrapped), progress, feeds, iterations
    )
    if count == 0:
        raise CheckNotRunError(f"{feeds.given_by} gives no feeds")

    compared = tuple(a.result() for a in outputs)
    squashed = tuple(a.result() for a in squash_inputs)
    verdict, reasons, judged = judge(compared, squashed)
    # Everything compared: the candidate's session is freed before the reference's noise sessions
    # are built in the memory it held (building them beside it peaked at twice the comparison's).
    del sessions, cand_session
    if verdict == NOT_EQUIVALENT and first_feed is not None:
        say(progress, "verify: measuring the reference's own rounding noise")
        # A decoding step after the prefill has its own rounding: measured too, with the same sessions.
        steps = [(first_outputs, first_feed)] + [(step_outputs, step_feed) for step_feed, step_outputs in later_steps]
        noise = measure_reference_noise(
            reference, runs.live_session, provider_used, ref_name, fetch.ref, fetch.ref[output_count:], steps
        )
        rejudged = judge_with_noise(compared, squashed, noise) if noise is not None else None
        if rejudged is not None:
            verdict, reasons, noise_notes = rejudged
            judged = tuple(judged) + noise_notes
        if noise is not None:  # the report says, per failing tensor, what the reference alone moves
            compared, squashed = (
                tuple(c if c.passed else replace(c, reference_noise=noise.max_abs.get(c.name)) for c in group)
                for group in (compared, squashed)
            )
    return VerifyReport(
        provider_requested=provider,
        provider_used=provider_used,
        fallback_reason=fallback,
        atol=atol,
        rtol=rtol,
        iterations=count,
        seed=seed,
        input_shapes=first_shapes,
        outputs=compared,
        verdict=verdict,
        reasons=reasons,
        squash_inputs=squashed,
        inputs=feeds.records(),
        notes=precision_notes + tuple(notes) + _defaults_note(ref_graph, feeds.records()) + tuple(decoding_notes) + judged,
    )


def _defaults_note(model: onnx.ModelProto, fed: tuple[InputRecord, ...]) -> tuple[str, ...]:
    """A note naming the initializers listed as graph inputs that were not fed (each model used its own).

    Such an input is a default a caller may override; the check ran on the stored defaults only,
    so the verdict says nothing of other values fed there.
    """
    listed = {value.name for value in model.graph.input}
    if not listed:
        return ()
    names = {record.name for record in fed}
    defaults = [t.name for t in model.graph.initializer if t.name in listed and t.name not in names]
    if not defaults:
        return ()
    shown = ", ".join(defaults[:3]) + (f" (+{len(defaults) - 3} more)" if len(defaults) > 3 else "")
    plural = "s" if len(defaults) > 1 else ""
    note = (
        f"{len(defaults)} initializer{plural} also listed as graph inputs were not fed: each model used its own "
        f"stored values (the verdict holds for those defaults): {shown}"
    )
    return (note,)
