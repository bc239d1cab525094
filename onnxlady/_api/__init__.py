"""The public API layer: one function per command, typed results; the CLI is a thin shell over it.

Each module holds one command (``_inspect``, ``_permute``, ``_unpermute``, ``_verify``,
``_perturb``, ``_resync``, ``_match``, ``_audit``, ``_watermark``, ``_demo``) and its result
class; ``_sources`` opens model and key arguments, checks output paths and writes keys for all
of them, and ``_results`` is the base every result shares. ``onnxlady/__init__.py`` re-exports them.
"""
