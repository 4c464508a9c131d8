"""Every text format a user may have, read the same way; bad input gives one clear DataError."""

import json

import pytest

from compressor.data import load_texts
from compressor.errors import DataError

DOCS = ["Once upon a time there was a cat.", "The dog ran, fast; home."]


def write_all_formats(folder, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{column: d, "label": i} for i, d in enumerate(DOCS)]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "d.json").write_text(json.dumps(rows))
    (folder / "wrapped.json").write_text(json.dumps({"data": rows}))
    (folder / "d.csv").write_text(f"{column},label\n" + "".join(f'"{d}",{i}\n' for i, d in enumerate(DOCS)))
    (folder / "d.tsv").write_text(f"{column}\tlabel\n" + "".join(f"{d}\t{i}\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
    return ["d.jsonl", "d.json", "wrapped.json", "d.csv", "d.tsv", "d.parquet"]


def test_every_tabular_format_gives_the_same_documents(tmp_path):
    for name in write_all_formats(tmp_path):
        assert load_texts(str(tmp_path / name)) == DOCS, name


def test_text_column_names_any_column(tmp_path):
    for name in write_all_formats(tmp_path, column="body"):
        with pytest.raises(DataError, match="--text-column"):
            load_texts(str(tmp_path / name))
        assert load_texts(str(tmp_path / name), text_column="body") == DOCS, name


def test_txt_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\r\nline two\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["line one\nline two\n"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_undecodable_bytes_are_one_line_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b'{"text": "caf\xe9"}\n' if suffix == ".jsonl" else b"text\ncaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(undecodable byte at position \d+\); convert it") as err:
        load_texts(str(path))
    assert "\n" not in str(err.value)


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_texts(str(tmp_path / "x.json"))
    (tmp_path / "y.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match="list of objects"):
        load_texts(str(tmp_path / "y.json"))


def test_unavailable_dataset_says_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"NAME\[:CONFIG\[:SPLIT\]\].*save the text locally and pass the path"):
        load_texts("no-such-user/no-such-dataset:cfg:test")
