"""Final stage of ``--method learned``: every affine record's per-group scales tuned against the *float model's
final logits* (KL), all layers together (the DWQ idea, on macq's records).

Why a second stage: the block-wise pass fits each decoder layer's output in isolation (MSE on hidden states), which
weighs every hidden direction alike and cannot see the tied embedding / head at all; the logits are what a user
samples from. Why only the scales: the block-wise pass has already chosen the codes (and the integer zero-points)
with every layer's own data; what it cannot do is re-balance the layers against each other for the final
distribution. One scale per group (one number per 64 weights at g64) is a far smaller parameter set than free
rounding offsets for the few thousand calibration tokens a CPU can afford, and the result stays exactly the same
:class:`~macq.record.AffineRecord` (fixed codes and integer zero-points, fp16 scales). Parametrised as
``log scale`` (Adam steps are relative changes whatever a group's magnitude), cast to the record's scale dtype in
the forward with a straight-through gradient, so the weights the loss sees are the weights the record dequantizes to.

Keep-best: the KL on held-out calibration sequences (never used for a gradient) is measured with the records' real
dequantized weights at the start and every ``kl_eval_every`` steps; the best scales win, so the stage never ends
worse than the block-wise result on that measure. Memory: the teacher's log-probs in fp16
(``n_calib x seq_len x vocab x 2`` bytes), the codes (uint8), one float copy of the model's weights built per
step, and one batch's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from macq.record import AffineRecord


@dataclass
class ScaleParams:
    """One record's tunable scales next to its fixed codes and zero-points (grouped ``[out, G, g]``)."""

    codes: torch.Tensor       # [out, G, g] uint8
    zero: torch.Tensor        # [out, G, 1] float32 (integer values)
    log_scale: torch.Tensor   # [out, G] float32, tuned
    record: AffineRecord      # the starting record (bits, group size, layout, symmetric or not)


def tunable(rec: Any) -> bool:
    """Per-group affine records in code-space form (integer zero-points or symmetric): the forms this stage keeps."""
    return isinstance(rec, AffineRecord) and rec.biases is None and not rec.per_tensor


def from_record(rec: AffineRecord) -> ScaleParams:
    out, inp = rec.shape
    g = rec.group_size
    return ScaleParams(codes=rec.codes.reshape(out, inp // g, g), zero=rec.effective_zeros().unsqueeze(-1),
                       log_scale=rec.scales.float().log(), record=rec)


def _scale(p: ScaleParams, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """The scales of ``rows`` (all by default) in the record's dtype, with a straight-through gradient."""
    s = p.log_scale[rows].exp()
    return s + (s.to(p.record.scales.dtype).float() - s).detach()


def dequantized(p: ScaleParams) -> torch.Tensor:
    """The module-layout weight of the current scales (differentiable in ``log_scale``)."""
    w = (_scale(p).unsqueeze(-1) * (p.codes.float() - p.zero)).reshape(p.record.shape)
    return w.t() if p.record.transposed else w


@torch.no_grad()
def to_record(p: ScaleParams) -> AffineRecord:
    r = p.record
    return AffineRecord(codes=r.codes, scales=_scale(p).to(r.scales.dtype), bits=r.bits, group_size=r.group_size,
                        zeros=r.zeros, transposed=r.transposed)


@torch.no_grad()
def teacher_logprobs(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The float model's log-probs ``[seq_len, vocab]`` (fp16, to halve the memory) for each calibration row, where
    the model is."""
    dev = _device(model)
    return [torch.log_softmax(model(input_ids=row[None].to(dev), use_cache=False).logits[0].float(), -1).half()
            for row in ids]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _kl(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || model with ``weights`` substituted), for one batch ``ids [b, T]`` (moved to
    where the model is)."""
    ids = ids.to(_device(model))
    logits = functional_call(model, weights, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
    lp = torch.log_softmax(logits.float(), -1)
    t = teacher.float()
    return (t.exp() * (t - lp)).sum(-1).mean()


@torch.no_grad()
def heldout_kl(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor, teacher: list[torch.Tensor],
               rows: list[int]) -> float:
    """Token-mean KL over ``rows`` of the calibration ids (every row has the same length)."""
    return sum(float(_kl(model, weights, ids[i:i + 1], teacher[i][None])) for i in rows) / max(len(rows), 1)


def tune_logits(model: nn.Module, records: dict[str, Any], ids: torch.Tensor, teacher: list[torch.Tensor], *,
                steps: int, lr: float, batch_size: int, eval_every: int, holdout: int, seed: int,
                progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Adam on the log-scales of every tunable record against the teacher's log-probs; keep-best on held-out KL.

    The last ``holdout`` calibration rows are held out (``0``: keep-best is judged on the training rows
    themselves). Returns the new records (same keys; untunable records unchanged) and stats (KL before /
    after on the held-out rows, the step the best was reached at).
    """
    params = {n: from_record(r) for n, r in records.items() if tunable(r)}
    for p_ in model.parameters():
        p_.requires_grad_(False)
    n = ids.shape[0]
    train = list(range(n - holdout)) if holdout else list(range(n))
    held = list(range(n - holdout, n)) if holdout else train

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": dequantized(p) for name, p in params.items()}

    with torch.no_grad():
        init = heldout_kl(model, weights(), ids, teacher, held)
    best, best_step = init, 0
    best_state = {k: p.log_scale.clone() for k, p in params.items()}
    leaves = [p.log_scale.requires_grad_(True) for p in params.values()]
    opt = torch.optim.Adam(leaves, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        rows = [train[int(i)] for i in torch.randint(len(train), (batch_size,), generator=gen)]
        loss = _kl(model, weights(), ids[rows], torch.stack([teacher[i] for i in rows]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                kl = heldout_kl(model, weights(), ids, teacher, held)
            if kl < best:
                best, best_step = kl, step
                best_state = {k: p.log_scale.detach().clone() for k, p in params.items()}
            if progress:
                print(f"  logits KL stage: step {step}/{steps}, batch KL {loss.item():.4f}, held-out KL {kl:.4f} "
                      f"(start {init:.4f}, best {best:.4f} at step {best_step})", flush=True)
    out = dict(records)
    for k, p in params.items():
        p.log_scale = best_state[k]
        out[k] = to_record(p)
    return out, {"kl_init": init, "kl": best, "best_step": best_step, "heldout_rows": len(held) if holdout else 0}
