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


def test_parquet_that_decodes_past_the_limit_is_refused(tmp_path, monkeypatch):
    """A small compressed file that decodes to far more (here 100,000 rows of one 1,000-character text,
    dictionary-encoded: about 100 MB decoded from a file of a few KB, whose footer says so too) was read
    whole into the worker that every job on its base model shares. It is decoded a batch at a time and
    refused once past the limit."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": ["a" * 1000] * 100_000}), path, compression="zstd")
    assert path.stat().st_size < 2**20
    monkeypatch.setenv("LORAFLEET_MAX_DATA_GIB", "0.01")
    with pytest.raises(DataError, match=r"data\.path: .*bomb\.parquet decodes to more than the 0\.01 GiB a data file may "
                                        r"hold in memory \(100000 rows, 0\.0 MiB on disk\); split it, or raise "
                                        r"LORAFLEET_MAX_DATA_GIB"):  # fmt: skip
        load_records(str(path))
    monkeypatch.setenv("LORAFLEET_MAX_DATA_GIB", "lots")
    with pytest.raises(DataError, match=r"LORAFLEET_MAX_DATA_GIB: must be a number of GiB > 0 \(got 'lots'\)"):
        load_records(str(path))
    monkeypatch.delenv("LORAFLEET_MAX_DATA_GIB")
    assert len(load_records(str(path))) == 100_000  # the default 4 GiB takes it


def test_parquet_records_equal_what_datasets_reads(tmp_path):
    """Parquet is read with pyarrow directly now; the records are what ``datasets`` gave: every column,
    nulls as None, lists and nested structs as Python lists and dicts."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    table = pa.table({
        "instruction": ["add", "reverse", None],
        "input": ["1 + 2", None, "x"],
        "input_ids": [[1, 2, 3], [4], []],
        "score": [1.5, None, -2.0],
        "n": [1, 2, None],
        "messages": [[{"role": "user", "content": "hi"}], [], None],
    })  # fmt: skip
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=2)  # two row groups
    want = datasets.load_dataset("parquet", data_files=str(path), split="train", keep_in_memory=True).to_list()
    assert load_records(str(path)) == want
    assert load_records(str(path))[2]["messages"] is None and load_records(str(path))[1]["input_ids"] == [4]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"data\.path: cannot read .*bad\.parquet as parquet: "):
        load_records(str(tmp_path / "bad.parquet"))


def test_parquet_dictionary_columns_count_their_decoded_rows(tmp_path, monkeypatch):
    """A categorical column (pandas ``Categorical`` written with ``to_parquet``) of many distinct texts:
    each 1,024-row batch carried the whole dictionary in ``nbytes``, so 50,000 rows of 1 KB (49 MiB)
    counted 2.4 GiB and the file was refused."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"{i:06d}" + "x" * 1000 for i in range(20_000)]
    table = pa.table({"text": pa.array(texts).dictionary_encode()})
    path = tmp_path / "cat.parquet"
    pq.write_table(table, path)
    monkeypatch.setenv("LORAFLEET_MAX_DATA_GIB", "0.1")  # 100 MiB: the 20 MB of texts fit
    records = load_records(str(path))
    assert len(records) == 20_000 and records[123]["text"] == texts[123]
    monkeypatch.setenv("LORAFLEET_MAX_DATA_GIB", "0.01")  # 10 MiB: they do not
    with pytest.raises(DataError, match=r"decodes to more than the 0\.01 GiB"):
        load_records(str(path))


def test_csv_cells_are_read_as_written(tmp_path):
    """pandas' type inference turned the answer 02108 into 2108.0, 2.50 into 2.5 and the text NA into a
    missing value (the no-input template), silently; every cell is text, only an empty one is missing."""
    path = tmp_path / "d.csv"
    path.write_text("\ufeffinstruction,input,output\nZip of,Boston,02108\nPrice of,NA,2.50\nCount,,3\nnull,x,null\n",
                    encoding="utf-8")  # fmt: skip
    assert load_records(str(path)) == [
        {"instruction": "Zip of", "input": "Boston", "output": "02108"},
        {"instruction": "Price of", "input": "NA", "output": "2.50"},
        {"instruction": "Count", "input": None, "output": "3"},
        {"instruction": "null", "input": "x", "output": "null"},
    ]


def test_field_types_and_label_lengths_are_checked_as_validate_reads_them(tmp_path):
    """What an audit found passing: a list trained as its repr (``['red', 'blue']``), token ids given
    as text (validate said ok, train failed), and labels longer than input_ids when both were cut to
    max_seq_len first (misaligned labels). A number is still text (an answer of 4 is "4")."""
    from actors.config import DataSettings
    from actors.data import check_records, tokenize_record

    def refused(records, fmt, words):
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        with pytest.raises(DataError, match=words):
            check_records(DataSettings(str(path), format=fmt, max_seq_len=3))

    refused([{"instruction": "w1", "output": ["red", "blue"]}], "alpaca",
            r"record 0: field 'output' must be text \(got \['red', 'blue'\]\)")  # fmt: skip
    refused([{"prompt": {"q": 1}, "completion": "w2"}], "text", r"record 0: field 'prompt' must be text")
    refused([{"input_ids": "hello"}], "tokens", r"record 0: input_ids must be a list of integer token ids \(got str\)")
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"instruction": "2+2", "output": 4}) + "\n")
    assert check_records(DataSettings(str(path), format="alpaca")) == 1
    with pytest.raises(DataError, match=r"labels has 6 tokens but input_ids has 4"):
        tokenize_record({"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8, 9, 9]}, "tokens", None,
                        DataSettings("x", format="tokens", max_seq_len=3))  # fmt: skip


def test_a_json_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "w1 w2"}\n{"text": "w3"}\n')
    assert load_records(str(path)) == [{"text": "w1 w2"}, {"text": "w3"}]


def test_records_left_with_nothing_to_train_are_counted_in_a_warning(tmp_path, caplog):
    """A record whose labels are all -100 (or whose prompt fills max_seq_len) was kept in silence."""
    from actors.config import DataSettings
    from actors.data import load_examples

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"input_ids": [5, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, -100]}, {"input_ids": [8, 9]}]))  # fmt: skip
    with caplog.at_level("WARNING", logger="actors.data"):
        examples = load_examples(DataSettings(str(path), format="tokens"), None)
    assert len(examples) == 3
    assert "1 of 3 records have no token to train on (e.g. record 1:" in caplog.text
