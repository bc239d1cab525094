"""Put a permuted and then perturbed copy of a model back in the original's neuron order.

Run: ``python3 examples/resync_a_perturbed_copy.py``

This is *Find the Lady*'s experiment in a few lines, all in memory: permute a model, add
Gaussian noise to its weights (Omega = 0.5, i.e. half of each tensor's standard deviation),
then recover the original order by matching neurons on their weights. Psi is the percentage of
permuted neurons put back in place; the re-ordered copy computes exactly what the suspect does.
"""

from __future__ import annotations

import onnx

import onnxlady
from onnxlady.testing import GraphBuilder, basic_block, conv_bn_relu, se_gate


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
    reference = build_model()
    permuted = onnxlady.permute(reference, seed=3)  # the reference itself is never changed
    suspect = onnxlady.perturb(permuted.model, noise=0.5, seed=11)
    worst = max(change.relative_l2_change for change in suspect.changes)
    print(f"suspect: {permuted.permuted_neurons} neurons permuted, noise on {len(suspect.tensors)} weight tensors "
          f"(relative change up to {worst:.2f})")

    for method in ("argmax", "hungarian"):
        result = onnxlady.resync(reference, suspect.model, method=method, true_key=permuted.key)
        print(f"{method}: Psi = {result.psi:.2f} %, {result.ambiguous} ambiguous neurons")

    check = onnxlady.verify(suspect.model, result.model, provider="cpu")
    print(f"resynced copy equivalent to the suspect: {check.equivalent}")
    return 0 if result.psi == 100.0 and check.equivalent else 1


if __name__ == "__main__":
    raise SystemExit(main())
