"""Calibrated palettization (``--method kmeans-cal``): sensitivity-weighted k-means + GPTQ-style LUT assignment.

Plain k-means (``--method kmeans``) minimises the weight error, treating every weight alike. What matters is
the model's loss, so, per SqueezeLLM:

1. **sensitivity-weighted k-means**: each weight's squared error is weighted by its sensitivity, the
   empirical Fisher diagonal (``sensitivity="fisher"``, squared gradients of the calibration loss, one
   backward per sequence on the float model; what coremltools' ``SKMPalettizer`` also uses) or the input
   Hessian diagonal ``E[x_j²]`` of the linear (``"hessian"``, no backward pass). The LUT is the weighted
   k-means of :func:`macq.quantizers.palettize.kmeans_lut` (exact-DP seeding, Lloyd to convergence).
2. **error feedback while assigning** (``error_feedback=True``): with the LUT fixed, columns are assigned to
   their nearest LUT entry one after another and each column's error is spread over the columns not yet
   assigned through the inverse input Hessian, exactly as GPTQ does for a uniform grid
   (:func:`lut_gptq`).
3. **LUT refit** (``refit_rounds``, GPTVQ's codebook update): with the indices fixed the layer-output error
   ``tr(ΔW H ΔWᵀ)`` is quadratic in the LUT entries, so each group's LUT is re-solved exactly
   (:func:`refit_lut`) and the feedback assignment rerun on the new LUT. Of every candidate (nearest,
   feedback, each refit and reassignment) the one with the lowest layer-output error is kept, so no step
   can make a linear worse on that measure. The rounds stop once a reassignment is not kept: the next refit
   would be of the same indices, so it could only repeat the last LUT.

The embedding / lm_head (``--include-embeddings``) have no input Hessian (a lookup; the head's input is
outside every decoder layer). With ``weighted_heads`` (default, with ``sensitivity="fisher"``) they get
Fisher-weighted k-means from the same backward passes on the float model, as ``SKMPalettizer`` does for every
tensor (on the default model, 4-bit g16, 32×512 c4: wiki 28.00 → 24.37, c4 115.8 → 99.1 against the data-free
k-means of :func:`macq.quantizers.head_records`, which ``weighted_heads=False`` keeps). They are written into
the model before the decoder is calibrated.

Layer by layer (:func:`macq.quantizers.calibration.layerwise`), true-sequential like GPTQ: each group of
linears sharing an input sees the already palettized earlier linears. The result is a plain
:class:`~macq.record.LUTRecord` (per-grouped-channel LUTs of ``group_size`` output rows; ``group_size=1``
is a per-channel LUT), which the Core ML exporter writes as ``constexpr_lut_to_dense`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from macq.arch import arch_spec
from macq.device import has_float64, wide_float
from macq.errors import MacqError
from macq.perf import matmul_flops
from macq.progress import add_flops, stage
from macq.quantizers.activations import StreamOptions
from macq.quantizers.base import QuantConfig, check, check_model_inputs
from macq.quantizers.palettize import GRANULARITIES, LUT_DTYPES, OUTLIER_HELP, SOLVERS, KMeansConfig, _groups, check_outlier_frac
from macq.record import LUTRecord

SENSITIVITIES = ("fisher", "hessian")


@dataclass
class KMeansCalConfig(StreamOptions, QuantConfig):
    method = "kmeans-cal"
    bits: int = 4
    granularity: str = "per_grouped_channel"
    group_size: int = 16           # output channels per LUT (per_grouped_channel); 1 = per-channel LUT
    lut_dtype: str = "float16"
    sensitivity: str = "fisher"    # per-weight k-means weights: "fisher" | "hessian"
    error_feedback: bool = True    # GPTQ-style assignment to the fixed LUT
    refit_rounds: int = 2          # LUT refits to the output error (then feedback reassignment); 0 = off
    weighted_heads: bool = True    # embedding / lm_head (if included): Fisher-weighted k-means (sensitivity fisher)
    damp_percent: float = 0.01
    block_size: int = 128
    solver: str = field(default="exact", metadata={"help": "k-means solver: exact (optimal LUT per group, 1-D DP) | "
                                                           "lloyd (seeded Lloyd: faster, local optima)"})
    n_iter: int = 300
    n_init: int = 4
    seed: int = 0
    batch_size: int = 8
    outlier_frac: float = field(default=0.0, metadata={"help": OUTLIER_HELP})

    def __post_init__(self) -> None:
        check(1 <= self.bits <= 8, f"--bits {self.bits}: kmeans-cal supports 1..8")
        check(self.granularity in GRANULARITIES,
              f"--granularity {self.granularity}: expected one of {', '.join(GRANULARITIES)}")
        check(self.group_size > 0, f"--group-size {self.group_size}: expected > 0 output channels per LUT")
        check(self.lut_dtype in LUT_DTYPES, f"--lut-dtype {self.lut_dtype}: expected one of {', '.join(LUT_DTYPES)}")
        check(self.sensitivity in SENSITIVITIES,
              f"--sensitivity {self.sensitivity}: expected one of {', '.join(SENSITIVITIES)}")
        check(0 < self.damp_percent < 1, f"--damp-percent {self.damp_percent}: expected a fraction in (0, 1)")
        check(self.block_size >= 1, f"--block-size {self.block_size}: expected >= 1")
        check(self.refit_rounds >= 0, f"--refit-rounds {self.refit_rounds}: expected >= 0")
        check(self.n_iter >= 0 and self.n_init >= 1, "n_iter >= 0 and n_init >= 1 expected")
        check(self.solver in SOLVERS, f"--solver {self.solver}: expected one of {', '.join(SOLVERS)}")
        check(self.batch_size >= 1, f"--batch-size {self.batch_size}: expected >= 1")
        check_outlier_frac(self.outlier_frac)
        self.check_stream_options()

    def kmeans_config(self) -> KMeansConfig:
        return KMeansConfig(bits=self.bits, granularity=self.granularity, group_size=self.group_size,
                            lut_dtype=self.lut_dtype, n_iter=self.n_iter, seed=self.seed, n_init=self.n_init,
                            weighted=True, solver=self.solver, outlier_frac=self.outlier_frac)


def lut_rows(rec: LUTRecord) -> torch.Tensor:
    """The LUT each output row uses, ``[out, K]`` float32."""
    return rec.lut.float().repeat_interleave(rec.shape[0] // rec.n_lut_groups, dim=0)


@torch.no_grad()
def lut_hinv(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """GPTQ's upper Cholesky factor of the damped inverse Hessian (dead inputs, never active, set to 1 first), in
    float32 as GPTQ's default precision has it (a float32 factorization that fails is redone in float64, then cast
    back): one per linear, shared by every assignment pass."""
    from macq.quantizers.gptq import inverse_hessian_cholesky

    Hf = H.float()
    dead = torch.diag(Hf) == 0
    if bool(dead.any()):
        Hf = Hf.clone() if Hf is H else Hf     # the caller's H is not changed
        Hf[dead, dead] = 1.0
    return inverse_hessian_cholesky(Hf, damp_percent)[0].float()


@torch.no_grad()
def lut_gptq(W: torch.Tensor, H: torch.Tensor, rows: torch.Tensor, damp_percent: float = 0.01,
             block_size: int = 128, fixed: torch.Tensor | None = None, hinv: torch.Tensor | None = None
             ) -> torch.Tensor:
    """GPTQ's column-by-column error feedback onto a fixed LUT: indices ``[out, in]`` (uint8).

    ``rows [out, K]`` is each output row's LUT. With ``H = I`` this is exactly nearest assignment.
    ``fixed [out, in]`` (bool, the record's outliers) are held at their value: error 0, no feedback from them
    (their index is meaningless and is replaced when the outliers are attached). ``hinv``: :func:`lut_hinv` of
    ``H``, when the caller already has it.

    The loop is GPTQ's (:func:`macq.quantizers.gptq.gptq_quantize`): float32, on ``Wᵀ`` so that a column is a
    contiguous row, rank-1 updates within sub-blocks of :data:`~macq.quantizers.gptq.SUB` columns and one GEMM
    for the rest of each block and one for the columns after it.
    """
    from macq.quantizers.gptq import SUB, gptq_block_flops

    Hinv = (hinv if hinv is not None else lut_hinv(H, damp_percent)).float()
    n, out = W.shape[1], W.shape[0]
    Wt = torch.empty(n, out, device=W.device).copy_(W.T)  # one transposing copy: it is updated in place
    lut = rows.float()
    held = fixed.T.contiguous() if fixed is not None else None
    idx = torch.empty(n, out, dtype=torch.uint8, device=W.device)   # K <= 256 entries (8 bits at most)
    d = Hinv.diagonal()
    E = Wt.new_empty(min(block_size, n), out)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, E1, Hd = Wt[i1:i2], E[:i2 - i1], Hinv[i1:i2, i1:] / d[i1:i2, None]   # W1: a view, updated in place
        for s1 in range(i1, i2, SUB):
            s2 = min(s1 + SUB, i2)
            for j in range(s1, s2):
                i, w = j - i1, W1[j - i1]
                k = (w.unsqueeze(1) - lut).abs_().argmin(1)
                q = lut.gather(1, k.unsqueeze(1)).squeeze(1)
                idx[j] = k
                torch.sub(w, q, out=E1[i])
                if held is not None:
                    E1[i].masked_fill_(held[j], 0.0)       # held at their value: no error to spread
                W1[i + 1:s2 - i1].addr_(Hd[i, i + 1:s2 - i1], E1[i], alpha=-1)
            W1[s2 - i1:].addmm_(Hd[s1 - i1:s2 - i1, s2 - i1:i2 - i1].T, E1[s1 - i1:s2 - i1], alpha=-1)
        Wt[i2:].addmm_(Hd[:, i2 - i1:].T, E1, alpha=-1)
        add_flops(gptq_block_flops(out, i2 - i1, n - i2))
    return idx.T.contiguous()


ROW_BYTES = 64 << 20     # float64 rows of ΔW (or of H) handled at a time: temporaries stay bounded at 8B widths
TRI_BLOCKS = 8           # H's lower triangle in (at least) 8 row blocks: (8 + 1) / 16 of the full product's work


def _row_step(n: int) -> int:
    return max(1, ROW_BYTES // (8 * n))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)``: the layer-output squared error on the calibration inputs (``H = E[x xᵀ]``).

    As ``2·tr(ΔW T ΔWᵀ) − Σ H_ii ΔW_ri²`` (``T`` the lower triangle of ``H``, diagonal included): float32 products
    over row blocks of the triangle, 9/16 of those of ``ΔW·H``, summed in float64. A row block of ``H`` and of
    ``ΔW`` at a time (at 8B ``down_proj`` a whole float32 ``ΔW`` would be 235 MB, a float32 ``H`` 822 MB)."""
    n = w.shape[1]
    step, hstep = _row_step(n), _tri_step(n)
    diag = torch.diagonal(H).float()
    wide = wide_float(H.device)
    tri = dia = 0.0
    for a in range(0, n, hstep):
        e = min(a + hstep, n)
        blk = H[a:e, :e].to(torch.float32, copy=True)
        blk[:, a:].tril_()
        for r in range(0, w.shape[0], step):
            d = w_hat[r:r + step, :e].float() - w[r:r + step, :e].float()
            tri += float((d @ blk.t()).mul_(d[:, a:]).sum(dtype=wide))
            dia += float(d[:, a:].square().mul_(diag[a:e]).sum(dtype=wide))
            add_flops(matmul_flops(d.shape[0], e, e - a))
    return 2 * tri - dia


def _tri_step(n: int) -> int:
    """Rows of ``H``'s lower triangle per block: at least :data:`TRI_BLOCKS` blocks (block ``j`` of ``B`` spans
    ``j/B`` of the columns, so the products are ``(B + 1) / 2B`` of the full square's), at most a float64
    ``ROW_BYTES`` block."""
    return min(_row_step(n), -(-n // TRI_BLOCKS))


REFIT_BYTES = 64 << 20   # one block of one-hot rows in the LUT refit: the whole [out, in, K] would be 1 GB at 1B


@torch.no_grad()
def refit_lut(w: torch.Tensor, H: torch.Tensor, idx: torch.Tensor, lut: torch.Tensor, ridge: float = 1e-9,
              fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The LUT minimising ``tr(ΔW H ΔWᵀ)`` for fixed indices (GPTVQ's codebook update), ``[G, K]`` float64 (float32
    on a device without float64).

    With ``Ŵ[r] = A_r c_g`` (``A_r`` the one-hot ``[in, K]`` of row ``r``'s indices, ``c_g`` its group's LUT) the
    error is quadratic in ``c_g``: ``(Σ_r A_rᵀ H A_r) c_g = Σ_r A_rᵀ H w_r``, one K×K system per LUT group.
    The k-means LUT is optimal for the *weight* error of nearest assignment; once GPTQ's feedback has chosen
    indices that are not nearest, and measured by the *output* error, other entries are better. A ridge
    ``ridge·mean(diag M)`` pulls towards the current ``lut`` so that unused entries keep their value.
    ``fixed [out, in]`` (outliers, held in the sparse part): no LUT entry there, so their one-hot rows are zero and
    ``w`` there must be what the sparse part does not hold (``w - v``, the fp16 rounding of the outlier ``v``).

    The products are float32 (the systems are solved in float64: on the CPU for a device without it) and use H's
    symmetry: with ``T`` its lower triangle (diagonal included) and ``D`` its diagonal,
    ``A_rᵀ H A_r = X + Xᵀ − A_rᵀ D A_r`` for ``X = A_rᵀ T A_r``, and ``T A_r`` is half the products of ``H A_r``,
    the stage's largest.
    """
    out, n = w.shape
    g, k = lut.shape
    dev, wide = w.device, wide_float(w.device)        # the systems in float64 where the device has it
    m = torch.empty(out, k, k, dtype=wide, device=dev)
    b = torch.empty(out, k, dtype=wide, device=dev)
    diag = torch.diagonal(H).float()
    step = max(1, REFIT_BYTES // (n * k * 4))          # rows per block: the one-hot block and T A_r stay bounded
    hstep = _tri_step(n)                               # rows of H made float32 at a time (no float32 copy of H)
    for r0 in range(0, out, step):
        r1 = min(r0 + step, out)
        rows = r1 - r0
        onehot = torch.zeros(n, rows, k, device=dev).scatter_(2, idx[r0:r1].T.long().unsqueeze(-1), 1.0)   # A_r, [in, rows, K]
        if fixed is not None:
            onehot.masked_fill_(fixed[r0:r1].T.unsqueeze(-1), 0.0)
        flat = onehot.view(n, rows * k)
        wt = w[r0:r1].t().float()
        ta, hw = torch.empty(n, rows * k, device=dev), torch.empty(n, rows, device=dev)
        for a in range(0, n, hstep):
            e = min(a + hstep, n)
            blk = H[a:e].to(torch.float32, copy=True)  # rows a..e of H
            torch.mm(blk, wt, out=hw[a:e])             # H w_r
            blk = blk[:, :e]
            blk[:, a:].tril_()                         # T's rows: columns up to e, the diagonal block's lower half
            torch.mm(blk, flat[:e], out=ta[a:e])
            add_flops(matmul_flops(e - a, n, rows) + matmul_flops(e - a, e, rows * k))
        per_row = onehot.permute(1, 0, 2)                                                  # [rows, in, K]
        x = torch.bmm(ta.view(n, rows, k).permute(1, 2, 0), per_row)                      # (A_rᵀ T A_r)ᵀ
        dr = (diag @ flat).view(rows, k)                                                   # A_rᵀ D A_r (diagonal)
        m[r0:r1] = x + x.transpose(1, 2) - torch.diag_embed(dr)
        b[r0:r1] = torch.bmm(hw.t().unsqueeze(1), per_row).squeeze(1)                     # A_rᵀ H w_r
        add_flops(matmul_flops(rows * k, n, k) + matmul_flops(rows * k, n, 1) + matmul_flops(rows, n, k))
        del onehot, ta, flat, per_row
    m, b = m.reshape(g, out // g, k, k).sum(1), b.reshape(g, out // g, k).sum(1)
    if not has_float64(dev):           # MPS: the small systems in float64 on the CPU (G of K x K)
        m, b = m.cpu().double(), b.cpu().double()
    lam = ridge * torch.diagonal(m, dim1=1, dim2=2).mean(1).clamp_min(1e-30)          # [G]
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    c0 = lut.to(m.device, m.dtype)
    c = torch.linalg.solve(m + lam[:, None, None] * eye, (b + lam[:, None] * c0).unsqueeze(-1)).squeeze(-1)
    return c.to(dev, wide)


def palettize_linear(w: torch.Tensor, H: torch.Tensor, importance: torch.Tensor, cfg: KMeansCalConfig
                     ) -> tuple[LUTRecord, dict[str, Any]]:
    """Weighted k-means LUT for ``w [out, in]``, then the best by output error of: nearest assignment, GPTQ
    feedback assignment, and ``refit_rounds`` rounds of (refit the LUT to the best indices, reassign by feedback)."""
    from macq.quantizers.palettize import quantize_weight

    rec = quantize_weight(w, cfg.kmeans_config(), importance)
    dt = rec.lut.dtype
    fixed, pos, vals, w_fix = None, rec.outlier_pos, rec.outlier_values, w
    if pos is not None:
        from macq.quantizers.outliers import attach_outliers, outlier_mask

        fixed = outlier_mask(rec)
        wf = w.clone().reshape(-1)
        wf[pos] = vals.float()                      # the outliers' stored (fp16) values are what they hold fixed
        w_fix = wf.view_as(w)
    w_lut = w if fixed is None else torch.where(fixed, w - w_fix, w)    # the part the LUT must hold

    def make(idx: torch.Tensor, lut: torch.Tensor) -> LUTRecord:
        cand = LUTRecord(indices=idx.to(torch.uint8), lut=lut, bits=rec.bits)
        return cand if pos is None else attach_outliers(cand, pos, vals)
    best_err = err_nearest = output_error(w, rec.dequantize(), H)
    info: dict[str, Any] = {"out_err_nearest": err_nearest, "feedback": False, "refit": 0}

    def consider(cand: LUTRecord, key: str) -> bool:
        nonlocal rec, best_err
        err = output_error(w, cand.dequantize(), H)
        info[key] = err
        if err < best_err:
            rec, best_err = cand, err
            return True
        return False

    hinv = lut_hinv(H, cfg.damp_percent) if cfg.error_feedback else None
    if cfg.error_feedback:
        idx = lut_gptq(w_fix, H, lut_rows(rec), cfg.damp_percent, cfg.block_size, fixed, hinv)
        info["feedback"] = consider(make(idx, rec.lut), "out_err_feedback")
    for r in range(cfg.refit_rounds):
        lut = refit_lut(w_lut, H, rec.indices, rec.lut, fixed=fixed).to(dt)
        improved = consider(make(rec.indices, lut), f"out_err_refit{r}")
        moved = False
        if cfg.error_feedback:
            idx = lut_gptq(w_fix, H, lut_rows(make(rec.indices, lut)), cfg.damp_percent, cfg.block_size, fixed, hinv)
            moved = consider(make(idx, lut), f"out_err_reassign{r}")
        if not (improved or moved):
            break
        info["refit"] = r + 1
        if not moved:   # the kept indices are the ones just refitted: a refit would solve the same systems again
            break
    info["out_err"] = best_err
    return rec, info


def hessian_importance(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``E[x_j²]`` broadcast over output rows: the weight's share of the output error if rounded alone."""
    return torch.diagonal(H).float().clamp_min(0).expand_as(w).clone()


def _check_groups(model: nn.Module, cfg: KMeansCalConfig) -> None:
    """Fail on a group size that does not divide some selected linear's (or head's) output dim, before any slow
    work; reads shapes only (works on a meta skeleton)."""
    from macq.models import get_weight, quantizable_modules

    decoder = quantizable_modules(model)
    heads = {n: m for n, m in quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head).items()
             if n not in decoder}
    for mod in {**quantizable_modules(model, skip=tuple(cfg.skip)), **heads}.values():
        _groups(get_weight(mod).detach()[:, :1], cfg.kmeans_config())


def layer_job(model: nn.Module, cfg: KMeansCalConfig, fisher: dict[str, torch.Tensor] | None = None,
              device: torch.device | None = None):
    """kmeans-cal's per-layer step (one input Hessian per group of linears sharing an input, collected after the
    earlier groups are palettized; weighted k-means, feedback assignment, LUT refit per linear), as
    :func:`~macq.quantizers.calibration.layerwise` and the streaming engine drive it. ``fisher``: per-weight
    importance by module path (popped as used); None = the Hessian diagonal. ``model`` is only read for its
    module names (a meta skeleton will do). On ``device`` (CPU by default) all but the k-means run, the exact 1-D
    optimum, which is CPU code."""
    from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
    from macq.quantizers.calibration import LayerJob
    from macq.quantizers.hessian import collect_hessians

    spec = arch_spec(model)
    selected = set(quantizable_modules(model, skip=tuple(cfg.skip)))
    records: dict[str, LUTRecord] = {}
    linears: dict[str, dict[str, Any]] = {}
    stats: dict[str, Any] = {"feedback_kept": 0, "linears": linears}

    def per_layer(_i: int, path: str, layer: nn.Module, inputs) -> None:
        groups = [[n for n in grp if f"{path}.{n}" in selected] for grp in spec.sequence]
        for grp in (g for g in groups if g):
            with stage("hessian"):
                H = collect_hessians(layer, inputs, [grp[0]], device or torch.device("cpu"), stop_early=True)[grp[0]]
            for name in grp:
                full, mod = f"{path}.{name}", layer.get_submodule(name)
                with stage("palettize"):
                    w = get_weight(mod).detach().float()
                    imp = fisher.pop(full) if fisher is not None else hessian_importance(w, H)
                    rec, info = palettize_linear(w, H, imp, cfg)
                    rec.transposed = is_conv1d(mod)
                    set_weight(mod, rec.dequantize())
                records[full], linears[full] = rec, info
                stats["feedback_kept"] += int(info["feedback"])
        missing = {m for m in selected if m.startswith(path + ".")} - set(records)
        if missing:
            raise MacqError(f"kmeans-cal: {sorted(missing)[0]} is not in the architecture's linear sequence")

    return LayerJob(per_layer, records, stats, device or torch.device("cpu"), cfg.batch_size, stats_in_manifest=True)


def layer_quantizer(model: nn.Module, cfg: KMeansCalConfig, device: torch.device | None = None):
    """The streaming engine's entry (:mod:`macq.quantizers.stream_calib`). Fisher sensitivities come from a
    streamed backward pass before the first layer (:func:`~macq.quantizers.stream_grad.stream_fisher`: one
    layer's diagonal on disk at a time, read back as the layer is palettized); with ``weighted_heads`` the
    embedding / lm_head get Fisher-weighted k-means there, else the engine's data-free k-means of
    :func:`macq.quantizers.head_records`, as the in-memory path gives them."""
    from macq.models import is_conv1d, quantizable_modules

    _check_groups(model, cfg)
    if cfg.sensitivity != "fisher":
        return layer_job(model, cfg, device=device)
    from macq.quantizers.palettize import quantize_weight
    from macq.quantizers.stream_grad import FisherStore, stream_fisher

    decoder = quantizable_modules(model)
    selected = set(quantizable_modules(model, skip=tuple(cfg.skip)))
    heads = {n for n in quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head) if n not in decoder}
    own = heads if cfg.weighted_heads else set()
    fisher = FisherStore()
    job = layer_job(model, cfg, fisher, device)

    def backward(stream, calib_ids: torch.Tensor) -> dict[str, LUTRecord]:
        stream_fisher(stream, calib_ids, selected, own, fisher)
        recs = {}
        with stage("palettize"):
            for name in sorted(own):
                mod = model.get_submodule(name)
                key = stream.head_key if name == stream.spec.lm_head else f"{name}.weight"
                w = stream.plan.store[key].float()
                recs[name] = quantize_weight(w.t() if is_conv1d(mod) else w, cfg.kmeans_config(), fisher.pop(name))
                recs[name].transposed = is_conv1d(mod)
                del w
        return recs

    job.backward, job.own_heads = backward, own
    return job


def quantize_model(model: nn.Module, cfg: KMeansCalConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """Calibrated palettization of every decoder linear of ``model`` (in place) → QuantizedModel."""
    from macq.device import resolve_device
    from macq.models import get_weight, is_conv1d, quantizable_modules
    from macq.qmodel import QuantizedModel
    from macq.quantizers import head_records
    from macq.quantizers.calibration import model_on, run_job
    from macq.quantizers.palettize import quantize_weight

    check_model_inputs("kmeans-cal", cfg, KMeansCalConfig, calib_ids)
    device = resolve_device(cfg.device)
    selected = quantizable_modules(model, skip=tuple(cfg.skip))
    heads = {n: m for n, m in quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head).items()
             if n not in quantizable_modules(model)}
    _check_groups(model, cfg)
    fisher_heads = heads if cfg.sensitivity == "fisher" and cfg.weighted_heads else {}
    head_recs = {} if fisher_heads else _write_heads(model, head_records(model, cfg))
    fisher = None
    if cfg.sensitivity == "fisher":
        from macq.quantizers.sensitivity import fisher_diagonal

        with model_on(model, device):
            fisher = fisher_diagonal(model, calib_ids, {**selected, **fisher_heads}, device, progress)
        fisher = {n: f.cpu() for n, f in fisher.items()}
    if fisher_heads:
        head_recs = {}
        for name, mod in fisher_heads.items():
            head_recs[name] = quantize_weight(get_weight(mod).detach().float(), cfg.kmeans_config(), fisher.pop(name))
            head_recs[name].transposed = is_conv1d(mod)
        _write_heads(model, head_recs)
    job = layer_job(model, cfg, fisher, device)
    run_job(model, calib_ids, job, progress, "kmeans-cal")
    method = cfg.to_dict()
    method["stats"] = job.stats
    return QuantizedModel.from_model(model, {**job.records, **head_recs}, method=method, source=source)


def _write_heads(model: nn.Module, recs: dict[str, LUTRecord]) -> dict[str, LUTRecord]:
    """Write the embedding / head records into ``model`` before the decoder is calibrated, so that every
    layer sees the inputs it will see at inference."""
    from macq.models import set_weight

    for name, rec in recs.items():
        set_weight(model.get_submodule(name), rec.dequantize(torch.float32))
    return recs
