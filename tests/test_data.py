import json

import pytest
import torch

from compressor.data import load_texts, make_windows, split_stream, windows_for
from compressor.errors import DataError


def test_default_text_splits_never_overlap(tokenizer):
    calib = windows_for(tokenizer, "default", split="calib", seq_len=64)
    held = windows_for(tokenizer, "default", split="eval", seq_len=64)
    assert calib.shape[1] == held.shape[1] == 64 and calib.shape[0] > 100
    stream = torch.arange(100)
    assert set(split_stream(stream, "calib").tolist()).isdisjoint(split_stream(stream, "eval").tolist())


def test_windows_seeded_subset_and_errors():
    stream = torch.arange(1000)
    a = make_windows(stream, 10, 5, seed=1)
    assert a.shape == (5, 10) and torch.equal(a, make_windows(stream, 10, 5, seed=1))
    assert not torch.equal(a, make_windows(stream, 10, 5, seed=2))
    with pytest.raises(DataError, match="fewer than one window"):
        make_windows(torch.arange(5), 10, None)


def test_file_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    (tmp_path / "b.tsv").write_text("sentence\tlabel\nhello there\t1\nbye\t0\n")
    (tmp_path / "c.csv").write_text("body,label\nhello,1\n")
    assert load_texts(str(tmp_path / "a.jsonl")) == ["doc 0", "doc 1", "doc 2"]
    assert load_texts(str(tmp_path / "b.tsv")) == ["hello there", "bye"]
    with pytest.raises(DataError, match=r"no text column `text` \(columns: body, label\)"):
        load_texts(str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
