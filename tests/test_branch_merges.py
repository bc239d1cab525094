"""RepVGG's deploy form: parallel convolution branches re-parameterised into one convolution.

Held-out round 17, F7: RepVGG (like MobileOne and ACNet) trains each block as a 3x3 convolution,
a 1x1 convolution and an identity BatchNorm over one input, summed; its deploy step writes the
block as the one 3x3 convolution they compute (the 1x1 kernel padded to the centre, the identity
a unit kernel scaled by its BatchNorm, biases summed). audit and resync refused the untouched
deploy copy ("different models: 55.6 % of them pair ... reference has Conv [16,3,1,1], suspect
has nothing"). The match now reads a proven block of branches as one site where the other model
holds one convolution in its place (:mod:`onnxlady._resync._branch_merges`), and compares the
kernels summed with it within a stated bound: converted, permuted, a changed weight or a wrong
merge modified, an unproven structure still refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.deployment import CONVERTERS, unavailable
from onnxlady._audit._verdicts import audit_models
from onnxlady._errors import OnnxladyError
from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._across import _site_value
from onnxlady._resync._match import match_models
from onnxlady._verify._compare import verify_models
from onnxlady.testing import copy_model, permute_copy
from tests.test_deployment import check_resync_across

#: (input channels, output channels, stride, identity branch, each conv branch with its own BatchNorm)
_BLOCKS = ((3, 8, 2, False, False), (8, 8, 1, True, False), (8, 16, 2, False, True), (16, 16, 1, True, True),
           (16, 16, 1, True, False))  # fmt: skip


def build_repvgg(seed: int = 0) -> onnx.ModelProto:
    """A small RepVGG in its training form: per block ``relu(conv3x3(x) + conv1x1(x) [+ bn(x)])``.

    Two blocks keep a BatchNormalization after each branch convolution (an export without
    constant folding), the others have it folded into the convolution; three have the identity
    branch (stride 1, as many channels in as out). Global average pooling and a Gemm head.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def batchnorm(name: str, x: str, channels: int) -> str:
        inputs = [x, param(f"{name}.gamma", rng.uniform(0.5, 1.5, channels)), param(f"{name}.beta", rng.normal(0, 0.1, channels)),
                  param(f"{name}.mean", rng.normal(0, 0.1, channels)), param(f"{name}.var", rng.uniform(0.5, 1.5, channels))]  # fmt: skip
        nodes.append(helper.make_node("BatchNormalization", inputs, [f"{name}.out"], name=name, epsilon=1e-5))
        return f"{name}.out"

    x = "image"
    for number, (cin, cout, stride, identity, with_bn) in enumerate(_BLOCKS):
        branches = []
        for kernel in (3, 1):
            name = f"b{number}.c{kernel}"
            fan = cin * kernel * kernel
            weight = param(f"{name}.weight", rng.normal(0, 1.0 / np.sqrt(fan), (cout, cin, kernel, kernel)))
            inputs = [x, weight] if with_bn else [x, weight, param(f"{name}.bias", rng.normal(0, 0.05, cout))]
            pad = (kernel - 1) // 2
            nodes.append(helper.make_node("Conv", inputs, [f"{name}.out"], name=f"{name}.Conv", kernel_shape=[kernel, kernel],
                                          pads=[pad] * 4, strides=[stride, stride]))  # fmt: skip
            branches.append(batchnorm(f"{name}.bn", f"{name}.out", cout) if with_bn else f"{name}.out")
        if identity:
            branches.append(batchnorm(f"b{number}.id", x, cout))
        total = branches[0]
        for step, other in enumerate(branches[1:]):
            nodes.append(helper.make_node("Add", [total, other], [f"b{number}.sum{step}"], name=f"b{number}.Add{step}"))
            total = f"b{number}.sum{step}"
        nodes.append(helper.make_node("Relu", [total], [f"b{number}.relu"], name=f"b{number}.Relu"))
        x = f"b{number}.relu"
    nodes.append(helper.make_node("ReduceMean", [x], ["pooled"], name="pool", axes=[2, 3], keepdims=0))
    nodes.append(helper.make_node("Gemm", ["pooled", param("fc.weight", rng.normal(0, 0.3, (10, 16))),
                                           param("fc.bias", rng.normal(0, 0.05, 10))], ["logits"], name="fc", transB=1))  # fmt: skip
    graph = helper.make_graph(nodes, "repvgg", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _fold(values: dict[str, np.ndarray], node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A BatchNormalization after a convolution folded into it, in float32 as torch's re-parameterisation does."""
    gamma, beta, mean, var = (values[name] for name in node.input[1:5])
    eps = np.float32(next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5))
    std = np.sqrt(var + eps)
    t = (gamma / std).astype(np.float32)
    return (weight * t.reshape(-1, 1, 1, 1)).astype(np.float32), (beta + (bias - mean) * t).astype(np.float32)


def reparameterise(model: onnx.ModelProto, identity: bool = True, offset: int = 0) -> onnx.ModelProto:
    """RepVGG's deploy step on an ONNX model of :func:`build_repvgg`'s form, in float32.

    Each block's sum becomes one 3x3 Conv: each branch's BatchNorm folded, the 1x1 kernel padded
    to the centre (``offset`` moves it off the centre: a wrong merge), the identity BatchNorm a
    unit kernel (left out without ``identity``: a wrong merge), the biases summed.
    """
    values = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    consumed: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "Relu" or producer.get(node.input[0]) is None or producer[node.input[0]].op_type != "Add":
            continue
        leaves, pending = [], [producer[node.input[0]]]
        while pending:
            add = pending.pop()
            consumed.add(add.name)
            for name in add.input:
                if name in producer and producer[name].op_type == "Add":
                    pending.append(producer[name])
                else:
                    leaves.append(name)
        kernel: np.ndarray | None = None
        bias: np.ndarray | None = None
        convs = []
        for leaf in leaves:
            made = producer[leaf]
            conv, bn = (made, None) if made.op_type == "Conv" else (producer.get(made.input[0]), made)
            if conv is None or conv.op_type != "Conv":  # the identity BatchNorm
                convs.append(("id", made, None))
            else:
                convs.append(("conv", conv, bn))
        main = next(conv for kind, conv, _ in convs if kind == "conv" and values[conv.input[1]].shape[-1] == 3)
        for kind, conv, bn in convs:
            if kind == "id":
                continue
            weight = values[conv.input[1]]
            b = values[conv.input[2]] if len(conv.input) > 2 else np.zeros(weight.shape[0], np.float32)
            if bn is not None:
                weight, b = _fold(values, bn, weight, b)
                consumed.add(bn.name)
            if weight.shape[-1] == 1:
                padded = np.zeros((*weight.shape[:2], 3, 3), np.float32)
                padded[:, :, 1 + offset, 1] = weight[:, :, 0, 0]
                weight = padded
            kernel = weight if kernel is None else (kernel + weight).astype(np.float32)
            bias = b if bias is None else (bias + b).astype(np.float32)
            consumed.add(conv.name)
        assert kernel is not None and bias is not None
        for kind, bn, _ in convs:
            if kind != "id":
                continue
            consumed.add(bn.name)
            if not identity:
                continue
            unit = np.zeros(kernel.shape, np.float32)
            unit[np.arange(kernel.shape[0]), np.arange(kernel.shape[0]), 1, 1] = 1.0
            unit_bias = np.zeros(kernel.shape[0], np.float32)
            weight, b = _fold(values, bn, unit, unit_bias)
            kernel, bias = (kernel + weight).astype(np.float32), (bias + b).astype(np.float32)
        block = main.name.split(".")[0]
        inits[f"{block}.fused.weight"], inits[f"{block}.fused.bias"] = kernel, bias
        fused = helper.make_node("Conv", [main.input[0], f"{block}.fused.weight", f"{block}.fused.bias"], [node.input[0]],
                                 name=f"{block}.fused.Conv")  # fmt: skip
        fused.attribute.extend(main.attribute)
        nodes.append(fused)
    kept = [node for node in model.graph.node if node.name not in consumed]
    order = {id(node): n for n, node in enumerate(model.graph.node)}
    deploy = copy_model(model)
    del deploy.graph.node[:]
    # Each fused Conv where its block's Relu reads it: before that Relu.
    by_output = {fused.output[0]: fused for fused in nodes}
    for node in sorted(kept, key=lambda n: order[id(n)]):
        if node.op_type == "Relu" and node.input[0] in by_output:
            deploy.graph.node.append(by_output[node.input[0]])
        deploy.graph.node.append(node)
    used = {name for node in deploy.graph.node for name in node.input}
    del deploy.graph.initializer[:]
    deploy.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in {**values, **inits}.items() if name in used)
    onnx.checker.check_model(deploy)
    return deploy


def _set(model: onnx.ModelProto, name: str, change) -> onnx.ModelProto:
    """A copy with initializer ``name`` replaced by ``change(a copy of its values)``."""
    changed = copy_model(model)
    tensor = next(t for t in changed.graph.initializer if t.name == name)
    tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()).astype(np.float32), name))
    return changed


def _bump(values: np.ndarray, index: tuple[int, ...], by: float) -> np.ndarray:
    values[index] += by
    return values


_REFERENCE = build_repvgg(0)
_DEPLOY = reparameterise(_REFERENCE)


def test_the_untouched_deploy_copy_is_converted() -> None:
    assert verify_models(_REFERENCE, _DEPLOY, provider="cpu").equivalent
    assert sum(node.op_type == "Conv" for node in _DEPLOY.graph.node) == len(_BLOCKS)  # one Conv per block
    report = audit_models(_REFERENCE, _DEPLOY)
    assert report.verdict == "converted" and report.exit_code == 0
    merged = [finding for finding in report.conversions if finding.kind == "branches-merged"]
    assert len(merged) == 1 and merged[0].model == "suspect"
    assert merged[0].detail.startswith(f"{len(_BLOCKS)} convolutions hold 13 parallel branches")


def test_a_deploy_copy_of_a_permuted_model_is_permuted_and_resyncs() -> None:
    model, _, _, key = permute_copy(_REFERENCE, 3)
    suspect = reparameterise(model)
    report = audit_models(_REFERENCE, suspect)
    assert report.verdict == "permuted" and report.exit_code == 0
    check_resync_across(_REFERENCE, suspect, key)  # Psi 100, equivalent, a wrong permutation caught


def test_a_deploy_that_keeps_the_3x3_operator_is_converted() -> None:
    """A deploy step done in the graph: each block's 3x3 Conv keeps its name and output, the other branches and the Add go.

    The block's Relu then reads the 3x3 Conv's output where it read the Add's: no branch is lost
    (the kernel holds them all, compared merged), so the check for a join skipped must not fire.
    """
    suspect = copy_model(_DEPLOY)
    for node in suspect.graph.node:
        if node.name.endswith(".fused.Conv"):
            block, fused = node.name.split(".")[0], node.output[0]
            node.name, node.output[0] = f"{block}.c3.Conv", f"{block}.c3.out"
            for reader in suspect.graph.node:
                reader.input[:] = [f"{block}.c3.out" if name == fused else name for name in reader.input]
    assert verify_models(_REFERENCE, suspect, provider="cpu").equivalent
    report = audit_models(_REFERENCE, suspect)
    assert report.verdict == "converted" and report.exit_code == 0


@pytest.mark.parametrize("converter", ["onnxslim", "ort-all"])
def test_a_permuted_deploy_copy_through_a_converter_is_permuted(converter: str) -> None:
    """The deploy form then a converter (onnxslim; ONNX Runtime's NCHWc layout and FusedConv): still the same model."""
    reason = unavailable(converter)
    if reason is not None:
        pytest.skip(reason)
    model, _, _, _ = permute_copy(_REFERENCE, 6)
    report = audit_models(_REFERENCE, CONVERTERS[converter](reparameterise(model)))
    assert report.verdict == "permuted" and report.exit_code == 0
    assert "branches-merged" in {finding.kind for finding in report.conversions}


def test_the_reference_in_deploy_form_against_the_branches() -> None:
    """The other way round: the deploy form is the reference, the suspect has the branches (permuted, or not)."""
    report = audit_models(_DEPLOY, _REFERENCE)
    assert report.verdict == "converted" and report.exit_code == 0
    assert [f.model for f in report.conversions if f.kind == "branches-merged"] == ["reference"]
    model, _, _, _ = permute_copy(_REFERENCE, 4)
    assert audit_models(_DEPLOY, model).verdict == "permuted"


#: Deploy copies that compute something else: a merge done wrong, a weight or bias changed after it.
_WRONG = {
    "identity-forgotten": lambda: reparameterise(_REFERENCE, identity=False),
    "1x1-off-centre": lambda: reparameterise(_REFERENCE, offset=1),
    "kernel-element": lambda: _set(_DEPLOY, "b3.fused.weight", lambda a: _bump(a, (5, 2, 0, 1), 0.05)),
    "centre-element": lambda: _set(_DEPLOY, "b1.fused.weight", lambda a: _bump(a, (2, 2, 1, 1), 0.05)),
    "bias": lambda: _set(_DEPLOY, "b4.fused.bias", lambda a: _bump(a, (7,), 0.05)),
}


@pytest.mark.parametrize("wrong", sorted(_WRONG))
def test_a_wrong_merge_or_a_changed_weight_is_modified(wrong: str) -> None:
    suspect = _WRONG[wrong]()
    assert not verify_models(_REFERENCE, suspect, provider="cpu").equivalent
    report = audit_models(_REFERENCE, suspect)
    assert report.verdict == "modified" and report.exit_code == 1


def test_the_merged_kernels_equal_the_deploy_kernels_within_a_tight_bound() -> None:
    """The merged value (float64) and the float32 deploy step agree within the bound read with it, a small one."""
    match = match_models(_REFERENCE, _DEPLOY)
    merged = [(a, b) for a, b in match.sites.items() if match.reference_site(a).branches]
    assert len(merged) == len(_BLOCKS)
    assert sum(match.reference_site(a).identity is not None for a, _ in merged) == 3
    for a, b in merged:
        site, partner = match.reference_site(a), match.suspect_site(b)
        for role in ("weight", "bias"):
            mine = _site_value(match.reference.graph, site, role, True)
            theirs = _site_value(match.suspect.graph, partner, role, True)
            assert mine is not None and theirs is not None
            assert np.all(np.abs(mine.value - theirs.value) <= mine.error + theirs.error)
            assert mine.error.max() <= 1e-5 * np.abs(mine.value).max()  # a bound that still tells a change


def test_an_unproven_structure_is_still_refused() -> None:
    """A 1x1 branch that reads the block's input through a Sigmoid is no branch of the 3x3 one: no merge, the refusal stays."""
    reference = copy_model(_REFERENCE)
    conv = next(node for node in reference.graph.node if node.name == "b1.c1.Conv")
    squashed = helper.make_node("Sigmoid", [conv.input[0]], ["b1.squashed"], name="b1.Sigmoid")
    conv.input[0] = "b1.squashed"
    position = next(n for n, node in enumerate(reference.graph.node) if node.name == "b1.c1.Conv")
    reference.graph.node.insert(position, squashed)
    naive = reparameterise(reference)  # the kernels summed all the same: another function
    assert not verify_models(reference, naive, provider="cpu").equivalent
    match = match_models(reference, naive)
    assert not any(site.branches and site.node == ModelGraph(reference).producer["b1.c3.out"][0] for site in match.reference_sites)
    with pytest.raises(OnnxladyError, match="different models"):
        audit_models(reference, naive)


def test_twins_with_branches_are_compared_as_stored() -> None:
    """Both models with their branches: nothing merged (each branch pairs with its counterpart)."""
    model, _, _, _ = permute_copy(_REFERENCE, 5)
    match = match_models(_REFERENCE, model)
    assert not any(site.branches or site.identity is not None for site in match.reference_sites + match.suspect_sites)
    assert not any(finding.kind == "branches-merged" for finding in match.conversions)


def _acnet(seed: int = 0, row: int = 1) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """ACNet's asymmetric block ``relu(conv3x3(x) + conv1x3(x) + conv3x1(x))`` twice, and its deploy form.

    The deploy form adds the 1x3 kernel at row ``row`` of the 3x3 one (1: the centre; else a
    wrong merge) and the 3x1 kernel at its centre column.
    """
    rng = np.random.default_rng(seed)
    train_nodes: list[onnx.NodeProto] = []
    deploy_nodes: list[onnx.NodeProto] = []
    train_inits: list[onnx.TensorProto] = []
    deploy_inits: list[onnx.TensorProto] = []
    x = "image"
    for block, (cin, cout) in enumerate(((3, 8), (8, 8))):
        kernels = {}
        total = np.zeros((cout, cin, 3, 3), np.float32)
        bias = np.zeros(cout, np.float32)
        for shape, pads in (((3, 3), [1, 1, 1, 1]), ((1, 3), [0, 1, 0, 1]), ((3, 1), [1, 0, 1, 0])):
            name = f"a{block}.k{shape[0]}x{shape[1]}"
            kernels[name] = rng.normal(0, 1 / np.sqrt(cin * 3), (cout, cin, *shape)).astype(np.float32)
            b = rng.normal(0, 0.05, cout).astype(np.float32)
            train_inits += [numpy_helper.from_array(kernels[name], f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")]
            train_nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.out"], name=name,
                                                kernel_shape=list(shape), pads=pads))  # fmt: skip
            top = row if shape[0] == 1 else 0
            left = 1 if shape[1] == 1 else 0
            total[:, :, top : top + shape[0], left : left + shape[1]] += kernels[name]
            bias += b
        outs = [node.output[0] for node in train_nodes[-3:]]
        train_nodes.append(helper.make_node("Add", outs[:2], [f"a{block}.s0"], name=f"a{block}.add0"))
        train_nodes.append(helper.make_node("Add", [f"a{block}.s0", outs[2]], [f"a{block}.sum"], name=f"a{block}.add1"))
        train_nodes.append(helper.make_node("Relu", [f"a{block}.sum"], [f"a{block}.relu"], name=f"a{block}.relu"))
        deploy_inits += [numpy_helper.from_array(total, f"a{block}.fused.w"), numpy_helper.from_array(bias, f"a{block}.fused.b")]
        deploy_nodes.append(helper.make_node("Conv", [x, f"a{block}.fused.w", f"a{block}.fused.b"], [f"a{block}.sum"],
                                             name=f"a{block}.fused", kernel_shape=[3, 3], pads=[1, 1, 1, 1]))  # fmt: skip
        deploy_nodes.append(helper.make_node("Relu", [f"a{block}.sum"], [f"a{block}.relu"], name=f"a{block}.relu"))
        x = f"a{block}.relu"
    head = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 8)).astype(np.float32), "fc.w"),
            numpy_helper.from_array(rng.normal(0, 0.05, 4).astype(np.float32), "fc.b")]  # fmt: skip
    tail = [helper.make_node("ReduceMean", [x], ["pooled"], name="pool", axes=[2, 3], keepdims=0),
            helper.make_node("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]  # fmt: skip
    models = []
    for nodes, inits in ((train_nodes, train_inits), (deploy_nodes, deploy_inits)):
        graph = helper.make_graph(nodes + tail, "acnet", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 12, 12])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits + head)  # fmt: skip
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    return models[0], models[1]


def test_acnet_asymmetric_kernels_merge_at_the_centre() -> None:
    """1x3 and 3x1 kernels nest in the 3x3 one at its centre row and column; one added a row off is caught."""
    reference, deploy = _acnet()
    assert verify_models(reference, deploy, provider="cpu").equivalent
    report = audit_models(reference, deploy)
    assert report.verdict == "converted" and "branches-merged" in {f.kind for f in report.conversions}
    _, wrong = _acnet(row=0)
    assert not verify_models(reference, wrong, provider="cpu").equivalent
    assert audit_models(reference, wrong).verdict == "modified"
