"""onnxlady: permute, verify and re-synchronize the neurons of ONNX models at graph level.

The public API mirrors the command line one to one: one function per command, the command's
options as keyword arguments with the same defaults and the same checks, and a typed result
whose ``to_json()`` is the document ``onnxlady COMMAND --json`` prints.

- :func:`inspect` — the coupled channel groups of a model (:class:`InspectResult`);
- :func:`permute` / :func:`unpermute` — shuffle every permutable group, with a
  :class:`PermutationKey` that restores the original bit for bit (:class:`PermuteResult`,
  :class:`UnpermuteResult`);
- :func:`verify` — ONNX Runtime equivalence check (:class:`VerifyResult`);
- :func:`perturb` — noise, quantization, pruning of the weights (:class:`PerturbResult`);
- :func:`resync` — put a permuted, perturbed or converted copy back in a reference's order
  (:class:`ResyncResult`);
- :func:`match` — pair the groups of two models a converter made differ (:class:`MatchResult`);
- :func:`audit` — is a suspect the reference up to permutation, and what was done to it
  (:class:`AuditResult`);
- :func:`embed_watermark` / :func:`extract_watermark` — a white-box mark in one Conv layer
  (:class:`WatermarkResult`, :class:`WatermarkExtraction`);
- :func:`demo` — all of it on a small model onnxlady builds (:class:`DemoResult`);
- :func:`build_index` / :func:`find` / :func:`find_all_pairs` — provenance at registry scale:
  fingerprint a registry into one index file, rank its models against a suspect, list every
  cluster of related models (:class:`IndexResult`, :class:`FindResult`, :class:`ClusterResult`).

Every model argument is a path or an ``onnx.ModelProto``, and no function changes a model it
is given; results that carry a model have ``save(path)``. Bad input raises
:class:`OnnxladyError`. :func:`load_model`, :func:`save_model`, :func:`read_key` and
:func:`analyze` are the building blocks for the rest.

Example::

    import onnxlady

    permuted = onnxlady.permute("model.onnx", output="shuffled.onnx", seed=7, verify=True)
    print(permuted.permuted_neurons, permuted.equivalent)
    restored = onnxlady.unpermute("shuffled.onnx", permuted.key)
    assert restored.weights_identical_to_source

The lower-level functions that work in place on an analysed model (``draw_permutations``,
``permute_model``, ``unpermute_model``, ``verify_models``, ``match_models``,
``graph_fingerprint``) stay importable from here for existing code, outside ``__all__``.
"""

# ruff: file-ignore[module-import-not-at-top-of-file]
# (the public API's imports come after the start-up handler below, which must precede them)

# Ctrl-C while the command line is still importing (numpy, onnx: seconds on a loaded machine)
# ends as it does later on: one line, exit 130, never a traceback. The handler goes in before
# any heavy import, only when this process is the ``onnxlady`` command; ``cli.main`` takes over.
import contextlib as _contextlib
import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """SIGINT before the command line's own handling: nothing was written yet, so exit at once."""
    _os.write(2, b"onnxlady: interrupted\n")
    _os._exit(130)


def _started_as_command() -> bool:
    """Whether this process is the ``onnxlady`` console script or ``python -m onnxlady``."""
    if _sys.argv[:1] == ["-m"]:  # runpy imports the package before it names the module in argv
        argv = list(getattr(_sys, "orig_argv", ()))
        return any(argv[i : i + 2] == ["-m", "onnxlady"] for i in range(len(argv) - 1))
    name = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return name.removesuffix(".exe").removesuffix("-script.py") == "onnxlady"


if _started_as_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    with _contextlib.suppress(ValueError):  # imported outside the main thread: signals are not ours to set
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)

# isort: split

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from onnxlady._errors import OnnxladyError

if _TYPE_CHECKING:  # what each name is, for type checkers and readers; imported on first use (__getattr__)
    from onnxlady._analysis._channels import ChannelAnalysis, ChannelGroup, GroupMember, TensorPermutation, analyze
    from onnxlady._api._audit import AuditResult, audit
    from onnxlady._api._demo import DemoResult, demo
    from onnxlady._api._inspect import InspectResult, inspect
    from onnxlady._api._match import MatchResult, match
    from onnxlady._api._permute import PermuteResult, permute
    from onnxlady._api._perturb import PerturbResult, perturb
    from onnxlady._api._provenance import (
        Candidate,
        Cluster,
        ClusterResult,
        Confirmation,
        FindResult,
        IndexResult,
        UnreadableFile,
        build_index,
        find,
        find_all_pairs,
    )
    from onnxlady._api._resync import ResyncResult, resync
    from onnxlady._api._unpermute import UnpermuteResult, unpermute
    from onnxlady._api._verify import VerifyResult, verify
    from onnxlady._api._watermark import (
        WatermarkExtraction,
        WatermarkResult,
        embed_watermark,
        extract_watermark,
        read_watermark_key,
    )
    from onnxlady._audit._verdicts import AuditReport
    from onnxlady._graph._expr import FreezeReason
    from onnxlady._io._files import LoadedModel, load_model, save_model
    from onnxlady._io._progress import ProgressReporter
    from onnxlady._resync._match import ConversionFinding, GroupPair, ModelMatch, UnmatchedGroup
    from onnxlady._resync._solver import GroupResync
    from onnxlady._transforms._key import PermutationKey, read_key
    from onnxlady._transforms._perturb import PerturbReport, TensorChange
    from onnxlady._transforms._watermark import WatermarkKey
    from onnxlady._verify._compare import OutputComparison, VerifyReport

    # isort: split
    # Lower-level building blocks that work in place on an analysed model: kept importable for
    # existing code, not part of the public API (``__all__``).
    from onnxlady._resync._match import match_models as match_models
    from onnxlady._transforms._key import graph_fingerprint as graph_fingerprint
    from onnxlady._transforms._permute import draw_permutations as draw_permutations
    from onnxlady._transforms._permute import permute_model as permute_model
    from onnxlady._transforms._permute import unpermute_model as unpermute_model
    from onnxlady._verify._compare import verify_models as verify_models

__all__ = [
    "AuditReport",
    "AuditResult",
    "Candidate",
    "ChannelAnalysis",
    "ChannelGroup",
    "Cluster",
    "ClusterResult",
    "Confirmation",
    "ConversionFinding",
    "DemoResult",
    "FindResult",
    "FreezeReason",
    "GroupMember",
    "GroupPair",
    "GroupResync",
    "IndexResult",
    "InspectResult",
    "LoadedModel",
    "MatchResult",
    "ModelMatch",
    "OnnxladyError",
    "OutputComparison",
    "PermutationKey",
    "PermuteResult",
    "PerturbReport",
    "PerturbResult",
    "ProgressReporter",
    "ResyncResult",
    "TensorChange",
    "TensorPermutation",
    "UnmatchedGroup",
    "UnpermuteResult",
    "UnreadableFile",
    "VerifyReport",
    "VerifyResult",
    "WatermarkExtraction",
    "WatermarkKey",
    "WatermarkResult",
    "analyze",
    "audit",
    "build_index",
    "demo",
    "embed_watermark",
    "extract_watermark",
    "find",
    "find_all_pairs",
    "inspect",
    "load_model",
    "match",
    "permute",
    "perturb",
    "read_key",
    "read_watermark_key",
    "resync",
    "save_model",
    "unpermute",
    "verify",
]
__version__ = "0.1.0"


#: Where each name of the package lives (the ``_TYPE_CHECKING`` imports above, which
#: tests/test_lazy_package.py holds equal). A name is imported on first use
#: (:func:`__getattr__`): ``onnxlady permute`` then imports what permuting needs, not the
#: audit, the provenance index or the resync of converted copies (a fifth of its CPU time on a
#: small model).
_MODULES: dict[str, str] = {  # module: its names, separated by spaces
    "onnxlady._analysis._channels": "ChannelAnalysis ChannelGroup GroupMember TensorPermutation analyze",
    "onnxlady._api._audit": "AuditResult audit",
    "onnxlady._api._demo": "DemoResult demo",
    "onnxlady._api._inspect": "InspectResult inspect",
    "onnxlady._api._match": "MatchResult match",
    "onnxlady._api._permute": "PermuteResult permute",
    "onnxlady._api._perturb": "PerturbResult perturb",
    "onnxlady._api._provenance": (
        "Candidate Cluster ClusterResult Confirmation FindResult IndexResult "
        "UnreadableFile build_index find find_all_pairs"
    ),
    "onnxlady._api._resync": "ResyncResult resync",
    "onnxlady._api._unpermute": "UnpermuteResult unpermute",
    "onnxlady._api._verify": "VerifyResult verify",
    "onnxlady._api._watermark": (
        "WatermarkExtraction WatermarkResult embed_watermark extract_watermark "
        "read_watermark_key"
    ),
    "onnxlady._audit._verdicts": "AuditReport",
    "onnxlady._graph._expr": "FreezeReason",
    "onnxlady._io._files": "LoadedModel load_model save_model",
    "onnxlady._io._progress": "ProgressReporter",
    "onnxlady._resync._match": "ConversionFinding GroupPair ModelMatch UnmatchedGroup match_models",
    "onnxlady._resync._solver": "GroupResync",
    "onnxlady._transforms._key": "PermutationKey read_key graph_fingerprint",
    "onnxlady._transforms._perturb": "PerturbReport TensorChange",
    "onnxlady._transforms._watermark": "WatermarkKey",
    "onnxlady._verify._compare": "OutputComparison VerifyReport verify_models",
    "onnxlady._transforms._permute": "draw_permutations permute_model unpermute_model",
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names.split()}


def __getattr__(name: str) -> _Any:
    """Import a name of the package on first use; a public one is named after the package.

    As onnx-ir does (``onnxlady.permute``, not ``onnxlady._api._permute.permute``): the private
    module an object lives in is an implementation detail; help() and tracebacks show the name
    users import.
    """
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    if name in __all__:
        value.__module__ = __name__
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The package's names, those not imported yet included."""
    return sorted(set(globals()) | set(_WHERE))


OnnxladyError.__module__ = __name__
