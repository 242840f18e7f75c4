"""Activation fake quantization at run time (SmoothQuant W8A8's input quantizers), part of the core.

A :class:`~macq.qmodel.QuantizedModel` records ``act_quant`` (module -> bits, mode, scale) and re-installs these
hooks when it rebuilds a torch model, so the hooks belong beside the record, not inside a method module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from macq.errors import MacqError

ACT_MODES = ("per_token", "per_tensor_static")
_TINY = 1e-8  # absmax floor: an all-zero token quantizes to zeros instead of NaN


def check_act_spec(name: str, spec: dict[str, Any]) -> None:
    bits, mode = spec.get("bits"), spec.get("mode")
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise MacqError(f"act_quant[{name}]: bits={bits!r}, expected an int in 2..16")
    if mode not in ACT_MODES:
        raise MacqError(f"act_quant[{name}]: mode={mode!r}, expected one of {', '.join(ACT_MODES)}")
    if mode == "per_tensor_static" and not (isinstance(spec.get("scale"), (int, float)) and spec["scale"] > 0):
        raise MacqError(f"act_quant[{name}]: per_tensor_static needs a positive float 'scale'")


def fake_quant_act(x: torch.Tensor, bits: int, mode: str, scale: float | None = None) -> torch.Tensor:
    """Symmetric integer fake quantization of ``x [..., C]``: codes in ``[−2^(b−1), 2^(b−1)−1]``.

    ``per_token``: scale = max|x| over the channel dim / (2^(b−1)−1), one per token (dynamic).
    ``per_tensor_static``: the given calibrated scale; values beyond its range saturate.
    """
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    if mode == "per_token":
        s = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(_TINY)
    else:
        s = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    q = torch.round(xf / s).clamp(-qmax - 1, qmax)
    return (q * s).to(x.dtype)


def _hook(spec: dict[str, Any]):
    bits, mode, scale = spec["bits"], spec["mode"], spec.get("scale")

    def pre_hook(_m: nn.Module, args: tuple):
        return (fake_quant_act(args[0], bits, mode, scale),) + tuple(args[1:])
    return pre_hook


def install_act_quant(model: nn.Module, act_quant: dict[str, dict[str, Any]]) -> list:
    """Install input fake-quant pre-hooks on each named module (replacing ones this function put there before).

    Returns the hook handles; ``remove_act_quant`` takes them off again.
    """
    handles = []
    for name, spec in act_quant.items():
        check_act_spec(name, spec)
        mod = model.get_submodule(name)
        old = getattr(mod, "_macq_act_quant", None)
        if old is not None:
            old.remove()
        h = mod.register_forward_pre_hook(_hook(spec))
        mod._macq_act_quant = h
        handles.append(h)
    return handles


def remove_act_quant(model: nn.Module) -> None:
    for mod in model.modules():
        h = getattr(mod, "_macq_act_quant", None)
        if h is not None:
            h.remove()
            del mod._macq_act_quant
