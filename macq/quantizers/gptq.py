"""GPTQ (Frantar et al., 2022): second-order post-training quantization, one linear at a time.

For a linear with weight ``W [out, in]`` seeing inputs ``X``, GPTQ minimises ``‖XWᵀ − XŴᵀ‖²`` by
quantizing input columns one after another and spreading each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian ``H = 2/n·Σ xxᵀ``. The inverse is used through its
upper Cholesky factor (numerically stable, and row ``j`` of it is exactly the inverse Hessian of the
remaining columns after ``j−1`` eliminations), and updates to later columns are applied lazily once per
block of ``block_size`` columns (same result, far fewer memory passes).

The grid is :mod:`macq.quantizers.grid`'s, so a GPTQ record at given bits/group/symmetry lives on exactly
RTN's grid; only the choice of codes differs. In MLX's float modes (``mode="mxfp4" | "nvfp4" | "mxfp8"``) each
block's 8-bit scale is fixed when the loop reaches the block (searched on the block's current weights, MLX's
own scale tried first: :func:`macq.quantizers.mxfp.search_scales`) and columns round to the nearest E2M1 / E4M3
value times that scale; the record is an :class:`~macq.record.FPRecord` in MLX's bytes. Groups are contiguous in the *original* column order
(``act_order`` requires ``static_groups``): MLX and Core ML hold no ``g_idx`` permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.microscale import FPFormat, fp_format
from macq.perf import matmul_flops
from macq.progress import add_flops, stage
from macq.quantizers import grid
from macq.quantizers.activations import StreamOptions
from macq.quantizers.base import HeadOptions, QuantConfig, check, check_bits
from macq.quantizers.grid import SCALE_DTYPES, ScaleOptions
from macq.record import AffineRecord, FPRecord

DAMP_RETRIES = 4        # on a failed Cholesky, damping is multiplied by 10 up to this many times
MSE_GRID = torch.linspace(1.0, 0.2, 41)  # range shrink factors tried by mse_clip (GPTQ's maxshrink 0.8)


@dataclass
class GPTQConfig(HeadOptions, StreamOptions, ScaleOptions, QuantConfig):
    method = "gptq"                # class constant (not a field), as in RTNConfig
    bits: int = 4
    group_size: int = field(default=128, metadata={
        "groups": "input", "help": "input elements per group (unset: largest of 128/64/32 dividing the model's dims); 0 per channel"})
    symmetric: bool = False
    damp_percent: float = 0.01     # λ = damp_percent · mean(diag H), added to diag H
    block_size: int = 128          # lazy-batch width (result is independent of it)
    act_order: bool = False        # quantize columns by descending diag(H)
    static_groups: bool = False    # group params from the original W (needed with act_order + groups)
    true_sequential: bool = True   # re-collect a layer's later inputs after its earlier linears are quantized
    mse_clip: bool = True          # per-group range shrink minimising |w − q(w)|^2.4 (GPTQ's "mse" option):
                                   # on SmolLM2 down_proj it cut held-out output error 0.89 -> 0.73 (RTN 1.06)
    scale_dtype: str = "float16"
    mode: str = field(default="affine", metadata={
        "help": "affine (integer grid) or an MLX microscaled float mode: mxfp4 (E2M1 codes, power-of-two scale "
                "per 32), nvfp4 (E2M1, fp8 E4M3 scale per 16), mxfp8 (E4M3 codes, power-of-two scale per 32); a "
                "float mode fixes --bits and --group-size (leave them unset)"})
    batch_size: int = 8            # calibration sequences per forward
    device: str = field(default="cpu", metadata={"help": "cpu|cuda|mps (cuda:N): where layers are quantized; "
                                                         "the streamed path keeps activations on the CPU"})
    offload: bool = False          # keep activations on CPU, move one layer at a time to ``device``
    n_calib: int = 128             # the CLI's business: calibration ids are passed in
    seq_len: int = 512
    dataset: str = "c4"

    def __post_init__(self) -> None:
        from macq.quantizers.rtn import MODES, fix_float_mode

        check(self.mode in MODES, f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode != "affine":
            fix_float_mode(self)
            check(not self.act_order, f"--act-order: --mode {self.mode} blocks are contiguous input columns")
        check_bits(self.bits, range(2, 9), "gptq")
        check(self.group_size >= 0, f"--group-size {self.group_size}: expected > 0, or 0 for per-channel")
        check(0 < self.damp_percent < 1, f"--damp-percent {self.damp_percent}: expected a fraction in (0, 1)")
        check(self.block_size >= 1, f"--block-size {self.block_size}: expected >= 1")
        check(self.batch_size >= 1, f"--batch-size {self.batch_size}: expected >= 1")
        check(str(self.device).split(":")[0] in ("cpu", "cuda", "mps", "auto"),
              f"--device {self.device}: expected cpu, cuda, cuda:N, mps or auto")
        self.check_stream_options()
        self.check_head_options()
        check(self.scale_dtype in SCALE_DTYPES,
              f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")
        check(not (self.act_order and self.group_size and not self.static_groups),
              "--act-order with --group-size needs --static-groups: permuted groups need a g_idx, "
              "which MLX and Core ML cannot hold")



def _params(w: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` per group of ``w [out, k, g]`` on the shared grid, with optional MSE range shrink."""
    args = (cfg.bits, cfg.symmetric, "int", cfg.torch_scale_dtype)
    if not cfg.mse_clip:
        return grid.affine_params(w, *args)[:2]
    best, best_err = None, None
    wf = w.float()                # the grid's functions work in float32: convert and take the range once
    lo, hi = w.amin(-1).float(), w.amax(-1).float()
    for c in MSE_GRID.tolist():   # vectorised over all groups; the loop is over candidate factors only
        ct = torch.tensor(c, dtype=torch.float32)
        s, z, b = grid.params_from_range(lo * ct, hi * ct, *args)
        err = (grid.dequantize_codes(grid.quantize_codes(wf, s, z, b, cfg.bits), s, z, b, cfg.bits)
               - wf).abs_().pow_(2.4).sum(-1)
        if best is None:
            best, best_err = [s, z], err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = [torch.where(better, s, best[0]), None if z is None else torch.where(better, z, best[1])]
    return best[0], best[1]


def _fp_params(w: torch.Tensor, fmt: FPFormat, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(divisor, scale byte)`` per block of ``w [out, k, g]``: MLX's rule, or the searched byte (mse_clip)."""
    from macq.quantizers.mxfp import block_scales, search_scales

    wg = w.double()
    byte, div = search_scales(wg, fmt, cfg.torch_scale_dtype) if cfg.mse_clip else \
        block_scales(wg, fmt, cfg.torch_scale_dtype)
    return div[..., 0].to(w.dtype), byte[..., 0]


def _fp_round(w: torch.Tensor, div: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """One column onto its blocks' grids: ``(codes, values)``; a zero scale (all-zero block) gives zeros."""
    from macq.quantizers.mxfp import grid_values, nearest_codes

    safe = torch.where(div > 0, div, torch.ones_like(div))
    c = nearest_codes(w / safe, fmt)
    return c, torch.where(div > 0, grid_values(c, fmt, safe), torch.zeros_like(w))


def _inverse_lower(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L`` (consumed): LAPACK's ``trtri`` on the CPU (n³/3 operations, in
    place), a triangular solve against the identity elsewhere."""
    if L.device.type != "cpu":
        return torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    from scipy.linalg import lapack

    a = L.numpy().T                          # the same memory, Fortran order: the upper triangle Lᵀ
    trtri = lapack.get_lapack_funcs("trtri", (a,))
    inv, info = trtri(a, lower=0, overwrite_c=1)
    if info != 0:
        raise MacqError(f"gptq: triangular inverse failed (LAPACK info {info})")
    out = torch.from_numpy(inv.T) if inv is not a else L   # in place: L now holds L⁻¹
    return out.tril_()


def _flip_both(M: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``M.flip(0, 1)`` in place (a square contiguous matrix): row blocks swapped with their mirror blocks, so
    the extra memory is two blocks of rows, not a second matrix."""
    n = M.shape[0]
    for i in range(0, n // 2, rows):
        b = min(rows, n // 2 - i)
        top = M[i:i + b].flip(0, 1)
        M[i:i + b] = M[n - i - b:n - i].flip(0, 1)
        M[n - i - b:n - i] = top
    if n % 2:
        M[n // 2] = M[n // 2].flip(0)
    return M


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the damping fraction used.

    One Cholesky and one triangular inverse (2n³/3 operations, half of factoring, inverting and factoring
    again): with ``J`` the order-reversing permutation, ``J(H+λI)J = L Lᵀ`` gives ``H+λI = Ũ Ũᵀ`` with
    ``Ũ = J L J`` upper triangular, so ``(H+λI)⁻¹ = (Ũ⁻¹)ᵀ Ũ⁻¹`` and ``U = Ũ⁻¹ = J L⁻¹ J`` is upper
    triangular with a positive diagonal: *the* upper Cholesky factor (it is unique).

    Near-singular Hessians (few tokens, low-rank inputs, float32 on MPS) can make the Cholesky fail;
    the damping is then multiplied by 10 and retried (``DAMP_RETRIES`` times) instead of aborting.
    MPS lacks float64 and some linalg kernels: there the factorization runs in float32 on the CPU and
    starts 10× damper.
    """
    device = H.device
    H = H.cpu() if device.type == "mps" else H
    n = H.shape[0]
    mean = torch.diag(H).mean()
    damp = damp_percent * (10.0 if H.dtype != torch.float64 else 1.0)  # float32 (MPS) starts damper
    f64 = H.dtype == torch.float64
    for _ in range(DAMP_RETRIES + 1):
        # one n×n matrix besides H: J H J (a copy), damped, factored, inverted and flipped back in place
        L = H.flip(0, 1)
        L.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty((), dtype=torch.int32, device=L.device)))
        add_flops(n ** 3 / 3, f64)
        if info.item() == 0:
            add_flops(n ** 3 / 3, f64)
            U = _flip_both(_inverse_lower(L))   # J L⁻¹ J
            del L
            if torch.isfinite(U).all() and bool((U.diagonal() > 0).all()):
                return U.to(device), damp
        damp *= 10
    raise MacqError(f"gptq: Hessian not positive definite even with damping {damp / 10:g} "
                    "(too little calibration data?)")


@dataclass
class PreparedHessian:
    """What GPTQ derives from ``H`` alone (damped inverse Cholesky factor, dead columns, column order): the
    same for every linear that sees this input, so linears sharing an input (q/k/v, gate/up) compute it once."""

    diag_mean: float          # mean of diag H, dead entries set to 1: the damping's unit (output-error stat)
    dead: torch.Tensor        # [in] bool: inputs that are always zero
    perm: torch.Tensor        # column order (act_order: descending diag H)
    Hinv: torch.Tensor        # upper Cholesky factor of (H[perm][:, perm] + λI)^-1
    damp: float


@torch.no_grad()
def prepare_hessian(H: torch.Tensor, cfg: GPTQConfig, device: torch.device, own: bool = False) -> PreparedHessian:
    """``H``'s part of :func:`gptq_quantize`, in float64 (float32 on MPS, which has no float64). With ``own``
    the caller hands ``H`` over (it is changed in place and dropped): no n×n copy (8B down_proj: 1.9 GB)."""
    dt = torch.float32 if device.type == "mps" else torch.float64
    given = H
    H = H.to(device, dt)
    if H is given and not own:
        H = H.clone()
    n = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True) if cfg.act_order else torch.arange(n, device=device)
    if cfg.act_order:               # the identity permutation would copy H twice for nothing
        H = H[perm][:, perm]
    diag_mean = torch.diag(H).mean().item()
    with stage("cholesky"):
        Hinv, damp = inverse_hessian_cholesky(H, cfg.damp_percent)
    return PreparedHessian(diag_mean, dead, perm, Hinv, damp)


def gptq_block_flops(out: int, b: int, rest: int) -> int:
    """Products of one lazy block of ``b`` columns over ``out`` rows with ``rest`` columns after it: the
    in-block rank-1 updates (column ``i`` updates ``b − i`` columns: ``2·out·(b−i)``) and the deferred
    ``Err [out, b] @ Hinv [b, rest]`` update of the later columns."""
    return out * b * (b + 1) + matmul_flops(out, b, rest)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor | None, cfg: GPTQConfig,
                  prepared: PreparedHessian | None = None) -> tuple[AffineRecord, dict[str, Any]]:
    """Quantize ``W [out, in]`` given ``H [in, in]`` (= 2/n·Σxxᵀ), or ``prepared`` from :func:`prepare_hessian`
    (shared by the linears that see the same input); returns the record and its stats.

    ``stats["loss"]`` is GPTQ's objective ``½·Σ (w−q)²/[H⁻¹]_jj``; ``stats["out_err"]`` is
    ``tr(ΔW H ΔWᵀ)`` (= 2/n·‖XΔWᵀ‖², the layer-output error) for the undamped ``H``.
    """
    dt = torch.float32 if W.device.type == "mps" else torch.float64  # MPS has no float64
    p = prepared if prepared is not None else prepare_hessian(H, cfg, W.device)
    W = W.to(dt).clone()
    out, n = W.shape
    fp = fp_format(cfg.mode) if cfg.mode != "affine" else None
    g = fp.group_size if fp is not None else (cfg.group_size or n)
    if n % g:
        raise MacqError(f"gptq: group_size={g} does not divide the input dim {n}")
    dead, perm, Hinv, damp = p.dead, p.perm, p.Hinv, p.damp
    W[:, dead] = 0.0
    W0 = W.clone()
    static = cfg.static_groups or cfg.group_size == 0   # per-channel params always come from the original W
    empty = W.new_zeros(out, n // g, dtype=torch.float32)
    with stage("grid"):             # each group's grid (MSE range search): element-wise, its own stage
        if fp is not None:          # zero holds the scale bytes, scale the decoded divisors
            empty = W.new_zeros(out, n // g)
            scale, zero = _fp_params(W.view(out, n // g, g), fp, cfg) if static else (empty, empty.to(torch.uint8))
        else:
            scale, zero = _params(W.view(out, n // g, g), cfg) if static else \
                (empty, None if cfg.symmetric else empty.clone())
    W = W[:, perm] if cfg.act_order else W   # the identity order needs no [out, n] gather
    codes, losses = torch.zeros(out, n, dtype=torch.uint8, device=W.device), W.new_zeros(out)
    group_of = (perm // g).tolist()  # group (in the original order) of the j-th quantized column
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), W.new_zeros(out, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j, gi = i1 + i, group_of[i1 + i]
            if not static and j % g == 0:  # params from the group's *current* weights: in-block part is
                rest = W[:, i2:j + g] - Err1[:, :i] @ Hinv[i1:j, i2:j + g]  # updated, the rest gets its pending update
                cur = torch.cat([W1[:, i:i + g], rest], 1).unsqueeze(1)
                with stage("grid"):
                    s, z = _fp_params(cur, fp, cfg) if fp is not None else _params(cur, cfg)
                scale[:, gi] = s[:, 0]
                if z is not None:
                    zero[:, gi] = z[:, 0]
            w, d = W1[:, i], Hinv1[i, i]
            if fp is not None:
                c, q = _fp_round(w, scale[:, gi], fp)
                codes[:, j], err = c, (w - q) / d
            else:
                s, z = scale[:, gi], None if cfg.symmetric else zero[:, gi]
                c = grid.quantize_codes(w.unsqueeze(1), s, z, None, cfg.bits)
                q = grid.dequantize_codes(c, s, z, None, cfg.bits)[:, 0].to(dt)
                codes[:, j], err = c[:, 0], (w - q) / d
            losses += err ** 2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        add_flops(gptq_block_flops(out, i2 - i1, n - i2), dt == torch.float64)
    codes = codes[:, torch.argsort(perm)] if cfg.act_order else codes
    rec: AffineRecord | FPRecord
    if fp is not None:
        rec = FPRecord(codes=codes.cpu(), scales=zero.cpu(), mode=cfg.mode)
    else:
        rec = AffineRecord(codes=codes.cpu(), scales=scale.to(cfg.torch_scale_dtype).cpu(), bits=cfg.bits, group_size=g,
                           zeros=None if cfg.symmetric else zero.to(torch.uint8).cpu())
    # tr(ΔW H ΔWᵀ) without the [out, n] @ [n, n] product: ΔW = −E·U (E the scaled errors, U the factor above,
    # rows in quantization order) and U (H+λI) Uᵀ = I, so tr(ΔW (H+λI) ΔWᵀ) = ‖E‖² = 2·loss, and the undamped
    # value subtracts λ‖ΔW‖² (dead columns: ΔW = 0 there, whatever H0 holds)
    delta = rec.dequantize().to(W0.device, dt) - W0
    loss = losses.sum().item()
    stats = {"loss": loss, "out_err": 2 * loss - damp * p.diag_mean * delta.pow(2).sum().item(),
             "damp": damp, "dead": int(dead.sum())}
    return rec, stats


# ------------------------------------------------------------------------------------------------
# Model driver: layer by layer (macq.quantizers.calibration), linears sharing an input share one H.

class _StopForward(Exception):
    pass


class HessianAccumulator:
    """Running mean of ``2·xxᵀ`` over calibration tokens. Each batch's ``XᵀX`` is one float32 matmul (the
    expensive part); the running sum is kept in float64 (float32 on MPS) so thousands of batches do not
    drift."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.H = torch.zeros(n_in, n_in, dtype=self.dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.H.device, torch.float32)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        xtx = x.T @ x                    # float32; widened and added a block of rows at a time, so the only
        scale = 2.0 / self.n             # n×n temporary is this one (8B down_proj: 0.8 GB, not 0.8 + 1.6)
        for r in range(0, xtx.shape[0], 1024):
            self.H[r:r + 1024] += xtx[r:r + 1024].to(self.dtype).mul_(scale)
        add_flops(matmul_flops(x.shape[1], t, x.shape[1]))


@torch.no_grad()
def collect_hessians(layer: nn.Module, inputs, names: list[str], device: torch.device,
                     stop_early: bool = False) -> dict[str, torch.Tensor]:
    """``H`` of each named submodule's input over all calibration batches of ``inputs`` (LayerInputs).
    With ``stop_early`` (one name) each forward stops once that input is seen, skipping the rest of the layer."""
    from macq.quantizers.calibration import _to, module_inputs

    acc: dict[str, HessianAccumulator] = {}

    def cb(name: str, x: torch.Tensor) -> None:
        acc.setdefault(name, HessianAccumulator(x.shape[-1], device)).add(x)
        if stop_early:
            raise _StopForward

    with module_inputs(layer, names, cb):
        for hs, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                layer(hs.to(device), **_to(kw, device))
            except _StopForward:
                pass
    return {k: a.H for k, a in acc.items()}


def layer_quantizer(model: nn.Module, cfg: GPTQConfig, device: torch.device):
    """GPTQ's per-layer step for :func:`~macq.quantizers.calibration.layerwise` and the streaming engine
    (:mod:`macq.quantizers.stream_calib`), which materialises one layer of a meta skeleton at a time: ``model``
    is only read for its module names. Returns a :class:`~macq.quantizers.calibration.LayerJob` whose
    ``records`` / ``stats`` fill as layers are quantized (in place: dequantized weights written back, so
    later layers calibrate on the quantized model's activations).

    One Hessian per input group (``ArchSpec.sequence``: q/k/v share one input, gate/up another) and one
    damped Cholesky factor per group (:func:`prepare_hessian`), shared by the group's linears. That is exact
    with ``true_sequential`` too: it re-collects a group's input only after the *previous* groups are
    quantized, and every member of a group reads the same tensor."""
    from macq.arch import arch_spec
    from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
    from macq.quantizers.calibration import LayerJob

    spec = arch_spec(model)
    selected = set(quantizable_modules(model, skip=tuple(cfg.skip)))
    records: dict[str, AffineRecord] = {}
    stats: dict[str, dict[str, Any]] = {}

    def quantize_group(path: str, layer: nn.Module, names: list[str], H: torch.Tensor) -> None:
        prepared = prepare_hessian(H, cfg, device, own=True)
        del H
        for name in names:
            mod = layer.get_submodule(name)
            with stage("columns"):
                rec, st = gptq_quantize(get_weight(mod).detach().to(device), None, cfg, prepared)
                rec.transposed = is_conv1d(mod)
                set_weight(mod, rec.dequantize().to(device))
            records[f"{path}.{name}"], stats[f"{path}.{name}"] = rec, st

    def per_layer(_i: int, path: str, layer: nn.Module, inputs) -> None:
        groups = [[n for n in grp if f"{path}.{n}" in selected] for grp in spec.sequence]
        groups = [grp for grp in groups if grp]
        mine = {m for m in selected if m.startswith(path + ".")}
        missing = mine - {f"{path}.{n}" for grp in groups for n in grp}
        if missing:
            raise MacqError(f"gptq: {sorted(missing)[0]} is not in the architecture's linear sequence")
        if cfg.true_sequential:
            for grp in groups:
                with stage("hessian"):
                    hs = collect_hessians(layer, inputs, [grp[0]], device, stop_early=True)
                quantize_group(path, layer, grp, hs.pop(grp[0]))
        else:
            with stage("hessian"):
                hs = collect_hessians(layer, inputs, [grp[0] for grp in groups], device)
            for grp in groups:
                quantize_group(path, layer, grp, hs.pop(grp[0]))

    return LayerJob(per_layer, records, stats, device, cfg.batch_size)


def gptq_layers(model: nn.Module, cfg: GPTQConfig, calib_ids: torch.Tensor,
                progress: bool = False) -> tuple[dict[str, AffineRecord], dict[str, dict[str, Any]]]:
    """Quantize every decoder linear of ``model`` in place (dequantized weights written back, so later
    layers calibrate on the quantized model's activations); returns ``(records, stats)`` by module path."""
    from macq.device import resolve_device
    from macq.quantizers.calibration import layerwise

    device = resolve_device(cfg.device)
    if not cfg.offload:
        model.to(device)
    job = layer_quantizer(model, cfg, device)
    layerwise(model, calib_ids, job.fn, batch_size=cfg.batch_size, device=device, offload=cfg.offload,
              progress=progress, description="gptq")
    return job.records, job.stats


def quantize_model(model: nn.Module, cfg: GPTQConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """GPTQ every decoder linear of ``model`` (modified in place) → :class:`~macq.qmodel.QuantizedModel`."""
    from macq.qmodel import QuantizedModel

    if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise MacqError("gptq: calibration ids must be a non-empty [n_samples, seq_len] tensor")
    records, _ = gptq_layers(model, cfg, calib_ids, progress)
    return QuantizedModel.from_model(model, records, method=cfg.to_dict(), source=source)
