"""Resync refuses a node-for-node copy wired otherwise than the reference (held-out round 17, F8).

A twin's tensors are re-ordered as the reference's channels move. A suspect whose node reads
another tensor (a graph listed out of order and made shape-inconsistent; a residual moved onto
a tensor whose channels move otherwise) would be written re-ordered into a file that does not
load, or that computes something else than the suspect: refused with one line, exit 2, nothing
written. The audit of the same suspect still names the edit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxlady
from fixtures.models import build_resnet
from onnxlady.cli import main


def _rewired(model: onnx.ModelProto, node: str, slot: int, tensor: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    (target,) = [n for n in copy.graph.node if n.name == node]
    target.input[slot] = tensor
    return copy


def _resync(tmp_path: Path, capsys, reference: onnx.ModelProto, suspect: onnx.ModelProto) -> tuple[int, list[str]]:
    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(suspect, tmp_path / "sus.onnx")
    code = main(["resync", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "-o", str(tmp_path / "out.onnx"), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_an_unsorted_inconsistent_copy_is_refused(tmp_path, capsys) -> None:
    reference = build_resnet(0)
    # layer2's first conv (16 input channels) reads the shortcut conv's 32 channels, listed after it.
    suspect = _rewired(reference, "layer2.conv1.conv", 0, "layer2.shortcut.conv")
    try:
        ort.InferenceSession(suspect.SerializeToString(), providers=["CPUExecutionProvider"])
        loads = True
    except Exception:  # ONNX Runtime's own refusal: the shapes do not agree
        loads = False
    assert not loads
    code, err = _resync(tmp_path, capsys, reference, suspect)
    assert code == 2 and len(err) == 1, err
    assert "layer2.conv1.conv" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_residual_moved_across_groups_is_refused(tmp_path, capsys) -> None:
    reference = build_resnet(0)
    permuted = onnxlady.permute(reference, seed=1).model
    # layer1's residual Add reads conv1's activation (same shape, another channel group) instead of the stem's.
    suspect = _rewired(permuted, "layer1.add", 1, "layer1.conv1.relu")
    code, err = _resync(tmp_path, capsys, reference, suspect)
    assert code == 2 and len(err) == 1, err
    assert "layer1.add" in err[0] and "moves otherwise" in err[0]
    assert not (tmp_path / "out.onnx").exists()
    # What it would have written (the twin re-ordered regardless) computes something else than the suspect.
    written = onnxlady._resync._entry.resync_model(reference, suspect).model
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for m in (suspect, written)
    ]
    assert np.abs(outputs[0]).max() > 0.1 and not np.allclose(outputs[0], outputs[1], atol=1e-3)
    # The audit, which writes nothing, still names the edit.
    onnx.save(reference, tmp_path / "ref.onnx")
    assert main(["audit", str(tmp_path / "ref.onnx"), str(tmp_path / "sus.onnx"), "--json", "--quiet"]) == 1
    assert "layer1.add" in json.loads(capsys.readouterr().out)["summary"]


def test_a_copy_wired_as_the_reference_is_resynced(tmp_path, capsys) -> None:
    reference = build_resnet(0)
    permuted = onnxlady.permute(reference, seed=1)
    # Renamed graph input: read under another name, the same channels (no move): resynced.
    suspect = onnx.ModelProto()
    suspect.CopyFrom(permuted.model)
    suspect.graph.input[0].name = "image"
    for node in suspect.graph.node:
        node.input[:] = ["image" if name == "input" else name for name in node.input]
    code, err = _resync(tmp_path, capsys, reference, suspect)
    assert code == 0, err
    written = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "out.onnx").graph.initializer}
    assert all(np.array_equal(onnx.numpy_helper.to_array(t), written[t.name]) for t in reference.graph.initializer)
