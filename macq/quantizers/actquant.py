"""Activation side of W8A8: calibration statistics of linear inputs, and simulated activation quantization.

* :func:`collect_input_stats` runs one decoder layer over the calibration inputs and accumulates, per group
  of linears that share one input (``ArchSpec.sequence``), the per-channel ``sum|x|``, ``max|x|`` and
  optionally the Gram matrix ``H = XᵀX`` (AWQ's exact output-error metric). Folding a scale ``s`` into the
  group's producer turns its inputs into ``X / s``; :meth:`InputStats.rescale` applies that to the
  statistics exactly, so nothing has to be re-run.
* :func:`install_act_quant` puts forward pre-hooks on linears that fake-quantize their input, symmetric
  integer absmax, either per token (dynamic) or per tensor with a static calibrated scale. The shared
  evaluator then measures W8A8 quality honestly: every matmul sees exactly the integers a W8A8 kernel
  would. :class:`~macq.qmodel.QuantizedModel.to_torch` calls it with ``QuantizedModel.act_quant``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.models import is_conv1d
from macq.quantizers.calibration import LayerInputs, module_inputs, run_layer

ACT_MODES = ("per_token", "per_tensor_static")
_TINY = 1e-8  # absmax floor: an all-zero token quantizes to zeros instead of NaN


@dataclass
class InputStats:
    """Statistics of the input ``X [tokens, C]`` shared by a group of linears."""

    n: int
    abs_sum: torch.Tensor          # [C] float64
    sum: torch.Tensor              # [C] float64 (signed: E[x] for AWQ's greedy rounding proxy)
    absmax: torch.Tensor           # [C] float32
    gram: torch.Tensor | None      # [C, C] float64, XᵀX (None unless asked for)

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n, 1)).float()

    @property
    def rms(self) -> torch.Tensor:
        """sqrt(E[x²]) per channel (AWQ's L2 salience), from the Gram diagonal."""
        if self.gram is None:
            raise MacqError("rms salience needs the Gram matrix (collect with gram=True)")
        return (self.gram.diagonal() / max(self.n, 1)).clamp_min(0).sqrt().float()

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became ``X / s`` (a scale was folded into their producer)."""
        s64 = s.double()
        self.abs_sum = self.abs_sum / s64
        self.sum = self.sum / s64
        self.absmax = (self.absmax.double() / s64).float()
        if self.gram is not None:
            self.gram = self.gram / s64[:, None] / s64[None, :]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def input_groups(layer: nn.Module, sequence: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """Linears of ``layer`` grouped by shared input: the arch's sequence, then any other linear alone."""
    linears = [n for n, m in layer.named_modules() if n and _is_linear(m)]
    groups = [tuple(n for n in g if n in linears) for g in sequence]
    groups = [g for g in groups if g]
    seen = {n for g in groups for n in g}
    return groups + [(n,) for n in linears if n not in seen]


@torch.no_grad()
def collect_input_stats(layer: nn.Module, inputs: LayerInputs, groups: list[tuple[str, ...]],
                        gram: bool = False) -> dict[tuple[str, ...], InputStats]:
    """Run ``layer`` over ``inputs`` once and accumulate :class:`InputStats` per group (hook on its first linear)."""
    stats: dict[tuple[str, ...], InputStats] = {}
    by_first = {g[0]: g for g in groups}

    def cb(name: str, x: torch.Tensor) -> None:
        g = by_first[name]
        st = stats.get(g)
        c = x.shape[-1]
        if st is None:
            st = stats[g] = InputStats(0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
                                       torch.zeros(c),
                                       torch.zeros(c, c, dtype=torch.float64) if gram else None)
        st.n += x.shape[0]
        st.abs_sum += x.abs().sum(0).double().cpu()
        st.sum += x.sum(0).double().cpu()
        st.absmax = torch.maximum(st.absmax, x.abs().amax(0).float().cpu())
        if st.gram is not None:
            st.gram += (x.float().T @ x.float()).double().cpu()  # fp32 matmul per batch, fp64 sum

    with module_inputs(layer, list(by_first), cb):
        run_layer(layer, inputs)
    # Accumulated under inference mode: clone into ordinary tensors so callers may update them in place.
    for st in stats.values():
        st.abs_sum, st.sum, st.absmax = st.abs_sum.clone(), st.sum.clone(), st.absmax.clone()
        st.gram = None if st.gram is None else st.gram.clone()
    return stats


# ---------------------------------------------------------------------------------------------- fake quant

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
