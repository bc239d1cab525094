"""``onnxlady.embed_watermark`` and ``onnxlady.extract_watermark``: a white-box (Uchida) mark in one Conv layer.

The mark lives in the mean of a Conv kernel over its output filters, so permuting the layer's
own neurons leaves it readable, permuting the group that feeds the layer scrambles about half
the bits, and :func:`~onnxlady.resync` restores them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxlady._api._checks import check_seed, check_whole
from onnxlady._api._results import Result
from onnxlady._api._sources import (
    ModelSource,
    OutputPath,
    check_external_inputs,
    check_outputs,
    jsonable,
    open_model,
    output_path,
    path_text,
    source_path,
)
from onnxlady._api._verify import ShapeOverrides, shape_overrides
from onnxlady._errors import OnnxladyError
from onnxlady._io._files import copy_model
from onnxlady._io._inputs import refuse_special_file
from onnxlady._io._outputs import OutputSet
from onnxlady._io._progress import say
from onnxlady._transforms._watermark import (
    WatermarkKey,
    load_key,
    save_key,
)
from onnxlady._transforms._watermark import embed_watermark as _embed
from onnxlady._transforms._watermark import extract_watermark as _extract
from onnxlady._verify._output_change import relative_output_change

#: The name a key is staged under (``save_key`` makes temporaries from it: a long name would not fit).
_STAGED_KEY = "watermark-key.npz"
#: A watermark key argument: a path to a key file (``.npz``) or a key in memory.
WatermarkKeySource = str | os.PathLike[str] | WatermarkKey


@dataclass
class WatermarkResult(Result):
    """The outcome of :func:`embed_watermark`: the marked model and the secret key that reads the mark.

    Attributes:
        model: the marked model.
        key: the secret key (layer, projection, bits); keep it to extract the mark.
        layer: the Conv node marked.
        weight: the kernel tensor changed.
        bits: number of bits embedded.
        margin: the margin every projection got.
        ber_before: bit error rate the unmarked kernel had against the message.
        relative_weight_change: ``|dW| / |W|`` of the kernel.
        min_projection: smallest signed projection after storing (positive: every bit reads back).
        relative_output_change: ``|y' - y| / |y|`` on random inputs, the cost of the mark.
        source: the input model's path; ``None`` for a model given in memory.
        output: where the marked model was written; ``None`` when it was kept in memory.
        key_path: where the key was written; ``None`` when it was not.
    """

    model: onnx.ModelProto = field(repr=False)
    key: WatermarkKey = field(repr=False)
    layer: str
    weight: str
    bits: int
    margin: float
    ber_before: float
    relative_weight_change: float
    min_projection: float
    relative_output_change: float
    source: Path | None = None
    output: Path | None = None
    key_path: Path | None = None

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        key_out: str | os.PathLike[str] | None = None,
        external_data: bool = False,
    ) -> None:
        """Write the marked model atomically, and the key with it when asked.

        Args:
            path: the model file to write.
            key_out: also write the secret key here (``.npz``).
            external_data: save the weights to ``PATH.data``.

        Raises:
            OnnxladyError: the key and the model would be the same file, a folder does not
                exist, or a file cannot be written.
        """
        target = Path(path)
        extra = [Path(key_out)] if key_out is not None else []
        check_outputs(target, [], extra, overwrite_input=True)
        with OutputSet() as outputs:  # the model and its key: both or neither
            outputs.write_model(target, self.model, external_data=external_data)
            for key_path in extra:
                save_key(self.key, outputs.stage(key_path, staged_name=_STAGED_KEY))

    def save_key(self, path: str | os.PathLike[str]) -> None:
        """Write the secret key (``.npz``) atomically.

        Args:
            path: the key file to write.

        Raises:
            OnnxladyError: the folder does not exist.
        """
        save_key(self.key, path)

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady watermark embed --json`` prints."""
        return jsonable(
            {
                "model": path_text(self.source),
                "output": path_text(self.output),
                "key": path_text(self.key_path),
                "layer": self.layer,
                "weight": self.weight,
                "bits": self.bits,
                "margin": self.margin,
                "ber_before": self.ber_before,
                "relative_weight_change": self.relative_weight_change,
                "min_projection": self.min_projection,
                "relative_output_change": self.relative_output_change,
            }
        )

    def to_text(self) -> str:
        """What ``onnxlady watermark embed`` prints: bits, files, the weight and output change."""
        place = str(self.output) if self.output is not None else "(kept in memory)"
        key = str(self.key_path) if self.key_path is not None else "kept in memory"
        return (
            f"embedded {self.bits} bits in {self.layer} -> {place} (key {key}); "
            f"weight change {100 * self.relative_weight_change:.2f} %, "
            f"output change {100 * self.relative_output_change:.2f} % on random inputs"
        )


@dataclass
class WatermarkExtraction(Result):
    """The outcome of :func:`extract_watermark`: the bits read back and how many are wrong.

    Attributes:
        bits: the bits read from the layer's kernel (0/1, uint8).
        bit_error_rate: the fraction of them that differ from the key's message.
        layer: the Conv node read.
        source: the model's path; ``None`` for a model given in memory.
        key_source: the key file's path; ``None`` for a key given in memory.
        located_by: how the layer was found: ``"name"`` (the key's node name), ``"weight"``
            (the kernel tensor it read at embedding: the node was renamed) or ``"search"`` (every
            Conv of the key's kernel width read, the best read kept).
        candidates: the Conv layers read (more than 1 only when searched).
        chance: the probability that an unmarked layer, or the best of the ``candidates``
            unmarked ones, reads with this few wrong bits: how far the read is from luck.
    """

    bits: np.ndarray = field(repr=False)
    bit_error_rate: float
    layer: str
    source: Path | None = None
    key_source: Path | None = None
    located_by: str = "name"
    candidates: int = 1
    chance: float = 1.0

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady watermark extract --json`` prints."""
        return jsonable(
            {
                "model": path_text(self.source),
                "key": path_text(self.key_source),
                "layer": self.layer,
                "located_by": self.located_by,
                "candidates": self.candidates,
                "bits": int(self.bits.size),
                "bit_error_rate": self.bit_error_rate,
                "chance": self.chance,
            }
        )

    def to_text(self) -> str:
        """What ``onnxlady watermark extract`` prints: the layer, the bits, the bit error rate and its chance."""
        where = {
            "name": "",
            "weight": " (found by its kernel tensor: the node was renamed)",
            "search": f" (no layer of the key's name or kernel tensor: best of {self.candidates} Conv layers of the key's kernel width)",
        }[self.located_by]
        return (
            f"{self.layer}{where}: {self.bits.size} bits, bit error rate {100 * self.bit_error_rate:.1f} %, "
            f"chance of so few errors without the mark {self.chance:.2g}"
        )


def embed_watermark(
    model: ModelSource,
    layer: str,
    *,
    output: OutputPath = None,
    key_out: OutputPath = None,
    bits: int = 64,
    seed: int = 0,
    shape: ShapeOverrides = (),
    external_data: bool = False,
    overwrite_input: bool = False,
    progress: Callable[[str], None] | None = None,
) -> WatermarkResult:
    """Mark a Conv layer without retraining: the smallest kernel change that makes the mark readable.

    The input model is never modified (the mark is written into a copy).

    Args:
        model: a path to an ONNX file or an ``onnx.ModelProto``.
        layer: the name of the Conv node to mark.
        output: write the marked model here (atomically); ``None`` keeps it in memory only.
        key_out: write the secret key (``.npz``) here.
        bits: number of bits to embed.
        seed: seed of the secret projection and of the bits.
        shape: input shapes for dynamic dimensions, used to measure the output change on random
            inputs (see :func:`~onnxlady.verify`): ``["images:1x3x320x320"]`` or ``{"images": (1, 3, 320, 320)}``.
        external_data: save the weights to ``OUTPUT.data`` (always so for a model read that way).
        overwrite_input: allow an output to be the input file.
        progress: called before the output change is measured.

    Returns:
        The marked model, its key and what the mark cost.

    Raises:
        OnnxladyError: no Conv node of that name, more bits than the kernel holds, a kernel
            whose precision cannot hold them, a bad seed or shape override, a model ONNX Runtime
            cannot run on the generated inputs (the message names the ``shape`` to give), or an
            output that is an input.
    """
    source = source_path(model)
    target, key_path = output_path(output), output_path(key_out)
    extra = [key_path] if key_path is not None else []
    check_outputs(target, [source], extra, overwrite_input=overwrite_input)
    check_whole(bits, "--bits", 1)
    check_seed(seed, "--seed")
    shapes = shape_overrides(shape)
    opened = open_model(model, progress=progress, digest=False)
    check_external_inputs(target, [opened], extra, overwrite_input=overwrite_input)
    marked = copy_model(opened.model)  # the original stays, to measure what the mark changes
    key, report = _embed(marked, layer, int(bits), seed)
    if progress is not None:
        progress("measuring the output change on random inputs")
    change = relative_output_change(opened.model, marked, shapes=shapes)
    result = WatermarkResult(
        model=marked,
        key=key,
        layer=str(report["layer"]),
        weight=str(report["weight"]),
        bits=int(report["bits"]),
        margin=float(report["margin"]),
        ber_before=float(report["ber_before"]),
        relative_weight_change=float(report["relative_weight_change"]),
        min_projection=float(report["min_projection"]),
        relative_output_change=change,
        source=source,
        output=target,
        key_path=key_path,
    )
    # The marked model and its key are one output set: both are written, or neither.
    with OutputSet() as outputs:
        if target is not None:
            say(progress, f"saving {target}")
            outputs.write_model(target, marked, external_data=external_data or opened.external_data)
        if key_path is not None:
            save_key(key, outputs.stage(key_path, staged_name=_STAGED_KEY))
    return result


def extract_watermark(model: ModelSource, key: WatermarkKeySource) -> WatermarkExtraction:
    """Read a watermark back and measure its bit error rate against the key's message.

    The model is not modified.

    Args:
        model: the (possibly permuted, resynchronized or perturbed) marked model: a path or an
            ``onnx.ModelProto``.
        key: the secret key :func:`embed_watermark` made: a path or a :class:`WatermarkKey`.

    Returns:
        The bits read and their bit error rate (about 0.5 means no mark, or a scrambled one).

    Raises:
        OnnxladyError: the key file is not a watermark key, or no Conv is found by the key's
            node name, by its kernel tensor, or by its kernel width; or the found kernel does not
            have the key's shape.
    """
    if isinstance(key, WatermarkKey):
        watermark_key = key
    elif isinstance(key, (str, os.PathLike)):
        watermark_key = read_watermark_key(key)
    else:
        raise OnnxladyError(f"key: expected a path or a WatermarkKey, got {type(key).__name__}")
    opened = open_model(model, digest=False)
    read = _extract(opened.model, watermark_key)
    return WatermarkExtraction(
        read.bits, read.bit_error_rate, read.layer, opened.path, source_path(key),
        located_by=read.located_by, candidates=read.candidates, chance=read.chance,
    )  # fmt: skip


def read_watermark_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Read a watermark key written by :func:`embed_watermark` (or :meth:`WatermarkResult.save_key`).

    Args:
        path: the ``.npz`` key file.

    Returns:
        The key.

    Raises:
        OnnxladyError: the file is missing or is not a consistent watermark key.
    """
    refuse_special_file(path, "watermark key file")  # a FIFO would block np.load
    return load_key(path)
