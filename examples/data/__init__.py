"""Data preparation for the examples (``python examples/data/prepare_data.py``)."""
