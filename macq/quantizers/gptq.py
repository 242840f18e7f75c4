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

import numpy as np
import torch
import torch.nn as nn

from macq.device import has_float64
from macq.errors import MacqError
from macq.microscale import FPFormat, fp_format
from macq.perf import matmul_flops
from macq.progress import add_flops, stage
from macq.quantizers import grid
from macq.quantizers.activations import StreamOptions
from macq.quantizers.base import HeadOptions, QuantConfig, check, check_bits
from macq.quantizers.grid import SCALE_DTYPES, ScaleOptions
from macq.quantizers.hessian import blas_threads, collect_hessians
from macq.record import AffineRecord, FPRecord

SUB = 16                # rows of Wᵀ per sub-block of the column loop (rank-1 updates stay in cache)
DAMP_RETRIES = 4        # on a failed Cholesky, damping is multiplied by 10 up to this many times
MSE_GRID = torch.linspace(1.0, 0.2, 41)  # range shrink factors tried by mse_clip (GPTQ's maxshrink 0.8)
MSE_COARSE = 8          # coarse step of the search over MSE_GRID (then steps of 4, 2, 1 around the best)


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
    precision: str = field(default="float32", metadata={
        "help": "float32|float64: dtype of the Hessian sum, the Cholesky factor and the column solve (a float32 "
                "factorization that fails is redone in float64)"})
    mse_clip: bool = True          # per-group range shrink minimising |w − q(w)|^2.4 (GPTQ's "mse" option):
                                   # on SmolLM2 down_proj it cut held-out output error 0.89 -> 0.73 (RTN 1.06)
    scale_dtype: str = "float16"
    mode: str = field(default="affine", metadata={
        "help": "affine (integer grid) or an MLX microscaled float mode: mxfp4 (E2M1 codes, power-of-two scale "
                "per 32), nvfp4 (E2M1, fp8 E4M3 scale per 16), mxfp8 (E4M3 codes, power-of-two scale per 32); a "
                "float mode fixes --bits and --group-size (leave them unset)"})
    batch_size: int = 8            # calibration sequences per forward
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
        check(self.precision in ("float32", "float64"), f"--precision {self.precision}: expected float32 or float64")
        self.check_stream_options()
        self.check_head_options()
        check(self.scale_dtype in SCALE_DTYPES,
              f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")
        check(not (self.act_order and self.group_size and not self.static_groups),
              "--act-order with --group-size needs --static-groups: permuted groups need a g_idx, "
              "which MLX and Core ML cannot hold")

    @property
    def torch_precision(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32



def _pow24_(x: torch.Tensor) -> torch.Tensor:
    """``x ← x^2.4`` in place for ``x ≥ 0``, as ``2^(2.4·log2 x)`` (0 gives 0). On the CPU NumPy's ``log2`` and
    ``exp2`` (its vectorised SIMD kernels: on this machine the three steps take 0.46× torch's ``log2``/``exp2``, and
    ``pow`` is slower still) on the tensor's own memory."""
    if x.device.type != "cpu":
        return x.log2_().mul_(2.4).exp2_()
    a = x.numpy()
    with np.errstate(divide="ignore"):          # log2(0) = -inf, and 2^-inf = 0
        np.log2(a, out=a)
    np.multiply(a, np.float32(2.4), out=a)
    np.exp2(a, out=a)
    return x


def _params(w: torch.Tensor, cfg: GPTQConfig, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scale, zero)`` per group of ``w [out, k, g]`` on the shared grid, with optional MSE range shrink;
    ``dim`` is the dimension that holds a group (``0`` for the column loop's ``[g, out]`` rows: no transpose).

    The shrink factor minimising ``Σ|w − q(w)|^2.4`` is searched coarse to fine: every ``MSE_COARSE``-th
    factor of :data:`MSE_GRID`, then the two factors 4, 2 and 1 steps either side of each group's best so far
    (12 candidates instead of 41; the same pick wherever the error has one minimum at that resolution).
    Each candidate's error is the grid's own arithmetic (``clamp(round(w/s) + z)``, then ``s·(q − z)``)
    written in place on one buffer: the search is element-wise, so passes and allocations are its cost."""
    args = (cfg.bits, cfg.symmetric, "int", cfg.torch_scale_dtype)
    if not cfg.mse_clip:
        return grid.affine_params(w.movedim(dim, -1), *args)[:2]
    wf = w.float()                # the grid's functions work in float32: convert and take the range once
    lo, hi = w.amin(dim).float(), w.amax(dim).float()
    x = torch.empty_like(wf)
    factors = MSE_GRID.to(wf.device)

    def error(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        c = factors[k]            # one factor per group (or one for all)
        s, z, _ = grid.params_from_range(lo * c, hi * c, *args)
        su, zu = s.unsqueeze(dim), None if z is None else z.unsqueeze(dim)
        grid.dequantize_into(grid.codes_into(wf, su, zu, cfg.bits, x), su, zu, cfg.bits, x).sub_(wf).abs_()
        _pow24_(x)
        return x.sum(dim), s, z

    def keep(best: tuple | None, k: torch.Tensor) -> tuple:
        """``(err, k, scale, zero)`` of each group's best candidate, with candidate ``k`` tried; strictly
        better wins: a tie keeps the candidate tried first."""
        err, s, z = error(k)
        if best is None:
            return err, k.expand_as(err), s, z
        m = err < best[0]
        return (torch.where(m, err, best[0]), torch.where(m, k, best[1]), torch.where(m, s, best[2]),
                None if z is None else torch.where(m, z, best[3]))

    last, best = len(MSE_GRID) - 1, None
    for k in range(0, last + 1, MSE_COARSE):   # vectorised over all groups; loops over candidates only
        best = keep(best, torch.tensor(k, device=wf.device))
    d = MSE_COARSE // 2
    while d:                                   # halving steps around each group's best so far
        centre = best[1]
        for k in (centre - d, centre + d):
            best = keep(best, k.clamp(0, last))
        d //= 2
    return best[2], best[3]


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


def _cholesky_lower(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor of a symmetric ``A`` (consumed) and LAPACK's ``info`` (0: positive definite).
    On the CPU, SciPy's ``potrf`` in place on ``A``'s own memory (on this AMD machine 1.26× the rate of torch's
    MKL one at n = 8192); elsewhere torch's. Only the lower triangle is the factor."""
    if A.device.type != "cpu":
        L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=A.device)))
        return L, int(info.item())
    from scipy.linalg import lapack

    a = A.numpy().T                          # Fortran view of the same memory: A itself (symmetric)
    potrf = lapack.get_lapack_funcs("potrf", (a,))
    with blas_threads():
        c, info = potrf(a, lower=0, overwrite_a=1, clean=0)   # a = UᵀU, U upper: in C order A = L·Lᵀ, L = Uᵀ
    return (A if c is a else torch.from_numpy(c.T)), int(info)


def _inverse_lower(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` of a lower-triangular ``L`` (consumed): LAPACK's ``trtri`` on the CPU (n³/3 operations, in
    place), a triangular solve against the identity elsewhere."""
    if L.device.type != "cpu":
        return torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    from scipy.linalg import lapack

    a = L.numpy().T                          # the same memory, Fortran order: the upper triangle Lᵀ
    trtri = lapack.get_lapack_funcs("trtri", (a,))
    with blas_threads():
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
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the damping fraction used, in ``H``'s dtype.

    One Cholesky and one triangular inverse (2n³/3 operations, half of factoring, inverting and factoring
    again): with ``J`` the order-reversing permutation, ``J(H+λI)J = L Lᵀ`` gives ``H+λI = Ũ Ũᵀ`` with
    ``Ũ = J L J`` upper triangular, so ``(H+λI)⁻¹ = (Ũ⁻¹)ᵀ Ũ⁻¹`` and ``U = Ũ⁻¹ = J L⁻¹ J`` is upper
    triangular with a positive diagonal: *the* upper Cholesky factor (it is unique).

    Near-singular Hessians (few tokens, low-rank inputs) can make the Cholesky fail. A float32 factorization
    on the CPU that fails is first redone in float64 at the same damping (the factor is then cast back);
    after that the damping is multiplied by 10 and retried (``DAMP_RETRIES`` times) instead of aborting.
    MPS lacks float64 and some linalg kernels: there the factorization runs in float32 on the CPU and
    starts 10× damper.
    """
    device, dtype = H.device, H.dtype
    mps = device.type == "mps"
    H = H.cpu() if mps else H
    n = H.shape[0]
    mean = torch.diag(H).mean()
    damp = damp_percent * (10.0 if mps else 1.0)  # float32-only MPS starts damper
    tries = DAMP_RETRIES + 1 + (dtype == torch.float32 and not mps)
    for _ in range(tries):
        # one n×n matrix besides H: J H J (a copy), damped, factored, inverted and flipped back in place
        f64 = H.dtype == torch.float64
        L = H.flip(0, 1)
        L.diagonal().add_(damp * mean.to(L.dtype))
        L, info = _cholesky_lower(L)
        add_flops(n ** 3 / 3, f64)
        if info == 0:
            add_flops(n ** 3 / 3, f64)
            U = _flip_both(_inverse_lower(L))   # J L⁻¹ J
            del L                               # a sum is finite only if every entry is (else: retried)
            if bool(torch.isfinite(U.sum())) and bool((U.diagonal() > 0).all()):
                return U.to(device, dtype), damp
        if not f64 and not mps:
            H = H.double()                       # precision first, then damping
            continue
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
    """``H``'s part of :func:`gptq_quantize`, in ``cfg.precision`` (float32 on MPS, which has no float64). With
    ``own`` the caller hands ``H`` over (it is changed in place or converted, and dropped): no n×n copy of
    it is kept (8B down_proj: 1.6 GB in float64), so pass it as ``hs.pop(name)``, not through a variable."""
    dt = cfg.torch_precision if has_float64(device) else torch.float32
    given = H
    H = H.to(device, dt)
    if H is given and not own:
        H = H.clone()
    del given
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

    The loop works on ``Wᵀ`` (a column of ``W`` is a contiguous row), in the factor's dtype
    (``cfg.precision``): the per-column rounding and the in-block rank-1 updates then stream through memory
    instead of striding across it, and the deferred block update is one ``[rest, b] @ [b, out]`` GEMM.

    ``stats["loss"]`` is GPTQ's objective ``½·Σ (w−q)²/[H⁻¹]_jj``; ``stats["out_err"]`` is
    ``tr(ΔW H ΔWᵀ)`` (= 2/n·‖XΔWᵀ‖², the layer-output error) for the undamped ``H``.
    """
    p = prepared if prepared is not None else prepare_hessian(H, cfg, W.device)
    dead, perm, Hinv, damp = p.dead, p.perm, p.Hinv, p.damp
    dt = Hinv.dtype
    out, n = W.shape
    fp = fp_format(cfg.mode) if cfg.mode != "affine" else None
    g = fp.group_size if fp is not None else (cfg.group_size or n)
    if n % g:
        raise MacqError(f"gptq: group_size={g} does not divide the input dim {n}")
    Wt = torch.empty(n, out, dtype=dt, device=W.device).copy_(W.T)   # [n, out], one transposing pass
    if bool(dead.any()):
        Wt[dead] = 0.0              # and their ΔW is 0: a zero column rounds to 0 on every grid
    static = cfg.static_groups or cfg.group_size == 0   # per-channel params always come from the original W
    with stage("grid"):             # each group's grid (MSE range search): element-wise, its own stage
        scale, zero = _group_params(Wt.T.reshape(out, n // g, g), fp, cfg) if static else \
            _empty_params(Wt, out, n // g, fp, cfg)
    scale = scale.T.contiguous()    # [k, out] during the loop: one group's row is contiguous
    zero = zero.T.contiguous() if zero is not None else None
    if cfg.act_order:
        Wt = Wt[perm]               # rows in quantization order
    orig = Wt.clone()               # the original columns, for ‖ΔW‖²
    codes = torch.zeros(n, out, device=W.device)     # as floats until the end
    d = Hinv.diagonal()
    # the loop keeps w − q (not (w − q)/[H⁻¹]_jj) and updates with H⁻¹'s rows divided by their diagonal
    E, Q = Wt.new_empty(min(cfg.block_size, n), out), torch.empty(SUB, out, device=W.device)   # reused
    dw2 = e2 = Wt.new_zeros(())     # ‖ΔW‖², Σ (w − q)²/[H⁻¹]_jj²
    group_of = (perm // g).tolist()  # group (in the original order) of the j-th quantized column
    for i1 in range(0, n, cfg.block_size):
        i2 = min(i1 + cfg.block_size, n)
        W1, E1, Hd = Wt[i1:i2], E[:i2 - i1], Hinv[i1:i2, i1:] / d[i1:i2, None]   # W1: a view, updated in place
        s1 = i1
        while s1 < i2:   # sub-blocks: rank-1 updates stay within SUB rows, then one GEMM for the block's rest
            s2 = min(s1 + SUB, i2) if static else min(s1 + SUB, i2, (s1 // g + 1) * g)   # a group starts one
            for j in range(s1, s2):
                i, gi = j - i1, group_of[j]
                if not static and j % g == 0:  # params from the group's *current* weights: rows in this block
                    cur = W1[i:i + g]          # are updated, rows past it get this block's updates first
                    if j + g > i2:
                        cur = torch.cat([cur, Wt[i2:j + g] - Hd[:i, i2 - i1:j + g - i1].T @ E1[:i]])
                    with stage("grid"):
                        sc, z = _column_group_params(cur, fp, cfg)
                    scale[gi] = sc
                    if z is not None:
                        zero[gi] = z
                q = _round_column(W1[i], codes[j], Q[j - s1], scale[gi], zero[gi] if zero is not None else None, fp, cfg)
                torch.sub(W1[i], q, out=E1[i])
                W1[i + 1:s2 - i1].addr_(Hd[i, i + 1:s2 - i1], E1[i], alpha=-1)
            m, es = s2 - s1, E1[s1 - i1:s2 - i1]
            dw2 = dw2 + (Q[:m].to(dt) - orig[s1:s2]).pow_(2).sum()
            e2 = e2 + (es / d[s1:s2, None]).pow_(2).sum()
            W1[s2 - i1:].addmm_(Hd[s1 - i1:s2 - i1, s2 - i1:i2 - i1].T, es, alpha=-1)
            s1 = s2
        Wt[i2:].addmm_(Hd[:, i2 - i1:].T, E1, alpha=-1)
        add_flops(gptq_block_flops(out, i2 - i1, n - i2), dt == torch.float64)
    codes = codes[torch.argsort(perm)] if cfg.act_order else codes
    codes = codes.T.to(torch.uint8).contiguous().cpu()
    scale, zero = scale.T.contiguous(), zero.T.contiguous() if zero is not None else None
    rec: AffineRecord | FPRecord
    if fp is not None:
        rec = FPRecord(codes=codes, scales=zero.cpu(), mode=cfg.mode)
    else:
        rec = AffineRecord(codes=codes, scales=scale.to(cfg.torch_scale_dtype).cpu(), bits=cfg.bits, group_size=g,
                           zeros=None if cfg.symmetric else zero.to(torch.uint8).cpu())
    # tr(ΔW H ΔWᵀ) without the [out, n] @ [n, n] product: ΔW = −E·U (E the scaled errors, U the factor above,
    # rows in quantization order) and U (H+λI) Uᵀ = I, so tr(ΔW (H+λI) ΔWᵀ) = ‖E‖² = 2·loss, and the undamped
    # value subtracts λ‖ΔW‖² (dead columns: ΔW = 0 there, whatever H0 holds)
    loss = e2.item() / 2
    stats = {"loss": loss, "out_err": 2 * loss - damp * p.diag_mean * dw2.item(),
             "damp": damp, "dead": int(dead.sum())}
    return rec, stats


def _group_params(w: torch.Tensor, fp: FPFormat | None, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each group's grid for ``w [out, k, g]``: ``(scale, zero)`` on the affine grid, ``(divisor, byte)`` in a
    float mode (the byte is stored in ``zero``'s place)."""
    return _fp_params(w, fp, cfg) if fp is not None else _params(w, cfg)


def _column_group_params(cur: torch.Tensor, fp: FPFormat | None, cfg: GPTQConfig
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_group_params` of one group held as the column loop's rows ``cur [g, out]`` -> ``[out]`` each."""
    if fp is None:
        return _params(cur, cfg, dim=0)
    sc, z = _fp_params(cur.T.unsqueeze(1), fp, cfg)
    return sc[:, 0], z[:, 0]


def _empty_params(W: torch.Tensor, out: int, k: int, fp: FPFormat | None, cfg: GPTQConfig
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group parameter tables ``[out, k]`` filled as the loop reaches each group (grids from the current
    weights)."""
    if fp is not None:
        return W.new_zeros(out, k), W.new_zeros(out, k, dtype=torch.uint8)
    empty = W.new_zeros(out, k, dtype=torch.float32)
    return empty, None if cfg.symmetric else empty.clone()


def _round_column(w: torch.Tensor, codes: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                  fp: FPFormat | None, cfg: GPTQConfig) -> torch.Tensor:
    """One column ``w [out]`` onto its groups' grids: its codes written into ``codes [out]`` (float) and its
    dequantized values into ``q`` (returned, in ``w``'s dtype); the shared grid's arithmetic (float32 rounding of
    ``w / s``) in place."""
    if fp is not None:
        c, v = _fp_round(w, s, fp)
        codes.copy_(c)
        return q.copy_(v).to(w.dtype)
    return grid.dequantize_into(grid.codes_into(w.float(), s, z, cfg.bits, codes), s, z, cfg.bits, q).to(w.dtype)


# ------------------------------------------------------------------------------------------------
# Model driver: layer by layer (macq.quantizers.calibration), linears sharing an input share one H.

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
    from macq.quantizers.calibration import LayerJob, reuse_outputs

    spec = arch_spec(model)
    selected = set(quantizable_modules(model, skip=tuple(cfg.skip)))
    records: dict[str, AffineRecord] = {}
    stats: dict[str, dict[str, Any]] = {}

    def quantize_group(path: str, layer: nn.Module, names: list[str], hs: dict[str, torch.Tensor]) -> None:
        prepared = prepare_hessian(hs.pop(names[0]), cfg, device, own=True)   # nothing else holds H
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
        dtype = cfg.torch_precision
        if cfg.true_sequential:
            reuse = reuse_outputs(layer)    # finished groups' outputs, for later passes and the layer's forward
            for k, grp in enumerate(groups):
                with stage("hessian"):
                    hs = collect_hessians(layer, inputs, [grp[0]], device, stop_early=True, dtype=dtype)
                quantize_group(path, layer, grp, hs)
                if k + 1 < len(groups):
                    reuse.freeze(grp)
        else:
            with stage("hessian"):
                hs = collect_hessians(layer, inputs, [grp[0] for grp in groups], device, dtype=dtype)
            for grp in groups:
                quantize_group(path, layer, grp, hs)

    return LayerJob(per_layer, records, stats, device, cfg.batch_size)


def gptq_layers(model: nn.Module, cfg: GPTQConfig, calib_ids: torch.Tensor,
                progress: bool = False) -> tuple[dict[str, AffineRecord], dict[str, dict[str, Any]]]:
    """Quantize every decoder linear of ``model`` in place (dequantized weights written back, so later
    layers calibrate on the quantized model's activations); returns ``(records, stats)`` by module path, the
    records on the CPU. Without ``offload`` the whole model is moved to ``cfg.device`` and left there."""
    from macq.device import resolve_device
    from macq.quantizers.calibration import layerwise
    from macq.record import record_to

    device = resolve_device(cfg.device)
    if not cfg.offload:
        model.to(device)
    job = layer_quantizer(model, cfg, device)
    layerwise(model, calib_ids, job.fn, batch_size=cfg.batch_size, device=device, offload=cfg.offload,
              progress=progress, description="gptq")
    return {name: record_to(rec, "cpu") for name, rec in job.records.items()}, job.stats


def quantize_model(model: nn.Module, cfg: GPTQConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """GPTQ every decoder linear of ``model`` (modified in place) → :class:`~macq.qmodel.QuantizedModel`."""
    from macq.qmodel import QuantizedModel

    if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise MacqError("gptq: calibration ids must be a non-empty [n_samples, seq_len] tensor")
    records, _ = gptq_layers(model, cfg, calib_ids, progress)
    return QuantizedModel.from_model(model, records, method=cfg.to_dict(), source=source)
