"""compressor.layers is self-contained: rebuilding any compressed layer (or a whole compressed
checkpoint) in a fresh process imports neither peft nor a method or adapter module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from compressor.layers import LAYER_TYPES, LowRankLinear, NMSparseLinear
from compressor.models import save
from compressor.targeting import replace_module
from compressor.testing import tiny_llama

SPECS = {
    "low_rank": {"in_features": 8, "out_features": 6, "rank": 2, "bias": True},
    "nm_sparse": {"in_features": 8, "out_features": 6, "n": 2, "m": 4},
    "dense_sparse": {"in_features": 8, "out_features": 6, "k": 8, "n": 2, "m": 4},
    "lora": {"in_features": 8, "out_features": 6, "rank": 2, "scaling": 2.0},
    "nola": {"in_features": 8, "out_features": 6, "rank": 2, "num_basis_a": 4, "num_basis_b": 4,
             "alpha": 4.0, "seed": 3},
    "dsee": {"in_features": 8, "out_features": 6, "rank": 2, "alpha": 4.0, "num_sparse": 5},
    "quant": {"in_features": 8, "out_features": 6, "bits": 3, "group_size": 4, "symmetric": False,
              "bias": True, "correction_rank": 2},
    "low_rank_quant": {"in_features": 8, "out_features": 6, "rank": 4, "bits": 4, "group_size": 4,
                       "u_group_size": 2, "symmetric": True, "bias": True},
    "nm_sparse_quant": {"in_features": 8, "out_features": 6, "n": 2, "m": 4, "bits": 4, "group_size": 2,
                        "symmetric": False, "bias": False},
    "quant_embedding": {"in_features": 8, "out_features": 6, "bits": 4, "group_size": 4, "symmetric": True},
    "quant_tied_head": {"in_features": 8, "out_features": 6},
}

FORBIDDEN = """
import sys
bad = sorted(m for m in sys.modules
             if m == "peft" or m.startswith(("peft.", "compressor.methods", "compressor.adapters")))
print("FORBIDDEN", bad)
"""


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code + FORBIDDEN], capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_every_layer_kind_is_in_the_table_and_has_a_spec():
    assert set(LAYER_TYPES) == set(SPECS)


def test_rebuilding_every_layer_kind_imports_no_method_or_peft():
    code = (f"import json\nfrom compressor.layers import build_layer\n"
            f"specs = json.loads({json.dumps(json.dumps(SPECS))})\n"
            "for kind, args in specs.items():\n"
            "    layer = build_layer({'type': kind, 'args': args})\n"
            "    assert layer.layer_type == kind and layer.in_features == 8\n")
    assert "FORBIDDEN []" in _run(code)


@pytest.mark.slow
def test_loading_a_compressed_checkpoint_imports_no_method_or_peft(tmp_path):
    model = tiny_llama()
    proj = model.model.layers[0].self_attn.q_proj
    u, v = torch.randn(proj.out_features, 4), torch.randn(4, proj.in_features)
    replace_module(model, "model.layers.0.self_attn.q_proj", LowRankLinear.from_factors(u, v))
    mlp = model.model.layers[1].mlp.up_proj
    dense = mlp.weight.detach().clone()
    dense.view(-1, 4)[:, 2:] = 0  # two zeros in every group of four: exactly 2:4
    replace_module(model, "model.layers.1.mlp.up_proj", NMSparseLinear.from_dense(dense, 2, 4))
    save(model, tmp_path / "ckpt")
    ids = torch.arange(12)[None]
    expected = model(ids).logits
    torch.save(expected, tmp_path / "expected.pt")
    code = (f"import torch, compressor\nmodel = compressor.load({str(tmp_path / 'ckpt')!r})\n"
            f"want = torch.load({str(tmp_path / 'expected.pt')!r})\n"
            "assert torch.allclose(model(torch.arange(12)[None]).logits, want, atol=1e-5)\n")
    assert "FORBIDDEN []" in _run(code)
