"""Audit on the real models: a permuted copy reads "permuted", an attacked one "scaled".

A permuted copy (every group, seed 1) must read "permuted"; a copy with 5 neurons of one conv
scaled by 1.5 (no compensation: the paper's integrity attack), then permuted (seed 2), must
read "scaled" and flag exactly those 5.

    python3 -m tools.audit_real_models     (models from tools.fetch_models; prints a Markdown table)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from onnx import numpy_helper

from onnxlady import audit, inspect, load_model, permute
from onnxlady.testing import tensor_holders
from tools.fetch_models import DEFAULT_OUT, fetch_models

#: The neurons the integrity attack scales by 1.5.
SCALED = [0, 2, 3, 5, 7]


def main(argv: list[str] | None = None) -> int:
    """Audit a permuted and an attacked copy of each real model; 0 when every verdict is right."""
    parser = argparse.ArgumentParser(prog="python3 -m tools.audit_real_models", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    ok = True
    print("| model | permuted copy | 5 neurons x 1.5, then permuted | flagged (group, neuron, k) |")
    print("|---|---|---|---|")
    for entry in fetch_models(DEFAULT_OUT):
        path = Path(str(entry["path"]))
        reference = load_model(path).model
        first = audit(reference, permute(reference, seed=1).model)
        attacked = load_model(path).model
        group = next(
            g for g in inspect(attacked).analysis.permutable_groups
            if g.size >= 8 and any(m.is_weight and m.axis == 0 and "conv weight" in m.role.split(", ") for m in g.members)
        )  # fmt: skip
        member = next(m for m in group.members if m.is_weight and m.axis == 0 and "conv weight" in m.role.split(", "))
        tensor = tensor_holders(attacked)[member.tensor]
        weights = numpy_helper.to_array(tensor).copy()
        weights[SCALED] *= 1.5
        tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
        second = audit(reference, permute(attacked, seed=2).model)
        flagged = sorted((s.group, s.neuron, round(s.k, 3)) for s in second.report.scaled_neurons)
        expected = [(group.id, n, 1.5) for n in SCALED]
        ok &= first.verdict == "permuted" and second.verdict == "scaled" and flagged == expected
        print(f"| {entry['name']} | {first.verdict} | {second.verdict} | {flagged} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
