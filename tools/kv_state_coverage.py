"""Producer-neuron coverage of decoders with a KV cache, with and without ``permute --kv-state`` (issue 12).

For the genai builder's fp32 and int4 builds of the LLaMA-style decoder in ``.cache/deployment``
(``tools.export_deployment_models --genai``) and the same decoder's plain torch.onnx export: the
permutable share of producer neurons (``inspect``) without and with the KV caches as state, the
state pairs moved, and over seven permutation seeds how many ``permute --kv-state`` results
``verify`` finds equivalent (two decoding steps, each model fed its own cache; the largest error)
and how many wrong permutations of them (one producer's rows moved alone) it catches; the
analysis time is the median of ``--repeat`` runs.

    python3 -m tools.kv_state_coverage [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import onnx

from onnxlady import analyze, load_model, permute, verify
from onnxlady._analysis._state import state_pairs
from onnxlady.testing import copy_model, permute_producer_only

DEPLOYMENT = Path(".cache") / "deployment"
#: Permutation seeds: each is permuted, verified, and a wrong permutation of it checked.
SEEDS = (1, 2, 3, 4, 5, 6, 7)
MODELS = {
    "llama (torch.onnx)": DEPLOYMENT / "llama.onnx",
    "genai fp32": DEPLOYMENT / "genai_fp32" / "model.onnx",
    "genai int4": DEPLOYMENT / "genai_int4" / "model.onnx",
    # The same int4 build computing in fp32: MatMulNBits' accuracy_level 4 quantizes its input to
    # int8 on the fly, so a last-bit difference from a permuted sum order can flip one rounding.
    "genai int4, accuracy_level 0": DEPLOYMENT / "genai_int4" / "model.onnx",
}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Cache shapes with 8 past positions; a symbolic head dim (the builder's ``kv_cache_dim``) from the attention."""
    attributes = {a.name: int(a.i) for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                  if a.name in ("num_heads", "kv_num_heads")}  # fmt: skip
    declared = {value.name: value.type.tensor_type.shape.dim for value in model.graph.input}
    shapes: dict[str, tuple[int, ...]] = {}
    for pair in state_pairs(model):
        dims = declared[pair.input]
        head = int(dims[3].dim_value) or _head_size(model, attributes["num_heads"], attributes["kv_num_heads"])
        shapes[pair.input] = (1, int(dims[1].dim_value), 8, head)
    return shapes


def _head_size(model: onnx.ModelProto, num_heads: int, kv_heads: int) -> int:
    """The head size of a genai build: its packed QKV width / (heads + 2 KV heads)."""
    analysis = analyze(model)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            shape = analysis.graph.shape(node.input[0]) or ()
            width = shape[-1] if shape else None
            if isinstance(width, int):
                return width // (num_heads + 2 * kv_heads)
    raise SystemExit("no GroupQueryAttention with a known query width")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| model | coverage % plain | coverage % --kv-state | state pairs moved | verify (2 steps) | wrong caught "
          "| analysis s (median) |")
    print("|---|---|---|---|---|---|---|")
    for name, path in MODELS.items():
        if not path.exists():
            print(f"| {name} | missing: {path} (run tools.export_deployment_models --genai) | | | | | |")
            continue
        model = load_model(path).model
        if "accuracy_level 0" in name:
            for node in model.graph.node:
                for attribute in node.attribute:
                    if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                        attribute.i = 0
        coverage = []
        for kv_state in (False, True):
            summary = analyze(model, kv_state=kv_state).summary()
            coverage.append(100.0 * float(summary["permutable_fraction"]))  # type: ignore[arg-type]
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            analyze(model, kv_state=True)
            times.append(time.perf_counter() - start)
        shapes = _shapes(model)
        verdicts, errors, caught, moved = [], [], 0, 0
        for seed in SEEDS:
            result = permute(model, seed=seed, kv_state=True)
            moved = len(result.key.extra.get("kv_state", []))
            report = verify(model, result.model, provider="cpu", shape=shapes)
            verdicts.append(report.verdict)
            errors.append(report.max_abs_error)
            wrong = copy_model(result.model)
            permute_producer_only(wrong, analyze(wrong, kv_state=True))
            caught += verify(model, wrong, provider="cpu", shape=shapes).verdict == "not-equivalent"
        equivalent = sum(verdict == "equivalent" for verdict in verdicts)
        print(f"| {name} | {coverage[0]:.1f} | {coverage[1]:.1f} | {moved} of {len(state_pairs(model))} | "
              f"{equivalent}/{len(SEEDS)} equivalent (max abs err {max(errors):.2g}) | {caught}/{len(SEEDS)} | "
              f"{statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
