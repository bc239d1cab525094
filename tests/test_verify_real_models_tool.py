"""``python3 -m tools.verify_real_models``: its rows, its hollow-EQUIVALENT check and its exit status."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx

from fixtures import FIXTURES
from fixtures.dynamic import build_vad_like
from onnxlady.testing import GraphBuilder
from tools import verify_real_models


def _saturated_mlp() -> onnx.ModelProto:
    """A Sigmoid output saturated on every input: verify must judge it on the logits."""
    b = GraphBuilder("saturated", seed=0)
    x = b.input("input", [1, 4])
    logits = b.mul(b.gemm(b.relu(b.gemm(x, 8, name="fc1")), 4, name="fc2"), np.full((1,), 1e4, np.float32))
    return b.build(b.sigmoid(logits, name="out"))


def test_rows_verdicts_and_exit_status(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(FIXTURES["vgg"](0), str(folder / "vgg.onnx"))
    onnx.save(build_vad_like(0), str(folder / "vad.onnx"))
    onnx.save(_saturated_mlp(), str(folder / "saturated.onnx"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = verify_real_models.main(["--models", str(folder), "--no-fixtures", "--json"])
    document = json.loads(out.getvalue())
    rows = {row["model"]: row for row in document["rows"]}
    assert code == 0 and document["summary"]["hollow_equivalent"] == 0
    # The VAD-like model cannot run on the default 64 samples: the row says which --shape to give.
    assert "--shape audio:1xN" in rows["vad"]["error"]
    vgg = rows["vgg"]
    assert vgg["itself"]["verdict"] == vgg["permuted"]["verdict"] == "equivalent"
    assert vgg["wrong"]["verdict"] == "not-equivalent" and vgg["inputs"][0]["rule"] == "uniform"
    saturated = rows["saturated"]
    assert saturated["itself"]["verdict"] == "equivalent"
    assert [h["rescued_by_input"] for h in saturated["itself"]["hollow"]] == [True]
    assert saturated["wrong"]["verdict"] == "not-equivalent"
    table = verify_real_models.table(document["rows"])
    assert "| vgg |" in table and "judged on its input" in table


def test_an_equivalent_verdict_on_a_hollow_output_is_flagged() -> None:
    """The tool judges verify's reports itself: EQUIVALENT with an unrescued hollow output is counted."""
    from onnxlady import VerifyResult
    from onnxlady._verify._report import OutputComparison, VerifyReport

    def compared(name: str, degenerate: str | None, kind: str = "output", stands_for: str | None = None):
        return OutputComparison(name, (4,), "float32", 0.0, 0.0, 0.0, 1.0, 0, 4, True, degenerate, kind,
                                "Sigmoid", stands_for)  # fmt: skip

    def report(outputs, squash_inputs=()) -> VerifyResult:
        return VerifyResult(VerifyReport("cpu", "CPUExecutionProvider", None, 1e-4, 1e-3, 1, 0, {"x": (1, 4)},
                                         tuple(outputs), "equivalent", (), tuple(squash_inputs)))  # fmt: skip

    saturated = compared("y", "saturated: ...")
    assert verify_real_models._judged(report([saturated]))["hollow_equivalent"] is True
    rescued = report([saturated], [compared("logits", None, "squash-input", "y")])
    assert verify_real_models._judged(rescued)["hollow_equivalent"] is False
    hollow_logits = report([saturated], [compared("logits", "constant: ...", "squash-input", "y")])
    assert verify_real_models._judged(hollow_logits)["hollow_equivalent"] is True
    nan = report([compared("y", "non-finite values (NaN or Inf) in the reference output")])
    assert verify_real_models._judged(nan)["hollow_equivalent"] is True
    row = {
        "itself": verify_real_models._judged(nan),
        "permuted": verify_real_models._judged(rescued),
        "wrong": {"verdict": "not-equivalent"},
    }
    counts = verify_real_models.summary([row])
    assert counts["hollow_equivalent"] == 1 and counts["equivalent"] == 2
