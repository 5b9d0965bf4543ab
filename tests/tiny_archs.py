"""Tiny random-weight models of several Hugging Face architectures, built from their transformers configs
(nothing downloaded), saved as HF folders with the micro tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, FFN, LAYERS, HEADS = 64, 128, 2, 4


def _configs(vocab: int, special: dict) -> dict:
    import transformers as tf

    common = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  max_position_embeddings=256, **special)
    return {
        "llama": tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **common),
        "llama-tied": tf.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True, **common),
        "qwen2": tf.Qwen2Config(vocab_size=vocab, num_key_value_heads=2, **common),
        "qwen3": tf.Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=16, **common),
        "mistral": tf.MistralConfig(vocab_size=vocab, num_key_value_heads=2, **common),
        "gemma": tf.GemmaConfig(vocab_size=vocab, num_key_value_heads=2, head_dim=16, **common),
        "phi3": tf.Phi3Config(vocab_size=vocab, num_key_value_heads=2, **common),
        "gpt-neox": tf.GPTNeoXConfig(vocab_size=vocab, **common),
        # GPT-2: Conv1D projections ([in, out] weights), learned position embeddings, tied head
        "gpt2": tf.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                              **special),
        # OPT with a narrower embedding: project_in before the layers, project_out after them
        "opt": tf.OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=256, word_embed_proj_dim=32,
                            **special),
    }


ARCHS = ["llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt-neox", "gpt2", "opt"]


def tiny_arch(name: str, tokenizer_path: str, root: Path, seed: int = 0) -> str:
    """``root/NAME``: a tiny ``name`` model with the tokenizer of ``tokenizer_path`` (built once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = root / name
    if (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = _configs(len(tokenizer), special)[name]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    torch.random.set_rng_state(state)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)
