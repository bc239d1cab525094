"""Weights read inside If branches and Loop bodies are perturbed too.

``perturb --noise`` changed only the main graph's weights: a model whose layers sit in an ``If``
branch or a ``Loop`` body kept them, and its audit read "2/4 weight tensors changed, kind
uncertain" instead of noise. The branch weights are now perturbed, in memory (a streaming
writer's overrides reach only the main graph's tensors) and written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures.recurrent import FIXTURES
from onnxlady import audit, perturb
from onnxlady._io._tensors import tensor_holders


@pytest.mark.parametrize("name", ["if_body", "loop_body"])
def test_subgraph_weights_are_perturbed_and_written(tmp_path: Path, name: str) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(FIXTURES[name](0), source)
    output = tmp_path / "noisy.onnx"
    result = perturb(source, output=output, noise=0.05, seed=2)
    main_graph = tensor_holders(onnx.load(source), subgraphs=False)
    inner = [change.tensor for change in result.report.changes if change.tensor not in main_graph]
    assert len(inner) >= 2, [change.tensor for change in result.report.changes]
    before, after = tensor_holders(onnx.load(source)), tensor_holders(onnx.load(output))
    for tensor in inner:
        assert not np.array_equal(numpy_helper.to_array(before[tensor]), numpy_helper.to_array(after[tensor])), tensor
    verdict = audit(source, output)
    assert verdict.verdict == "perturbed", verdict.summary
