"""CI scripts, importable from the repository root (``python -m ci.tiny_regression``)."""
