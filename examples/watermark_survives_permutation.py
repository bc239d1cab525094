"""A white-box watermark scrambled by a permutation, and restored by resync.

Run: ``python3 examples/watermark_survives_permutation.py``

The mark (Uchida et al.) lives in the mean of one Conv kernel over its output filters: permuting
the neurons that feed that layer scrambles about half the bits, which is how a thief would hide
a stolen model. Resynchronizing the stolen copy to the marked model puts the neurons back in
order and the mark reads again without a single wrong bit.
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
    marked = onnxlady.embed_watermark(build_model(), "block.conv2.conv", bits=64, seed=42)
    print(f"embedded {marked.bits} bits in {marked.layer}: weight change {100 * marked.relative_weight_change:.2f} %, "
          f"output change {100 * marked.relative_output_change:.2f} %")
    stolen = onnxlady.permute(marked.model, seed=9).model
    scrambled = onnxlady.extract_watermark(stolen, marked.key).bit_error_rate
    print(f"bit error rate after permutation: {100 * scrambled:.1f} %")
    restored = onnxlady.resync(marked.model, stolen).model
    recovered = onnxlady.extract_watermark(restored, marked.key).bit_error_rate
    print(f"bit error rate after resync: {100 * recovered:.1f} %")
    return 0 if scrambled > 0.2 and recovered == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
