"""Tiny random transformers built in code, for fast tests of every method.

They use vocabulary size 512 so the embedded stories260K tokenizer (and thus the embedded text)
works with them unchanged.
"""

from __future__ import annotations

import torch

VOCAB = 512


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 64):
    """A 2-block Llama with grouped-query attention (4 heads, 2 KV heads), like stories260K."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 32):
    """A 2-layer BERT encoder (MiniLM-shaped, much smaller)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=hidden * 2, max_position_embeddings=256)
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2, hidden: int = 32):
    """A 2-block GPT-2 (its linears are HF Conv1D, weights stored transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def example_input_ids(batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
