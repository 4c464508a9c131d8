"""Architectures table: tiny random-init models built in code (2 layers, hidden 32, no downloads),
crossed with analyze / svd-llm / saes-svd / prune / lora. Each cell runs the Pipeline from a saved
HF folder, writes --out, reloads it with compressor.load and checks the outputs are the same."""

from __future__ import annotations

import pytest
import torch

import compressor
from compressor.errors import ConfigError
from compressor.pipeline import Pipeline
from compressor.testing.tiny import VOCAB, example_input_ids

CONTEXT = 128
EVALUATE = {"seq_len": 32, "num_windows": 2, "batch_size": 2}
CALIB = {"num_windows": 4, "seq_len": 32, "batch_size": 2}
METHODS = {
    "analyze": {},
    "svd": {"rank": 0.6},
    "svd-llm": {"rank": 0.6, **CALIB},
    "saes-svd": {"rank": 0.6, **CALIB},
    "prune": {"pattern": "unstructured", "sparsity": 0.5, "score": "magnitude", **CALIB},
    "lora": {"steps": 2, "batch_size": 2, "seq_len": 32, "num_eval": 2, "r": 2, "dropout": 0.0},
}


def _decoder(name, **extra):
    import transformers

    base = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": CONTEXT}
    return getattr(transformers, name)(**{**base, **extra})


def _configs():
    from transformers import BartConfig, BertConfig, GPT2Config, OPTConfig, T5Config

    return {
        "gpt2": (GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT), "GPT2LMHeadModel"),
        "opt": (OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=CONTEXT, word_embed_proj_dim=32), "OPTForCausalLM"),
        "qwen2": (_decoder("Qwen2Config", num_key_value_heads=2), "Qwen2ForCausalLM"),
        "mistral": (_decoder("MistralConfig", num_key_value_heads=2), "MistralForCausalLM"),
        "phi": (_decoder("PhiConfig"), "PhiForCausalLM"),
        "gemma": (_decoder("GemmaConfig", num_key_value_heads=2, head_dim=8), "GemmaForCausalLM"),
        "gpt_neox": (_decoder("GPTNeoXConfig", tie_word_embeddings=True), "GPTNeoXForCausalLM"),
        "bert": (BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=CONTEXT), "BertModel"),
        "bart": (BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=CONTEXT), "BartForConditionalGeneration"),
        "t5": (T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
               "T5ForConditionalGeneration"),
    }


ARCHS = ("gpt2", "opt", "qwen2", "mistral", "phi", "gemma", "gpt_neox", "bert", "bart", "t5")
ENCODER_DECODER = ("bart", "t5")
ENCODERS = ("bert", "bart", "t5")
CALIBRATED = ("svd-llm", "saes-svd", "prune")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One saved HF folder (weights + the stories260K tokenizer) per architecture."""
    import transformers

    tokenizer = compressor.models.default_tokenizer()
    folders = {}
    for arch, (config, cls_name) in _configs().items():
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(config).eval()
        folder = tmp_path_factory.mktemp(arch)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[arch] = folder
    return folders


def outputs(model, ids):
    """The model's main output tensor on `ids` (logits, or hidden states of a bare encoder)."""
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def cell_params():
    for arch in ARCHS:
        for method in METHODS:
            marks = [pytest.mark.slow] if arch not in ("gpt2", "qwen2", "bert") else []
            if method == "lora" and arch in ENCODERS:
                continue  # causal-LM fine-tuning; encoders are refused below
            if arch in ENCODER_DECODER and method in CALIBRATED:
                continue  # refused below
            if method == "svd" and arch not in ENCODER_DECODER:
                continue  # the data-free baseline: the encoder-decoders' compression cell
            yield pytest.param(arch, method, marks=marks, id=f"{arch}-{method}")


@pytest.mark.parametrize("arch, method", list(cell_params()))
def test_architecture_method_save_reload(model_dirs, tmp_path, arch, method):
    out = tmp_path / "out"
    evaluate = False if arch in ENCODER_DECODER else EVALUATE
    fields = {**METHODS[method], **({"ignore": ["wo"]} if arch == "t5" and method != "analyze" else {})}
    pipeline = Pipeline.from_flags(method, fields, model=str(model_dirs[arch]), out=str(out),
                                   evaluate=evaluate)
    report, loaded = pipeline.run(quiet=True)
    assert type(loaded.model).__name__ == _configs()[arch][1]
    if method == "analyze":
        assert report.stages[0].metrics["layers"] > 0 and (out / "report.json").is_file()
        return
    after = report.evaluation.get("after", {})
    assert all(torch.isfinite(torch.tensor(float(v))) for v in after.values())
    ids = example_input_ids(batch=2, seq_len=16)
    if method == "lora":  # an unmerged adapter run writes the peft adapter alone
        import peft

        reloaded = peft.PeftModel.from_pretrained(compressor.load(model_dirs[arch]), out / "adapter").base_model.model
    else:
        reloaded = compressor.load(out)
    assert type(reloaded).__name__ == type(loaded.model).__name__
    torch.testing.assert_close(outputs(reloaded, ids), outputs(loaded.model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ENCODERS)
def test_lm_finetuning_of_an_encoder_is_refused_before_work(model_dirs, tmp_path, arch):
    pipeline = Pipeline.from_flags("lora", METHODS["lora"], model=str(model_dirs[arch]), out=str(tmp_path / "o"),
                                   evaluate=False)
    with pytest.raises(ConfigError, match="needs a causal LM"):
        pipeline.run(quiet=True)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ENCODER_DECODER)
def test_evaluating_an_encoder_decoder_is_refused_before_work(model_dirs, tmp_path, arch):
    pipeline = Pipeline.from_flags("svd", {"rank": 0.5}, model=str(model_dirs[arch]), out=str(tmp_path / "o"),
                                   evaluate=EVALUATE)
    with pytest.raises(ConfigError, match="encoder-decoder"):
        pipeline.run(quiet=True)


@pytest.mark.parametrize("arch", ENCODER_DECODER)
@pytest.mark.parametrize("method", CALIBRATED)
def test_calibrating_an_encoder_decoder_is_refused_before_work(model_dirs, tmp_path, arch, method):
    pipeline = Pipeline.from_flags(method, METHODS[method], model=str(model_dirs[arch]), out=str(tmp_path / "o"),
                                   evaluate=False)
    with pytest.raises(ConfigError, match="calibrated methods do not support encoder-decoder"):
        pipeline.run(quiet=True)


def test_compressing_t5_wo_is_refused_with_the_fix(model_dirs, tmp_path):
    pipeline = Pipeline.from_flags("svd", {"rank": 0.5}, model=str(model_dirs["t5"]), out=str(tmp_path / "o"),
                                   evaluate=False)
    with pytest.raises(ConfigError, match="--ignore wo"):
        pipeline.run(quiet=True)


def test_seq_len_above_the_context_is_refused(model_dirs, tmp_path):
    pipeline = Pipeline.from_flags("svd-llm", {**METHODS["svd-llm"], "seq_len": CONTEXT + 1},
                                   model=str(model_dirs["gpt2"]), out=str(tmp_path / "o"), evaluate=False)
    with pytest.raises(ConfigError, match=f"context is {CONTEXT}"):
        pipeline.run(quiet=True)
