"""The deployment table (issue 12): real models x the converters deployment pipelines run.

Each model is permuted (every permutable group, seed 7; a decoder with a KV cache with its caches
as state, ``permute --kv-state``), then converted by each real converter of
:mod:`fixtures.deployment` (ONNX Runtime's offline optimizer at ``basic`` and ``extended``, and at
``all`` for convolutional models (NCHWc layout on x86; its groups are frozen, so no wrong
permutation of the output can be made: ``n/a``), its transformer optimizer for BERT encoders and GPT-2, onnxslim, onnx-simplifier, int4 ``MatMulNBits`` for
models with MatMul weights); the decoders also go through no converter at all (``none``: permute
-> verify -> resync as models of their own). Per cell:

- coverage: the permutable share of producer neurons (``inspect``) of the plain model (for a
  model with a KV cache: with the caches pinned / as state) and of the same model through the
  converter (unpermuted; KV caches as state), in %;
- Psi: resync of the converted suspect against the plain reference, with the true key;
- left: groups resync solved in the common form but left in place in the output (the converted
  form freezes or restricts them);
- verify: the output against the suspect (``verify``'s verdict; a decoder with a KV cache over
  two decoding steps, each model fed its own cache), and whether a wrong permutation of the
  output (one producer's rows moved alone) is caught (``n/a`` where the check did not pass);
- audit: the verdict and the conversions it names;
- s: resync time, the median of ``--repeat`` runs.

Models: the PyPI models of ``tools.fetch_models`` in ``.cache/models``, the torch exports of
``tools.export_deployment_models`` in ``.cache/deployment`` (ResNet-18, a BERT encoder, a
LLaMA-style decoder, nn.MultiheadAttention, GPT-2, a Whisper encoder; the genai builder's fp32 and int4 forms of that
decoder, run as models of their own), and fixtures. A converter that fails on a model, or does
not install, is reported in its row. A second table pairs the same weights written by different
tools (the torch.onnx export of the decoder and the genai builder's fp32 and int4 forms): match
coverage (KV caches as state), match confidence, audit as is (``converted``), and resync and
audit with the suspect permuted.

    python3 -m tools.deployment_table [--only NAME] [--converter NAME] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from fixtures import FIXTURES
from fixtures.deployment import SHARING, convert, unavailable
from onnxlady import OnnxladyError, PermutationKey, analyze, audit, load_model, permute, resync, verify
from onnxlady._analysis._state import state_pairs
from onnxlady.testing import copy_model, permute_producer_only

CACHE = Path(".cache")
FIXTURE_ROWS = ("resnet", "mobilenet", "matmul_mlp", "encoder_postnorm", "bert_like")
#: Models ONNX Runtime's transformer optimizer fuses: (its model type, heads, hidden size).
TRANSFORMERS = {"bert_like": ("bert", 4, 32), "bert": ("bert", 4, 64), "gpt2": ("gpt2", 4, 64)}
#: Models with MatMul weights, which MatMulNBits quantizes.
MATMUL_MODELS = ("matmul_mlp", "encoder_postnorm", "bert_like", "bert", "llama", "genai_fp32", "magika",
                 "whisper_encoder")
CONVERTERS = ("none", "ort-basic", "ort-extended", "ort-all", "ort-transformer", "onnxslim", "onnxsim", "nbits")
#: Models with 2-D convolutions, which ``ORT_ENABLE_ALL`` writes in the NCHWc layout on x86.
CONV_MODELS = ("ppocr_cls", "ppocrv4_det", "ppocrv4_rec", "nudenet_yolov8n", "resnet18", "resnet", "mobilenet")
#: Models also run as models of their own (converter ``none``: permute -> verify -> resync).
DECODERS = ("llama", "genai_fp32", "genai_int4")


def _transformer(model: onnx.ModelProto, model_type: str, heads: int, hidden: int) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer``'s fusions for ``model_type`` (Python passes only)."""
    import tempfile

    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(copy_model(model), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                     opt_level=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "optimized.onnx")
        fused.save_model_to_file(path)
        return onnx.load(path)


def models(only: list[str] | None) -> list[tuple[str, Callable[[], onnx.ModelProto]]]:
    """(name, loader) of every model of the table, in order."""
    def from_file(path: Path) -> Callable[[], onnx.ModelProto]:
        return lambda: load_model(path).model

    def built(build: Callable[[int], onnx.ModelProto]) -> Callable[[], onnx.ModelProto]:
        return lambda: build(0)

    found: list[tuple[str, Callable[[], onnx.ModelProto]]] = []
    for folder in (CACHE / "models", CACHE / "deployment"):
        for path in sorted(folder.glob("*.onnx")) + sorted(folder.glob("*/model.onnx")):
            found.append((path.parent.name if path.name == "model.onnx" else path.stem, from_file(path)))
    found += [(name, built(FIXTURES[name])) for name in FIXTURE_ROWS]
    found += [(name, built(SHARING[name])) for name in ("shared_layers",)]
    return [(name, load) for name, load in found if not only or name in only]


def applies(converter: str, name: str) -> bool:
    """Whether ``converter`` is run on model ``name``."""
    if converter == "none":
        return name in DECODERS
    if converter == "ort-transformer":
        return name in TRANSFORMERS
    if converter == "nbits":
        return name in MATMUL_MODELS
    if converter == "ort-all":
        return name in CONV_MODELS
    return True


def _convert(model: onnx.ModelProto, converter: str, name: str) -> onnx.ModelProto:
    if converter == "none":
        return copy_model(model)
    if converter == "ort-transformer":
        return _transformer(model, *TRANSFORMERS[name])
    return convert(model, converter)


def _coverage(model: onnx.ModelProto, kv_state: bool = False) -> float:
    """The permutable share of producer neurons, in %; with ``kv_state``, KV caches taken as state."""
    return 100.0 * float(analyze(model, kv_state=kv_state).summary()["permutable_fraction"])  # type: ignore[arg-type]


def has_state(model: onnx.ModelProto) -> bool:
    """Whether the model has KV-cache state pairs (``past_key_values.*`` -> ``present.*``)."""
    return bool(state_pairs(model))


#: The input shapes given to verify for a decoder with a KV cache: 4 new tokens, 3 cached ones
#: (``verify`` runs it as two decoding steps of 2 tokens, each model fed its own cache).
NEW_TOKENS, PAST_TOKENS = 4, 3


def decoder_shapes(model: onnx.ModelProto) -> dict[str, list[int]] | None:
    """Input shapes for a decoder with ``past_key_values.*`` inputs (the genai builder's), else None.

    The cache's head size is the hidden size (the token table's width) over the query heads of
    its GroupQueryAttention.
    """
    names = [value.name for value in model.graph.input]
    if not any(name.startswith("past_key_values.") for name in names):
        return None
    tables = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    attention = next((n for n in model.graph.node if n.op_type == "GroupQueryAttention"), None)
    table = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables), None)
    if attention is None or table is None:
        return None
    heads = next(a.i for a in attention.attribute if a.name == "num_heads")
    kv_heads = next(a.i for a in attention.attribute if a.name == "kv_num_heads")
    head_size = tables[table.input[0]][1] // heads
    shapes = {"input_ids": [1, NEW_TOKENS], "attention_mask": [1, NEW_TOKENS + PAST_TOKENS]}
    for name in names:
        if name.startswith("past_key_values."):
            shapes[name] = [1, kv_heads, PAST_TOKENS, head_size]
    return shapes


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto, shapes: dict[str, list[int]] | None) -> str:
    try:
        if shapes is None:
            return verify(reference, candidate, provider="cpu").verdict
        return verify(reference, candidate, provider="cpu", shape=shapes).verdict
    except OnnxladyError as exc:
        return f"not run ({str(exc)[:60]})"


def row(name: str, plain: onnx.ModelProto, permuted: onnx.ModelProto, key: PermutationKey, converter: str,
        repeat: int) -> list[str]:  # fmt: skip
    """One table row: the cells of the module docstring."""
    suspect = _convert(permuted, converter, name)
    converted = _convert(plain, converter, name)
    converted_coverage = _coverage(converted, kv_state=has_state(converted))
    times = []
    result = None
    for _ in range(repeat):
        begin = time.perf_counter()
        result = resync(plain, suspect, true_key=key)
        times.append(time.perf_counter() - begin)
    assert result is not None
    across = result.details.across
    left = len(across.unwritten) if across is not None else 0
    shapes = decoder_shapes(plain)
    checked = _verify(suspect, result.model, shapes)
    wrong = copy_model(result.model)
    try:
        permute_producer_only(wrong, analyze(wrong))
    except AssertionError:  # the converted form's own analysis moves no producer: nothing to swap
        caught = "n/a (no producer moves in this form)"
    else:
        if checked != "equivalent":  # a check that did not run (or failed) catches nothing
            caught = "n/a (the check above did not pass)"
        else:
            caught = "yes" if _verify(suspect, wrong, shapes) == "not-equivalent" else "**no**"
    report = audit(plain, suspect)
    kinds = ", ".join(sorted({c.kind for c in report.conversions})) or "-"
    psi = "-" if result.psi is None else f"{result.psi:.2f}"
    return [
        f"{converted_coverage:.1f}", psi, str(left), checked, caught,
        f"{report.verdict} ({kinds})", f"{statistics.median(times):.2f}",
    ]


#: One model in two forms made by different tools from the same weights: (reference, suspect).
FORMS = (("llama", "genai_fp32"), ("llama", "genai_int4"), ("genai_fp32", "genai_int4"))


def forms_table(found: dict[str, Callable[[], onnx.ModelProto]]) -> bool:
    """The second table: one model's weights written by two tools, as is and with the suspect permuted.

    The tools: torch.onnx, the genai builder in fp32 and int4. Coverage is the suspect's and the
    reference's with KV caches as state; a suspect with a KV cache is permuted with it. True
    when every row is clean (audit ``converted`` as is, Psi >= 99 and ``permuted`` permuted).
    """
    from onnxlady import match

    ok = True
    print()
    print("| reference | suspect | coverage % (reference / suspect, KV state on) | confidence % | audit as is | "
          "Psi % (suspect permuted) | audit (suspect permuted) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for first, second in FORMS:
        if first not in found or second not in found:
            continue
        reference, suspect = found[first](), found[second]()
        coverage = (f"{_coverage(reference, kv_state=has_state(reference)):.1f} / "
                    f"{_coverage(suspect, kv_state=has_state(suspect)):.1f}")  # fmt: skip
        try:
            confidence = f"{100 * match(reference, suspect).confidence:.1f}"
            plain = audit(reference, suspect)
            permutation = permute(suspect, seed=7, kv_state=has_state(suspect))
            result = resync(reference, permutation.model, true_key=permutation.key)
            moved = audit(reference, permutation.model)
        except OnnxladyError as exc:
            ok = False
            print(f"| {first} | {second} | {coverage} | - | refused: {str(exc)[:160]} | - | - |", flush=True)
            continue
        psi = "-" if result.psi is None else f"{result.psi:.2f}"
        kinds = ", ".join(sorted({c.kind for c in moved.conversions})) or "-"
        ok = ok and plain.verdict == "converted" and moved.verdict == "permuted"
        ok = ok and result.psi is not None and result.psi >= 99.0
        print(f"| {first} | {second} | {coverage} | {confidence} | {plain.verdict} | {psi} | {moved.verdict} ({kinds}) |",
              flush=True)  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    """Print the table; 0 when every cell has Psi >= 99, an equivalent output and ``permuted``."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.deployment_table", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="only this model (repeatable)")
    parser.add_argument("--converter", action="append", choices=CONVERTERS, help="only this converter (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="resync runs timed per cell (median)")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    ok = True
    print("| model | coverage % | converter | coverage % converted | Psi % | left in place | verify | "
          "wrong perm caught | audit (conversions named) | resync s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, load in models(args.only):
        plain = load()
        # A decoder with a KV cache is permuted with its caches as state (``permute --kv-state``);
        # its coverage cell shows the share with the caches pinned, then with them as state.
        state = has_state(plain)
        coverage = f"{_coverage(plain):.1f}" + (f" / {_coverage(plain, kv_state=True):.1f} KV" if state else "")
        try:
            permutation = permute(plain, seed=7, kv_state=state)
        except OnnxladyError as exc:
            print(f"| {name} | {coverage} | - | - | - | - | - | - | permute refused: {exc} | - |", flush=True)
            continue
        for converter in args.converter or CONVERTERS:
            if not applies(converter, name):
                continue
            reason = None if converter == "none" else unavailable(converter)
            cells: list[str]
            if reason is not None:
                cells = ["-"] * 5 + [f"not installed: {reason}", "-"]
            else:
                try:
                    cells = row(name, plain, permutation.model, permutation.key, converter, args.repeat)
                except Exception as exc:  # a converter's or a check's failure is a cell of the table
                    cells = ["-"] * 5 + [f"failed: {type(exc).__name__}: {str(exc)[:160]}", "-"]
                    ok = False
                else:
                    psi_ok = cells[1] != "-" and float(cells[1]) >= 99.0
                    ok = ok and psi_ok and cells[3] == "equivalent" and cells[5].startswith("permuted")
            text = " | ".join(cell.replace("|", "/").replace("\n", " ") for cell in cells)
            print(f"| {name} | {coverage} | {converter} | {text} |", flush=True)
    if not args.only:
        ok = forms_table(dict(models(None))) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
