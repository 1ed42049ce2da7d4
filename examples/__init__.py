"""Example launches, importable from the repository root (the tests import ``examples.dry_run``)."""
