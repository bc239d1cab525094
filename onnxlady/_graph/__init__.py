"""Layer 1, graph: a read-only view of an ONNX graph, constant folding of shape arithmetic and the index-map algebra of channel permutations."""
