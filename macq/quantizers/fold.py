"""Exact per-input-channel scale folding, shared by AWQ and SmoothQuant.

For a :class:`~macq.arch.ScaleMapping` ``(prev, linears)`` and scales ``s [C]``, ``prev``'s output channel
``j`` is divided by ``s_j`` and every following linear's weight column ``j`` is multiplied by ``s_j``.
Because the op between ``prev`` and the linears is per-channel linear (a norm's affine weight feeding the
linears directly; a value projection feeding attention, whose mixing is across tokens only; an up
projection feeding ``act(gate) * up``), the model computes exactly the same function in float, but the
linears now see inputs ``X / s``: activation outliers moved into the weights (SmoothQuant) or salient
channels enlarged before weight rounding (AWQ). No new op is introduced, so exporters need nothing.

Skipped mappings: when ``prev``'s output dim differs from the linears' input dim the channels do not
correspond one to one. The Llama-family ``v_proj -> o_proj`` mapping under grouped-query attention
(``n_kv_heads < n_heads``; the default SmolLM2 has 9 heads / 3 KV heads) is such a case: each KV head
feeds several query heads' slices of ``o_proj``, so a per-channel scale on ``o_proj``'s input cannot be
divided out of ``v_proj`` unless it is shared across the repeated heads. :func:`can_fold` says so and
callers leave that linear unscaled.

Two registry facts change the arithmetic (both carried by the mapping, see :class:`~macq.arch.ScaleMapping`):
a norm computing ``x̂ · (offset + w)`` (Gemma: ``1 + w``) folds as ``w' = (offset + w) / s − offset``; and a
fused producer (Phi-3's ``qkv_proj``, ``gate_up_proj``) is divided only on the rows of the part that feeds
the linears (``rows``, resolved per config by :meth:`~macq.arch.ArchSpec.resolved`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from macq.arch import ScaleMapping
from macq.device import wide_float
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, set_weight


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def out_dim(m: nn.Module) -> int:
    """Output channels of a norm (its weight length) or a linear / Conv1D (rows of ``[out, in]``)."""
    if _is_linear(m):
        return get_weight(m).shape[0]
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return w.numel()
    raise MacqError(f"cannot fold a scale into {type(m).__name__}: expected a norm with a 1-D weight or a linear")


def _rows(mapping: ScaleMapping) -> slice | None:
    if mapping.part is not None and mapping.rows is None:
        raise MacqError(f"mapping {mapping.prev}:{mapping.part} is a fused part with unresolved rows; "
                        "use arch_spec(model).resolved(model.config)")
    return None if mapping.rows is None else slice(*mapping.rows)


def can_fold(layer: nn.Module, mapping: ScaleMapping) -> bool:
    """True when ``prev``'s outputs correspond one to one with every linear's inputs (see module doc)."""
    rows = _rows(mapping)
    c = out_dim(layer.get_submodule(mapping.prev)) if rows is None else rows.stop - rows.start
    return all(get_weight(layer.get_submodule(n)).shape[1] == c for n in mapping.linears)


def foldable_mappings(layer: nn.Module, mappings: tuple[ScaleMapping, ...]) -> list[ScaleMapping]:
    return [m for m in mappings if can_fold(layer, m)]


@torch.no_grad()
def fold_scales(layer: nn.Module, mapping: ScaleMapping, s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input columns by ``s`` (in place).

    Computed in float64 then cast back, so the float function is preserved to the weights' precision (on a device
    without float64, in float32: a float32 weight times or over a float32 scale is rounded once either way).
    """
    if not can_fold(layer, mapping):
        raise MacqError(f"cannot fold scales from {mapping.prev} into {', '.join(mapping.linears)}: "
                        "channel counts differ (grouped-query attention?)")
    wide = wide_float(s.device)
    s64 = s.detach().to(wide).flatten()
    if not bool(torch.isfinite(s64).all()) or bool((s64 <= 0).any()):
        raise MacqError("fold scales must be finite and positive")
    prev = layer.get_submodule(mapping.prev)
    rows = _rows(mapping) or slice(None)
    if _is_linear(prev):
        w = get_weight(prev).detach().clone()
        w[rows] = (w[rows].to(wide) / s64[:, None]).to(w.dtype)
        set_weight(prev, w)
    else:
        off = mapping.norm_offset
        prev.weight.copy_(((prev.weight.to(wide) + off) / s64 - off).to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias[rows] = (bias[rows].to(wide) / s64).to(bias.dtype)
    for name in mapping.linears:
        mod = layer.get_submodule(name)
        w = get_weight(mod)
        set_weight(mod, (w.to(wide) * s64[None, :]).to(w.dtype))
