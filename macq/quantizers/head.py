"""The output head by GPTQ: the record that computes the logits (the lm_head, or with tied embeddings the
embedding itself) calibrated on the quantized model's final hidden states instead of rounded data-free.

Why: the head is the largest single matrix of a small model and its rounding error lands on every logit
directly. On the default model in mxfp4 (GPTQ on every decoder linear), keeping the head in float took wiki
perplexity from 30.2 to 21.7 while a float embedding lookup with the quantized head gave 29.4 (measured through
mlx_lm, see docs/results/mlx-fp4.md): nearly all of the head's cost is in its use as the output projection,
which is what GPTQ's objective ``‖X (W − Ŵ)ᵀ‖²`` with ``X`` the head's inputs addresses. With tied embeddings
the one record serves both uses; the lookup then reads GPTQ's codes (whose plain weight error is close to
round-to-nearest's).

Order: the registry quantizes the head data-free first (the decoder layers calibrate on the embedding lookup
they will see), runs the method on the decoder layers, then re-quantizes the head from its float weight by
GPTQ with ``H`` from the quantized model's final hidden states (the head's inputs at inference). One extra
forward over the calibration set, stopped at the head (the logits are never computed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def head_module(model: nn.Module, cfg: Any) -> str | None:
    """The record that computes the logits, if ``cfg`` quantizes it: the lm_head, or the embedding when tied."""
    from macq.arch import arch_spec
    from macq.models import tied_embeddings

    spec = arch_spec(model)
    if tied_embeddings(model):
        return spec.embed if (cfg.include_embeddings or cfg.include_lm_head) else None
    return spec.lm_head if cfg.include_lm_head else None


class _Stop(Exception):
    pass


@torch.no_grad()
def head_hessian(model: nn.Module, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``H = 2/n·Σ xxᵀ`` over the head's inputs on ``calib``; each forward stops at the head."""
    from macq.arch import arch_spec
    from macq.models import model_device
    from macq.quantizers.hessian import HessianAccumulator

    head = model.get_submodule(arch_spec(model).lm_head)
    acc = HessianAccumulator(head.weight.shape[1], torch.device("cpu"))

    def hook(_m: nn.Module, args: tuple) -> None:
        x = args[0]
        acc.add(x.detach().reshape(-1, x.shape[-1]))
        raise _Stop

    handle = head.register_forward_pre_hook(hook)
    dev = model_device(model)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i:i + batch_size].to(dev))
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc.H


def gptq_head(model: nn.Module, cfg: Any, calib: torch.Tensor, name: str, w: torch.Tensor
              ) -> tuple[Any, dict[str, float]]:
    """GPTQ record of the head ``name`` from its float weight ``w [out, in]`` on ``cfg``'s grid (bits, group,
    symmetry, scale dtype, float mode), scale search on. Stats: output error of the record and of the data-free
    record the registry made first, both ``tr(ΔW H ΔWᵀ)``."""
    from macq.models import get_weight
    from macq.quantizers.gptq import GPTQConfig, gptq_quantize

    H = head_hessian(model, calib, getattr(cfg, "batch_size", 8))
    gcfg = GPTQConfig.from_kwargs(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                                  scale_dtype=cfg.scale_dtype, mode=getattr(cfg, "mode", "affine"), mse_clip=True)
    rec, st = gptq_quantize(w.float(), H, gcfg)
    d0 = get_weight(model.get_submodule(name)).detach().double() - w.double()
    return rec, {"out_err": st["out_err"], "out_err_data_free": float(((d0 @ H) * d0).sum())}
