"""Resync and audit of GroupNorm's two channel factors (held-out round 10, finding F7).

GroupNorm(G, C) exported by torch's legacy exporter is ``Reshape [1, G, -1] ->
InstanceNormalization(ones[G], zeros[G]) -> Reshape back -> Mul gamma -> Add beta``. The analysis
splits the C channels into a group-level factor ``p (x) I_k`` (which GroupNorm group) and a
within-group factor ``I_G (x) p``. The group-level factor's only slice aligned in the first pass
was the InstanceNormalization's scale and shift, ones and zeros: every neuron alike, so the
match was a tie (Psi 37.5 %, margin 0) and a model permuted by onnxlady alone was audited
``modified``. Slices that cannot tell neurons apart no longer keep the informative ones out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxlady import analyze, audit, perturb, resync, verify_models
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

CHANNELS, SIDE = 32, 8


def _group_norm_model(groups: int) -> onnx.ModelProto:
    b = GraphBuilder(f"group_norm_{groups}", 0)
    x = b.conv(b.input("input", (1, 3, SIDE, SIDE)), CHANNELS, 3, name="conv_in", gain=1.0)
    with b.scope("norm"):
        t = b.reshape(x, [1, groups, -1], name="group")
        scale = b.param("norm.ones", np.ones(groups, np.float32))
        shift = b.param("norm.zeros", np.zeros(groups, np.float32))
        t = b.custom("InstanceNormalization", "", [t, scale, shift], (1, groups, CHANNELS // groups * SIDE * SIDE),
                     name="instance", epsilon=1e-5)  # fmt: skip
        t = b.reshape(t, [1, CHANNELS, SIDE, SIDE], name="ungroup")
        t = b.mul(t, b.uniform((CHANNELS, 1, 1), 0.5, 1.5), name="gamma", const_name="value")
        t = b.add(t, b.small_normal((CHANNELS, 1, 1), 0.2), name="beta", const_name="value")
    x = b.relu(t, name="act")
    return b.build(b.global_avg_pool(b.conv(x, 6, 3, name="conv_out", gain=1.0), name="pool"))


def _saved(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("groups", [8, 4])
def test_a_permuted_group_norm_model_resyncs_and_audits_permuted(tmp_path: Path, groups: int) -> None:
    source = _group_norm_model(groups)
    analysis = analyze(source)
    sizes = sorted(g.size for g in analysis.groups if g.permutable)
    assert groups in sizes and CHANNELS // groups in sizes  # the two factors
    permuted, _, perms, key = permute_copy(source, 7)
    assert perms and verify_models(source, permuted).equivalent
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    reference = _saved(source, tmp_path / "reference.onnx")
    suspect = _saved(permuted, tmp_path / "suspect.onnx")
    key_path = tmp_path / "true.key.json"
    key_path.write_text(json.dumps(key.to_json()))
    assert resync(reference, suspect, output=tmp_path / "resynced.onnx", true_key=key_path).psi == pytest.approx(100.0)
    assert audit(reference, suspect).verdict == "permuted"
    noisy = tmp_path / "noisy.onnx"
    perturb(suspect, output=noisy, noise=0.1, seed=1)
    assert resync(reference, noisy, output=tmp_path / "resynced_noisy.onnx", true_key=key_path).psi == pytest.approx(100.0)
