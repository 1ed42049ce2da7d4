"""The dataset columns a reward function reads, checked in the data files before Ray starts.

A reward module may declare what it reads from every row as a module-level ``DATA_FIELDS`` mapping, a dotted
column path (verl's row layout: ``reward_model.ground_truth``) to the Arrow type family it needs ("string").
The driver (``launch_checks``) loads the configured reward the way verl does, reads that declaration from the
loaded module (so a user's copy of a reward file carries its own), and runs ``missing_fields`` on
``data.train_files`` and ``data.val_files``: a row without the field fails the launch, naming the file, the
rows and the key, instead of failing inside the reward at whatever step first draws it.

Only the named top-level columns are read (Arrow's columnar reader; parquet, and JSON lines as verl's
``RLHFDataset`` reads ``.json`` / ``.jsonl``), so a 100k-row file costs well under a second. Files that are not
on this machine (another node's disk, ``hdfs://``) are reported as not checked, not as errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

__all__ = ["TYPE_FAMILIES", "missing_fields"]

TYPE_FAMILIES = {"string": "a string"}
"""The type families a ``DATA_FIELDS`` entry may name, and how an error message says them."""

SHOWN_ROWS = 5
"""At most this many offending row numbers are named per file and key."""


def _read(path: str, columns: list[str]):
    """The top-level ``columns`` of a parquet or JSON-lines file as an Arrow table (a missing column is absent)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        present = set(pq.read_schema(path).names)
        return pq.read_table(path, columns=[c for c in columns if c in present])
    import pyarrow.json as pj

    table = pj.read_json(path)
    return table.select([c for c in columns if c in table.column_names])


def _field(table, dotted: str):
    """The column at a dotted path (struct children below the top level), nulls of any parent included; or None."""
    import pyarrow.compute as pc

    top, *children = dotted.split(".")
    if top not in table.column_names:
        return None
    column = table.column(top).combine_chunks()
    for child in children:
        if column.type.num_fields == 0 or column.type.get_field_index(child) < 0:
            return None
        parent_null = column.is_null()
        column = pc.if_else(parent_null, None, column.field(child))
    return column


def _type_ok(arrow_type, family: str) -> bool:
    import pyarrow as pa

    if family == "string":
        return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_null(arrow_type)
    raise ValueError(f"DATA_FIELDS names the type {family!r}; known: {sorted(TYPE_FAMILIES)}")


def missing_fields(files: Iterable[str], fields: Mapping[str, str], data_key: str) -> tuple[list[str], list[str]]:
    """``(errors, notes)`` for the rows of ``files`` (the value of config key ``data_key``) that lack a field of
    ``fields`` ({dotted path: type family}) or hold it with another type; notes say what was checked or not."""
    import pyarrow.compute as pc

    start = time.perf_counter()
    errors, notes, rows = [], [], 0
    for path in files:
        local = os.path.expanduser(str(path))
        if not os.path.isfile(local) or not local.endswith((".parquet", ".json", ".jsonl")):
            notes.append(f"{data_key}: {path} not checked for the reward's fields (not a local parquet/JSON file)")
            continue
        try:
            table = _read(local, sorted({f.split(".")[0] for f in fields}))
        except Exception as exc:  # e.g. a JSON array, which verl's loader reads and Arrow's line reader does not
            notes.append(f"{data_key}: {path} not checked for the reward's fields ({type(exc).__name__}: {exc})")
            continue
        rows += table.num_rows
        for dotted, family in fields.items():
            column = _field(table, dotted)
            if column is None:
                errors.append(f"{data_key}: {path} has no {dotted} (the configured reward reads it from every row)")
                continue
            if not _type_ok(column.type, family):
                errors.append(
                    f"{data_key}: {path} stores {dotted} as {column.type}, the configured reward needs "
                    f"{TYPE_FAMILIES[family]}"
                )
                continue
            bad = pc.indices_nonzero(column.is_null()).to_pylist()
            if bad:
                shown = ", ".join(str(i) for i in bad[:SHOWN_ROWS]) + (", ..." if len(bad) > SHOWN_ROWS else "")
                errors.append(
                    f"{data_key}: {path} rows {shown} ({len(bad)} of {table.num_rows}) have no {dotted} (null); "
                    "the configured reward reads it from every row"
                )
    notes.append(f"{data_key}: {rows} rows checked for {sorted(fields)} in {time.perf_counter() - start:.2f} s")
    return errors, notes
