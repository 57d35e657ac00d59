"""Evaluation during and after training: STS correlations and retrieval metrics, with the eval
texts embedded across ranks."""
