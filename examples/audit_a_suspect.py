"""Audit suspects against a reference: permuted only, or also perturbed, and how?

Run: ``python3 examples/audit_a_suspect.py``

Each suspect is put back in the reference's order first, then compared neuron by neuron. The
verdict says whether the function was kept (``permuted``: exit code 0) or changed
(``perturbed``, with the kind of change found: noise, quantization or pruning: exit code 1).
The last audit also writes a Markdown report.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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
    permuted = onnxlady.permute(reference, seed=5).model
    suspects = {
        "permuted": permuted,
        "permuted + noise": onnxlady.perturb(permuted, noise=0.1, seed=2).model,
        "permuted + pruned": onnxlady.perturb(permuted, prune=30).model,
    }
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="onnxlady-example-") as folder:
        for name, suspect in suspects.items():
            result = onnxlady.audit(reference, suspect, markdown=Path(folder) / "report.md")
            verdicts[name] = result.verdict
            print(f"{name}: verdict {result.verdict} (exit code {result.exit_code}): {result.summary}")
        report = (Path(folder) / "report.md").read_text()
        print(f"Markdown report: {len(report.splitlines())} lines")
    expected = {"permuted": "permuted", "permuted + noise": "perturbed", "permuted + pruned": "perturbed"}
    return 0 if verdicts == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
