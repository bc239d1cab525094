"""``onnxlady.unpermute``: undo a permutation with its key; the tensors come back bit for bit."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import onnx

from onnxlady._api._memory import check_memory
from onnxlady._api._results import Result
from onnxlady._api._sources import (
    KeySource,
    ModelSource,
    OpenedModel,
    OutputPath,
    check_external_inputs,
    check_outputs,
    jsonable,
    open_key,
    open_model,
    output_path,
    path_text,
    source_path,
)
from onnxlady._errors import OnnxladyError
from onnxlady._io._digest import PendingDigest
from onnxlady._io._files import file_sha256, load_model, save_model
from onnxlady._io._node_table import NodeTable
from onnxlady._io._outputs import OutputSet
from onnxlady._io._progress import say
from onnxlady._io._stream import Override
from onnxlady._transforms._key import PermutationKey
from onnxlady._transforms._permute import DeferredTensors, unpermute_model, unpermute_model_streamed


@dataclass
class UnpermuteResult(Result):
    """The outcome of :func:`unpermute`: the model in its original neuron order.

    Attributes:
        model: the restored model.
        key: the key that was undone.
        weights_identical_to_source: True when every restored tensor is bit-identical to the
            source the key was made from (False: the model was changed after it was permuted,
            but the neuron order is restored all the same).
        source: the permuted model's path; ``None`` for a model given in memory.
        key_source: the key file's path; ``None`` for a key given in memory.
        output: where the restored model was written; ``None`` when it was kept in memory.
        output_sha256: sha256 of the written file; ``None`` when nothing was written.
    """

    _model: onnx.ModelProto | None = field(repr=False)
    key: PermutationKey = field(repr=False)
    weights_identical_to_source: bool
    source: Path | None = None
    key_source: Path | None = None
    output: Path | None = None
    output_sha256: str | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The restored model.

        When it was streamed to :attr:`output`, it is read back from there on first use (its
        external weights, if any, mapped rather than loaded).
        """
        if self._model is None:
            if self.output is None:
                raise OnnxladyError("the restored model was neither kept nor written")
            # The caller's model: external weights mapped, inline ones in memory (never views of
            # the file, which onnx.save could not write).
            self._model = load_model(self.output, map_external=True, map_inline=False).model
        return self._model

    @property
    def output_identical_to_source_file(self) -> bool | None:
        """True when the written file is byte-identical to the file the key was made from."""
        return None if self.output_sha256 is None else self.output_sha256 == self.key.source_sha256

    def save(self, path: str | os.PathLike[str], *, external_data: bool = False) -> str:
        """Write the restored model atomically.

        Args:
            path: the model file to write.
            external_data: save the weights to ``PATH.data``.

        Returns:
            The sha256 of the written file (equal to the key's source sha256 when the file is
            the original, byte for byte).

        Raises:
            OnnxladyError: the folder does not exist or the file cannot be written.
        """
        return save_model(self.model, path, external_data=external_data, digest=True)

    def to_json(self) -> dict[str, Any]:
        """The document ``onnxlady unpermute --json`` prints."""
        return jsonable(
            {
                "model": path_text(self.source),
                "key": path_text(self.key_source),
                "output": path_text(self.output),
                "weights_identical_to_source": self.weights_identical_to_source,
                "output_sha256": self.output_sha256,
                "output_identical_to_source_file": self.output_identical_to_source_file,
            }
        )

    def to_text(self) -> str:
        """What ``onnxlady unpermute`` prints: where the model went and whether it is the source's.

        "Bit-identical" is claimed only on evidence: the written file's sha256 equal to the one
        the key recorded for the source file, or the restored weights' sha256 equal to the one it
        recorded for the source's weights.
        """
        if self.output_identical_to_source_file:
            verdict = "the written file is bit-identical to the source (sha256 recorded in the key)"
        elif self.weights_identical_to_source:
            verdict = "the restored weights are bit-identical to the source (sha256 recorded in the key)"
            if self.output is not None:
                verdict += "; the file's encoding differs from the source file"
        else:
            verdict = (
                "the weights differ from the source (the model was changed after it was permuted, "
                "--allow-changed-model); neuron order restored"
            )
        return f"unpermuted -> {_place(self.output)}: {verdict}"


def unpermute(
    model: ModelSource,
    key: KeySource,
    *,
    output: OutputPath = None,
    external_data: bool = False,
    overwrite_input: bool = False,
    allow_changed_model: bool = False,
    progress: Callable[[str], None] | None = None,
    max_memory: str | int | None = None,
) -> UnpermuteResult:
    """Undo a permutation with its key; the tensors come back bit for bit.

    The input model is never modified (a ``ModelProto`` input is copied first).

    Args:
        model: the permuted model: a path or an ``onnx.ModelProto``.
        key: the key :func:`permute` wrote: a path or a :class:`PermutationKey`.
        output: write the restored model here (atomically); ``None`` keeps it in memory only.
        external_data: save the weights to ``OUTPUT.data`` (always so for a model read that way).
        overwrite_input: allow ``output`` to be an input file.
        allow_changed_model: apply the key to a model file whose sha256 differs from the one the
            key recorded for the permuted model (it was changed on purpose after permuting);
            without it such a pair is refused, since a key beside a model it was not written
            for (an interrupted write, a mix-up) would scramble the model silently.
        progress: called before the model is written.
        max_memory: refuse to start when the estimated peak memory exceeds this (bytes, or a
            size such as ``"2G"``); see :mod:`onnxlady._api._memory`.

    Returns:
        The restored model and whether its weights are the source's, bit for bit.

    Raises:
        OnnxladyError: the key is malformed or was made for another model (or for another
            version of this file, unless ``allow_changed_model``), the output is an input, or a
            file cannot be read or written.
    """
    source = source_path(model)
    key_source = source_path(key)
    target = output_path(output)
    check_outputs(target, [source, key_source], overwrite_input=overwrite_input)
    check_memory(max_memory, "unpermute", [source], mapped=target is not None)
    # The model file's sha256, checked against the key's below, is hashed beside the reading of
    # the key and the load (None for a path that is not a regular file: the load refuses it).
    hashing = PendingDigest.start(source) if source is not None else None
    permutation_key = open_key(key)
    # With an output file, every weight is restored as the writer writes it (external ones stay in
    # their files): one restored tensor in memory at a time. The streaming writer orders fields as
    # protobuf does, so the file is the source's byte for byte. A key that untied constants is
    # undone in place (the copies it removes are never written).
    streamed = target is not None and not permutation_key.untied
    # (The nodes as the load's check read them make the graph fingerprint's lines: see graph_fingerprint.)
    opened = open_model(model, progress=progress, map_external=streamed, digest=hashing is None, node_table=True)
    nodes, opened.nodes = opened.nodes, None
    if hashing is not None:
        opened.sha256 = hashing.result()
    check_external_inputs(target, [opened], overwrite_input=overwrite_input)
    # The file is the one the key was written beside: restored weights that are not the source's
    # can then only come from a key that was edited or corrupted.
    checked = not allow_changed_model and opened.sha256 is not None and bool(permutation_key.permuted_sha256)
    if not allow_changed_model:
        _check_model_matches_key(opened, permutation_key)
    restored = opened.writable()
    if not streamed or not opened.owned:
        identical = unpermute_model(restored, permutation_key, nodes)
        if checked and not identical:
            raise OnnxladyError(_BROKEN_KEY.format(model=opened.path))
        result = UnpermuteResult(restored, permutation_key, identical, source, key_source, target)
        if target is not None:
            say(progress, f"saving {target}")
            result.output_sha256 = save_model(
                restored, target, external_data=external_data or opened.external_data, digest=True
            )
        return result
    assert target is not None  # streamed
    sha256, identical = _write_restored(
        restored, permutation_key, target, external_data or opened.external_data, checked=checked,
        shown=opened.path, progress=progress, nodes=nodes,
    )  # fmt: skip
    del restored, opened  # the model in memory still holds the permuted bytes: the result reads the file
    return UnpermuteResult(None, permutation_key, identical, source, key_source, target, sha256)


_BROKEN_KEY = (
    "{model}: the key does not restore this model although it is the file the key was written for "
    "(its sha256 matches): the key was edited or is corrupt; nothing written"
)


def _write_restored(
    restored: onnx.ModelProto,
    key: PermutationKey,
    target: Path,
    external: bool,
    *,
    checked: bool,
    shown: Path | None,
    progress: Callable[[str], None] | None,
    nodes: NodeTable | None = None,
) -> tuple[str, bool]:
    """Write ``restored``, its large weights restored as they are written; refused before commit.

    With ``checked`` (the model is the file the key was written for), restored weights that are
    not the source's refuse the key while the file is still staged: the target stays as it was.

    Returns:
        The written model file's sha256, and whether the weights are the source's bit for bit.

    Raises:
        OnnxladyError: the key is broken, or the file cannot be written.
    """
    deferred = DeferredTensors()
    verdict = unpermute_model_streamed(restored, key, deferred, nodes)
    say(progress, f"saving {target}")
    overrides = cast("dict[str, Override]", deferred.overrides)  # arrays: the writer takes any buffer
    with OutputSet() as outputs:  # committed only when the check below passes
        sha256 = outputs.write_model(target, restored, external_data=external, digest=True, overrides=overrides)
        # A file that is the source's byte for byte needs no hashing of its weights; with external
        # data the model file's sha256 does not cover the weights.
        identical = verdict("" if external else sha256)
        if checked and not identical:
            raise OnnxladyError(_BROKEN_KEY.format(model=shown))
    return sha256, identical


def _check_model_matches_key(opened: OpenedModel, key: PermutationKey) -> None:
    """Refuse a model file that is not the one the key was written beside (by its sha256).

    A model in memory is not checked this way (its serialization need not be the file's bytes);
    the graph fingerprint check still applies to it.
    """
    if opened.sha256 is None or not key.permuted_sha256:
        return
    if opened.sha256 != key.permuted_sha256:
        raise OnnxladyError(
            f"{opened.path}: this is not the model the key was written for (sha256 {opened.sha256[:12]}..., "
            f"the key expects {key.permuted_sha256[:12]}...): pass --allow-changed-model if it was changed "
            "on purpose after permuting"
        )
    if key.permuted_data_sha256 and len(opened.external_files) == 1:
        data_sha = file_sha256(opened.external_files[0])
        if data_sha != key.permuted_data_sha256:
            raise OnnxladyError(
                f"{opened.external_files[0]}: these are not the weights the key was written for (sha256 "
                f"{data_sha[:12]}..., the key expects {key.permuted_data_sha256[:12]}...): pass "
                "--allow-changed-model if they were changed on purpose after permuting"
            )


def _place(path: Path | None) -> str:
    return str(path) if path is not None else "(kept in memory)"
