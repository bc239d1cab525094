"""Permute a model's neurons, check the result computes the same function, and restore it bit for bit.

Run: ``python3 examples/permute_and_verify.py`` (writes into a temporary folder).

The model is a small CNN built with ``onnxlady.testing`` (a stem, a downsampling residual block,
a squeeze-and-excitation gate, a two-layer head), saved to a file as a real model would be.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

import onnxlady
from onnxlady.testing import GraphBuilder, basic_block, conv_bn_relu, copy_model, permute_producer_only, se_gate


def build_model(seed: int = 0) -> onnx.ModelProto:
    """A small image classifier: input ``image`` [1, 3, 32, 32], output ``logits`` [1, 10]."""
    b = GraphBuilder("example_cnn", seed)
    x = b.input("image", (1, 3, 32, 32))
    x = conv_bn_relu(b, x, 16, 3, name="stem")
    x = basic_block(b, x, 32, stride=2, name="block")
    x = se_gate(b, x, squeeze=8, name="se")
    x = b.flatten(b.global_avg_pool(x, name="pool"), name="flatten")
    x = b.relu(b.gemm(x, 64, name="fc1"), name="fc1_relu")
    return b.build(b.gemm(x, 10, name="logits", gain=1.0))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="onnxlady-example-") as folder:
        model_path = Path(folder) / "model.onnx"
        onnxlady.save_model(build_model(), model_path)

        # 1. Which neurons can move together, and which cannot (and why).
        inspected = onnxlady.inspect(model_path)
        summary = inspected.summary
        print(f"groups: {summary['groups']}, permutable: {summary['permutable_groups']}, "
              f"permutable producer neurons: {100 * summary['permutable_fraction']:.1f} %")

        # 2. Permute file to file (streamed), with the equivalence check run on the CPU.
        permuted = onnxlady.permute(model_path, output=Path(folder) / "shuffled.onnx", seed=7, verify=True,
                                    provider="cpu")
        print(f"permuted {len(permuted.permuted_groups)} groups ({permuted.permuted_neurons} neurons) "
              f"-> {permuted.output.name}, key {permuted.key_path.name}")
        print(f"equivalent: {permuted.equivalent} (max abs error {permuted.verify.max_abs_error:.2e})")

        # 3. A wrong permutation (one conv's rows swapped, its consumers left alone) must be caught.
        wrong = copy_model(permuted.model)
        permute_producer_only(wrong, onnxlady.analyze(wrong))
        caught = onnxlady.verify(model_path, wrong, provider="cpu")
        print(f"wrong permutation caught: {not caught.equivalent}")

        # 4. The key restores the original, bit for bit.
        restored = onnxlady.unpermute(permuted.output, permuted.key_path, output=Path(folder) / "restored.onnx")
        print(f"restored bit-identical: {restored.weights_identical_to_source}, "
              f"same file: {restored.output_identical_to_source_file}")
        ok = permuted.equivalent and not caught.equivalent and restored.weights_identical_to_source
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
