"""Helpers for tests of onnxlady and of code built on it (like ``numpy.testing``).

Two parts:

- a deterministic model builder: :class:`GraphBuilder` writes an ONNX graph the way a PyTorch
  ``forward`` reads (one method per layer, shapes tracked, weights drawn from one seeded
  generator so the same seed gives byte-identical models), with the block helpers
  :func:`conv_bn_relu`, :func:`basic_block`, :func:`inverted_residual` and :func:`se_gate`;
  the models use opset :data:`OPSET` and IR version :data:`IR_VERSION`;
- helpers that tests and the measurement tools share: :func:`copy_model` (a deep copy, since
  onnxlady's transforms rewrite a model in place), :func:`constant_bytes` (every constant of a
  graph, serialised, to compare models bit for bit), :func:`permute_copy` (a permuted copy with
  its analysis, permutations and key) and :func:`permute_producer_only` (a *wrong* permutation:
  one producer's rows swapped, its consumers left alone, which an equivalence check must catch);
  :func:`index_maps` and :func:`group_at` say which group moves an axis of a tensor, and how;
  :data:`PRODUCER_ROLES` names the weight roles whose rows are neurons; :func:`tensor_holders`
  gives every constant of a graph (initializer or ``Constant`` node) by name, to edit in place
  (plant an attack, break a weight).

Example::

    from onnxlady.testing import GraphBuilder, conv_bn_relu, permute_copy

    b = GraphBuilder("tiny", seed=0)
    x = b.input("input", [1, 3, 8, 8])
    y = b.flatten(b.global_avg_pool(conv_bn_relu(b, x, 8, name="stem")))
    model = b.build(b.gemm(y, 4, name="output"))
    permuted, analysis, perms, key = permute_copy(model, seed=1)  # the stem's 8 channels move
"""

from onnxlady._io._tensors import tensor_holders
from onnxlady.testing._builder import (
    IR_VERSION,
    OPSET,
    GraphBuilder,
    basic_block,
    conv_bn_relu,
    inverted_residual,
    se_gate,
)
from onnxlady.testing._helpers import (
    PRODUCER_ROLES,
    constant_bytes,
    copy_model,
    group_at,
    index_maps,
    permute_copy,
    permute_producer_only,
)

__all__ = [
    "IR_VERSION",
    "OPSET",
    "PRODUCER_ROLES",
    "GraphBuilder",
    "basic_block",
    "constant_bytes",
    "conv_bn_relu",
    "copy_model",
    "group_at",
    "index_maps",
    "inverted_residual",
    "permute_copy",
    "permute_producer_only",
    "se_gate",
    "tensor_holders",
]
