"""Tiny random causal LMs (Llama, Qwen2 with q/k/v bias, GPT-2 with transposed Conv1D) and a small
byte-level BPE tokenizer trained offline on the bundled TinyStories text, for fast structural tests.
No download is needed; everything is seeded."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from macq.atomic import atomic_dir
from macq.data import load_text

TINY_VOCAB = 512


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained on the bundled TinyStories sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_text("tinystories").split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny model in eval mode, float32, weights scaled up so that quantization
    error is visible (random init at std 0.02 in 64 dims is nearly linear)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg.initializer_range = 0.1
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny model + tokenizer as an HF directory (atomically) and return it."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        tiny_model(arch, seed, **overrides).save_pretrained(tmp, safe_serialization=True)
        tiny_tokenizer().save_pretrained(tmp)
    return path
