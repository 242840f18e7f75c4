"""A quantized KV cache simulated in torch: what quantizing keys and values costs, for any model macq runs in torch.

MLX's ``QuantizedKVCache`` (``mlx_lm.generate --kv-bits``) stores every key and value row as affine codes with a
scale and bias per ``group_size`` elements along the head dimension (``mx.quantize``'s affine mode) and attends to
the dequantized values. :class:`QuantizedKVSim` does the same in a transformers cache: each new key / value is
rounded onto that grid (:func:`fake_quantize_kv`, MLX's own scale and bias rule from
:func:`macq.quantizers.rtn.mlx_affine_params`) before it is stored, so the attention of every later position, and
of the window's own positions in a one-pass forward, reads the rounded values, exactly what decoding through
mlx_lm's cache reads. It answers "how much does a 4- or 8-bit KV cache cost on *this* model" for a float
checkpoint or a macq quantization (its dequantized weights), next to the weights' own error; the MLX export of
the same records gives the same numbers through mlx_lm (checked by the tests).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from macq.errors import MacqError
from macq.quantizers.rtn import mlx_affine_params

KV_BITS = (2, 3, 4, 5, 6, 8)        # the widths mlx_lm's QuantizedKVCache takes
KV_GROUPS = (32, 64, 128)


def check_kv(bits: int, group_size: int, head_dim: int | None = None) -> None:
    """One-line refusal of a KV width / group the runtime cache cannot hold (before any work)."""
    if bits not in KV_BITS:
        raise MacqError(f"--kv-bits {bits}: a quantized KV cache holds {', '.join(map(str, KV_BITS))} bits")
    if group_size not in KV_GROUPS:
        raise MacqError(f"--kv-group-size {group_size}: expected one of {', '.join(map(str, KV_GROUPS))}")
    if head_dim is not None and head_dim % group_size:
        raise MacqError(f"--kv-group-size {group_size}: does not divide the model's head dim {head_dim}")


def fake_quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``x [..., head_dim]`` rounded onto MLX's affine grid per ``group_size`` elements of the last dim and
    dequantized (``mx.dequantize(*mx.quantize(x, group_size, bits))``), in ``x``'s dtype."""
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale, bias = mlx_affine_params(xg, bits)
    scale, bias = scale.to(x.dtype).float().unsqueeze(-1), bias.to(x.dtype).float().unsqueeze(-1)
    q = ((xg - bias) / scale).round_().clamp_(0, 2 ** bits - 1)
    return (q * scale + bias).reshape(shape).to(x.dtype)


class QuantizedKVSim(DynamicCache):
    """A transformers ``DynamicCache`` whose stored keys and values are :func:`fake_quantize_kv`'s."""

    def __init__(self, bits: int, group_size: int = 64, **kwargs: Any) -> None:
        check_kv(bits, group_size)
        super().__init__(**kwargs)
        self.kv_bits, self.kv_group_size = bits, group_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k = fake_quantize_kv(key_states, self.kv_bits, self.kv_group_size)
        v = fake_quantize_kv(value_states, self.kv_bits, self.kv_group_size)
        return super().update(k, v, layer_idx, *args, **kwargs)


def kv_logits_fn(model: torch.nn.Module, bits: int, group_size: int = 64):
    """A logits function for :mod:`macq.eval.perplexity`: each window is one forward over a fresh
    :class:`QuantizedKVSim`, so every position attends to the quantized keys / values of itself and all
    earlier positions of its window (what mlx_lm's ``--quantized-kv-start 0`` decoding sees)."""
    from macq.arch import head_dim
    from macq.compat import cache_keyword

    check_kv(bits, group_size, head_dim(model.config))
    key = cache_keyword(model)
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(ids: torch.Tensor) -> torch.Tensor:
        cache = QuantizedKVSim(bits, group_size, config=model.config)
        return model(input_ids=ids.to(device), use_cache=True, **{key: cache}).logits.float()

    return fn


def kv_rows(base, make_fn, ids: torch.Tensor, kv_bits: tuple[int, ...], group_size: int,
            context: int) -> list[dict[str, Any]]:
    """The float-KV row, then one row per width in ``kv_bits`` (``make_fn(bits)`` -> logits function), with KL /
    top-1 against the float-KV row: the same weights, so the KV quantization's own cost. Shared by the MLX
    runner (mlx_lm's cache) and the torch simulation."""
    from macq.eval import reference_logprobs
    from macq.eval.measure import quality

    ref = reference_logprobs(base, ids, context)
    q = quality(base, ids, None, context)
    rows = [{"kv": "float", "kv_bits": None, "ppl": q["ppl"].value, "ppl_stderr": q["ppl"].stderr, "kl": 0.0,
             "top1": 1.0, "n_tokens": int(q["n_tokens"].value), "context": context}]
    for b in kv_bits:
        q = quality(make_fn(b), ids, ref, context)
        rows.append({"kv": f"{b}-bit g{group_size}", "kv_bits": b, "ppl": q["ppl"].value,
                     "ppl_stderr": q["ppl"].stderr, "kl": q["kl"].value, "top1": q["top1"].value,
                     "n_tokens": int(q["n_tokens"].value), "context": context})
    return rows
