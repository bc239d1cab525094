"""A tensor computed from constants and read by several operators (held-out F1, Mamba's ``A = -exp(A_log)``).

torch's legacy exporter keeps ``A_log (initializer) -> Exp -> Neg`` and its unrolled selective
scan reads the result once per time step. The stored ``A_log`` can follow the d_inner channels
(its rows) and the state channels (its columns), but only where every reader of the computed
tensor takes the permuted axis; a reader that does not (a Slice of the channel axis here) must
freeze the channels, since it would see moved values without the analysis knowing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxlady import analyze, draw_permutations, permute_model, unpermute_model, verify_models
from onnxlady._analysis import _channels
from onnxlady.testing import GraphBuilder, copy_model, permute_producer_only, tensor_holders

D_INNER, STATE = 16, 4


def _scan(*, steps: int = 3, sliced_reader: bool = False) -> onnx.ModelProto:
    """in_proj -> ``steps`` readers of ``A = -exp(A_log)`` (dt * A, exp, times B) -> mean over the state -> out_proj.

    ``sliced_reader``: A is also read by a Slice of its first 8 channels, whose mean is added to
    the output (a reader that cannot follow a permutation of the channels).
    """
    b = GraphBuilder("scan", 0)
    x = b.input("input", (1, 5, 8))
    h = b.matmul(x, D_INNER, name="in_proj")  # [1, 5, 16]: the d_inner channels
    state_b = b.unsqueeze(b.matmul(x, STATE, name="x_proj"), [2], name="b_unsq")  # [1, 5, 1, 4]
    a_log = b.param("A_log", np.log(b.uniform((D_INNER, STATE), 0.5, 4.0)).astype(np.float32))
    a = b.custom("Neg", "", [b.custom("Exp", "", [a_log], (D_INNER, STATE), name="exp_a")], (D_INNER, STATE), name="neg_a")
    total = None
    for step in range(steps):
        dt = b.unsqueeze(b.sigmoid(b.add(h, b.small_normal((D_INNER,), 0.5), name=f"dt{step}")), [-1], name=f"dt_unsq{step}")
        decay = b.custom("Exp", "", [b.mul(dt, a, name=f"dta{step}")], (1, 5, D_INNER, STATE), name=f"decay{step}")
        term = b.mul(decay, state_b, name=f"term{step}")
        total = term if total is None else b.add(total, term, name=f"sum{step}")
    assert total is not None
    y = b.reduce_mean(total, [3], keepdims=False, name="over_state")  # [1, 5, 16]
    y = b.matmul(y, 3, name="out_proj", gain=1.0)
    if sliced_reader:
        part = b.slice(a, [0], [8], [0], name="a_part")
        y = b.add(y, b.reduce_mean(part, [0, 1], keepdims=True, name="a_part_mean"), name="output")
    return b.build(y)


def _group_of(analysis: _channels.ChannelAnalysis, tensor: str, axis: int) -> str:
    (group,) = {
        g.id for g in analysis.groups for m in g.members if m.tensor == tensor and m.axis == axis
    }
    return group


def test_every_reader_takes_the_computed_tensor_so_its_constant_follows_both_axes() -> None:
    analysis = analyze(_scan())
    inner, state = _group_of(analysis, "in_proj.weight", 1), _group_of(analysis, "x_proj.weight", 1)
    assert analysis.group(inner).permutable and analysis.group(state).permutable
    (plan,) = [p for p in analysis.tensors if p.tensor == "A_log"]
    assert sorted(axis for axis, _ in plan.axes) == [0, 1]
    assert _group_of(analysis, "A_log", 0) == inner and _group_of(analysis, "A_log", 1) == state
    summary = analysis.summary()
    assert summary["permutable_producer_neurons"] + summary["producer_neurons_pinned_by_outputs"] == summary["producer_neurons"]


@pytest.mark.parametrize("seed", [1, 2])
def test_permuted_scan_is_equivalent_and_unpermutes_to_the_same_bytes(seed: int) -> None:
    source = _scan()
    model = copy_model(source)
    analysis = analyze(model)
    key = permute_model(analysis, draw_permutations(analysis, seed), seed=seed)
    holders = tensor_holders(model)
    assert not np.array_equal(onnx.numpy_helper.to_array(holders["A_log"]), onnx.numpy_helper.to_array(tensor_holders(source)["A_log"]))
    report = verify_models(source, model, provider="cpu", iterations=2, seed=seed)
    assert report.equivalent and not report.degenerate_outputs, [(o.name, o.max_abs_error) for o in report.outputs]
    assert unpermute_model(model, key) is True
    assert model.SerializeToString() == source.SerializeToString()


def test_a_wrong_permutation_is_caught() -> None:
    source = _scan()
    model = copy_model(source)
    permute_producer_only(model, analyze(model))
    assert not verify_models(source, model, provider="cpu").equivalent


def test_the_constant_left_unpermuted_is_caught() -> None:
    """The whole permutation but A_log's: A_log's moving is what keeps the scan equivalent."""
    source = _scan()
    model = copy_model(source)
    analysis = analyze(model)
    permute_model(analysis, draw_permutations(analysis, 1), seed=1)
    tensor_holders(model)["A_log"].CopyFrom(tensor_holders(source)["A_log"])
    assert not verify_models(source, model, provider="cpu").equivalent


def test_a_reader_that_cannot_follow_freezes_the_channels() -> None:
    source = _scan(sliced_reader=True)
    analysis = analyze(source)
    (inner,) = [g for g in analysis.groups if g.size == D_INNER]
    assert not inner.permutable
    assert any("'neg_a' carries no channel permutation" in reason.message for reason in inner.reasons), inner.reasons
    assert not any(p.tensor in ("A_log", "in_proj.weight") for p in analysis.tensors)
    model = copy_model(source)
    fresh = analyze(model)
    permute_model(fresh, draw_permutations(fresh, 1), seed=1)
    assert verify_models(source, model, provider="cpu").equivalent


def test_without_the_reader_check_the_slice_would_see_moved_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is what keeps the sliced reader's model equivalent (so the test above can fail)."""
    monkeypatch.setattr(_channels, "freeze_partial_derived", lambda state: None)
    source = _scan(sliced_reader=True)
    model = copy_model(source)
    analysis = analyze(model)
    assert analysis.group(_group_of(analysis, "in_proj.weight", 1)).permutable
    permute_model(analysis, draw_permutations(analysis, 1), seed=1)
    assert not verify_models(source, model, provider="cpu").equivalent
