"""Helpers for tests of onnxlady and of code built on it (like ``numpy.testing``)."""
