"""Torch wrappers that make an HF causal LM traceable for Core ML.

Why a wrapper at all: transformers 5's mask code does not convert (``torch.diff``), so the caller passes a
4-D additive causal mask and transformers returns it untouched; its ``DynamicCache`` is a Python object
that cannot become Core ML state, so a duck-typed cache writes into registered buffers (stateful model:
``ct.StateType``) or into cloned input tensors (KV-in / KV-out model).

Sliding-window attention (registry: :meth:`macq.arch.ArchSpec.layer_windows`) is built into the graph: the
caller's causal mask is widened by a band that hides keys ``q − k ≥ W`` (transformers leaves a 4-D mask
untouched, so without it a windowed model would attend past its window). Models mixing full and windowed
layers get ``{layer_type: mask}`` when their forward accepts that (registry ``mask_by_layer_type``); other
mixes are refused at export.

Both caches are stacked ``[layers, 1, kv_heads, context, head_dim]``. With flexible shapes the write
position is ``mask.shape[-1] - input_ids.shape[-1]`` (keys seen so far) and attention reads
``cache[..., :end, :]``; with fixed shapes (query length 1, mask width ``context``) an explicit
``position`` input selects the slot through a one-hot blend, so no shape in the graph is dynamic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from macq.arch import ArchSpec, arch_spec, kv_heads
from macq.arch import head_dim as _head_dim
from macq.compat import cache_keyword
from macq.errors import MacqError

MASK_MIN = -1.0e4  # additive "minus infinity" that stays finite in fp16 (softmax weight exp(-1e4) == 0)


def kv_shape(config, context: int) -> tuple[int, int, int, int, int]:
    return (config.num_hidden_layers, 1, kv_heads(config), context, _head_dim(config))


def window_masks(spec: ArchSpec, config) -> tuple[int | None, str]:
    """``(W, how)``: ``how`` is ``"none"`` (no windowed layer), ``"all"`` (every layer windowed by ``W``: one
    banded mask) or ``"by_type"`` (pass ``{"full_attention": causal, "sliding_attention": banded}``)."""
    windows = spec.layer_windows(config)
    sizes = {w for w in windows if w}
    if not sizes:
        return None, "none"
    if len(sizes) > 1:
        raise MacqError(f"model_type {config.model_type!r}: sliding windows of several lengths {sorted(sizes)} are not "
                        "supported by the Core ML exporter")
    (w,) = sizes
    if all(windows):
        return w, "all"
    if spec.attention.mask_by_layer_type:
        return w, "by_type"
    raise MacqError(f"model_type {config.model_type!r}: full and sliding-window layers mixed, and its HF forward "
                    "takes a single mask; the Core ML exporter cannot give each layer its own")


def window_band(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, q, k]`` band hiding keys at distance ``q − k ≥ window`` (HF's sliding-window rule)."""
    far = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(0)) >= window
    # cast + multiply, not torch.where(far, scalar, scalar): coremltools types that select as a scalar
    return (far.to(dtype) * MASK_MIN)[None, None]


def causal_mask(q_len: int, past: int, width: int | None = None, dtype=np.float16) -> np.ndarray:
    """Additive mask ``[1, 1, q_len, width]`` for queries at positions ``past .. past+q_len-1``.

    ``width`` defaults to ``past + q_len`` (flexible-shape models); fixed-shape models pass ``context``
    and the slots not yet written are masked too.
    """
    width = past + q_len if width is None else width
    k = np.arange(width)[None, :]
    q = past + np.arange(q_len)[:, None]
    return np.where(k <= q, 0.0, MASK_MIN).astype(dtype)[None, None]


class _SliceCache:
    """Duck-typed transformers cache: ``update`` writes k/v at ``[start, end)`` and returns ``[:end]``.

    ``update`` takes any further arguments (``cache_kwargs`` before transformers 5.24, ``kwargs=`` from 5.24)
    and ignores them: a slice write needs only the layer index."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start, end):
        self.k, self.v, self.start, self.end = k, v, start, end

    def update(self, k, v, layer_idx, *_args, **_kwargs):
        self.k[layer_idx:layer_idx + 1, :, :, self.start:self.end] = k.unsqueeze(0)
        self.v[layer_idx:layer_idx + 1, :, :, self.start:self.end] = v.unsqueeze(0)
        return self.k[layer_idx, :, :, :self.end], self.v[layer_idx, :, :, :self.end]

    def get_seq_length(self, layer_idx: int = 0):
        return self.start


class _OneHotCache:
    """Fixed-shape cache: the single new token lands in slot ``position`` by ``c·(1−h) + new·h``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, onehot: torch.Tensor, position):
        self.k, self.v, self.h, self.position = k, v, onehot, position  # onehot [context, 1]

    def update(self, k, v, layer_idx, *_args, **_kwargs):
        kc = self.k[layer_idx] * (1 - self.h) + k * self.h
        vc = self.v[layer_idx] * (1 - self.h) + v * self.h
        self.k[layer_idx:layer_idx + 1] = kc.unsqueeze(0)
        self.v[layer_idx:layer_idx + 1] = vc.unsqueeze(0)
        return kc, vc

    def get_seq_length(self, layer_idx: int = 0):
        return self.position


class CoreMLLM(nn.Module):
    """``forward(input_ids, causal_mask[, position][, key_cache, value_cache])``.

    ``stateful=True``: the caches are buffers (become ``ct.StateType``) and only logits are returned.
    ``stateful=False``: the caches are inputs and the updated caches are returned (KV-in / KV-out).
    """

    def __init__(self, model: nn.Module, context: int, stateful: bool = True, fixed_shapes: bool = False):
        super().__init__()
        self.model, self.context, self.stateful, self.fixed = model, context, stateful, fixed_shapes
        self.shape = kv_shape(model.config, context)
        self.window, self.window_how = window_masks(arch_spec(model), model.config)
        if stateful:
            self.register_buffer("key_cache", torch.zeros(self.shape))
            self.register_buffer("value_cache", torch.zeros(self.shape))

    def input_names(self) -> list[str]:
        names = ["input_ids", "causal_mask"] + (["position"] if self.fixed else [])
        return names + ([] if self.stateful else ["key_cache_in", "value_cache_in"])

    def forward(self, input_ids, causal_mask, *rest):
        rest = list(rest)
        position = rest.pop(0) if self.fixed else None
        if self.stateful:
            k, v = self.key_cache, self.value_cache
        else:
            k, v = rest[0].clone(), rest[1].clone()
        q_len = input_ids.shape[-1]
        if self.fixed:
            slots = torch.arange(self.context, dtype=torch.float32)
            onehot = (slots == position.float()).float().unsqueeze(-1)
            cache = _OneHotCache(k, v, onehot, position)
            pos_ids = position.view(1, 1).long()
            k_pos = torch.arange(self.context)
        else:
            end = causal_mask.shape[-1]
            start = end - q_len
            cache = _SliceCache(k, v, start, end)
            pos_ids = (torch.arange(q_len) + start).unsqueeze(0)
            k_pos = torch.arange(end)
        mask = causal_mask
        if self.window_how != "none":
            banded = causal_mask + window_band(pos_ids[0], k_pos, self.window, causal_mask.dtype)
            mask = banded if self.window_how == "all" else {"full_attention": causal_mask, "sliding_attention": banded}
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos_ids,
                            use_cache=True, **{cache_keyword(self.model): cache}).logits
        return logits if self.stateful else (logits, k, v)


def prepare_model(model: nn.Module) -> nn.Module:
    """Eager attention (matmul + mask + softmax: converts and maps to plain ops) and no grad."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
