import math

import pytest
import torch

from compressor.analysis import spectra
from compressor.analysis.analyze import AnalyzeConfig, apply
from compressor.context import Context
from compressor.errors import ModelError
from compressor.targeting import linear_weight, select_linears
from compressor.testing import tiny_llama


def test_spectral_quantities_on_known_matrix():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert spectra.condition_number(sigma, eps=0.0) == 4.0
    p = sigma / sigma.sum()
    assert spectra.effective_rank(sigma) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-6)
    assert spectra.effective_rank(torch.ones(5)) == pytest.approx(5.0, rel=1e-6)
    assert spectra.stable_rank(sigma) == pytest.approx((16 + 4 + 1 + 1) / 16)
    normalised = spectra.welore_normalise(sigma)
    assert normalised.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert spectra.welore_removed(normalised, 0.5) == 3


def test_welore_tau_bisection_hits_target_from_below():
    torch.manual_seed(0)
    spectra_list = [torch.linalg.svdvals(torch.randn(40, 30) @ torch.diag(torch.rand(30) ** k))
                    for k in (1, 3, 6)]
    for target in (0.2, 0.5, 0.7):
        tau = spectra.welore_tau(spectra_list, target)
        reached = spectra.welore_reduction(spectra_list, tau)
        assert reached <= target + 1e-9
        # one more rank would overshoot: the bisection found the largest admissible τ
        assert spectra.welore_reduction(spectra_list, tau + 1e-4) >= reached
        assert target - reached < 1 / 90 + 1e-9


def test_welore_removes_more_from_heavy_tails():
    flat = torch.linspace(1.0, 0.9, 32)
    heavy = torch.logspace(0, -3, 32)
    tau = spectra.welore_tau([flat, heavy], 0.5)
    assert spectra.welore_removed(spectra.welore_normalise(heavy), tau) > spectra.welore_removed(
        spectra.welore_normalise(flat), tau)


def test_kappatune_precedence():
    kappas = {"a": 5.0, "b": 1.0, "c": 3.0, "d": 10.0, "e": 2.0}
    assert spectra.kappatune_select(kappas, top_p=0.4) == ["b", "e"]
    assert spectra.kappatune_select(kappas, num_modules=3, top_p=0.4) == ["b", "e", "c"]
    assert spectra.kappatune_select(kappas, top_p=None, threshold=3.0) == ["b", "e", "c"]
    assert spectra.kappatune_select(kappas, top_p=0.01) == ["b"]  # at least one


def test_analyze_matches_svdvals_on_real_checkpoint(stories):
    result = apply(stories.model, AnalyzeConfig(use_cache=False), Context(tokenizer=stories.tokenizer, quiet=True))
    modules = select_linears(stories.model)
    assert len(result.per_module) == len(modules) == 35
    for row in result.per_module:
        sigma = torch.linalg.svdvals(linear_weight(modules[row["module"]]).detach().float())
        expected = (sigma[0] / (sigma[-1] + 1e-8)).item()
        assert row["kappa"] == pytest.approx(expected, rel=1e-4)
    kept = {row["type"]: row["welore_kept"] for row in result.per_module}
    assert len(set(kept.values())) > 1  # non-uniform across layer types
    assert sum(r["kappatune_selected"] for r in result.per_module) == math.floor(0.2 * 35)


def test_second_run_uses_cache():
    model = tiny_llama()
    ctx = Context(quiet=True)
    first = apply(model, AnalyzeConfig(), ctx)
    second = apply(model, AnalyzeConfig(), ctx)
    assert second.metrics["cache_hits"] == len(second.per_module) == 14
    assert [r["kappa"] for r in first.per_module] == [r["kappa"] for r in second.per_module]


def test_nan_weights_name_the_layers():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"1 layer\(s\) hold NaN/Inf weights: model.layers.1.mlp.up_proj"):
        apply(model, AnalyzeConfig(), Context(quiet=True))


def test_next_steps_name_the_low_rank_matrices_and_the_commands_that_factor_them():
    from compressor.analysis.analyze import AnalyzeConfig, next_steps

    rows = [{"type": t, "lrc": lrc} for t, lrc in [("q_proj", True), ("k_proj", True), ("up_proj", True),
                                                  ("q_proj", True), ("k_proj", False), ("up_proj", False)]]
    lines = next_steps(rows, "runs/my model", AnalyzeConfig())
    assert lines[0] == ("next: 4 of 6 matrices are low-rank enough to factor (more than 50% of their rank "
                        "removable): q_proj 2/2, k_proj 1/2, up_proj 1/2")
    assert "`compressor compress 'runs/my model' --method welore --rank 0.5 --out compressed-welore`" in lines[1]
    assert lines[2].endswith("--method saes-svd --rank 0.6 --targets q_proj --out compressed-saes-svd`")
    none = next_steps([{"type": "q_proj", "lrc": False}], "default", AnalyzeConfig())
    assert len(none) == 1 and "`compressor compress --method saes-svd --rank 0.8" in none[0]
