"""``--method dkm``: differentiable k-means palettization (coremltools.optimize.torch DKMPalettizer)
fine-tuned on calibration text. The training lives in :mod:`macq.quantizers.dkm_train` (Core ML's own
algorithm); this adapter gives it a self-validating config and the registry's model-method signature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macq.quantizers.base import QuantConfig, check


@dataclass
class DKMConfig(QuantConfig):
    method = "dkm"
    bits: int = 4
    group_size: int = 16          # output channels per LUT (per_grouped_channel)
    steps: int = 20               # optimizer steps of the causal-LM loss
    lr: float = 1e-5
    batch_size: int = 2

    def __post_init__(self) -> None:
        check(self.bits in (1, 2, 3, 4, 6, 8), f"--bits {self.bits}: dkm supports 1, 2, 3, 4, 6, 8")
        check(self.group_size >= 1, f"--group-size {self.group_size}: expected output channels per LUT >= 1")
        check(self.steps >= 1, f"--steps {self.steps}: expected >= 1")
        check(self.lr > 0, f"--lr {self.lr}: expected > 0")
        check(not (self.include_embeddings or self.include_lm_head), "dkm palettizes decoder linears only")


def quantize_model(model: torch.nn.Module, cfg: DKMConfig, calib: torch.Tensor, progress: bool = False,
                   source: str = ""):
    from macq.quantizers.dkm_train import dkm_quantize

    qm = dkm_quantize(model, calib, bits=cfg.bits, group_size=cfg.group_size, steps=cfg.steps, lr=cfg.lr,
                      batch_size=cfg.batch_size, progress=progress)
    qm.source = source
    qm.method.update(cfg.to_dict())
    return qm
