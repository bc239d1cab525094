"""onnxlady: permute, verify and re-synchronize the neurons of ONNX models at graph level.

The public API re-exported here is what the command line uses:

- :func:`load_model` / :func:`save_model` — safe I/O (external data, atomic writes);
- :func:`analyze` — the coupled channel groups of a model (:class:`ChannelAnalysis`);
- :func:`draw_permutations`, :func:`permute_model`, :func:`unpermute_model` — permutation with a
  :class:`PermutationKey` that restores the original bit for bit;
- :func:`verify_models` — ONNX Runtime equivalence check (:class:`VerifyReport`);
- :func:`match_models` — the pairing of two models' groups when a converter ran on one of them
  (:class:`ModelMatch`), which resync and audit use for such suspects.
"""

from onnxlady._analysis._channels import ChannelAnalysis, ChannelGroup, GroupMember, TensorPermutation, analyze
from onnxlady._errors import OnnxladyError
from onnxlady._graph._expr import FreezeReason
from onnxlady._io._files import LoadedModel, load_model, save_model
from onnxlady._transforms._key import PermutationKey, graph_fingerprint, read_key
from onnxlady._resync._match import ConversionFinding, GroupPair, ModelMatch, UnmatchedGroup, match_models
from onnxlady._transforms._permute import draw_permutations, permute_model, unpermute_model
from onnxlady._verify._compare import VerifyReport, verify_models

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "ConversionFinding",
    "FreezeReason",
    "GroupMember",
    "GroupPair",
    "LoadedModel",
    "ModelMatch",
    "OnnxladyError",
    "PermutationKey",
    "TensorPermutation",
    "UnmatchedGroup",
    "VerifyReport",
    "analyze",
    "draw_permutations",
    "graph_fingerprint",
    "load_model",
    "match_models",
    "permute_model",
    "read_key",
    "save_model",
    "unpermute_model",
    "verify_models",
]
__version__ = "0.1.0"
