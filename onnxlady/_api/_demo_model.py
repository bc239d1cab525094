"""The small CNN classifier that the built-in demo permutes.

One model that exercises every kind of channel coupling the tool handles on real conv nets:
Conv + unfolded BatchNormalization + Relu, an identity residual Add, a downsampling residual
block with a strided 1x1 shortcut, a MobileNetV2 inverted residual (depthwise conv, Clip 0..6),
a squeeze-and-excitation Mul gate, a channel Concat of two branches and a
GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm head. About 120k parameters, built from a
seed in a few milliseconds, so the demo needs no download.
"""

from __future__ import annotations

import onnx

from onnxlady.testing._builder import (
    GraphBuilder,
    basic_block,
    conv_bn_relu,
    inverted_residual,
    se_gate,
)

NUM_CLASSES: int = 10
INPUT_NAME: str = "image"
OUTPUT_NAME: str = "logits"
INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 32, 32)


def build_demo_model(seed: int = 0) -> onnx.ModelProto:
    """Build the demo classifier: input ``image`` [1, 3, 32, 32] -> output ``logits`` [1, 10]."""
    b = GraphBuilder("onnxlady_demo", seed)
    x = b.input(INPUT_NAME, INPUT_SHAPE)
    x = conv_bn_relu(b, x, 24, 3, name="stem")                     # [1, 24, 32, 32]
    x = basic_block(b, x, 24, name="stage1")                       # identity residual
    x = basic_block(b, x, 48, stride=2, name="stage2")             # [1, 48, 16, 16], 1x1 shortcut
    x = inverted_residual(b, x, expand=96, out_channels=48, name="stage3")
    x = se_gate(b, x, squeeze=12, name="stage3.se")
    x = _two_branch_concat(b, x, name="stage4")                    # [1, 64, 16, 16]
    x = conv_bn_relu(b, x, 64, 3, stride=2, name="stage5")         # [1, 64, 8, 8]
    with b.scope("head"):
        x = b.flatten(b.global_avg_pool(x, name="pool"), name="flatten")
        x = b.relu(b.gemm(x, 128, name="fc1"), name="relu")
    # The last Gemm is named after the graph output, so its tensor is "logits".
    logits = b.gemm(x, NUM_CLASSES, name=OUTPUT_NAME, gain=1.0)
    return b.build(logits)


def _two_branch_concat(b: GraphBuilder, x: str, *, name: str) -> str:
    """A 1x1 branch and a 3x3 branch concatenated on the channel axis."""
    with b.scope(name):
        left = b.relu(b.conv(x, 32, 1, name="branch1x1"), name="branch1x1_relu")
        right = b.relu(b.conv(x, 32, 3, name="branch3x3"), name="branch3x3_relu")
        return b.concat([left, right], axis=1, name="concat")
