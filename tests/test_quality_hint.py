"""The one-line hint after a run whose quality did not move or collapsed."""

from compressor.cli.common import quality_hint


def ev(before, after):
    return {"before": {"perplexity": before}, "after": {"perplexity": after}}


def test_collapse_after_compression_suggests_keep_ratio_and_healing():
    hint = quality_hint(ev(3.9, 58.7), {"compress"})
    assert hint.startswith("hint: held-out perplexity rose 15×")
    assert "--rank" in hint and "--method heal" in hint and "heal` stage" in hint


def test_unmoved_finetune_suggests_a_larger_lr():
    hint = quality_hint(ev(3.914, 3.914), {"finetune"})
    assert "did not move" in hint and "larger --lr" in hint


def test_diverged_finetune_suggests_a_lower_lr():
    assert "lower --lr" in quality_hint(ev(3.9, 39324.0), {"finetune"})


def test_no_hint_for_a_normal_run_or_missing_numbers():
    assert quality_hint(ev(3.9, 5.1), {"compress"}) is None
    assert quality_hint(ev(3.99, 3.97), {"finetune"}) is None
    assert quality_hint({"after": {"embedding_cosine_to_dense": 0.9}}, {"compress"}) is None
