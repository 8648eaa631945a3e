"""Result CSVs kept in the repo: appending rows, also when a benchmark gains columns."""
import csv

from mage.provenance import append_csv_rows


def _read(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_append_writes_the_header_once(tmp_path):
    path = tmp_path / "r.csv"
    append_csv_rows(path, ["a", "b"], [{"a": 1, "b": 2}])
    append_csv_rows(path, ["a", "b"], [{"a": 3, "b": 4}])
    header, rows = _read(path)
    assert header == ["a", "b"] and rows == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]


def test_new_columns_extend_the_header_and_keep_old_rows(tmp_path):
    path = tmp_path / "r.csv"
    append_csv_rows(path, ["a", "b"], [{"a": 1, "b": 2}])
    append_csv_rows(path, ["a", "c", "b"], [{"a": 3, "c": 5, "b": 4}])
    header, rows = _read(path)
    assert header == ["a", "b", "c"]
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
    assert not (tmp_path / "r.csv.tmp").exists()
