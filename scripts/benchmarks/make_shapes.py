"""Write a random-weight Hugging Face checkpoint with the exact shape of a public model (no download).

    python scripts/bench.py make_shapes llama-3.2-1b /work/scratch/scale/llama-3.2-1b
    python scripts/bench.py make_shapes llama-3.2-3b /work/scratch/scale/llama-3.2-3b-4l --layers 4   # 3B widths, 4 layers
    python scripts/bench.py make_shapes --list

Quality numbers on these checkpoints mean nothing; cost numbers (time, memory, size) do. The configs are the
published ``config.json`` values (hidden, intermediate, layers, heads, KV heads, head dim, vocab, RoPE base and
scaling, tying). Tensors are bf16, N(0, 0.02) for matrices and 1 for norm weights, written one at a time into
5 GB shards with an index (the tensor names and shapes come from transformers' own model class built on the meta
device), so writing an 8B checkpoint needs about one embedding's worth of RAM. The tokenizer is the default
model's (SmolLM2, vocab 49152): token ids above that decode to nothing, which is fine for cost measurements.
``--layers N`` keeps every width and only cuts the depth: a calibrated method's per-layer time and peak memory
are the full model's (every decoder layer has the same shapes), at a fraction of the run; totals extrapolate
linearly in the number of layers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from macq.atomic import atomic_dir  # noqa: E402
from macq.shards import ShardWriter  # noqa: E402

_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_act="silu",
               max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False,
               mlp_bias=False, bos_token_id=128000, eos_token_id=128001, initializer_range=0.02)
_LLAMA32_ROPE = dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                     original_max_position_embeddings=8192)
_LLAMA31_ROPE = dict(_LLAMA32_ROPE, factor=8.0)

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_scaling=_LLAMA32_ROPE),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         rope_scaling=_LLAMA32_ROPE),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_scaling=_LLAMA31_ROPE),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
                       max_window_layers=28, bos_token_id=151643, eos_token_id=151643, initializer_range=0.02),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ROW_BLOCK = 1 << 22


def make_config(name: str, layers: int | None = None):
    from transformers import AutoConfig

    d = dict(SHAPES[name])
    if layers is not None:
        d["num_hidden_layers"] = layers
        if "max_window_layers" in d:
            d["max_window_layers"] = layers
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    cfg.dtype = torch.bfloat16
    return cfg


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """bf16; norm weights 1 (as initialised), everything else N(0, 0.02), filled in row blocks."""
    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for a in range(0, flat.numel(), ROW_BLOCK):
        n = min(ROW_BLOCK, flat.numel() - a)
        flat[a:a + n] = torch.randn(n, generator=gen).mul_(0.02)
    return out


def _public_rope_keys(path: Path, shape: dict) -> None:
    """transformers 5 nests RoPE settings in ``rope_parameters``; the published files (and mlx_lm, which
    reads only the top level) have ``rope_theta`` / ``rope_scaling`` at the top: write both, as published."""
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = shape["rope_theta"]
    if "rope_scaling" in shape:
        cfg["rope_scaling"] = dict(shape["rope_scaling"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def write_shape(name: str, out: Path, tokenizer_dir: Path | None, seed: int = 0, force: bool = False,
                layers: int | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    if out.exists() and not force:
        raise SystemExit(f"error: {out} exists (pass --force)")
    cfg = make_config(name, layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    keys = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if cfg.tie_word_embeddings:
        keys.pop("lm_head.weight", None)   # tied checkpoints store the embedding once, as HF writes them
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    with atomic_dir(out) as tmp:
        w = ShardWriter(tmp, "model", 5 * 10**9, metadata={"format": "pt"})
        for k, shape in keys.items():
            w.add(k, random_tensor(k, shape, gen))
        w.close({"total_parameters": sum(int(torch.tensor(s).prod()) for s in keys.values())})
        cfg.save_pretrained(tmp)
        _public_rope_keys(tmp / "config.json", SHAPES[name])
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).is_file():
                    shutil.copy2(tokenizer_dir / f, tmp / f)
    n = sum(int(torch.tensor(s).prod()) for s in keys.values())
    print(json.dumps({"shape": name, "layers": cfg.num_hidden_layers, "path": str(out), "parameters": n,
                      "bytes": sum(f.stat().st_size for f in out.iterdir()), "seconds": round(time.time() - t0, 1)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--list", action="store_true", help="print the known shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="keep the widths, cut the depth to N decoder layers")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the default model's)")
    a = ap.parse_args()
    if a.layers is not None and a.layers < 1:
        raise SystemExit(f"error: --layers: expected a positive number of decoder layers, got {a.layers}")
    if a.list or a.shape is None or a.out is None:
        print("\n".join(sorted(SHAPES)))
        return
    tok = a.tokenizer
    if tok is None:
        from macq.models import prepare_default_model

        tok = prepare_default_model()
    torch.set_num_threads(1)
    write_shape(a.shape, a.out, tok, a.seed, a.force, a.layers)


if __name__ == "__main__":
    main()
