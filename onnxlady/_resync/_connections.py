"""Which layer feeds which: the connections a converter keeps and another architecture does not.

Fusing MatMul and Add, packing Q/K/V into one Attention, folding a BatchNorm or quantizing leave
the layer-to-layer connections unchanged; two models that merely share layer shapes do not share
them. Matching re-pairs sites content cannot tell apart by them
(:mod:`onnxlady._resync._site_pairing`) and counts the share both models have in its confidence.
A residual Add fused into a convolution's sum input (``FusedConv``'s ``Z``, an NCHWc ``Conv``'s
``Sum``) is passed through to the layers after it, as the Add was.
"""

from __future__ import annotations

from onnxlady._graph._model_graph import ModelGraph
from onnxlady._resync._nchwc_forms import is_fused_sum
from onnxlady._resync._sites import MICROSOFT, Site

__all__ = ["CONNECTED_FAMILIES", "connection_agreement", "successors"]

#: Site families whose connections are compared: layers and tables (a normalisation's scale
#: and shift move between fused and unfused forms; layers do not).
CONNECTED_FAMILIES = ("dense", "conv", "conv-transpose", "table")
#: Operators whose output depends on their input's shape only.
_SHAPE_READERS = frozenset({"Shape", "Size"})


def successors(graph: ModelGraph, sites: list[Site]) -> set[tuple[int, int]]:
    """Pairs (a, b) of layer sites where b is the next layer on some path from a's output.

    What a converter keeps: fusing MatMul and Add, packing Q/K/V into one Attention, folding
    a BatchNorm or quantizing leave which layer feeds which layer unchanged; two architectures
    that merely share layer shapes do not.
    """
    at_node: dict[int, list[int]] = {}
    for number, site in enumerate(sites):
        if site.family in CONNECTED_FAMILIES:
            at_node.setdefault(site.node, []).append(number)
    # An identity branch merged into a layer (RepVGG's, re-parameterised in the other model):
    # what reaches the block's input through it reaches that layer, as in the merged form.
    stops = {site.identity: number for number, site in enumerate(sites) if site.identity is not None}
    edges: set[tuple[int, int]] = set()
    reached_from: dict[tuple[int, int], set[int]] = {}
    for number, site in enumerate(sites):
        if site.family not in CONNECTED_FAMILIES:
            continue
        tail_outputs = graph.nodes[site.tail].output
        # A part of a layer packed behind a Split starts at its own output: the other parts'
        # readers are not its successors (the same layer cut by Slices has one tail per part).
        own = graph.nodes[site.tail].op_type == "Split" and site.node != site.tail and site.part < len(tail_outputs)
        tail = (site.tail, site.part if own else -1)
        if tail not in reached_from:
            found: set[int] = set()
            stack = [tail_outputs[site.part]] if own else [name for name in tail_outputs if name]
            seen: set[str] = set(stack)
            while stack:
                for index, slot in graph.consumers.get(stack.pop(), []):
                    # Shape arithmetic reads sizes, not values: a simplifier folds it away.
                    if index < 0 or graph.nodes[index].op_type in _SHAPE_READERS:
                        continue
                    if (index, slot) in stops:
                        found.add(stops[(index, slot)])
                        continue
                    # A FusedConv's or NCHWc Conv's fourth input is a residual Add fused after it: passed through.
                    if index in at_node and index != site.node and not _fused_sum(graph, index, slot):
                        found.update(at_node[index])
                        continue
                    outputs = graph.nodes[index].output
                    if graph.nodes[index].op_type == "DynamicQuantizeLinear":  # its scale reaches the next layer's Mul
                        outputs = outputs[:1]
                    for name in outputs:
                        if name and name not in seen:
                            seen.add(name)
                            stack.append(name)
            reached_from[tail] = found
        edges.update((number, other) for other in reached_from[tail])
    return edges


def _fused_sum(graph: ModelGraph, index: int, slot: int) -> bool:
    """Whether input ``slot`` of node ``index`` is a residual Add fused into the convolution.

    ORT fuses ``Add(conv(x), z)`` (and an activation after it) into ``com.microsoft``
    ``FusedConv(X, W, B, Z)`` -- the ORT-mobile ``convert_onnx_models_to_ort`` path does -- and
    into an NCHWc Conv's ``Sum``: ``z`` flows past the convolution's weights to its output, as
    through the Add it was, so the convolution is not the next layer of ``z``'s producer.
    """
    node = graph.nodes[index]
    if slot == 3 and node.op_type == "FusedConv" and node.domain == MICROSOFT:
        return True
    return is_fused_sum(graph, index, slot)


def connection_agreement(
    reference: ModelGraph, suspect: ModelGraph, ref_sites: list[Site], sus_sites: list[Site], pairs: dict[int, int]
) -> float:
    """Share of layer-to-layer connections among paired sites that both models have (Jaccard).

    A pair of a live site and a dead one (an edge rewired around a layer: held-out round 14,
    F7) is left out: the site and weight shares already count it lost, and its connections
    would count the same edit a second time, refusing as another model one that is mostly the
    same (the audit names the dead layer). So are the connections that go around such a layer
    in the model where it is dead: a reader made to read what fed the layer (a residual sum
    rewired to the block's input, leaving a branch unused) is that same edit once more.
    """
    alike = {a: b for a, b in pairs.items() if ref_sites[a].live == sus_sites[b].live}
    back = {b: a for a, b in alike.items()}
    ref_edges, sus_edges = successors(reference, ref_sites), successors(suspect, sus_sites)
    mine = {(a, b) for a, b in ref_edges if a in alike and b in alike}
    theirs = {(back[a], back[b]) for a, b in sus_edges if a in back and b in back}
    # Sites dead in one model only, and the connections that go around them in the other's terms.
    dead_in_suspect = {a for a, b in pairs.items() if ref_sites[a].live and not sus_sites[b].live}
    dead_in_reference = {b for a, b in pairs.items() if sus_sites[b].live and not ref_sites[a].live}
    around_mine = _around(ref_edges, dead_in_suspect)
    around_theirs = {(back[a], back[b]) for a, b in _around(sus_edges, dead_in_reference) if a in back and b in back}
    excused = ((theirs - mine) & around_mine) | ((mine - theirs) & around_theirs)
    union = (mine | theirs) - excused
    return len(mine & theirs) / len(union) if union else 1.0


def _around(edges: set[tuple[int, int]], bypassed: set[int]) -> set[tuple[int, int]]:
    """Connections (a, c) from a site outside ``bypassed`` to one through a chain of ``bypassed`` sites only."""
    if not bypassed:
        return set()
    after: dict[int, set[int]] = {}
    for a, b in edges:
        after.setdefault(a, set()).add(b)
    found: set[tuple[int, int]] = set()
    for start in {a for a, b in edges if a not in bypassed and b in bypassed}:
        stack = [b for b in after[start] if b in bypassed]
        seen = set(stack)
        while stack:
            for c in after.get(stack.pop(), ()):
                if c not in bypassed:
                    found.add((start, c))
                elif c not in seen:
                    seen.add(c)
                    stack.append(c)
    return found
