"""Layer 4, verification: run two models in ONNX Runtime and compare their outputs."""
