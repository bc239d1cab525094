"""No "derived" call rests on one layer alone (issue 17, held-out finding F7 of session 12).

An OPT was called ``derived`` from an SBERT that shared only its token embedding and LayerNorm
vectors (0.757 under a limit of 0.773; ``--confirm`` said unrelated): the tied head reading the
shared table paired at distance 0 and pulled the rest, past the limit on its own, under it. The
call now also needs the distance without the closest weighed pair within the limit
(``LayerMatch.without_closest``). Reproduced here with two language models of different depth
that share one embedding table (read by each one's tied head) and their LayerNorm vectors, and
nothing else.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fixtures import FIXTURES
from onnxlady._provenance._find import _threshold_of, find
from onnxlady._provenance._fingerprint import compare_fingerprints, fingerprint_model, is_derived
from onnxlady._provenance._index import add_fingerprints
from onnxlady._transforms._perturb import perturb_model
from onnxlady.testing import permute_copy

VOCAB = 1000
#: Widths of the MatMul chain between the embedding and the tied head: no two layers of one
#: shape, so the ratio test (``contrast``) measures nothing and only the distance calls.
CHAIN = (128, 384, 160, 448, 192, 128)


def _language_model(
    rng: np.random.Generator,
    table: np.ndarray,
    norm: tuple[np.ndarray, np.ndarray],
    name: str,
    spread: float = 0.2,
    chain: tuple[int, ...] = CHAIN,
) -> onnx.ModelProto:
    """Token ids -> ``Gather(table)`` -> LayerNorm -> MatMul/Relu chain -> LayerNorm -> ``MatMul(x, table^T)``.

    The chain's weights are drawn from ``rng`` with a mild per-neuron scale (a log-normal
    ``spread``: their norms spread as trained layers' do); the table and the LayerNorm vectors
    are given.
    """
    inits = [numpy_helper.from_array(table, "embed.tokens.weight"), numpy_helper.from_array(norm[0], "ln.weight"),
             numpy_helper.from_array(norm[1], "ln.bias")]  # fmt: skip
    nodes = [helper.make_node("Gather", ["embed.tokens.weight", "ids"], ["embedded"]),
             helper.make_node("LayerNormalization", ["embedded", "ln.weight", "ln.bias"], ["x0"], axis=-1)]  # fmt: skip
    x = "x0"
    for i, (rows, cols) in enumerate(itertools.pairwise(chain)):
        weight = rng.standard_normal((rows, cols)) / np.sqrt(rows) * np.exp(spread * rng.standard_normal(cols))[None, :]
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}.fc{i}.weight"))
        nodes += [helper.make_node("MatMul", [x, f"{name}.fc{i}.weight"], [f"fc{i}"]),
                  helper.make_node("Relu", [f"fc{i}"], [f"act{i}"])]  # fmt: skip
        x = f"act{i}"
    nodes += [helper.make_node("LayerNormalization", [x, "ln.weight", "ln.bias"], ["normed"], axis=-1),
              helper.make_node("Transpose", ["embed.tokens.weight"], ["tied"], perm=[1, 0]),
              helper.make_node("MatMul", ["normed", "tied"], ["logits"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, table.shape[0]])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """("opt", "sbert"): independent chains, one shared token table and LayerNorm vectors."""
    rng = np.random.default_rng([0, 0])
    width = CHAIN[0]
    table = (rng.standard_normal((VOCAB, width)) * 0.02 * np.exp(0.3 * rng.standard_normal(VOCAB))[:, None]).astype(
        np.float32
    )
    norm = (
        (1 + 0.1 * rng.standard_normal(width)).astype(np.float32),
        (0.05 * rng.standard_normal(width)).astype(np.float32),
    )
    opt = _language_model(np.random.default_rng([0, 1]), table, norm, "opt")
    sbert = _language_model(np.random.default_rng([0, 2]), table, norm, "sbert")
    return opt, sbert


def test_a_shared_embedding_alone_is_not_derived(tmp_path: Path) -> None:
    opt, sbert = _pair()
    index = tmp_path / "r.idx"
    add_fingerprints(index, [("opt", fingerprint_model(opt))])
    match = compare_fingerprints(fingerprint_model(sbert), fingerprint_model(opt))
    closest = min(match.pairs, key=lambda pair: pair[2])
    heads = fingerprint_model(sbert).layers - 1, fingerprint_model(opt).layers - 1
    # The tied heads pair closest (0 but for the model-wide shifts); the ratio test measures nothing.
    assert closest[:2] == heads and closest[2] < 0.2 and match.contrast is None
    candidate = find(fingerprint_model(sbert), index, top=1).candidates[0]
    # Was within the limit (0.61 under 0.64) only thanks to the shared table, and past it without
    # the tied heads (0.66): the support rule's finding. The chains' layers are random with
    # per-neuron scales, no longer floored (``shaped_layers``), so they now read 0.96 apart
    # (limit 0.70) and the call no longer needs the rule; ``test_registry_fixtures_...`` below
    # still needs it.
    assert candidate.call == "unrelated"
    assert candidate.threshold < 0.97 * match.without_closest


def test_a_copy_with_every_layer_moved_is_still_derived(tmp_path: Path) -> None:
    """The test of the test: a permuted, noisy copy of the same model stays derived; so does one pruned."""
    opt, _ = _pair()
    index = tmp_path / "r.idx"
    add_fingerprints(index, [("opt", fingerprint_model(opt))])
    for change in ({"noise": 0.1}, {"prune_percent": 30.0}):
        copy, *_ = permute_copy(opt, 3)
        perturb_model(copy, seed=1, **change)  # type: ignore[arg-type]
        candidate = find(fingerprint_model(copy), index, top=1).candidates[0]
        assert candidate.call == "derived", change


def test_registry_fixtures_of_other_architectures_are_not_derived() -> None:
    """Two pairs ``find --all-pairs`` joined on the registry experiment's index before.

    Different architectures at one seed, no layer in common (the closest pairs 0.44 and 0.23
    apart): within the limit by 1 % and 3 %, past it without their closest pair.
    """
    for first, second, seed in (("encoder_postnorm", "tied_lm_head", 1), ("bert_like", "encoder_prenorm", 2)):
        match = compare_fingerprints(
            fingerprint_model(FIXTURES[first](seed)), fingerprint_model(FIXTURES[second](seed))
        )
        limit = _threshold_of(match, None)
        assert match.distance <= limit and not is_derived(match, limit), (first, second)


def test_several_copied_layers_need_no_support() -> None:
    """The test of the test: three copied layers of four are derived, as before.

    The fixtures draw these two models' convolutions from one stream per seed, and their heads
    differ: the closest pair is one of three copies, and the rule asks nothing more of it (without
    the exemption of copies it read 0.55 past the limit of 0.52).
    """
    match = compare_fingerprints(
        fingerprint_model(FIXTURES["constant_weights"](1)), fingerprint_model(FIXTURES["weight_only_int8"](1))
    )
    limit = _threshold_of(match, None)
    assert sorted(d for _, _, d in match.pairs)[2] < 0.05
    assert is_derived(match, limit)
