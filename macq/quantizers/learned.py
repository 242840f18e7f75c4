"""Learned rounding and grid for affine records (the AutoRound / OmniQuant / DWQ family), block by block.

Per decoder layer (driven by :func:`macq.quantizers.calibration.layerwise`):

1. the *float* layer's outputs on the float model's own inputs are the target (a float activation stream is
   carried next to the engine's quantized one, as AutoRound does with ``enable_quanted_input``: the layer
   being tuned sees the quantized model's inputs, so it also learns to undo the error accumulated so far);
2. optional AWQ initialisation (``init="awq"``): AWQ's per-channel scales are searched and folded and its
   per-group clip searched, exactly as ``--method awq`` does;
3. every linear of the layer gets a rounding offset ``v ∈ [−½, ½]`` per weight and two range factors per
   group (``lo``/``hi`` on the group's min / max, in ``[1 − max_shrink, 1]``), all tuned jointly by sign-SGD
   (AutoRound's optimiser: step ``lr·sign(grad)``, linear decay) on the mean squared error of the layer
   output over random calibration batches, with straight-through rounding;
4. **keep-best**: the exact objective (output MSE over *all* calibration tokens, with the records' real
   dequantized weights) is measured at the initialisation and every ``eval_every`` steps; the best candidate
   wins, so the result is never worse than its initialisation on this objective;
5. optional logits stage (``kl_steps``, :mod:`macq.quantizers.learned_kl`): every record's per-group scales,
   the embedding / tied head included, tuned together against the float model's final log-probs (KL) on the
   calibration tokens, keep-best on held-out calibration sequences.

The grid is :mod:`macq.quantizers.grid`'s (integer zero-point, fp16 scale rounded before the codes), so the
output is a plain :class:`~macq.record.AffineRecord` that both exporters take unchanged. Memory: one layer,
its parameters' gradients, and three activation sets (quantized input, float input, float target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from macq.arch import ArchSpec, arch_spec
from macq.device import resolve_device
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
from macq.progress import stage
from macq.quantizers import awq_search as S
from macq.quantizers.activations import ActivationStore, StreamOptions
from macq.quantizers.base import QuantConfig, check, check_bits, check_model_inputs
from macq.quantizers.calibration import LayerInputs, _to, layer_device, model_on, run_job, run_layer, target_linears
from macq.quantizers.calibration import layer_out as _layer_out
from macq.quantizers.calibration import plain as _plain
from macq.quantizers.grid import SCALE_DTYPES, ScaleOptions
from macq.record import record_to

INITS = ("awq", "rtn")
_TINY = 2.0 ** -24


@dataclass
class LearnedConfig(StreamOptions, ScaleOptions, QuantConfig):
    method = "learned"
    bits: int = 3
    group_size: int = 64
    symmetric: bool = False
    init: str = "awq"                # "awq": AWQ scales + clip first; "rtn": nearest on the full range
    steps: int = 0                   # sign-SGD steps per decoder layer; 0 (the measured best here): AWQ's init, then the logits stage
    lr: float = 0.0                  # 0: AutoRound's default 1/steps
    eval_every: int = 8              # keep-best checkpoints (plus the initialisation and the last step)
    max_shrink: float = 0.5          # range factors live in [1 - max_shrink, 1]
    batch_size: int = 1              # calibration sequences per optimiser step (and per stored batch)
    scale_dtype: str = "float16"
    seed: int = 0
    n_grid: int = 20                 # AWQ init: α grid
    clip_grid: int = 20              # AWQ init: clip grid
    kl_steps: int = field(default=40, metadata={
        "help": "logits stage: Adam steps on every record's per-group scales (embedding / head included) against the "
                "float model's logits, after the block-wise pass (0 = off)"})
    kl_lr: float = field(default=3e-3, metadata={"help": "logits stage: Adam learning rate on the log-scales"})
    kl_batch: int = field(default=1, metadata={"help": "logits stage: calibration sequences per step"})
    kl_eval_every: int = field(default=10, metadata={"help": "logits stage: steps between keep-best checks"})
    kl_rows: int = field(default=8, metadata={
        "help": "logits stage: the first N calibration sequences feed it (bounds the float log-probs it keeps: "
                "N x seq_len x vocab x 2 bytes)"})
    kl_holdout: int = field(default=2, metadata={
        "help": "logits stage: calibration sequences held out for keep-best (0 = judge on the training ones)"})
    mode: str = field(default="affine", metadata={
        "help": "affine only: the rounding offsets and the logits stage tune continuous affine scales, which MLX's "
                "float modes (one scale byte per block) cannot hold; use --method awq, awq-gptq or gptq there"})

    def __post_init__(self) -> None:
        check(self.mode == "affine", f"--mode {self.mode}: learned tunes continuous affine scales, which MLX's float "
              "grids cannot hold; use --method awq, awq-gptq or gptq with --mode")
        check_bits(self.bits, range(2, 9), self.method)
        check(self.group_size >= 0, f"--group-size {self.group_size}: expected >0 or 0 (per channel)")
        check(self.init in INITS, f"--init {self.init}: expected one of {', '.join(INITS)}")
        check(self.steps >= 0, f"--steps {self.steps}: expected >= 0")
        check(self.lr >= 0, f"--lr {self.lr}: expected >= 0 (0 = 1/steps)")
        check(self.eval_every >= 1, f"eval_every={self.eval_every}: expected >= 1")
        check(0.0 <= self.max_shrink < 1.0, f"max_shrink={self.max_shrink}: expected in [0, 1)")
        check(self.batch_size >= 1, f"--batch-size {self.batch_size}: expected >= 1")
        check(self.scale_dtype in SCALE_DTYPES, f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")
        check(self.n_grid >= 1 and self.clip_grid >= 1, "n_grid and clip_grid: expected >= 1")
        check(self.kl_steps >= 0, f"--kl-steps {self.kl_steps}: expected >= 0 (0 = no logits stage)")
        check(self.kl_lr > 0, f"--kl-lr {self.kl_lr}: expected > 0")
        check(self.kl_batch >= 1, f"--kl-batch {self.kl_batch}: expected >= 1")
        check(self.kl_eval_every >= 1, f"--kl-eval-every {self.kl_eval_every}: expected >= 1")
        check(self.kl_holdout >= 0, f"--kl-holdout {self.kl_holdout}: expected >= 0")
        check(self.kl_rows >= 1, f"--kl-rows {self.kl_rows}: expected >= 1")
        check(not self.kl_steps or self.kl_holdout < self.kl_rows,
              f"--kl-holdout {self.kl_holdout}: must leave training sequences of the --kl-rows {self.kl_rows}")
        self.check_stream_options()

    def awq_config(self):
        from macq.quantizers.awq import AWQConfig

        return AWQConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, n_grid=self.n_grid,
                         clip_grid=self.clip_grid, max_shrink=max(self.max_shrink, 1e-3), scale_dtype=self.scale_dtype)


# ---------------------------------------------------------------------------------------------- the grid

def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _ste_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x + (x.to(dtype).float() - x).detach()


@dataclass
class LinearParams:
    """Tunable quantization of one weight ``w [out, in]``: rounding offsets and per-group range factors."""

    w: torch.Tensor                  # [out, G, g] float32, fixed
    v: torch.Tensor                  # [out, G, g] rounding offsets in [-0.5, 0.5]
    lo: torch.Tensor                 # [out, G] factor on the group min
    hi: torch.Tensor                 # [out, G] factor on the group max

    def tensors(self) -> list[torch.Tensor]:
        return [self.v, self.lo, self.hi]


def grid_params(p: LinearParams, bits: int, symmetric: bool, sdtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per group, differentiable (straight-through rounding of the zero and the scale dtype);
    with ``lo = hi = c`` and ``v = 0`` exactly :func:`macq.quantizers.grid.affine_params` with clip ``c``."""
    maxq = 2 ** bits - 1
    wmin, wmax = p.w.amin(-1) * p.lo, p.w.amax(-1) * p.hi
    if symmetric:
        scale = 2 * torch.maximum(wmin.abs(), wmax.abs()) / maxq
        scale = _ste_cast(scale.clamp_min(_TINY), sdtype)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = _ste_cast(((wmax - wmin) / maxq).clamp_min(_TINY), sdtype)
    zero = _ste_round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def fake_quant(p: LinearParams, bits: int, symmetric: bool, sdtype: torch.dtype) -> torch.Tensor:
    """Dequantized weight ``[out, in]`` of the current parameters, differentiable in ``v``, ``lo``, ``hi``."""
    scale, zero = grid_params(p, bits, symmetric, sdtype)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = (_ste_round(p.w / s + p.v) + z).clamp(0, 2 ** bits - 1)
    return (s * (q - z)).reshape(p.w.shape[0], -1)


@torch.no_grad()
def to_record(p: LinearParams, bits: int, symmetric: bool, sdtype: torch.dtype):
    """The :class:`AffineRecord` of the current parameters (its ``dequantize()`` equals :func:`fake_quant`)."""
    from macq.record import AffineRecord

    scale, zero = grid_params(p, bits, symmetric, sdtype)
    q = (torch.round(p.w / scale.unsqueeze(-1) + p.v) + zero.unsqueeze(-1)).clamp(0, 2 ** bits - 1)
    out, n_g, g = p.w.shape
    return AffineRecord(codes=q.reshape(out, n_g * g).to(torch.uint8), scales=scale.to(sdtype), bits=bits,
                        group_size=g, zeros=None if symmetric else zero.to(torch.uint8))


# ---------------------------------------------------------------------------------------------- one layer

@torch.no_grad()
def layer_objective(layer: nn.Module, weights: dict[str, torch.Tensor], hidden: list[torch.Tensor],
                    kwargs: list[dict[str, Any]], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the layer's output (with ``weights`` substituted) over every calibration token."""
    tot, n = 0.0, 0
    for hs, kw, t in zip(hidden, kwargs, targets):
        tot += float((_layer_out(layer, weights, hs, kw) - t).pow(2).sum())
        n += t.numel()
    return tot / max(n, 1)


def tune_layer(layer: nn.Module, params: dict[str, LinearParams], hidden: list[torch.Tensor],
               kwargs: list[dict[str, Any]], targets: list[torch.Tensor], cfg: LearnedConfig,
               gen: torch.Generator) -> dict[str, Any]:
    """Sign-SGD on ``params`` (module name -> LinearParams) against ``targets``; keeps the best checkpoint.

    Returns stats: objective at init, best objective, the step it was reached at (0 = initialisation).
    """
    sd, bits, sym = cfg.torch_scale_dtype, cfg.bits, cfg.symmetric

    def weights(grad: bool) -> dict[str, torch.Tensor]:
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            return {f"{n}.weight": _oriented(layer.get_submodule(n), fake_quant(p, bits, sym, sd)) for n, p in params.items()}

    def snapshot() -> dict[str, list[torch.Tensor]]:
        return {n: [t.detach().clone() for t in p.tensors()] for n, p in params.items()}

    init = layer_objective(layer, weights(False), hidden, kwargs, targets)
    best, best_step, best_state = init, 0, snapshot()
    lr0 = cfg.lr if cfg.lr > 0 else 1.0 / max(cfg.steps, 1)
    leaves = [t for p in params.values() for t in p.tensors()]
    lo_b = 1.0 - cfg.max_shrink
    for step in range(1, cfg.steps + 1):
        b = int(torch.randint(len(hidden), (1,), generator=gen))
        for t in leaves:
            t.requires_grad_(True)
        with torch.enable_grad():
            loss = (_layer_out(layer, weights(True), hidden[b], kwargs[b]) - targets[b]).pow(2).mean()
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        lr = lr0 * (1.0 - (step - 1) / max(cfg.steps, 1))
        with torch.no_grad():
            for t, g in zip(leaves, grads):
                t.requires_grad_(False)
                if g is not None:
                    t -= lr * torch.sign(g)
            for p in params.values():
                p.v.clamp_(-0.5, 0.5)
                p.lo.clamp_(lo_b, 1.0)
                p.hi.clamp_(lo_b, 1.0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            obj = layer_objective(layer, weights(False), hidden, kwargs, targets)
            if obj < best:
                best, best_step, best_state = obj, step, snapshot()
    with torch.no_grad():
        for n, p in params.items():
            for t, saved in zip(p.tensors(), best_state[n]):
                t.copy_(saved)
    return {"objective_init": init, "objective": best, "best_step": best_step}


def _oriented(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> the module's own weight layout (GPT-2 Conv1D stores ``[in, out]``)."""
    return w.t() if is_conv1d(mod) else w


def init_params(w: torch.Tensor, g: int, clip: torch.Tensor | float) -> LinearParams:
    out, inp = w.shape
    c = torch.as_tensor(clip, dtype=torch.float32, device=w.device).expand(out, inp // g).clone()
    return LinearParams(w=S.grouped(w.float(), g).clone(), v=torch.zeros(out, inp // g, g, device=w.device), lo=c,
                        hi=c.clone())


def quantize_layer(layer: nn.Module, path: str, inputs: LayerInputs, float_hidden: list[torch.Tensor],
                   cfg: LearnedConfig, spec: ArchSpec, targets_set: set[str], records: dict[str, Any],
                   stats: dict[str, Any], gen: torch.Generator) -> list[torch.Tensor]:
    """Tune one layer in place; returns the float layer's outputs (the next layer's float inputs)."""
    from macq.quantizers.actquant import collect_input_stats, input_groups
    from macq.quantizers.awq import search_and_fold

    f_inputs = LayerInputs(hidden=float_hidden, kwargs=inputs.kwargs, storage=inputs.storage)
    with stage("target"):
        f_out = run_layer(layer, f_inputs)                        # targets: float layer on float inputs
    groups = input_groups(layer, spec.sequence)
    linears = list(target_linears(layer, path, groups, targets_set))
    params: dict[str, LinearParams] = {}
    if cfg.init == "awq":
        acfg = cfg.awq_config()
        with stage("hessian"):
            st = collect_input_stats(layer, inputs, groups, gram=True)
        with stage("search"):
            search_and_fold(layer, path, groups, st, acfg, spec, stats)
    with stage("search"):
        for grp, full, mod in linears:
            w = get_weight(mod).detach().float()
            g = cfg.group_for(full, w.shape[1])
            clip: torch.Tensor | float = 1.0
            if cfg.init == "awq" and acfg.clip_search:
                clip = S.search_clip(w, st[grp].gram.float(), cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype,
                                     cfg.clip_grid, acfg.max_shrink)
            params[full[len(path) + 1:]] = init_params(w, g, clip)
    dev = layer_device(layer, inputs.storage)      # the tuning's batches live where the layer computes
    hidden = [_plain(_to(h, dev)) for h in inputs.hidden]
    kwargs = [_plain(_to(k, dev)) for k in inputs.kwargs]
    targets = [_plain(_to(t, dev)) for t in f_out]
    for p_ in layer.parameters():
        p_.requires_grad_(False)
    with stage("tune"):
        info = tune_layer(layer, params, hidden, kwargs, targets, cfg, gen)
        stats["layers"][path] = info
        for name, p in params.items():
            mod = layer.get_submodule(name)
            rec = to_record(p, cfg.bits, cfg.symmetric, cfg.torch_scale_dtype)
            rec.transposed = is_conv1d(mod)
            set_weight(mod, rec.dequantize(torch.float32))
            records[f"{path}.{name}"] = rec
    return f_out


def layer_job(model: nn.Module, cfg: LearnedConfig, records: dict[str, Any] | None = None, progress: bool = False,
              device: torch.device | None = None):
    """The block-wise pass's per-layer step, as :func:`~macq.quantizers.calibration.layerwise` and the streaming
    engine (:mod:`macq.quantizers.stream_calib`) drive it; ``model`` is only read for module names and config
    (a meta skeleton will do). The float activation stream (the float layers' outputs on the float inputs)
    lives in the job, next to the driver's quantized stream: a list in memory, or, when the driver's stream is
    an :class:`~macq.quantizers.activations.ActivationStore`, a sibling store in the same dtype and memory
    budget (spilling with it). ``records``: the dict to add to (the heads may already be in it). ``device``: where
    the driver puts each layer (CPU by default)."""
    from macq.quantizers.calibration import LayerJob

    spec = arch_spec(model).resolved(model.config)
    targets = set(quantizable_modules(model, False, False, tuple(cfg.skip)))
    n_layers = len(model.get_submodule(spec.layers))
    records = {} if records is None else records
    stats: dict[str, Any] = {"scales": {}, "layers": {}}
    gen = torch.Generator().manual_seed(cfg.seed)
    state: dict[str, Any] = {"float": None}

    def fn(i: int, path: str, layer: nn.Module, inputs: LayerInputs) -> None:
        prev = state["float"]
        fh = prev if prev is not None else list(inputs.hidden)
        f_out = quantize_layer(layer, path, inputs, fh, cfg, spec, targets, records, stats, gen)
        if isinstance(prev, ActivationStore):
            prev.release()
        if i + 1 == n_layers:              # the last layer's float outputs feed nothing
            state["float"] = None
        elif isinstance(inputs.hidden, ActivationStore):
            store = ActivationStore(inputs.hidden.dtype, inputs.hidden.budget)
            for t in f_out:
                store.append(t)
            state["float"] = store
        else:
            state["float"] = f_out
        if progress:
            info = stats["layers"][path]
            print(f"  {path}: output MSE {info['objective_init']:.4g} -> {info['objective']:.4g} "
                  f"(best at step {info['best_step']})", flush=True)

    return LayerJob(fn, records, stats, device or torch.device("cpu"), cfg.batch_size, stats_in_manifest=True)


def layer_quantizer(model: nn.Module, cfg: LearnedConfig, device: torch.device | None = None):
    """The streaming engine's entry: the block-wise pass per layer, the embedding / lm_head from the engine's
    data-free :func:`macq.quantizers.head_records` (as the in-memory path makes them), and with ``kl_steps`` the
    logits stage over the kept layers after the last one (:mod:`macq.quantizers.learned_stream`)."""
    job = layer_job(model, cfg, device=device)
    if not cfg.kl_steps:
        return job
    if arch_spec(model).extra_embeds:
        raise MacqError("--stream: learned's logits stage streams families without learned position embeddings "
                        f"({model.config.model_type} has them); pass --no-stream, or --kl-steps 0")

    def finish(stream, calib_ids: torch.Tensor, files, heads: dict[str, Any]) -> dict[str, Any]:
        from macq.quantizers.learned_stream import tune_logits_streamed

        kl_ids = calib_ids[:cfg.kl_rows]
        check(cfg.kl_holdout < kl_ids.shape[0],
              f"--kl-holdout {cfg.kl_holdout}: must leave training sequences of the {kl_ids.shape[0]} calibration ones")
        heads, job.stats["logits"] = tune_logits_streamed(
            stream, files, heads, kl_ids, steps=cfg.kl_steps, lr=cfg.kl_lr, batch_size=cfg.kl_batch,
            eval_every=cfg.kl_eval_every, holdout=cfg.kl_holdout, seed=cfg.seed, progress=stream.progress)
        return heads

    job.finish = finish
    return job


def quantize_model(model: nn.Module, cfg: LearnedConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """Learned rounding + grid for every decoder linear of ``model`` (in place) → QuantizedModel; then, with
    ``kl_steps``, every record's scales (embedding / head included) tuned to the float model's logits.

    The method quantizes its own embedding / head (``head_records``, the registry's data-free choice) rather than
    letting the registry do it, because the logits stage needs the *float* model's logits (computed here before
    anything is quantized) and tunes the head's scales too. ``method["stats"]`` holds each layer's objective at
    initialisation and after tuning, and the logits stage's held-out KL before and after.
    """
    from macq.models import set_weight
    from macq.qmodel import QuantizedModel
    from macq.quantizers import head_records
    from macq.quantizers.learned_kl import teacher_logprobs, tune_logits

    check_model_inputs("learned", cfg, LearnedConfig, calib_ids)
    device = resolve_device(cfg.device)
    kl_ids = calib_ids[:cfg.kl_rows]
    if cfg.kl_steps:
        check(cfg.kl_holdout < kl_ids.shape[0],
              f"--kl-holdout {cfg.kl_holdout}: must leave training sequences of the {kl_ids.shape[0]} calibration ones")
    with model_on(model, device):
        teacher = teacher_logprobs(model, kl_ids) if cfg.kl_steps else None
    records: dict[str, Any] = head_records(model, cfg)      # quantized first: the decoder is calibrated on them
    for name, rec in records.items():
        set_weight(model.get_submodule(name), rec.dequantize(torch.float32))
    job = layer_job(model, cfg, records, progress, device)
    stats = job.stats
    run_job(model, calib_ids, job, progress, "learned")
    if teacher is not None:
        with model_on(model, device):
            on = {n: record_to(r, device) for n, r in records.items()}
            records, stats["logits"] = tune_logits(model, on, kl_ids, teacher, steps=cfg.kl_steps,
                                                   lr=cfg.kl_lr, batch_size=cfg.kl_batch, eval_every=cfg.kl_eval_every,
                                                   holdout=cfg.kl_holdout, seed=cfg.seed, progress=progress)
        records = {n: record_to(r, "cpu") for n, r in records.items()}
        for name, rec in records.items():
            set_weight(model.get_submodule(name), rec.dequantize(torch.float32))
    method = cfg.to_dict()
    method["stats"] = stats
    return QuantizedModel.from_model(model, records, method=method, source=source)
