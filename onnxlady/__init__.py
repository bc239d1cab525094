"""onnxlady: permute, verify and re-synchronize the neurons of ONNX models at graph level."""

from onnxlady._errors import OnnxladyError

__all__ = ["OnnxladyError"]
__version__ = "0.1.0"
