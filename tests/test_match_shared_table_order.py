"""One embedding table read by two branches, the branches reordered: the readers pair by connections.

Held-out round 11, finding F1: a BART (token embedding shared by encoder and decoder) through
ONNX Runtime's offline optimizer at EXTENDED or ALL was refused as "different models, 61.1 %".
The optimizer writes the decoder's nodes first; the two Gathers of the shared table hold the
same numbers, so content cannot tell them apart, and the alignment paired the encoder's Gather
with the decoder's. Every layer each feeds then counted as a lost connection. The readers are
now re-paired by the layers they connect to; the refusal, where one is still due, names the
share that fell short instead of "no weight of either model has a counterpart".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures.contrib import ort_optimized
from fixtures.conversions import to_float16
from onnxlady import OnnxladyError, analyze, audit, match, verify_models
from onnxlady._resync import _site_pairing
from onnxlady.testing import GraphBuilder, copy_model, permute_copy, permute_producer_only

SEQ, VOCAB, WIDTH, HIDDEN = 5, 24, 16, 32
BRANCHES = ("enc", "dec")


def _two_branches() -> onnx.ModelProto:
    """Two branches (encoder, decoder) each reading one shared token table, then a LayerNorm and an MLP."""
    b = GraphBuilder("shared_table", 0)
    table = b.param("shared.weight", b.small_normal((VOCAB, WIDTH), std=1.0))
    outputs = []
    for branch in BRANCHES:
        ids = b.input(f"{branch}_ids", (1, SEQ), onnx.TensorProto.INT64)
        x = b.layer_norm(b.gather(table, ids, name=f"{branch}_embed"), name=f"{branch}_ln")
        x = b.relu(b.matmul(x, HIDDEN, name=f"{branch}_fc1"), name=f"{branch}_act")
        outputs.append(b.matmul(x, WIDTH, name=f"{branch}_out"))
    return b.build(outputs)


def _encoder_decoder() -> onnx.ModelProto:
    """BART's embedding in small: a shared token table and learned positions per branch.

    Each branch adds its positions, then a LayerNorm, an MLP and a residual LayerNorm; the
    decoder reads the encoder's output. ONNX Runtime at EXTENDED folds each positional Gather into a constant, fuses the Add and
    LayerNorm into SkipLayerNormalization and writes the decoder's embedding first.
    """
    b = GraphBuilder("encoder_decoder", 0)
    table = b.param("shared.weight", b.small_normal((VOCAB, WIDTH), std=1.0))
    encoded = ""
    for branch in BRANCHES:
        ids = b.input(f"{branch}_ids", (1, SEQ), onnx.TensorProto.INT64)
        positions = b.param(f"{branch}_positions", np.arange(2, SEQ + 2, dtype=np.int64)[None, :])
        position = b.gather(b.param(f"{branch}_pos.weight", b.small_normal((SEQ + 2, WIDTH), std=1.0)), positions,
                            name=f"{branch}_pos")  # fmt: skip
        x = b.add(b.gather(table, ids, name=f"{branch}_embed"), position, name=f"{branch}_sum")
        x = b.layer_norm(x, name=f"{branch}_ln")
        if encoded:
            x = b.add(x, encoded, name="cross")
        hidden = b.relu(b.matmul(x, HIDDEN, name=f"{branch}_fc1"), name=f"{branch}_act")
        x = b.layer_norm(b.add(x, b.matmul(hidden, WIDTH, name=f"{branch}_fc2"), name=f"{branch}_res"),
                         name=f"{branch}_ln2")  # fmt: skip
        encoded = b.matmul(x, WIDTH, name=f"{branch}_out")
    return b.build(encoded)


def _decoder_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the decoder's nodes written first (as ONNX Runtime does), in float16.

    float16 is a conversion: the audit then pairs sites across forms rather than node for node.
    """
    reordered = copy_model(model)
    nodes = list(reordered.graph.node)
    first = [node for node in nodes if node.name.startswith("dec_")]
    del reordered.graph.node[:]
    reordered.graph.node.extend(first + [node for node in nodes if node not in first])
    onnx.checker.check_model(reordered)
    return to_float16(reordered)


def _saved(tmp_path: Path, reference: onnx.ModelProto, suspect: onnx.ModelProto, name: str = "suspect") -> tuple[Path, Path]:
    paths = tmp_path / "reference.onnx", tmp_path / f"{name}.onnx"
    onnx.save(reference, paths[0])
    onnx.save(suspect, paths[1])
    return paths


def test_the_shared_table_pairs_reader_for_reader(tmp_path: Path) -> None:
    source = _two_branches()
    suspect = _decoder_first(source)
    assert verify_models(source, suspect, atol=1e-2).equivalent
    result = match(*_saved(tmp_path, source, suspect))
    assert result.details.confidence == pytest.approx(1.0)
    gathers = [p for p in result.details.site_pairs if "embed" in p.reference]
    assert len(gathers) == 2
    for pair in gathers:  # each branch's reader with the same branch's
        assert pair.reference.split("'")[1] == pair.suspect.split("'")[1], pair


@pytest.mark.parametrize("level", ["extended", "all"])
def test_onnx_runtime_extended_keeps_the_model_and_its_permuted_copy(tmp_path: Path, level: str) -> None:
    pytest.importorskip("onnxruntime")
    source = _encoder_decoder()
    optimized = ort_optimized(source, level)
    kinds = [node.op_type for node in optimized.graph.node]
    assert "SkipLayerNormalization" in kinds and kinds.index("Gather") < kinds.index("Relu")
    assert verify_models(source, optimized, atol=1e-4).equivalent
    result = audit(*_saved(tmp_path, source, optimized))
    assert result.verdict == "converted", result.summary
    permuted, _, perms, _ = permute_copy(source, 5)
    assert perms and verify_models(source, permuted).equivalent
    assert audit(*_saved(tmp_path, source, ort_optimized(permuted, level), "permuted")).verdict == "permuted"
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    caught = audit(*_saved(tmp_path, source, ort_optimized(wrong, level), "wrong"))
    assert caught.exit_code != 0 and caught.verdict not in ("converted", "identical", "permuted"), caught.summary


def test_the_untouched_model_reordered_is_converted(tmp_path: Path) -> None:
    source = _two_branches()
    result = audit(*_saved(tmp_path, source, _decoder_first(source)))
    assert result.verdict == "converted", result.summary
    assert result.exit_code == 0


def test_a_permuted_copy_reordered_is_permuted(tmp_path: Path) -> None:
    source = _two_branches()
    permuted, _, perms, _ = permute_copy(source, 3)
    assert perms and verify_models(source, permuted).equivalent
    result = audit(*_saved(tmp_path, source, _decoder_first(permuted)))
    assert result.verdict == "permuted", result.summary


def test_a_wrong_permutation_reordered_is_caught(tmp_path: Path) -> None:
    source = _two_branches()
    wrong = copy_model(source)
    permute_producer_only(wrong, analyze(wrong))
    assert not verify_models(source, wrong).equivalent
    result = audit(*_saved(tmp_path, source, _decoder_first(wrong)))
    assert result.exit_code != 0 and result.verdict not in ("converted", "identical", "permuted"), result.summary


def test_the_refusal_names_the_share_that_fell_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the re-pairing the readers cross: the refusal says connections, not "no counterpart"."""
    monkeypatch.setattr(_site_pairing, "_settle_by_connections", lambda *args, **kwargs: None)
    source = _two_branches()
    with pytest.raises(OnnxladyError) as refused:
        audit(*_saved(tmp_path, source, _decoder_first(source)))
    message = str(refused.value)
    assert "different models" in message and "connections between paired layers" in message, message
    assert "no weight of either model has a counterpart" not in message
