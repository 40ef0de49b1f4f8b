"""Reading data files: JSON Lines and JSON lists directly, the rest through ``datasets``; the same records either way."""

from __future__ import annotations

import json

import pytest

from actors.data import DataError, load_records


def via_datasets(path) -> list[dict]:
    datasets = pytest.importorskip("datasets")

    return datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True).to_list()


RECORDS = [
    {"instruction": "add", "input": "1 + 2", "output": "3"},
    {"instruction": "reverse", "output": "c b a"},  # no "input": filled with None, as datasets does
    {"messages": [{"role": "user", "content": "hi"}], "output": "x"},
]


def test_jsonl_records_equal_what_datasets_reads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")  # a trailing blank line is fine
    got = load_records(str(path))
    assert got == via_datasets(path)
    assert got[1] == {"instruction": "reverse", "input": None, "output": "c b a", "messages": None}


def test_json_list_equals_jsonl(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_records(str(tmp_path / "d.json")) == load_records(str(tmp_path / "d.jsonl"))


def test_one_line_file_is_one_record(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(RECORDS[0]))
    assert load_records(str(path)) == [RECORDS[0]]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"a": 1}\n{"a": 2\n{"a": 3}\n', "line 2 as JSON"),
        ('{"a": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
        ("", "has no records"),
    ],
)
def test_malformed_json_lines_name_the_line(tmp_path, text, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=words) as err:
        load_records(str(path))
    assert str(err.value).startswith("data.path:")
