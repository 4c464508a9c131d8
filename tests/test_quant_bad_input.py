"""Weights holding NaN / Inf are refused by rtn and gptq in one line before anything changes
(the Python API) and by the CLI with a non-zero exit and nothing written."""

from __future__ import annotations

import pytest
import torch
from compressor.cli.main import app
from typer.testing import CliRunner

from compressor.context import Context
from compressor.errors import ModelError
from compressor.layers import QuantLinear
from compressor.methods.gptq import GPTQConfig
from compressor.methods.gptq import apply as gptq_apply
from compressor.methods.rtn import RTNConfig
from compressor.methods.rtn import apply as rtn_apply
from compressor.models import default_tokenizer, save
from compressor.testing import tiny_llama


@pytest.mark.parametrize("apply, config", [(rtn_apply, RTNConfig(group_size=16)),
                                           (gptq_apply, GPTQConfig(group_size=16, num_windows=2, seq_len=16))])
def test_a_nan_weight_is_refused_before_any_layer_changes(apply, config):
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(ModelError, match=r"`model.layers.1.mlp.up_proj` holds NaN/Inf weights") as err:
        apply(model, config, Context.for_model(model))
    assert "\n" not in str(err.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_an_infinite_embedding_is_refused():
    model = tiny_llama()
    model.model.embed_tokens.weight.data[7, 0] = float("inf")
    with pytest.raises(ModelError, match="the input embedding` holds NaN/Inf"):
        rtn_apply(model, RTNConfig(group_size=16, embedding_bits=8), Context(quiet=True))
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_the_cli_exits_non_zero_in_one_line_and_writes_nothing(tmp_path):
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.data[0, 0] = float("inf")
    save(model, tmp_path / "bad", default_tokenizer())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "bad"), "--method", "rtn", "--group-size", "16",
                                      "--out", str(out), "-q"])
    text = result.output.strip()
    assert result.exit_code != 0 and text.startswith("error:") and "NaN/Inf" in text and "\n" not in text, text
    assert not out.exists()
