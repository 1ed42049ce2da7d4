"""verl_cppo.launch.data_check on hand-built parquet and JSON-lines files: every kind of missing field is found with
its file, rows and key; complete files and files that are not on this machine are not errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from verl_cppo.launch.data_check import SHOWN_ROWS, missing_fields

FIELDS = {"reward_model.ground_truth": "string"}


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"q{i}", "reward_model": {"style": "rule", "ground_truth": str(i)}} for i in range(n)]


def _parquet(tmp_path, rows, name="d.parquet") -> str:
    path = str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_complete_files_pass_and_the_rows_are_counted(tmp_path):
    errors, notes = missing_fields([_parquet(tmp_path, _rows(7))], FIELDS, "data.train_files")
    assert errors == [] and "data.train_files: 7 rows checked for ['reward_model.ground_truth']" in notes[-1]


def test_null_field_and_null_parent_are_both_named_by_row(tmp_path):
    rows = _rows(5)
    rows[1]["reward_model"]["ground_truth"] = None
    rows[3]["reward_model"] = None  # the whole struct missing
    path = _parquet(tmp_path, rows)
    errors, _ = missing_fields([path], FIELDS, "data.val_files")
    assert errors == [f"data.val_files: {path} rows 1, 3 (2 of 5) have no reward_model.ground_truth (null); "
                      "the configured reward reads it from every row"]  # fmt: skip


def test_many_bad_rows_are_shown_up_to_the_limit(tmp_path):
    rows = _rows(20)
    for row in rows[2:]:
        row["reward_model"]["ground_truth"] = None
    (error,) = missing_fields([_parquet(tmp_path, rows)], FIELDS, "k")[0]
    assert f"rows {', '.join(str(i) for i in range(2, 2 + SHOWN_ROWS))}, ... (18 of 20)" in error


def test_missing_column_missing_child_and_wrong_type(tmp_path):
    no_column = _parquet(tmp_path, [{"prompt": "q"}], "a.parquet")
    no_child = _parquet(tmp_path, [{"reward_model": {"style": "rule"}}], "b.parquet")
    numeric = _parquet(tmp_path, [{"reward_model": {"ground_truth": 3}}], "c.parquet")
    errors, _ = missing_fields([no_column, no_child, numeric], FIELDS, "k")
    assert errors == [
        f"k: {no_column} has no reward_model.ground_truth (the configured reward reads it from every row)",
        f"k: {no_child} has no reward_model.ground_truth (the configured reward reads it from every row)",
        f"k: {numeric} stores reward_model.ground_truth as int64, the configured reward needs a string",
    ]


def test_json_lines_are_read_like_parquet(tmp_path):
    rows = _rows(3)
    rows[2]["reward_model"]["ground_truth"] = None
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    errors, _ = missing_fields([str(path)], FIELDS, "k")
    assert errors == [f"k: {path} rows 2 (1 of 3) have no reward_model.ground_truth (null); "
                      "the configured reward reads it from every row"]  # fmt: skip


def test_files_not_on_this_machine_are_notes(tmp_path):
    errors, notes = missing_fields(["hdfs://cluster/train.parquet", str(tmp_path / "absent.parquet")], FIELDS, "k")
    assert errors == [] and sum("not checked" in n for n in notes) == 2
