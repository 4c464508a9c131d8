"""Compressed layers call compressor.kernels: greedy generation gives identical tokens with the
Triton kernels (interpreted on CPU) and with the torch references (COMPRESSOR_KERNELS=ref)."""

import pytest
import torch

from compressor.layers import LowRankLinear
from compressor.targeting import linear_weight, replace_module, select_linears

pytest.importorskip("triton")


def _factor_half_rank(model):
    for name, module in select_linears(model, ["re:.*layers\\.0\\.(self_attn|mlp)\\.(q_proj|down_proj)"]).items():
        weight = linear_weight(module).detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        rank = max(1, min(weight.shape) // 2)
        replace_module(model, name, LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank]))


@pytest.mark.slow
def test_greedy_tokens_identical_with_kernels_on_and_off(stories, monkeypatch):
    model, tokenizer = stories.model, stories.tokenizer
    _factor_half_rank(model)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    outputs = {}
    for backend in ("ref", "triton"):
        monkeypatch.setenv("COMPRESSOR_KERNELS", backend)
        with torch.no_grad():
            outputs[backend] = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.equal(outputs["ref"], outputs["triton"])
