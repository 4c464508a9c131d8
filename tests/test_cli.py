"""CLI behaviour: the acceptance commands of the foundation and every bad-input path
(one-line error, non-zero exit, no traceback, nothing written)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compressor.cli.main import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment, code=None):
    assert result.exit_code != 0
    if code is not None:
        assert result.exit_code == code
    text = result.output.strip()
    assert "Traceback" not in text
    assert text.startswith("error:") and fragment in text
    assert len([line for line in text.splitlines() if line.strip()]) <= 3  # one logical line, soft-wrapped


def test_analyze_writes_report_and_plots(tmp_path):
    out = tmp_path / "o"
    result = invoke("analyze", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert len(list(out.glob("*.png"))) >= 3
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["model"] == "default" and report["run"]["versions"]["torch"]
    assert len(report["stages"][0]["per_module"]) == 35


@pytest.mark.slow
def test_recipe_gives_same_report_as_flags(tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "analyze.yaml"
    assert invoke("analyze", "--out", tmp_path / "a", "-q").exit_code == 0
    assert invoke("run", recipe, "--out", tmp_path / "b", "-q").exit_code == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())["stages"][0]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["stages"][0]
    assert a["config"] == b["config"]
    assert a["per_module"] == b["per_module"]


def test_eval_default_perplexity_in_expected_range(tmp_path):
    result = invoke("eval", "-q", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    ppl = json.loads((tmp_path / "e" / "eval.json").read_text())["perplexity"]
    assert 3.5 < ppl < 8.0  # stories260K on the first 64 held-out windows: 3.99


def test_missing_model_path(tmp_path):
    result = invoke("analyze", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    result = invoke("analyze", tmp_path / "junk", "--out", tmp_path / "o")
    assert_one_line_error(result, "is not a model")
    assert not (tmp_path / "o").exists()


def test_unknown_method(tmp_path):
    result = invoke("compress", "--method", "sdv", "--out", tmp_path / "o")
    assert_one_line_error(result, "unknown method `sdv`; did you mean `svd`", code=2)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage,fragment", [({"method": "analyze", "topp": 0.1}, "did you mean `top_p`"),
                                            ({"method": "analyze", "top_p": "many"}, "must be a number")])
def test_bad_recipe(tmp_path, stage, fragment):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [stage]}))
    result = invoke("run", recipe, "--out", tmp_path / "o")
    assert_one_line_error(result, fragment, code=2)
    assert "stages[0]" in result.output
    assert not (tmp_path / "o").exists()


def test_malformed_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [method: analyze\n  - : :")
    assert_one_line_error(invoke("run", recipe), "not valid YAML", code=2)


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root ignores mode bits; sysfs refuses new entries even to root
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_read_only_out(tmp_path):
    target = _read_only_dir(tmp_path) / "compressor-out"
    result = invoke("analyze", "--out", target)
    assert_one_line_error(result, "not writable")
    assert not target.exists()


def test_nan_checkpoint_names_layers(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with torch.no_grad():
        model.model.layers[2].self_attn.v_proj.weight[1, 1] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(stories_dir / name, tmp_path / "nan" / name)
    result = invoke("analyze", tmp_path / "nan", "--out", tmp_path / "o")
    assert_one_line_error(result, "model.layers.2.self_attn.v_proj")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_console_script_runs_analyze_with_no_arguments():
    exe = shutil.which("compressor")
    command = [exe] if exe else [sys.executable, "-m", "compressor.cli.main"]
    done = subprocess.run([*command, "analyze", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "WeLore" in done.stdout and "KappaTune" in done.stdout


@pytest.mark.parametrize("args,fragment", [
    (["compress", "--method", "dsformer", "--rank", "0.6"],
     "dsformer: `--rank` was renamed `--keep-bytes` (dsformer's budget counts stored bytes, not parameters)"),
    (["finetune", "--method", "lora", "--set", "rank=4"],
     "stages[0] (lora): `rank` was renamed `r` (peft's name for the adapter rank)"),
    (["finetune", "--method", "kappatune", "--set", "lora_rank=4"], "`lora_rank` was renamed `lora_r`"),
    (["compress", "--method", "lora"], "`--method lora` is not a compression method; use `compressor finetune --method lora`"),
])
def test_renamed_flags_and_keys_name_the_new_one(tmp_path, args, fragment):
    result = invoke(*args, "--out", tmp_path / "o")
    assert_one_line_error(result, fragment, code=2)
    assert not (tmp_path / "o").exists()


def test_new_names_fill_their_fields(tmp_path):
    from compressor.pipeline import Pipeline
    from compressor.registry import fields_from_flags

    assert fields_from_flags("dsformer", {"keep-bytes": 0.5, "calib-windows": 8}) == {"keep_bytes": 0.5,
                                                                                       "num_windows": 8}
    assert fields_from_flags("lora", {"r": 4}) == {"r": 4}
    assert fields_from_flags("kappatune", {"r": 4}) == {"lora_r": 4}
    stage = Pipeline.from_flags("nola", fields_from_flags("nola", {"r": 2})).stages[0]
    assert stage.config.r == 2
