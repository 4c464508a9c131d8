"""Tuning data: splits never overlap, k-shot sampling, batch order, and the input errors."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.errors import ConfigError, DataError
from compressor.training import TrainConfig
from compressor.training.data import (
    build_task_data,
    label_token_ids,
    read_labelled_rows,
    split_examples,
)


@pytest.fixture
def unique_jsonl(tmp_path):
    """60 rows, unique texts, three labels."""
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"text": f"row number {i}", "label": ["a", "b", "c"][i % 3]})
            for i in range(60)
        )
    )
    return str(path)


def _classification(data, **kw):
    return TrainConfig(task="classification", data=data, **{"num_eval": 12, "batch_size": 4, **kw})


def test_held_out_rows_never_train_and_k_shot_draws_k_per_label(unique_jsonl):
    train, held_out = split_examples(_classification(unique_jsonl, k_shot=5), seed=0)
    assert len(held_out) == 12
    assert not {t for t, _ in train} & {t for t, _ in held_out}
    counts = {label: sum(1 for _, lab in train if lab == label) for label in "abc"}
    assert counts == {"a": 5, "b": 5, "c": 5}
    again, _ = split_examples(_classification(unique_jsonl, k_shot=5), seed=0)
    other, _ = split_examples(_classification(unique_jsonl, k_shot=5), seed=1)
    assert again == train and other != train


def test_lm_train_and_eval_windows_do_not_overlap(ctx):
    data = build_task_data(TrainConfig(seq_len=64, num_eval=8), ctx)
    train = {tuple(w.tolist()) for w in data.train["input_ids"]}
    assert len(train) > 100 and not train & {tuple(w.tolist()) for w in data.eval["input_ids"]}


def test_batches_walk_seeded_epoch_permutations(ctx, tuning_text):
    data = build_task_data(TrainConfig(seq_len=64, num_train=12, num_eval=4, data=tuning_text), ctx)
    rows = {tuple(w.tolist()): i for i, w in enumerate(data.train["input_ids"])}
    first_epoch = [
        rows[tuple(w.tolist())]
        for b in range(3)
        for w in data.train_batch(b, 4, seed=0)["input_ids"]
    ]
    assert sorted(first_epoch) == list(range(12))  # every window exactly once per epoch
    again = [rows[tuple(w.tolist())] for w in data.train_batch(1, 4, seed=0)["input_ids"]]
    assert again == first_epoch[4:8]  # a pure function of (seed, index): resumes see the same data
    second_epoch = [
        rows[tuple(w.tolist())]
        for b in range(3, 6)
        for w in data.train_batch(b, 4, seed=0)["input_ids"]
    ]
    assert sorted(second_epoch) == list(range(12)) and second_epoch != first_epoch


def test_missing_label_column_lists_the_columns(ctx, sentiment_tsv):
    with pytest.raises(
        DataError, match=r"`label_column` 'target' is not in .*columns found: sentence, label"
    ):
        build_task_data(_classification(sentiment_tsv, label_column="target"), ctx)


def test_labels_without_a_label_word_are_listed(ctx, unique_jsonl):
    config = _classification(unique_jsonl, label_words={"a": "sad", "b": "happy"})
    with pytest.raises(DataError, match=r"labels 'c' in `data` have no entry in `label_words`"):
        build_task_data(config, ctx)


def test_dataset_smaller_than_one_batch(ctx, unique_jsonl, tuning_text):
    with pytest.raises(
        DataError, match=r"gave 8 training examples, fewer than one batch \(`batch_size`=16\)"
    ):
        build_task_data(_classification(unique_jsonl, num_eval=52, batch_size=16), ctx)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_task_data(TrainConfig(data=tuning_text, seq_len=512, num_train=3, batch_size=4), ctx)


def test_prompt_inputs_end_at_the_prompt_and_label_words_differ(ctx, tokenizer, sentiment_tsv):
    config = _classification(
        sentiment_tsv, label_words={"0": "sad", "1": "happy"}, prompt="{text}. She was"
    )
    data = build_task_data(config, ctx)
    ids = label_token_ids(tokenizer, config.prompt, ["sad", "happy"])
    assert torch.equal(data.label_token_ids, ids) and ids[0] != ids[1]
    last = data.train["attention_mask"].sum(1) - 1
    was = tokenizer(" was", add_special_tokens=False)["input_ids"][-1]
    assert (data.train["input_ids"][torch.arange(len(last)), last] == was).all()
    assert data.labels == ("0", "1") and set(data.train["labels"].tolist()) == {0, 1}


def test_labelled_file_errors(tmp_path):
    with pytest.raises(DataError, match="ending in .tsv, .csv, .jsonl"):
        read_labelled_rows(tmp_path / "x.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_labelled_rows(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"schedule": "step"}, "`schedule` must be one of 'constant', 'linear', 'cosine'"),
        ({"steps": 0}, "`steps` must be an integer >= 1, got 0"),
        ({"lr": -1.0}, "`lr` must be > 0"),
        ({"label_words": {"0": "bad"}, "prompt": "no placeholder"}, "must contain the placeholder"),
        ({"mixed_precision": "fp8"}, "`mixed_precision` must be one of"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


def test_config_round_trips_through_a_dict():
    config = TrainConfig.from_dict({"steps": 5, "label_words": {0: "bad", 1: "good"}, "lr": 1})
    assert config.label_words == {"0": "bad", "1": "good"} and config.lr == 1.0
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="did you mean `steps`"):
        TrainConfig.from_dict({"step": 5})
