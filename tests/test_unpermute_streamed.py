"""Unpermute to a file restores each weight as the writer writes it (issue 15).

Before, an inline model was restored in place and serialized whole (about 4x the model in memory);
the streaming writer writes protobuf's own bytes, so each large weight is restored as it is written
and the file is still the source's byte for byte. A model stored inline stays inline: the streamed
path once wrote its weights to an external data file.
"""

from __future__ import annotations

from pathlib import Path

import onnx

import onnxlady
from fixtures.large import build_large_model
from onnxlady._transforms._permute import _DEFER_BYTES


def test_an_inline_model_is_restored_streamed_byte_for_byte(tmp_path: Path) -> None:
    source = tmp_path / "source.onnx"
    onnx.save(build_large_model(2), source)
    sizes = [t.raw_data and len(t.raw_data) for t in onnx.load(source).graph.initializer]
    assert max(sizes) >= _DEFER_BYTES  # some weights take the streamed path
    permuted = onnxlady.permute(source, output=tmp_path / "p.onnx", seed=3)
    assert (tmp_path / "p.onnx").read_bytes() != source.read_bytes()
    restored = onnxlady.unpermute(tmp_path / "p.onnx", permuted.key_path, output=tmp_path / "u.onnx")
    assert (tmp_path / "u.onnx").read_bytes() == source.read_bytes()
    assert restored.to_json()["output_identical_to_source_file"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx", "p.onnx.key.json", "source.onnx", "u.onnx"]


def _edited_keys(key_path: Path) -> dict[str, dict[str, object]]:
    import json

    key = json.loads(key_path.read_text())
    dropped = json.loads(json.dumps(key))
    dropped["tensors"] = dropped["tensors"][1:]
    swapped = json.loads(json.dumps(key))
    group = next(g for g in swapped["groups"] if g["size"] > 2)
    group["perm"][0], group["perm"][1] = group["perm"][1], group["perm"][0]
    return {"dropped": dropped, "swapped": swapped}


def test_an_edited_key_is_refused_and_writes_nothing(tmp_path: Path, capsys) -> None:
    """Held-out: a key with a tensor entry dropped (or two entries of a perm swapped) restored a broken
    model with exit 0 and "the model was changed after it was permuted", though the model was the very
    file the key recorded."""
    import json

    from onnxlady.cli import main

    for size, name in ((2, "large"), (0, "small")):  # streamed weights, and a model restored in memory
        source = tmp_path / f"{name}.onnx"
        model = build_large_model(size) if size else __import__("fixtures").FIXTURES["resnet"](0)
        onnx.save(model, source)
        permuted = onnxlady.permute(source, output=tmp_path / f"{name}.p.onnx", seed=3)
        for kind, edited in _edited_keys(Path(permuted.key_path)).items():
            key = tmp_path / f"{name}.{kind}.key.json"
            key.write_text(json.dumps(edited))
            out = tmp_path / f"{name}.{kind}.u.onnx"
            assert main(["unpermute", str(tmp_path / f"{name}.p.onnx"), "--key", str(key), "-o", str(out)]) == 2
            err = capsys.readouterr().err
            assert "the key was edited or is corrupt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
            assert not out.exists() and not Path(f"{out}.data").exists()
        # The key as written still restores the file byte for byte.
        out = tmp_path / f"{name}.u.onnx"
        assert main(["unpermute", str(tmp_path / f"{name}.p.onnx"), "--key", str(permuted.key_path), "-o", str(out)]) == 0
        assert out.read_bytes() == source.read_bytes()
