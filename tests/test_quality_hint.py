"""The one-line hint after a run whose quality did not move or collapsed: every flag it names is
one the method that ran takes, as the command that ran it spells it."""

from types import SimpleNamespace

from compressor.cli.outcome import quality_hint


def ev(before, after):
    return {"before": {"perplexity": before}, "after": {"perplexity": after}}


def stage(name, kind="compress", **config):
    return SimpleNamespace(stage=name, kind=kind, config=config)


def test_collapse_after_compression_suggests_a_higher_rank_and_healing_the_output():
    hint = quality_hint(ev(3.9, 58.7), [stage("svd-llm", rank=0.6)], "compress", "runs/svd")
    assert hint.startswith("hint: held-out perplexity rose 15×")
    assert "a higher --rank, e.g. 0.8" in hint
    assert "`compressor finetune --method heal runs/svd --out runs/svd-healed`" in hint


def test_prune_hint_never_names_rank_and_suggests_what_prune_takes():
    magnitude = quality_hint(ev(3.9, 121.2), [stage("prune", score="magnitude", pattern="2:4")], "compress", "p")
    assert "--rank" not in magnitude and "--set score=sparsegpt" in magnitude and "--method heal p" in magnitude
    sparsegpt = quality_hint(ev(3.9, 121.2), [stage("prune", score="sparsegpt", pattern="2:4")], "compress", "p")
    assert "--rank" not in sparsegpt and "--ignore" in sparsegpt


def test_dsformer_hint_names_keep_bytes_and_recipes_use_set_with_the_stage_index():
    assert "a higher --keep-bytes, e.g. 0.8" in quality_hint(ev(3.9, 60.0), [stage("dsformer", keep_bytes=0.6)],
                                                              "compress")
    hint = quality_hint(ev(3.9, 60.0), [stage("analyze", "analyze"), stage("saes-svd", rank=0.4)], "run", "o")
    assert "--set stages.1.rank=0.6" in hint and "--rank" not in hint


def test_unmoved_finetune_suggests_a_larger_lr():
    hint = quality_hint(ev(3.914, 3.914), [stage("lora", "finetune")], "finetune")
    assert "did not move" in hint and "larger learning rate (--lr" in hint and "(--steps)" in hint


def test_diverged_finetune_suggests_a_lower_lr():
    assert "lower the learning rate (--lr;" in quality_hint(ev(3.9, 39324.0), [stage("lora", "finetune")], "finetune")
    assert "--set stages.0.lr=" in quality_hint(ev(3.9, 39324.0), [stage("mezo", "finetune")], "run")


def test_no_hint_for_a_normal_run_or_missing_numbers():
    assert quality_hint(ev(3.9, 5.1), [stage("svd", rank=0.8)], "compress") is None
    assert quality_hint(ev(3.99, 3.97), [stage("lora", "finetune")], "finetune") is None
    assert quality_hint({"after": {"embedding_cosine_to_dense": 0.9}}, [stage("svd")], "compress") is None


def test_a_factored_output_larger_than_a_quantized_input_is_told_to_quantize_it():
    from compressor.cli.outcome import size_lines

    size = {"dtype": "bfloat16", "before": {"disk_bytes": 98_400_000}, "after": {"disk_bytes": 183_900_000},
            "ratio": {"disk_bytes": 1.87, "memory_bytes": 0.683}}
    size_line, warning = size_lines(size, "runs/smol")
    assert size_line == "size: 183.9 MB written (bfloat16), 1.87× the input file (98.4 MB), 0.683× the dense " \
                        "model's in-memory bytes"
    assert warning.startswith("warning: the output is larger than the input file")
    assert "`compressor compress runs/smol --method gptq --bits 4`" in warning
