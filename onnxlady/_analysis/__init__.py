"""Layer 3, analysis: the coupled channel groups of a model, computed once from the rule registry."""
