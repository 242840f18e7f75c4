"""Tiny random causal LMs, one per registry family (:data:`TINY_CONFIGS`), and a small
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


_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
# One tiny config per registry family (plus variants that exercise a row's options), built from the real HF
# config classes. Gemma: head_dim and query scalar set explicitly (defaults are 256), two layers alternating
# sliding / full attention. Phi-3: multi-head (kv = heads, as Phi-3-mini), so the v rows of qkv_proj fold
# into o_proj. llama3: Llama-3.x rope scaling.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_DIMS, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", dict(_DIMS, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(_DIMS, head_dim=16, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_DIMS, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_DIMS, head_dim=16, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(_DIMS, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(_DIMS, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                                             layer_types=["sliding_attention", "full_attention"],
                                             tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(_DIMS, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def tiny_config(arch: str = "llama", **overrides):
    """A tiny HF config for ``arch`` (a key of :data:`TINY_CONFIGS`), ``overrides`` applied after."""
    import transformers

    try:
        cls_name, kw = TINY_CONFIGS[arch]
    except KeyError:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(TINY_CONFIGS)}") from None
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0)
    cfg = getattr(transformers, cls_name)(**{**common, **kw})
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
