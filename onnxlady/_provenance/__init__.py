"""Layer 65, provenance: permutation-invariant fingerprints of models, an index of them, and search."""
