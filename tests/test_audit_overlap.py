"""The audit's steps run beside one another (issue 15, audit time), with the report it gives in line.

- The similarity of a twin as stored is computed in a thread beside the resync, that of the
  re-synchronized twin beside the comparison of its constants and the scale analysis
  (:mod:`onnxlady._audit._beside`): the same report, finding for finding, as in line; an error
  of the earlier step comes first, as in line.
- The re-synchronized twin's arrays, kept once computed, are computed once when two threads
  ask for one at the same time (:class:`onnxlady._audit._lazy.LazyConstants`).
- The constants compared after the resync are compared a small chunk at a time, and a group's
  sampled rows of one tensor are not copied again: the temporaries of the two steps that now
  run at once stay small (the audit's peak memory).
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import onnxlady
import onnxlady._audit._verdicts as verdicts_module
import onnxlady._io._external as external_module
import onnxlady._io._files as files_module
from fixtures import FIXTURES
from onnxlady._analysis._channels import analyze
from onnxlady._audit._lazy import LazyConstants
from onnxlady._transforms._permute import draw_permutations, permute_model
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import copy_model, permute_producer_only


def _paths(tmp_path: Path, *, wrong: bool = False) -> tuple[Path, Path]:
    reference = FIXTURES["resnet"](0)
    suspect = copy_model(reference)
    permute_model(analyze(suspect), draw_permutations(analyze(suspect), 1))
    if wrong:  # one producer's rows moved without its consumers: no permutation of the model
        permute_producer_only(suspect, analyze(suspect))
    perturb_model(suspect, seed=3, noise=0.05)
    reference_path, suspect_path = tmp_path / "ref.onnx", tmp_path / "sus.onnx"
    onnx.save(reference, reference_path)
    onnx.save(suspect, suspect_path)
    return reference_path, suspect_path


@pytest.fixture(autouse=True)
def _map_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixtures' tensors are small: map every one of at least 1 KB, as large ones are."""
    monkeypatch.setattr(external_module, "INLINE_BYTES", 1024)
    monkeypatch.setattr(files_module, "INLINE_BYTES", 1024)


class _InLine:
    """What ``Beside`` computes, computed in line by the caller (the audit as it ran before)."""

    def __init__(self, function: Any, *args: Any) -> None:
        self._error: BaseException | None = None
        try:
            self._value = function(*args)
        except Exception as error:
            self._error = error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def error(self) -> BaseException | None:
        return self._error


def _texts(reference: Path, suspect: Path, folder: Path) -> tuple[str, str, str, str]:
    html, markdown = folder / "a.html", folder / "a.md"
    result = onnxlady.audit(reference, suspect, html=html, markdown=markdown)
    return result.to_json_text(), result.to_markdown(), html.read_text(), markdown.read_text()


@pytest.mark.parametrize("wrong", [False, True], ids=["twin", "wrong-permutation"])
def test_similarity_runs_beside_and_the_report_is_the_one_in_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrong: bool
) -> None:
    reference, suspect = _paths(tmp_path, wrong=wrong)
    threads: list[str] = []
    side = verdicts_module._similarity_side

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return side(*args)

    monkeypatch.setattr(verdicts_module, "_similarity_side", recorded)
    (tmp_path / "beside").mkdir()
    beside = _texts(reference, suspect, tmp_path / "beside")
    assert len(threads) == 2 and threading.main_thread().name not in threads, threads

    monkeypatch.setattr(verdicts_module, "Beside", _InLine)
    threads.clear()
    (tmp_path / "inline").mkdir()
    in_line = _texts(reference, suspect, tmp_path / "inline")
    assert threads == [threading.main_thread().name] * 2
    assert beside == in_line
    report = onnxlady.audit(reference, suspect).report
    if wrong:  # a wrong permutation is caught either way
        assert report.exit_code == 1 and report.verdict not in ("identical", "permuted", "converted")
        assert report.differing_tensors
    else:
        assert report.verdict == "perturbed", report.summary


def test_an_error_of_the_earlier_step_comes_first_as_in_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, suspect = _paths(tmp_path)

    def resync_fails(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # the similarity beside fails first (it is waited for either way)
        raise RuntimeError("the resync's error")

    def similarity_fails(*args: Any) -> Any:
        raise TypeError("the similarity's error")

    monkeypatch.setattr(verdicts_module, "resync_model", resync_fails)
    monkeypatch.setattr(verdicts_module, "_similarity_side", similarity_fails)
    with pytest.raises(TypeError, match="the similarity's error"):  # in line, it was raised before the resync ran
        verdicts_module.audit_models(onnx.load(reference), onnx.load(suspect))

    def similarity_refuses(*args: Any) -> Any:
        raise KeyError("tensors named otherwise")  # caught: no twin, compared after the resync

    monkeypatch.setattr(verdicts_module, "_similarity_side", similarity_refuses)
    with pytest.raises(RuntimeError, match="the resync's error"):
        verdicts_module.audit_models(onnx.load(reference), onnx.load(suspect))


def test_arrays_kept_all_are_computed_once_when_two_threads_ask() -> None:
    calls: list[str] = []

    def slow(name: str) -> Any:
        def load() -> np.ndarray:
            calls.append(name)
            time.sleep(0.1)  # the other thread asks meanwhile
            return np.full(3, len(calls))

        return load

    lazy = LazyConstants({"a": slow("a"), "b": slow("b")}, keep_all=True)
    got: list[np.ndarray] = []
    readers = [threading.Thread(target=lambda: got.append(lazy["a"])) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert calls == ["a"]
    assert got[0] is got[1] is lazy["a"]


def test_close_compares_a_small_chunk_at_a_time() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(1 << 21).astype(np.float32)  # 8 MB
    b = a + np.float32(1e-7) * a
    tracemalloc.start()
    try:
        close = verdicts_module._close(a, b, 1e-5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert close
    assert peak < 2.5e6, f"{peak / 1e6:.1f} MB of temporaries to compare two 8 MB tensors"
    far = b.copy()
    far[-1] += 1  # the last chunk differs
    assert not verdicts_module._close(a, far, 1e-5)


def test_one_tensor_s_sampled_rows_are_not_copied_again() -> None:
    from onnxlady._audit._verdicts import _side_by_side

    rows = np.arange(12.0).reshape(3, 4)
    assert _side_by_side([rows]) is rows
    transposed = np.arange(12.0).reshape(4, 3).T  # F-ordered: copied into the layout hstack gives
    joined = _side_by_side([transposed])
    assert joined.flags.c_contiguous and np.array_equal(joined, np.hstack([transposed]))
    assert np.array_equal(_side_by_side([rows, rows[:, :1]]), np.hstack([rows, rows[:, :1]]))
