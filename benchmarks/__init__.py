"""Benchmarks, importable from the repository root (``python -m benchmarks.stability.run_study``)."""
