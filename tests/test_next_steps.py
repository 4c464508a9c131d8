"""Every command's closing line names what to do with what it wrote, and that works: each output
(LoRA, NOLA and DSEE adapters, a healed, a pruned and an svd-llm checkpoint) loads from the line's
Python call, evaluates to the "after" perplexity its run printed, and generates, through the
commands the line prints, run as printed from the folder the user ran them in."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from compressor.cli.main import app
from typer.testing import CliRunner

import compressor

pytestmark = pytest.mark.slow

# name -> the command that writes runs/<name> (small settings: the embedded model, few steps).
PRODUCERS = {
    "svd-llm": "compress --method svd-llm --rank 0.8 --calib-windows 8 --out runs/svd-llm",
    "prune": "compress --method prune --out runs/prune",
    "heal": "finetune --method heal runs/svd-llm --steps 2 --out runs/heal",
    "lora": "finetune --method lora --steps 2 --lr 3e-3 --out runs/lora",
    "nola": "finetune --method nola --steps 2 --out runs/nola",
    "dsee": "finetune --method dsee --steps 2 --out runs/dsee",
}
TICKED = re.compile(r"`([^`]+)`")


def read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def invoke(line: str):
    result = CliRunner().invoke(app, shlex.split(line))
    assert result.exit_code == 0, f"`compressor {line}` failed:\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    """Run every producer once in a scratch folder: (the folder, {name: its closing line})."""
    folder = tmp_path_factory.mktemp("next-steps")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        lines = {name: invoke(command + " -q").strip().splitlines()[-1] for name, command in PRODUCERS.items()}
    return folder, lines


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_the_closing_line_says_how_to_use_the_output_and_each_step_works(name, produced, monkeypatch):
    folder, lines = produced
    line = lines[name]
    assert line.startswith(f"wrote runs/{name} ("), line
    kind = "adapter" if name in ("lora", "nola", "dsee") else "compressed checkpoint"
    assert kind in line
    steps = TICKED.findall(line)
    assert steps == [f"compressor eval runs/{name}", f"compressor generate runs/{name}",
                     f"compressor.load('runs/{name}')"]
    monkeypatch.chdir(folder)
    after = read_json(f"runs/{name}/report.json")["evaluation"]["after"]["perplexity"]
    evaluated = invoke(steps[0].removeprefix("compressor "))
    assert f"perplexity {after:.4f} over" in evaluated  # "after" was measured on what was written
    generated = invoke(steps[1].removeprefix("compressor ")).strip()
    assert generated.startswith("Once upon a time") and len(generated) > len("Once upon a time") + 10
    model = eval(steps[2], {"compressor": compressor})  # the line's own Python call
    assert isinstance(model, torch.nn.Module) and model.config.model_type == "llama"


def test_compress_and_finetune_take_an_adapter_run_as_model(produced, monkeypatch):
    folder, _ = produced
    monkeypatch.chdir(folder)
    lora_after = read_json("runs/lora/report.json")["evaluation"]["after"]["perplexity"]
    invoke("compress runs/lora --method prune --out runs/lora-pruned -q")
    before = read_json("runs/lora-pruned/report.json")["evaluation"]["before"]["perplexity"]
    assert before == pytest.approx(lora_after, rel=1e-6)  # base + adapter, merged, is what was compressed
    nola_after = read_json("runs/nola/report.json")["evaluation"]["after"]["perplexity"]
    invoke("finetune runs/nola/adapter --method lora --steps 1 --out runs/nola-lora -q")
    report = read_json("runs/nola-lora/report.json")
    assert report["evaluation"]["before"]["perplexity"] == pytest.approx(nola_after, rel=1e-6)
    # The new adapter's base is the NOLA adapter, which loads the same way: the chain resolves.
    assert read_json("runs/nola-lora/adapter/adapter_config.json")["base_model_name_or_path"] \
        == str(folder / "runs" / "nola" / "adapter")
    assert f"perplexity {report['evaluation']['after']['perplexity']:.4f}" in invoke("eval runs/nola-lora -q")


def test_lora_on_a_compressed_checkpoint_is_refused_before_loading_with_a_command_that_works(produced,
                                                                                            monkeypatch):
    folder, _ = produced
    monkeypatch.chdir(folder)
    result = CliRunner().invoke(app, shlex.split("finetune runs/svd-llm --method lora --steps 1 --out runs/no"))
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith("error: lora wraps plain linears, and 35 of its targets in `runs/svd-llm` are "
                           "compressed layers") and "perplexity" not in line
    assert "`compressor finetune --method heal runs/svd-llm`" in line and not (folder / "runs" / "no").exists()


def test_plain_transformers_names_the_import_a_compressed_checkpoint_needs(produced):
    import subprocess
    import sys

    folder, _ = produced
    code = ("import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(folder / 'runs' / 'svd-llm')!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=folder,
                          check=False)
    assert done.returncode != 0  # refused: no random weights
    assert "import_compressor_first_to_load_this_checkpoint" in done.stdout + done.stderr
