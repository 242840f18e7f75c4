"""Run an exported directory through mlx_lm itself: load, logits, generation, perplexity and speed.

Everything goes through ``mlx_lm.load`` so a passing check means the files work in the real loader,
not in a re-implementation of it. Functions take a path or an already loaded ``(model, tokenizer)``
pair, so a benchmark loads once and measures many times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Union

import numpy as np

from macq.errors import MacqError

Loaded = tuple[Any, Any]              # (mlx model, mlx_lm TokenizerWrapper)
PathOrLoaded = Union[str, Path, Loaded]


def default_compute_dtype() -> str | None:
    """``float32`` off Apple silicon: mlx's CPU build has no native fp16 arithmetic, and its fp16
    quantized matmul is ~40x slower than fp32 there (measured: 1.43 s vs 36 ms for 16x576 @ 576x1536,
    4-bit g64). On macOS the stored dtype is used as is."""
    return None if sys.platform == "darwin" else "float32"


def load_mlx(path: str | Path, compute_dtype: str | None = None) -> Loaded:
    """``mlx_lm.load`` on a local directory (never the hub).

    ``compute_dtype`` (e.g. ``"float32"``) upcasts every floating parameter after loading -- scales,
    biases, norms: the values are exactly the stored ones (fp16/bf16 -> fp32 is exact), only the
    arithmetic changes. Packed uint32 weights are untouched."""
    from mlx_lm import load

    p = Path(path)
    if not (p / "config.json").is_file():
        raise MacqError(f"{p} is not an MLX model directory (no config.json)")
    from macq.integrity import check_safetensors_dir

    check_safetensors_dir(p)   # mlx's own error on a damaged file names neither the file nor the problem
    model, tok = load(str(p))
    if compute_dtype is not None:
        import mlx.core as mx
        from mlx.utils import tree_map

        dt = getattr(mx, compute_dtype)
        model.update(tree_map(lambda a: a.astype(dt) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))
        mx.eval(model.parameters())
    return model, tok


def _loaded(m: PathOrLoaded, compute_dtype: str | None = None) -> Loaded:
    return m if isinstance(m, tuple) else load_mlx(m, compute_dtype)


def hf_tokenizer(tokenizer):
    """The HF tokenizer inside mlx_lm's TokenizerWrapper (macq.data tokenizes with the HF API)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def mlx_logits(model: PathOrLoaded, ids) -> np.ndarray:
    """Logits ``[len, vocab]`` (float32) for one sequence of token ids, one full forward, no cache."""
    import mlx.core as mx

    net, _ = _loaded(model)
    x = mx.array(np.asarray(ids, dtype=np.int32).reshape(1, -1))
    out = net(x)[0].astype(mx.float32)
    return np.array(out)


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids for ``prompt`` as a user turn with the generation prompt (when a template exists),
    else the plain encoding."""
    tok = hf_tokenizer(tokenizer)
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    return list(tok(prompt)["input_ids"])


def generate_mlx(model: PathOrLoaded, prompt: str, max_tokens: int = 64, chat: bool = True) -> str:
    """Greedy ``mlx_lm.generate``; with ``chat`` the tokenizer's chat template is applied first."""
    from mlx_lm import generate

    net, tok = _loaded(model)
    ids = chat_prompt(tok, prompt) if chat else prompt
    return generate(net, tok, prompt=ids, max_tokens=max_tokens, verbose=False)


def logits_fn(model: PathOrLoaded):
    """A callable ``LongTensor [B, T] -> np.ndarray [B, T, V]`` (float32) for macq's evaluators."""
    import mlx.core as mx

    net, _ = _loaded(model)

    def fn(x) -> np.ndarray:
        arr = mx.array(np.asarray(x, dtype=np.int64).astype(np.int32))
        return np.array(net(arr).astype(mx.float32))

    return fn


def decode_speed(model: PathOrLoaded, prompt_ids, n_tokens: int = 32) -> dict[str, float]:
    """Prefill and decode tokens/s through mlx_lm's KV-cache loop (``generate_step``, greedy, EOS
    ignored so every run decodes the same number of tokens)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    net, _ = _loaded(model)
    prompt = mx.array(np.asarray(prompt_ids, dtype=np.int32))
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for n, _ in enumerate(generate_step(prompt, net, max_tokens=n_tokens), start=1):
        if n == 1:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    if t_first is None:
        raise MacqError(f"decode_speed: n_tokens={n_tokens}: expected >= 1")
    decode = (n - 1) / (t_end - t_first) if n > 1 else float("nan")
    return {"prefill_tokens_per_s": len(prompt_ids) / (t_first - t0), "tokens_per_s": decode}


def eval_mlx(model: PathOrLoaded, dataset: str = "wiki", context: int = 512, max_tokens: int | None = 4096,
             stride: int | None = None, speed_prompt: int = 128, speed_tokens: int = 32,
             compute_dtype: str | None = "auto", reference=None, speed_repeats: int = 1) -> dict[str, float]:
    """Perplexity on the evaluation split (first half of the text, ``macq.data.eval_tokens``) with
    exactly the windows of macq's torch evaluator (``macq.eval.perplexity``), plus prefill / decode
    speed. ``max_tokens`` caps the evaluated tokens (CPU time). ``compute_dtype="auto"`` is
    :func:`default_compute_dtype` (fp32 arithmetic on Linux CPUs, stored values unchanged).

    ``reference`` (an unquantized torch model) adds KL / top-1 against it, from the same MLX forward
    passes (each window runs once). ``speed_repeats > 1`` runs one untimed warm-up and reports the median
    of that many timed runs."""
    import statistics

    from macq.data import eval_tokens
    from macq.eval.measure import quality

    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype()
    net, tok = _loaded(model, compute_dtype)
    ids = eval_tokens(hf_tokenizer(tok), dataset, max_tokens)
    ref_lp = None
    if reference is not None:
        from macq.eval import reference_logprobs

        ref_lp = reference_logprobs(reference, ids, context, stride)
    q = quality(logits_fn((net, tok)), ids, ref_lp, context, stride=stride)
    prompt = ids[:speed_prompt].tolist()
    if speed_repeats > 1:
        decode_speed((net, tok), prompt, speed_tokens)
    runs = [decode_speed((net, tok), prompt, speed_tokens) for _ in range(max(1, speed_repeats))]
    speed = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {"ppl": q["ppl"].value, "ppl_stderr": q["ppl"].stderr, "n_tokens": int(q["n_tokens"].value),
           "compute_dtype": compute_dtype or "stored", **speed}
    if ref_lp is not None:
        out.update({"kl": q["kl"].value, "top1": q["top1"].value})
    return out


def kv_logits_fn(model: PathOrLoaded, kv_bits: int | None = None, kv_group_size: int = 64):
    """:func:`logits_fn` with every layer's keys and values held in mlx_lm's ``QuantizedKVCache`` (what
    ``mlx_lm.generate --kv-bits`` uses): each window runs as one forward over a fresh cache, so every position
    attends to quantized keys / values of itself and all earlier positions, exactly as decoding through that
    cache does (mlx_lm's ``--quantized-kv-start`` = 0). ``kv_bits=None``: the plain fp cache-free forward."""
    import mlx.core as mx
    from mlx_lm.models.cache import QuantizedKVCache

    from macq.eval.kvsim import check_kv

    if kv_bits is None:
        return logits_fn(model)
    check_kv(kv_bits, kv_group_size)
    net, _ = _loaded(model)

    def fn(x) -> np.ndarray:
        arr = mx.array(np.asarray(x, dtype=np.int64).astype(np.int32))
        cache = [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in range(len(net.layers))]
        return np.array(net(arr, cache=cache).astype(mx.float32))

    return fn


def eval_mlx_kv(model: PathOrLoaded, kv_bits: tuple[int, ...] = (8, 4), dataset: str = "wiki", context: int = 2048,
                max_tokens: int | None = 4096, kv_group_size: int = 64,
                compute_dtype: str | None = "auto") -> list[dict[str, Any]]:
    """Perplexity with the KV cache in the model's float dtype (first row) and quantized to each of ``kv_bits``
    (KL / top-1 of each against the float-KV row, from the same weights: the KV quantization's own cost).
    Long windows (``context``) are the point: the error grows with the number of cached positions attended."""
    from macq.data import eval_tokens
    from macq.eval.kvsim import check_kv, kv_rows

    for b in kv_bits:
        check_kv(b, kv_group_size)
    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype()
    loaded = _loaded(model, compute_dtype)
    ids = eval_tokens(hf_tokenizer(loaded[1]), dataset, max_tokens)
    return kv_rows(logits_fn(loaded), lambda b: kv_logits_fn(loaded, b, kv_group_size), ids, kv_bits,
                   kv_group_size, context)
