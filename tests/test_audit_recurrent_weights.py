"""An LSTM/GRU/RNN's W and R are weights in the audit's evidence (held-out round 12, F6; session 13, h7 item 2).

The forensics counted only Conv/ConvTranspose/Gemm/MatMul weights; a recurrent layer's input and
recurrence weights were "other constants" (biases, normalisation). I.i.d. noise on every weight
of a recurrent model then read as "2 biases/normalisation constants changed" and the kind
``uncertain``; it is ``noise`` now, with W and R counted among the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures.recurrent import FIXTURES
from onnxlady import audit
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model


def _recurrent_weights(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node if node.op_type in ("LSTM", "GRU", "RNN") for name in node.input[1:3]}


def _noise_everywhere(model: onnx.ModelProto, omega: float = 0.05) -> onnx.ModelProto:
    """``perturb``'s noise on its weights, and the same noise on the recurrent W and R it leaves alone."""
    noisy = copy_model(model)
    perturb_model(noisy, noise=omega, seed=1)
    rng = np.random.default_rng(5)
    names = _recurrent_weights(model)
    for index, tensor in enumerate(noisy.graph.initializer):
        if tensor.name in names:
            values = numpy_helper.to_array(tensor).astype(np.float64)
            values = values + rng.standard_normal(values.shape) * omega * values.std()
            noisy.graph.initializer[index].CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    return noisy


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn", "lstm_bidirectional"])
def test_noise_on_every_weight_of_a_recurrent_model_is_noise(tmp_path: Path, name: str) -> None:
    source = FIXTURES[name](0)
    names = _recurrent_weights(source)
    assert len(names) == 2
    onnx.save(source, tmp_path / "reference.onnx")
    onnx.save(_noise_everywhere(source), tmp_path / "suspect.onnx")
    result = audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")
    assert result.verdict == "perturbed", result.summary
    perturbation = result.report.perturbation
    assert perturbation is not None and perturbation["kind"] == "noise", result.summary
    evidence = perturbation["evidence"]
    assert evidence["non_weight_constants_changed"] == []
    # W and R counted with the weights perturb touches (every one of them changed)
    assert evidence["changed_tensors"] == evidence["weight_tensors"] >= 2 + len(names)


def test_perturbs_own_noise_still_reads_noise(tmp_path: Path) -> None:
    """``perturb`` leaves W and R alone: unchanged weights, the kind still noise (the share changed says so)."""
    source = FIXTURES["lstm"](0)
    noisy = copy_model(source)
    perturb_model(noisy, noise=0.05, seed=1)
    onnx.save(source, tmp_path / "reference.onnx")
    onnx.save(noisy, tmp_path / "suspect.onnx")
    result = audit(tmp_path / "reference.onnx", tmp_path / "suspect.onnx")
    perturbation = result.report.perturbation
    assert result.verdict == "perturbed" and perturbation is not None and perturbation["kind"] == "noise", result.summary
    assert perturbation["evidence"]["weight_tensors"] == perturbation["evidence"]["changed_tensors"] + 2
