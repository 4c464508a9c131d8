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
from typer.testing import CliRunner

import compressor
from compressor.cli.main import app

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
    after = json.loads(open(f"runs/{name}/report.json").read())["evaluation"]["after"]["perplexity"]
    evaluated = invoke(steps[0].removeprefix("compressor "))
    assert f"perplexity {after:.4f} over" in evaluated  # "after" was measured on what was written
    generated = invoke(steps[1].removeprefix("compressor ")).strip()
    assert generated.startswith("Once upon a time") and len(generated) > len("Once upon a time") + 10
    model = eval(steps[2], {"compressor": compressor})  # noqa: S307 (the line's own Python call)
    assert isinstance(model, torch.nn.Module) and model.config.model_type == "llama"
