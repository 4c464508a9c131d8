"""Hardening (issue 22): bad values on the command line, in recipes, in resume checkpoints, data
files and caches get one line naming the field / file / value and the fix (never the catch-all
`unexpected <Exception>`), and documented spellings (`--set pattern=2:4`) work. CLI-driven."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_hardening_outputs import home, invoke, refused  # noqa: F401  (home: a fixture)

TINY_FT = ["finetune", "--method", "backprop", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
           "--eval-windows", "1", "--set", "num_eval=2", "-q"]


# -- recipes and --set ------------------------------------------------------------------------------


def test_a_recipe_key_given_twice_is_refused(home):
    (home / "r.yaml").write_text("stages:\n  - method: svd\n    rank: 0.5\n    rank: 0.8\n")
    refused(["run", "r.yaml", "--dry-run"], 2, "key `rank` is given twice (line 4)")


@pytest.mark.slow
def test_set_pattern_2_4_is_the_n_m_pattern_not_a_base_60_number(home):
    result = invoke("compress", "--method", "prune", "--set", "pattern=2:4", "--eval-windows", "1", "-q", "--out", "p")
    assert result.exit_code == 0, result.output
    layers = json.loads((home / "p" / "config.json").read_text())["quantization_config"]["layers"]
    assert {(spec["args"]["n"], spec["args"]["m"]) for spec in layers.values()} == {(2, 4)}
    (home / "r.yaml").write_text("stages:\n  - method: prune\n    pattern: 2:4\n")
    assert "pattern: '2:4'" in invoke("run", "r.yaml", "--dry-run").stdout


@pytest.mark.parametrize(("value", "fragment"), [(".nan", "`max_grad_norm` must be a finite number, got nan"),
                                                 (".inf", "`max_grad_norm` must be a finite number, got inf"),
                                                 ("-.inf", "must be >= 0, got 0.0 and -inf")])
def test_non_finite_numbers_are_refused(home, value, fragment):
    refused([*TINY_FT, "--set", f"max_grad_norm={value}", "--out", "o"], 2, fragment)
    assert not (home / "o").exists()


def test_values_that_can_never_finish_are_refused(home):
    refused([*TINY_FT, "--steps", str(10**25)], 2, "`steps` is out of range")
    refused([*TINY_FT, "--steps", str(10**9)], 2, "`steps` is 1000000000, more than a run can finish",
            "at most 100,000,000")
    refused([*TINY_FT, "--seed", str(10**30)], 2, "`seed` is out of range")
    refused(["compress", "--method", "svd", "--max-memory", "cpu=abc", "-q"], 2, "the size for `cpu` is 'abc'",
            "0=20GiB,cpu=60GiB")
    refused(["finetune", "--method", "lora", "--r", "100000", "--steps", "1", "--eval-windows", "1", "-q"], 2,
            "r=100000 is larger than", "(64x64)", "--r 64")
    assert list(home.iterdir()) == []


def test_compressor_kernels_is_checked_at_start_up(home, monkeypatch):
    refused(["eval", "--eval-windows", "1", "-q"], 2, "COMPRESSOR_KERNELS is 'bogus'", "auto",
            env={"COMPRESSOR_KERNELS": "bogus"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(["eval", "--eval-windows", "1", "-q"], 2, "COMPRESSOR_KERNELS=triton needs", "COMPRESSOR_KERNELS=auto",
            env={"COMPRESSOR_KERNELS": "triton", "TRITON_INTERPRET": "0"})


# -- generate ----------------------------------------------------------------------------------------


def test_generate_zero_new_tokens_returns_the_prompt(home):
    result = invoke("generate", "--prompt", "Once upon a time", "--max-new-tokens", "0")
    assert result.exit_code == 0 and result.stdout.strip() == "Once upon a time", result.output


def test_generate_beyond_the_context_is_refused(home):
    refused(["generate", "--max-new-tokens", "100000"], 2, "`--max-new-tokens` is 100000", "context is 512",
            "at most 511")


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_and_counted(home):
    result = invoke("generate", "--prompt", "Once upon a time " * 300, "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert ("note: the prompt has 1201 tokens, more than the 509 that fit the model's context of 512 with 3 new "
            "tokens; its first 692 tokens were dropped") in result.stderr.replace("\n", " ")


# -- data, resume, cache, disk ----------------------------------------------------------------------


def test_a_parquet_file_with_magic_bytes_but_no_footer_is_named(home):
    (home / "d.parquet").write_bytes(b"PAR1" + b"\x00" * 4 + b"PAR1")
    refused(["eval", "--data", "d.parquet", "--eval-windows", "1", "-q"], 2, "`d.parquet` is not valid Parquet")


@pytest.fixture
def checkpointed(home) -> Path:
    """A tiny backprop run with checkpoints at steps 1 and 2."""
    result = invoke(*TINY_FT, "--set", "checkpoint_every=1", "--out", "ft")
    assert result.exit_code == 0, result.output
    return home / "ft" / "checkpoints"


@pytest.mark.parametrize("step", [-100, "2", 2.5, None])
def test_a_resume_meta_step_that_is_not_a_count_is_refused(checkpointed, step):
    meta = checkpointed / "step-2" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": step}))
    refused([*TINY_FT, "--steps", "4", "--resume", "ft", "--out", "ft2"], 2, "meta.json", f"`step` {step!r}",
            "not an integer >= 0")


def test_an_empty_optimizer_file_on_resume_is_named(checkpointed):
    (checkpointed / "step-2" / "optimizer.pt").write_bytes(b"")
    refused([*TINY_FT, "--steps", "4", "--resume", "ft", "--out", "ft2"], 2, "optimizer.pt", "damaged")


def per_module(folder: Path) -> list[dict]:
    return json.loads((folder / "report.json").read_text())["stages"][0]["per_module"]


@pytest.mark.slow
def test_a_damaged_spectra_cache_is_rebuilt_not_trusted(home, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(home / "cache"))
    assert invoke("analyze", "--out", "fresh", "-q").exit_code == 0
    entries = sorted((home / "cache" / "spectra").glob("*.safetensors"))
    assert len(entries) == 35
    for path in entries:  # every entry halved, its metadata kept: what the issue found trusted
        sigma = load_file(path)["sigma"]
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        save_file({"sigma": sigma[: len(sigma) // 2].contiguous()}, str(path), metadata=metadata)
    result = invoke("analyze", "--out", "again", "-q")
    assert result.exit_code == 0 and "(0 cached)" in result.stdout, result.output
    fresh, again = per_module(home / "fresh"), per_module(home / "again")
    assert again == fresh
    q_proj = next(row for row in again if row["module"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["full_rank"] == 64 and round(q_proj["kappa"], 1) == 2461.6
    assert "(35 cached)" in invoke("analyze", "-q").stdout  # the rebuilt entries are trusted again


def test_a_full_disk_while_writing_weights_says_so(home, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    message = refused(["compress", "--method", "svd", "--eval-windows", "1", "-q", "--out", "o"], 2,
                      "no space left on the device")
    assert "corrupt" not in message and "re-download" not in message
    assert list(home.iterdir()) == []
