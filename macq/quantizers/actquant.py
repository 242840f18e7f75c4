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

import torch
import torch.nn as nn

from macq.act_runtime import ACT_MODES, check_act_spec, fake_quant_act, install_act_quant, remove_act_quant
from macq.device import wide_float
from macq.errors import MacqError
from macq.models import is_conv1d
from macq.quantizers.calibration import LayerInputs, module_inputs, run_layer


@dataclass
class InputStats:
    """Statistics of the input ``X [tokens, C]`` shared by a group of linears."""

    n: int
    abs_sum: torch.Tensor          # [C] float64
    sum: torch.Tensor              # [C] float64 (signed: E[x] for AWQ's greedy rounding proxy)
    absmax: torch.Tensor           # [C] float32
    gram: torch.Tensor | None      # [C, C] float64, XᵀX (None unless asked for)
    x: torch.Tensor | None = None  # [tokens, C] float32, the inputs themselves: kept with the Gram when C >
                                   # tokens, where an output error from X (2·out·C·tokens) beats H's (2·out·C²)

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
        s64 = s.to(self.sum.dtype)
        self.abs_sum = self.abs_sum / s64
        self.sum = self.sum / s64
        self.absmax = (self.absmax.to(s64.dtype) / s64).float()
        if self.gram is not None:          # in place: at 8B down_proj each n×n float64 temporary is 1.6 GB
            self.gram.div_(s64[:, None]).div_(s64[None, :])
        if self.x is not None:
            self.x.div_(s.float())


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
    """Run ``layer`` over ``inputs`` once and accumulate :class:`InputStats` per group (hook on its first linear).
    With ``gram``, a group whose input is wider than the calibration has tokens also keeps the inputs (``x``)."""
    from macq.quantizers.hessian import gram_into

    stats: dict[tuple[str, ...], InputStats] = {}
    xs: dict[tuple[str, ...], list[torch.Tensor]] = {}
    by_first = {g[0]: g for g in groups}

    def cb(name: str, x: torch.Tensor) -> None:
        g = by_first[name]
        st = stats.get(g)
        c = x.shape[-1]
        if st is None:   # on the layer's device, in float64 where it has it (float32 on MPS)
            wide = {"dtype": wide_float(x.device), "device": x.device}
            st = stats[g] = InputStats(0, torch.zeros(c, **wide), torch.zeros(c, **wide),
                                       torch.zeros(c, device=x.device), torch.zeros(c, c, **wide) if gram else None)
        st.n += x.shape[0]
        st.abs_sum += x.abs().sum(0).to(st.sum.dtype)
        st.sum += x.sum(0).to(st.sum.dtype)
        st.absmax = torch.maximum(st.absmax, x.abs().amax(0).float())
        if st.gram is not None:
            gram_into(st.gram, x.float(), 1.0)   # fp32 syrk per batch, fp64 sum
            if c > inputs.n_tokens:
                xs.setdefault(g, []).append(x.float())

    with module_inputs(layer, list(by_first), cb):
        run_layer(layer, inputs)
    # Accumulated under inference mode: clone into ordinary tensors so callers may update them in place.
    for g, st in stats.items():
        st.abs_sum, st.sum, st.absmax = st.abs_sum.clone(), st.sum.clone(), st.absmax.clone()
        st.gram = None if st.gram is None else st.gram.clone()
        st.x = torch.cat(xs.pop(g)) if g in xs else None
    return stats


# Fake quantization of activations lives in the core (macq.act_runtime): a saved QuantizedModel re-installs
# it in to_torch, and the core may not import a method module. Re-exported here for the methods.

__all__ = ["ACT_MODES", "InputStats", "check_act_spec", "collect_input_stats", "fake_quant_act", "input_groups",
           "install_act_quant", "remove_act_quant"]
