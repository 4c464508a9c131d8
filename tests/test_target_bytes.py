"""gptq `target_bytes`: the written model.safetensors meets the byte budget exactly as predicted,
more bytes buy a lower calibration loss, an unreachable budget is refused before any work, the
allocation gives more bits to the matrix whose output error costs more, and the checkpoint loads
with from_pretrained after `import compressor` (plain transformers refuses it)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.methods._byte_allocation import (
    Format,
    allocate_formats,
    format_losses,
    format_options,
    safetensors_bytes,
)
from compressor.methods.gptq import GPTQConfig
from compressor.methods.gptq import apply as gptq_apply
from compressor.models import default_tokenizer, load_model, save
from compressor.testing import tiny_llama

CALIB = {"num_windows": 4, "seq_len": 64, "batch_size": 4}


def test_header_prediction_matches_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"b.scales": torch.zeros(3, 7, dtype=torch.bfloat16), "a.qweight": torch.zeros(5, 11, dtype=torch.uint8),
               "c": torch.zeros(2, dtype=torch.float32), "d.weight": torch.zeros(0, dtype=torch.bfloat16),
               "e": torch.zeros(4, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    entries = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    assert safetensors_bytes(entries, {"format": "pt"}) == (tmp_path / "x.safetensors").stat().st_size


def test_options_skip_groups_that_do_not_divide_and_merge_per_channel():
    # 64 columns: g64 is per-channel; 172 columns: only per-channel; ranks below min(out, in)
    assert format_options((32, 64), [4], [64, 0], [0, 40]) == [Format(4, 64, 0)]
    assert format_options((64, 172), [3, 4], [64, 0], [0, 8]) == [
        Format(3, 172, 0), Format(3, 172, 8), Format(4, 172, 0), Format(4, 172, 8)]


def test_the_matrix_with_the_costlier_output_error_gets_more_bits():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=gen)
    formats = format_options((16, 64), [2, 3, 4, 8], [0], [0])
    size = {f: 16 * 64 * f.bits // 8 + 32 for f in formats}  # codes + 16 fp16 scales

    def choose(loud: float) -> tuple[int, int]:
        options = {name: [(f, size[f], loss) for f, loss in zip(formats, format_losses(weight, scale * torch.eye(64), formats))]
                   for name, scale in (("quiet", 1.0), ("loud", loud))}
        chosen = allocate_formats(options, budget=size[Format(8, 64)] + size[Format(2, 64)])
        return chosen["loud"].bits, chosen["quiet"].bits

    assert choose(loud=1.0) == (4, 4)  # equal Hessians: equal bits
    assert choose(loud=100.0) == (8, 2)  # an output error 100x costlier buys the other matrix's bits


def test_a_full_rank_correction_prices_zero_loss():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    hessian = torch.eye(16) + 0.1
    zero, full = format_losses(weight, hessian, [Format(2, 16, 0), Format(2, 16, 8)])
    assert zero > 0 and full == pytest.approx(0.0, abs=1e-5 * zero)  # float32 singular values


@functools.cache
def _quantized(target: float, **fields):
    model = tiny_llama(hidden=64, intermediate=128)
    ctx = Context(tokenizer=default_tokenizer(), quiet=True, checkpoint_dtype=torch.bfloat16)
    fields = {"group_options": (32, 0), "bit_options": (2, 3, 4, 8), **CALIB, **fields}
    config = GPTQConfig(target_bytes=target, **fields)
    return model, gptq_apply(model, config, ctx)


def test_budgets_are_met_on_disk_exactly_as_predicted_and_more_bytes_lower_the_loss(tmp_path):
    losses = []
    for target in (0.2, 0.35, 0.55):  # the cheapest formats (int2 embedding too) take 0.14
        model, result = _quantized(target, embedding_bit_options=(2, 3, 4, 8))
        folder = save(model, tmp_path / f"q{target}", default_tokenizer(), dtype=torch.bfloat16)
        size = (folder / "model.safetensors").stat().st_size
        assert size == result.metrics["predicted_bytes"] <= result.metrics["budget_bytes"]
        assert result.metrics["budget_bytes"] == int(target * result.metrics["dense_bf16_bytes"])
        assert size > 0.9 * result.metrics["budget_bytes"]  # the budget is spent, not just respected
        losses.append(result.metrics["predicted_loss"])
    assert losses[0] > losses[1] > losses[2]


def test_corrections_are_bought_when_offered_and_stay_in_the_budget(tmp_path):
    model, result = _quantized(0.5, correction_ranks=(0, 4, 16), bit_options=(2, 3))
    ranks = {r["correction_rank"] for r in result.per_module}
    assert ranks - {0}  # some matrix took a correction
    folder = save(model, tmp_path / "q", default_tokenizer(), dtype=torch.bfloat16)
    assert (folder / "model.safetensors").stat().st_size == result.metrics["predicted_bytes"] <= result.metrics["budget_bytes"]


def test_an_unreachable_budget_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["compress", "--method", "gptq", "--target-bytes", "0.05", "--group-size", "0",
                                      "--dtype", "bfloat16", "--out", str(out)])
    assert result.exit_code != 0
    assert "`target_bytes`=0.05" in result.output and "raise `target_bytes` to at least" in result.output
    assert "calibration" not in result.output.lower()  # refused before the calibration pass
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="target_bytes"):
        GPTQConfig(target_bytes=1.5)
    with pytest.raises(ConfigError, match="correction_ranks"):
        GPTQConfig(target_bytes=0.3, correction_rank=8)


FRESH = """
import sys, torch, transformers
folder = sys.argv[1]
try:
    transformers.AutoModelForCausalLM.from_pretrained(folder)
except Exception as err:
    print("REFUSED", type(err).__name__, "compressor" in sys.modules)
import compressor
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
ours = compressor.load(folder)
ids = torch.arange(40)[None] % 500
print("EQUAL", torch.equal(hf(ids).logits, ours(ids).logits), sorted({m.bits for m in hf.modules() if hasattr(m, 'qweight')}))
"""


def test_a_target_bytes_checkpoint_loads_with_from_pretrained_after_import_compressor(tmp_path):
    model, result = _quantized(0.35, embedding_bit_options=(2, 3, 4, 8))  # as above (cached)
    folder = save(model, tmp_path / "q", default_tokenizer(), dtype=torch.bfloat16)
    bits = sorted({r["bits"] for r in result.per_module})
    assert len(bits) > 1  # a mixed-format checkpoint
    output = subprocess.run([sys.executable, "-c", FRESH, str(folder)], capture_output=True, text=True,
                            timeout=300, check=True).stdout
    assert "REFUSED RuntimeError False" in output
    assert f"EQUAL True {bits}" in output
    assert load_model(str(folder)).model is not None


def test_a_file_over_its_budget_is_not_published():
    from compressor.pipeline import record_budgets, result_problems
    from compressor.report.records import Report, StageRecord

    def report(disk: int) -> Report:
        metrics = {"budget_bytes": 1000, "predicted_bytes": 990, "dense_bf16_bytes": 4000}
        record = StageRecord("gptq", "compress", {}, metrics, [], [], {}, {}, 0.0, modified_model=False)
        return Report(stages=[record], size={"after": {"disk_bytes": disk}})

    within, over = report(990), report(1001)
    for r in (within, over):
        record_budgets(r)
    assert within.stages[0].notes == ["bytes budget 1000 vs on disk 990 (predicted 990; 0.2475 of the dense bf16 checkpoint)"]
    assert result_problems(None, within) == []
    assert result_problems(None, over) == ["stage `gptq`: model.safetensors is 1001 bytes, over its `target_bytes` "
                                           "budget of 1000 (predicted 990)"]
