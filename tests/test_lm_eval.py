"""The lm-eval bridge: the shipped offline task, scores of the in-memory model (factored, pruned,
with an adapter) through lm-eval's HFLM, the same numbers as lm-eval run directly, task scores in
pipeline reports, and the one-line errors (unknown task, lm-eval missing, data needing the network).

Most tests score a 12-item task written into a tmp `--tasks-dir` (a YAML with local data files, the
offline route for any user task); the shipped 200-item `tinystories_cloze` runs in the CLI tests."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from compressor import lm_eval_bridge
from compressor.cli.main import app
from compressor.errors import ConfigError
from compressor.layers.low_rank import LowRankLinear
from compressor.testing.lm_eval_tasks import write_mini_cloze

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra; CI installs it with `all`

TASK_DIR = lm_eval_bridge.SHIPPED_TASKS / "tinystories_cloze"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def cloze_module():
    spec = importlib.util.spec_from_file_location("cloze_data", TASK_DIR / "cloze_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """A 12-item copy of the shipped task as a plain YAML + local .jsonl in its own folder."""
    return write_mini_cloze(tmp_path_factory.mktemp("tasks"))


# -- the shipped task --------------------------------------------------------------------------


def test_shipped_items_are_rebuilt_from_the_excerpt_and_are_true_cloze_items():
    module = cloze_module()
    shipped = [json.loads(line) for line in (TASK_DIR / "tinystories_cloze.jsonl").read_text().splitlines()]
    assert shipped == module.build(module.EXCERPT.read_text(encoding="utf-8"))
    assert len(shipped) == 200
    paragraphs = [p.strip() for p in module.EXCERPT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    heldout = paragraphs[len(paragraphs) // 2:]
    for item in shipped:
        answer = item["choices"][item["label"]]
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4
        # the true word follows the context in a held-out paragraph
        assert any(p.startswith(f"{item['context']} {answer}") for p in heldout)
    assert "CDLA-Sharing-1.0" in (TASK_DIR / "LICENSE").read_text()


def test_lm_eval_keys_become_metric_names():
    values = {"alias": "x", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": "N/A",
              "exact_match,strict-match": 1.0, "flag,none": True}
    assert lm_eval_bridge._metrics(values) == {"acc": 0.5, "exact_match_strict-match": 1.0}
    assert lm_eval_bridge.flat_scores({"t": {"acc": 0.5}}) == {"t/acc": 0.5}


# -- scores of the in-memory model ---------------------------------------------------------------


def test_factored_model_is_scored_as_it_is_held(stories, small_task):
    """lm-eval runs the LowRankLinear modules themselves (forward hooks fire), and the score equals
    the dense model's only through them: the model is neither merged nor reloaded."""
    import compressor
    from compressor.context import Context
    from compressor.methods.svd import SVDConfig

    model, tokenizer = stories.model, stories.tokenizer
    compressor.apply_(model, SVDConfig(rank=0.5), Context.for_model(model, tokenizer))
    factored = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(factored) == 35
    seen = set()
    for name, module in factored.items():
        module.register_forward_hook(lambda mod, args, out, name=name: seen.add(name))
    scores = lm_eval_bridge.task_scores(model, tokenizer, ["mini_cloze"], tasks_dir=small_task)
    assert seen == set(factored)
    assert all(isinstance(m, LowRankLinear) for m in factored.values())  # still factored afterwards
    assert 0.0 <= scores["mini_cloze"]["acc"] <= 1.0 and scores["mini_cloze"]["acc"] * 12 % 1 == 0


def test_adapter_model_is_scored_with_its_adapter(stories, small_task):
    """A peft LoRA model goes to lm-eval as the PeftModel, unmerged: every lora_B runs."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(stories.model, config)
    adapters = [name for name, _ in model.named_modules() if name.endswith("lora_B.default")]
    seen = set()
    for name, module in model.named_modules():
        if name in adapters:
            module.register_forward_hook(lambda mod, args, out, name=name: seen.add(name))
    scores = lm_eval_bridge.task_scores(model, stories.tokenizer, ["mini_cloze"], tasks_dir=small_task)
    assert len(adapters) == 10 and seen == set(adapters)
    assert 0.0 <= scores["mini_cloze"]["acc"] <= 1.0


@pytest.mark.slow
def test_cli_eval_task_score_equals_lm_eval_run_directly(tmp_path):
    """`compressor eval CKPT --tasks tinystories_cloze` (the shipped task) prints the accuracy that
    lm-eval's own simple_evaluate reaches on compressor.load(CKPT)."""
    import compressor
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    ckpt = tmp_path / "svd"
    assert invoke("compress", "--method", "svd", "--rank", "0.8", "--out", ckpt, "-q").exit_code == 0
    result = invoke("eval", ckpt, "--tasks", "tinystories_cloze", "--out", tmp_path / "e", "-q")
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "e" / "eval.json").read_text())["tasks"]["tinystories_cloze"]
    assert f"tinystories_cloze: acc {ours['acc']:.4f}" in result.output

    model = compressor.load(ckpt)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(ckpt)
    factored = {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    seen = set()
    for name, module in model.named_modules():
        if name in factored:
            module.register_forward_hook(lambda mod, args, out, name=name: seen.add(name))
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
                                     tasks=["tinystories_cloze"], log_samples=False,
                                     task_manager=TaskManager(include_path=str(lm_eval_bridge.SHIPPED_TASKS)))
    assert direct["results"]["tinystories_cloze"]["acc,none"] == ours["acc"]
    assert direct["results"]["tinystories_cloze"]["acc_norm,none"] == ours["acc_norm"]
    assert len(factored) == 35 and seen == factored  # the checkpoint's factored layers, unmerged, ran


@pytest.mark.slow
def test_recipe_reports_task_scores_before_and_after(tmp_path, stories, small_task):
    """`evaluate: {tasks: [...]}` puts task scores beside perplexity, before and after the stages,
    in report.json and report.md; `before` is the dense model's score."""
    import compressor

    recipe = {"stages": [{"method": "prune"}], "out": str(tmp_path / "p"),
              "evaluate": {"tasks": ["mini_cloze"], "tasks_dir": str(small_task)}}
    report, _ = compressor.Pipeline.from_recipe(recipe).run(quiet=True)
    dense = lm_eval_bridge.task_scores(stories.model, stories.tokenizer, ["mini_cloze"], tasks_dir=small_task)
    assert report.evaluation["before"]["mini_cloze/acc"] == dense["mini_cloze"]["acc"]
    assert "mini_cloze/acc" in report.evaluation["after"] and "perplexity" in report.evaluation["after"]
    saved = json.loads((tmp_path / "p" / "report.json").read_text())["evaluation"]
    assert saved["after"]["mini_cloze/acc"] == report.evaluation["after"]["mini_cloze/acc"]
    assert "mini_cloze/acc" in (tmp_path / "p" / "report.md").read_text()


# -- one-line errors -----------------------------------------------------------------------------


def test_missing_lm_eval_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "compressor\[eval\]"'):
        lm_eval_bridge.import_lm_eval()


def test_cli_refuses_tasks_dir_that_is_not_a_folder(tmp_path):
    result = invoke("eval", "--tasks", "x", "--tasks-dir", tmp_path / "none")
    assert result.exit_code == 2 and result.output.startswith("error:") and "--tasks-dir" in result.output


@pytest.mark.slow
def test_cli_unknown_task_suggests_the_nearest(tmp_path):
    result = invoke("eval", "--tasks", "tinystories_cloz", "--out", tmp_path / "e")
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown lm-eval task `tinystories_cloz`")
    assert "did you mean `tinystories_cloze`?" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_cli_task_needing_the_hub_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = invoke("eval", "--tasks", "arc_easy", "--out", tmp_path / "e")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: task `arc_easy` needs its data from the Hugging Face Hub")
    assert "--tasks-dir" in result.output and len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "e").exists()
