"""Learned rounding (``learned``), calibrated palettization (``kmeans-cal``), embeddings for every method."""

from __future__ import annotations

import itertools

import pytest
import torch

from macq.data import calibration_samples
from macq.errors import MacqError
from macq.models import get_weight, set_weight
from macq.quantizers import grid, make_config
from macq.quantizers import quantize_model as registry_quantize
from macq.quantizers.calibration import capture_first_layer_inputs, run_layer
from macq.quantizers.kmeans_cal import KMeansCalConfig, lut_gptq, lut_rows, output_error, palettize_linear, refit_lut
from macq.quantizers.learned import LearnedConfig, fake_quant, init_params, layer_objective, to_record, tune_layer
from macq.quantizers.palettize import KMeansConfig, kmeans_lut, quantize_weight
from macq.record import AffineRecord, LUTRecord
from macq.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(tiny_tokenizer(), "tinystories", 4, 32, seed=0)


# ------------------------------------------------------------------------------------------ learned

def test_learned_grid_at_init_is_the_shared_grid():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    clip = torch.rand(24, 2) * 0.5 + 0.5
    p = init_params(w, 32, clip)
    ref = grid.fake_quantize(w.view(24, 2, 32), 3, False, "int", torch.float16, clip).view(24, 64)
    assert torch.equal(fake_quant(p, 3, False, torch.float16), ref)
    rec = to_record(p, 3, False, torch.float16)
    assert isinstance(rec, AffineRecord) and torch.equal(rec.dequantize(), ref)
    p.v.uniform_(-0.5, 0.5)                                 # any offsets: the record still equals the fake quant
    assert torch.equal(to_record(p, 3, False, torch.float16).dequantize(), fake_quant(p, 3, False, torch.float16))


def _layer_problem(calib):
    model = tiny_model()
    inputs = capture_first_layer_inputs(model, calib, batch_size=2)
    layer = model.model.layers[0]
    targets = [t.clone() for t in run_layer(layer, inputs)]
    hidden = [h.clone() for h in inputs.hidden]
    kwargs = [{k: (tuple(x.clone() for x in v) if isinstance(v, tuple) else v) for k, v in kw.items()}
              for kw in inputs.kwargs]
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer, names, hidden, kwargs, targets


def _objective_with_records(layer, names, params, hidden, kwargs, targets, bits):
    """Independent of the tuner: write each record's dequantized weight into the layer and run it plainly."""
    for n in names:
        set_weight(layer.get_submodule(n), to_record(params[n], bits, False, torch.float16).dequantize())
    return layer_objective(layer, {}, hidden, kwargs, targets)


@pytest.mark.parametrize("lr", [0.0, 50.0], ids=["autoround-lr", "absurd-lr"])
def test_learned_never_worse_than_its_initialisation(calib, lr):
    layer, names, hidden, kwargs, targets = _layer_problem(calib)
    w0 = {n: get_weight(layer.get_submodule(n)).detach().clone() for n in names}
    params = {n: init_params(w0[n], 32, 1.0) for n in names}
    init = {n: to_record(p, 3, False, torch.float16) for n, p in params.items()}
    for n in names:
        set_weight(layer.get_submodule(n), init[n].dequantize())
    before = layer_objective(layer, {}, hidden, kwargs, targets)
    for n in names:
        set_weight(layer.get_submodule(n), w0[n])
    cfg = LearnedConfig(bits=3, group_size=32, steps=12, eval_every=3, lr=lr)
    info = tune_layer(layer, params, hidden, kwargs, targets, cfg, torch.Generator().manual_seed(0))
    after = _objective_with_records(layer, names, params, hidden, kwargs, targets, 3)
    assert after == pytest.approx(info["objective"], rel=1e-5)
    assert before == pytest.approx(info["objective_init"], rel=1e-5)
    assert after <= before
    if lr == 0.0:
        assert after < 0.9 * before                          # the default schedule does learn something
    if info["best_step"] == 0:                               # nothing beat the start: the start comes back exactly
        for n in names:
            assert torch.equal(to_record(params[n], 3, False, torch.float16).codes, init[n].codes)


def test_learned_method_on_a_tiny_model(calib):
    qm = registry_quantize(tiny_model(), "learned", calib=calib, bits=3, group_size=32, steps=6, eval_every=3,
                           n_grid=4, clip_grid=4, include_embeddings=True)
    layers = qm.method["stats"]["layers"]
    assert layers and all(v["objective"] <= v["objective_init"] for v in layers.values())
    assert all(isinstance(r, AffineRecord) and r.bits == 3 for r in qm.records.values())
    assert "model.embed_tokens" in qm.records and qm.records["model.embed_tokens"].group_size == 32


@pytest.mark.parametrize("kw, msg", [(dict(init="gptq"), "--init"), (dict(steps=-1), "--steps"), (dict(bits=1), "--bits"),
                                     (dict(lr=-1.0), "--lr")])
def test_learned_bad_config(kw, msg):
    with pytest.raises(MacqError, match=msg) as e:
        LearnedConfig(**kw)
    assert "\n" not in str(e.value)


def _kl64(model, ids, teacher_model, rows):
    """Independent of the stage: token-mean KL(float || quantized) in float64 from two plain forwards per row."""
    tot = 0.0
    with torch.no_grad():
        for i in rows:
            t = torch.log_softmax(teacher_model(input_ids=ids[i:i + 1]).logits[0].double(), -1)
            q = torch.log_softmax(model(input_ids=ids[i:i + 1]).logits[0].double(), -1)
            tot += float((t.exp() * (t - q)).sum(-1).mean())
    return tot / len(rows)


@pytest.fixture(scope="module")
def calib6():
    return calibration_samples(tiny_tokenizer(), "tinystories", 6, 32, seed=0)


@pytest.mark.parametrize("holdout, lr", [(0, 1e-2), (2, 1e-2), (2, 5.0)], ids=["judged-on-train", "held-out", "absurd-lr"])
def test_logits_stage_never_worse_than_its_start(calib6, holdout, lr):
    """The logits stage's result, run plainly with the records written in (tied embedding / head: llama3), has a
    KL to the float model on the keep-best rows <= the block-wise records' it started from; only scales move."""
    float_model = tiny_model("llama3")
    kw = dict(calib=calib6, bits=3, group_size=32, steps=2, eval_every=2, init="rtn", include_embeddings=True)
    start = registry_quantize(tiny_model("llama3"), "learned", kl_steps=0, **kw)
    tuned = registry_quantize(tiny_model("llama3"), "learned", kl_steps=12, kl_eval_every=3, kl_holdout=holdout,
                              kl_lr=lr, **kw, seed=0)
    rows = [4, 5] if holdout else list(range(6))
    before, after = _kl64(start.to_torch(), calib6, float_model, rows), _kl64(tuned.to_torch(), calib6, float_model, rows)
    st = tuned.method["stats"]["logits"]
    assert st["kl_init"] == pytest.approx(before, rel=1e-4) and st["kl"] == pytest.approx(after, rel=1e-4)
    assert after <= before
    if holdout == 0 and lr < 1:
        assert after < 0.95 * before                          # on its own rows the stage does learn
    assert set(tuned.records) == set(start.records) and "model.embed_tokens" in tuned.records
    for name, rec in tuned.records.items():
        assert torch.equal(rec.codes, start.records[name].codes) and torch.equal(rec.zeros, start.records[name].zeros)
        assert rec.scales.dtype == torch.float16


def test_logits_stage_config_round_trips_and_fails_fast(calib6):
    cfg = LearnedConfig(kl_steps=5, kl_lr=2e-3, kl_holdout=1, kl_batch=2, kl_eval_every=4, kl_rows=3)
    assert LearnedConfig.from_dict(cfg.to_dict()) == cfg
    for kw, msg in [(dict(kl_steps=-1), "--kl-steps"), (dict(kl_lr=0.0), "--kl-lr"), (dict(kl_batch=0), "--kl-batch"),
                    (dict(kl_holdout=-1), "--kl-holdout"), (dict(kl_eval_every=0), "--kl-eval-every"),
                    (dict(kl_rows=0), "--kl-rows")]:
        with pytest.raises(MacqError, match=msg):
            LearnedConfig(**kw)
    with pytest.raises(MacqError, match="--kl-holdout 6: must leave training sequences"):
        registry_quantize(tiny_model(), "learned", calib=calib6, kl_steps=1, kl_holdout=6)
    with pytest.raises(MacqError, match="--kl-holdout 4: must leave training sequences of the --kl-rows 4"):
        LearnedConfig(kl_steps=1, kl_rows=4, kl_holdout=4)                  # the config itself, before any work


# ------------------------------------------------------------------------------------------ kmeans-cal

def _brute_force_sse(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Minimum of Σ w_i (x_i − c_{a(i)})² over every assignment of the points to k clusters (c = weighted means)."""
    n = x.numel()
    best = float("inf")
    for a in itertools.product(range(k), repeat=n):
        a = torch.tensor(a)
        sse = 0.0
        for c in range(k):
            m = a == c
            if m.any():
                mu = (w[m] * x[m]).sum() / w[m].sum()
                sse += float((w[m] * (x[m] - mu) ** 2).sum())
        best = min(best, sse)
    return best


@pytest.mark.parametrize("bits, n, seed", [(1, 8, 0), (1, 8, 1), (2, 6, 2)])
def test_weighted_kmeans_reaches_the_brute_force_optimum(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, generator=g, dtype=torch.float64).float()
    w = torch.rand(1, n, generator=g, dtype=torch.float64).float() * 10 + 0.01
    lut, idx = kmeans_lut(x, bits, w, lut_dtype=torch.float32)
    got = float((w * (x - lut[0, idx[0].long()]) ** 2).sum())
    want = _brute_force_sse(x[0].double(), w[0].double(), 2 ** bits)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    # weights matter: the unweighted optimum is worse on the weighted objective (or equal)
    lut_u, idx_u = kmeans_lut(x, bits, None, lut_dtype=torch.float32)
    assert float((w * (x - lut_u[0, idx_u[0].long()]) ** 2).sum()) >= got - 1e-6


def test_lut_gptq_is_nearest_with_identity_hessian_and_helps_with_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    rec = quantize_weight(w, KMeansConfig(bits=2, group_size=16))
    rows = lut_rows(rec)
    idx = lut_gptq(w, torch.eye(48), rows, damp_percent=1e-9)
    nearest = LUTRecord(indices=idx.to(torch.uint8), lut=rec.lut, bits=2).dequantize()
    assert torch.equal(nearest, rec.dequantize())
    x = torch.randn(2000, 8) @ torch.randn(8, 48) + 0.1 * torch.randn(2000, 48)   # low-rank, correlated inputs
    H = (x.T @ x).double() / 2000
    fb = LUTRecord(indices=lut_gptq(w, H, rows).to(torch.uint8), lut=rec.lut, bits=2).dequantize()
    assert output_error(w, fb, H) < 0.8 * output_error(w, rec.dequantize(), H)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lut_hinv_sets_dead_inputs_without_touching_the_callers_hessian(dtype):
    """A never-active input (zero row and column of H) gets a unit diagonal before factoring, in a copy: the
    factor equals the one of H with that diagonal set by hand (float64 reference), and H is unchanged."""
    from macq.quantizers.kmeans_cal import lut_hinv

    gen = torch.Generator().manual_seed(3)
    H = _correlated_hessian(12, gen)
    H[4, :] = H[:, 4] = 0.0
    H = H.to(dtype)
    before = H.clone()
    got = lut_hinv(H, 0.01)
    assert torch.equal(H, before) and got.dtype == torch.float32
    ref = H.double().clone()
    ref[4, 4] = 1.0
    ref += 0.01 * ref.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(ref), upper=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _feedback_reference(w, H, rows, damp, fixed=None):
    """GPTQ's loop as its paper writes it, onto LUT rows: float64, one column at a time, every later column
    updated at once (no lazy blocks), the inverse's upper factor from ``torch.linalg``."""
    W, rows = w.double().clone(), rows.double()
    Hd = H.double() + damp * H.double().diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    idx = torch.zeros(W.shape, dtype=torch.long)
    for j in range(W.shape[1]):
        idx[:, j] = (W[:, j:j + 1] - rows).abs().argmin(1)
        q = rows.gather(1, idx[:, j:j + 1])[:, 0]
        if fixed is not None:
            q = torch.where(fixed[:, j], W[:, j], q)
        W[:, j:] -= ((W[:, j] - q) / U[j, j]).unsqueeze(1) * U[j, j:]
    return idx


@pytest.mark.parametrize("block_size,with_fixed", [(40, False), (16, True), (7, False)])
def test_lut_gptq_equals_the_float64_column_loop(block_size, with_fixed):
    """The float32 lazy-block loop (sub-blocks of 16 columns, ragged blocks: 50 = 40 + 10, 3·16 + 2, 7·7 + 1)
    against :func:`_feedback_reference`: the same indices up to float32 near-ties, the same output error."""
    gen = torch.Generator().manual_seed(block_size)
    w = torch.randn(32, 50, generator=gen)
    H = _correlated_hessian(50, gen)
    rec = quantize_weight(w, KMeansConfig(bits=3, group_size=8))
    fixed = torch.rand(32, 50, generator=gen) < 0.05 if with_fixed else None
    got = lut_gptq(w, H, lut_rows(rec), 0.01, block_size, fixed).long()
    want = _feedback_reference(w, H, lut_rows(rec), 0.01, fixed)
    live = ~fixed if fixed is not None else torch.ones_like(got, dtype=torch.bool)
    assert float((got != want)[live].float().mean()) <= 0.005
    err = [output_error(w, LUTRecord(indices=i.to(torch.uint8), lut=rec.lut, bits=3).dequantize(), H) for i in (got, want)]
    assert err[0] == pytest.approx(err[1], rel=1e-3)
    assert err[0] < 0.7 * output_error(w, rec.dequantize(), H)     # the feedback is doing something


def _correlated_hessian(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(600, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, n, generator=gen, dtype=torch.float64)
    x = x + 0.1 * torch.randn(600, n, generator=gen, dtype=torch.float64)     # low-rank, correlated inputs
    return x.T @ x / 600


@pytest.mark.parametrize("block_bytes", [None, 12 * 4 * 4 * 3])   # whole, or blocks of 3 rows (not a group)
def test_refit_lut_is_the_least_squares_optimum(monkeypatch, block_bytes):
    """Independent reference: per LUT group, ``lstsq`` on the explicit design matrix of ``vec((A_k) L)`` with
    ``H = L Lᵀ``, i.e. the LUT minimising ``‖(W − Ŵ) L‖²_F = tr(ΔW H ΔWᵀ)`` for the fixed indices; also when
    the one-hot rows are processed in blocks that cut across LUT groups (the memory bound at real sizes)."""
    import macq.quantizers.kmeans_cal as kc

    out, n, gs, k = 8, 12, 4, 4
    if block_bytes is not None:
        monkeypatch.setattr(kc, "REFIT_BYTES", block_bytes)
        monkeypatch.setattr(kc, "ROW_BYTES", 5 * 8 * n)       # H and ΔW 5 rows at a time: 5 + 5 + 2
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, n, generator=gen, dtype=torch.float64)
    H = _correlated_hessian(n, gen)
    rec = quantize_weight(w.float(), KMeansConfig(bits=2, group_size=gs, lut_dtype="float32"))
    got = refit_lut(w, H, rec.indices, rec.lut.double(), ridge=0.0)
    L = torch.linalg.cholesky(H)
    onehot = torch.nn.functional.one_hot(rec.indices.long(), k).double()
    for g in range(out // gs):
        rows = slice(g * gs, (g + 1) * gs)
        design = torch.stack([(onehot[rows, :, j] @ L).reshape(-1) for j in range(k)], 1)
        want = torch.linalg.lstsq(design, (w[rows] @ L).reshape(-1, 1)).solution[:, 0]
        assert torch.allclose(got[g], want, rtol=1e-5, atol=1e-5)
    refit = LUTRecord(indices=rec.indices, lut=got.float(), bits=2).dequantize().double()
    assert output_error(w, refit, H) < 0.9 * output_error(w, rec.dequantize().double(), H)
    d = refit - w
    assert output_error(w, refit, H) == pytest.approx(float(torch.trace(d @ H @ d.T)), rel=1e-5)


@pytest.mark.parametrize("n,row_bytes", [(50, 64 << 20), (50, 8 * 50 * 3), (7, 8 * 7)])
def test_output_error_from_the_triangle_equals_the_float64_trace(n, row_bytes, monkeypatch):
    """2·tr(ΔW T ΔWᵀ) − Σ H_ii ΔW² over row blocks of the triangle (ragged: 50 = 7·7 + 1) and of ΔW (3 rows, or
    1) against the float64 ``tr(ΔW H ΔWᵀ)``."""
    import macq.quantizers.kmeans_cal as kc

    monkeypatch.setattr(kc, "ROW_BYTES", row_bytes)
    gen = torch.Generator().manual_seed(n)
    w, w_hat = torch.randn(10, n, generator=gen), torch.randn(10, n, generator=gen)
    H = _correlated_hessian(n, gen)
    d = (w_hat - w).double()
    assert kc.output_error(w, w_hat, H) == pytest.approx(float(torch.trace(d @ H.double() @ d.T)), rel=1e-5)


def test_refit_lut_keeps_unused_entries():
    w = torch.tensor([[0.0, 1.0, 0.1, 0.9]])
    idx = torch.tensor([[0, 3, 0, 3]], dtype=torch.uint8)
    lut = torch.tensor([[0.0, 0.3, 0.6, 1.0]], dtype=torch.float64)
    got = refit_lut(w, torch.eye(4, dtype=torch.float64), idx, lut)
    assert torch.allclose(got, torch.tensor([[0.05, 0.3, 0.6, 0.95]], dtype=torch.float64), atol=1e-6)


def test_palettize_linear_keeps_the_lowest_output_error():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 48, generator=gen)
    H = _correlated_hessian(48, gen)
    imp = torch.ones_like(w)
    base = palettize_linear(w, H, imp, KMeansCalConfig(bits=2, group_size=16, n_init=1, refit_rounds=0))[1]
    rec, info = palettize_linear(w, H, imp, KMeansCalConfig(bits=2, group_size=16, n_init=1, refit_rounds=3))
    assert info["out_err"] == pytest.approx(output_error(w, rec.dequantize(), H), rel=1e-12)
    assert info["out_err"] == min(v for k, v in info.items() if k.startswith("out_err_"))
    assert info["refit"] >= 1 and info["out_err"] < 0.95 * base["out_err"]


def _every_round(w, H, imp, cfg):
    """The keep-best over nearest, feedback and ``refit_rounds`` full rounds (refit the kept indices, reassign),
    no round skipped: what the stopping rule must reproduce."""
    from macq.quantizers.kmeans_cal import lut_hinv

    rec = quantize_weight(w, cfg.kmeans_config(), imp)
    best, err = rec, output_error(w, rec.dequantize(), H)
    hinv = lut_hinv(H, cfg.damp_percent)

    def keep(c):
        nonlocal best, err
        e = output_error(w, c.dequantize(), H)
        if e < err:
            best, err = c, e
    keep(LUTRecord(indices=lut_gptq(w, H, lut_rows(rec), hinv=hinv), lut=rec.lut, bits=rec.bits))
    for _ in range(cfg.refit_rounds):
        lut = refit_lut(w, H, best.indices, best.lut).to(rec.lut.dtype)
        keep(LUTRecord(indices=best.indices, lut=lut, bits=rec.bits))
        rows = lut.float().repeat_interleave(cfg.group_size, 0)
        keep(LUTRecord(indices=lut_gptq(w, H, rows, hinv=hinv).to(torch.uint8), lut=lut, bits=rec.bits))
    return best, err


@pytest.mark.parametrize("seed", range(4))
def test_refit_rounds_stop_once_the_indices_stay_and_keep_the_same_record(seed, monkeypatch):
    import macq.quantizers.kmeans_cal as kc

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 48, generator=gen)
    H = _correlated_hessian(48, gen)
    imp = torch.rand(32, 48, generator=gen)
    cfg = KMeansCalConfig(bits=2, group_size=16, refit_rounds=4)
    calls = []
    real = kc.refit_lut
    monkeypatch.setattr(kc, "refit_lut", lambda *a, **k: calls.append(1) or real(*a, **k))
    rec, info = palettize_linear(w, H, imp, cfg)
    want, err = _every_round(w, H, imp, cfg)
    assert torch.equal(rec.indices, want.indices) and torch.equal(rec.lut, want.lut)
    assert info["out_err"] == err
    kept = [r for r in range(4) if info.get(f"out_err_reassign{r}") is not None]
    assert len(calls) == len(kept) <= info["refit"] + 1 <= 4   # a refit per round run; none after a round kept no new indices


@pytest.mark.parametrize("sensitivity", ["fisher", "hessian"])
def test_kmeans_cal_on_a_tiny_model(calib, sensitivity):
    qm = registry_quantize(tiny_model(), "kmeans-cal", calib=calib, bits=3, group_size=4, sensitivity=sensitivity,
                           n_init=1, include_embeddings=True)
    assert all(isinstance(r, LUTRecord) and r.bits == 3 for r in qm.records.values())
    assert "model.embed_tokens" in qm.records
    for name, st in qm.method["stats"]["linears"].items():
        assert st["out_err"] <= min(st["out_err_nearest"], st["out_err_feedback"])
    assert qm.method["stats"]["feedback_kept"] >= 1


@pytest.mark.parametrize("weighted_heads", [True, False])
def test_kmeans_cal_embedding_is_fisher_weighted(calib, weighted_heads):
    """The embedding record is weighted k-means with the float model's empirical Fisher, recomputed here by a
    plain autograd loop (mean over sequences of the squared gradient of each sequence's loss); without
    ``weighted_heads`` it is the data-free k-means every other LUT method uses for heads."""
    model = tiny_model()
    cfg = KMeansConfig(bits=3, group_size=4, n_init=1)
    w = model.model.embed_tokens.weight.detach().clone()
    fisher = torch.zeros_like(w)
    for s in range(calib.shape[0]):
        model.zero_grad()
        x = calib[s:s + 1]
        model(input_ids=x, labels=x).loss.backward()
        fisher += model.model.embed_tokens.weight.grad.pow(2) / calib.shape[0]
    model.zero_grad()
    qm = registry_quantize(model, "kmeans-cal", calib=calib, bits=3, group_size=4, n_init=1, refit_rounds=0,
                           include_embeddings=True, weighted_heads=weighted_heads)
    got = qm.records["model.embed_tokens"]
    weighted = quantize_weight(w, KMeansConfig(bits=3, group_size=4, n_init=1, weighted=True), fisher)
    plain = quantize_weight(w, cfg)
    want, other = (weighted, plain) if weighted_heads else (plain, weighted)
    assert torch.equal(got.lut, want.lut) and torch.equal(got.indices, want.indices)
    assert not torch.equal(got.lut, other.lut)
    assert torch.equal(qm.to_torch().model.embed_tokens.weight.detach(), got.dequantize())


def test_kmeans_cal_bad_config_fails_fast():
    with pytest.raises(MacqError, match="--sensitivity"):
        make_config("kmeans-cal", sensitivity="grad")
    with pytest.raises(MacqError, match="--refit-rounds -1"):
        make_config("kmeans-cal", refit_rounds=-1)
    with pytest.raises(MacqError, match="--group-size 5"):
        registry_quantize(tiny_model(), "kmeans-cal", calib=torch.zeros(1, 4, dtype=torch.long), group_size=5)


# ------------------------------------------------------------------------------------------ equal size

@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibrated_methods_quantize_the_embedding(calib, method):
    kw = dict(n_grid=4, clip_grid=4) if method == "awq" else {}
    qm = registry_quantize(tiny_model(), method, calib=calib, bits=4, group_size=32, include_embeddings=True, **kw)
    rec = qm.records["model.embed_tokens"]
    assert isinstance(rec, AffineRecord) and rec.bits == 4 and rec.group_size == 32
    assert "model.embed_tokens.weight" not in qm.float_tensors
    emb = qm.to_torch().model.embed_tokens.weight.detach()
    assert torch.equal(emb, rec.dequantize())


# ------------------------------------------------------------------------------------------ exports

def test_learned_export_loads_in_mlx_lm(tmp_path, calib):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np

    from mlx_backend import export_mlx, load_mlx, mlx_logits
    from mlx_backend.layout import mlx_arch, mlx_name

    qm = registry_quantize(tiny_model(), "learned", calib=calib, bits=3, group_size=32, steps=3, eval_every=3,
                           init="rtn", include_embeddings=True, kl_steps=2, kl_eval_every=1, kl_holdout=1, kl_lr=0.05)
    assert qm.method["stats"]["logits"]["best_step"] > 0        # the export holds records the logits stage changed
    export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float32")
    model, tok = load_mlx(tmp_path / "m")
    for name, rec in qm.records.items():
        mod = model
        for part in mlx_name(name, mlx_arch(qm.config.model_type)).split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        w = mx.dequantize(mod.weight, mod.scales, mod.biases, mod.group_size, mod.bits)
        np.testing.assert_array_equal(np.array(w.astype(mx.float32)), rec.dequantize().numpy(), err_msg=name)
    ids = np.array([3, 17, 101, 7, 250, 33, 480, 12], dtype=np.int64)
    with torch.no_grad():
        ref = qm.to_torch()(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert float(np.abs(mlx_logits((model, tok), ids) - ref).max() / np.abs(ref).max()) < 1e-4


@pytest.mark.parametrize("group_size", [16, 1])     # 1: a per-channel LUT, one per output row
def test_kmeans_cal_record_reads_back_bit_exact_from_core_ml(calib, group_size):
    pytest.importorskip("coremltools")
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from converters.weights import apply_records_to_program, plan_layouts

    qm = registry_quantize(tiny_model(), "kmeans-cal", calib=calib, bits=4, group_size=group_size,
                           sensitivity="hessian", n_init=1)
    name = next(n for n in qm.records if n.endswith("mlp.down_proj"))
    rec = qm.records[name]
    assert rec.n_lut_groups == rec.shape[0] // group_size and tuple(rec.lut.shape) == (rec.n_lut_groups, 16)
    w = rec.dequantize(torch.float32).half().numpy()
    wt = np.ascontiguousarray(w.T)                                   # the program holds [in, out]

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, wt.shape[0]), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.matmul(x=x, y=wt, name="mm")

    layouts, _ = plan_layouts({name: rec})
    apply_records_to_program(prog, {name: rec}, layouts)
    ops = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == 1
    got = np.asarray(ops[0].materialized_val_inference())
    assert np.array_equal(got.view(np.uint16), np.ascontiguousarray(w.T).view(np.uint16))


def test_learned_awq_init_is_awq_bit_for_bit():
    """``learned`` with no block-wise steps and no logits stage is AWQ's initialisation alone: at AWQ's engine batch
    (8 calibration sequences per layer forward) it gives ``--method awq``'s quantization exactly -- the same records
    (codes, fp16 scales, zero-points; embedding included) and the same folded float tensors. At learned's default
    ``batch_size=1`` (its sign-SGD batch, which is also the layer engine's batch) AWQ's input statistics are summed
    in another order: the folded norms move by float32 ulps (the records happen to agree on this tiny model). On
    the 30-layer model such ulps can flip AWQ's discrete alpha / clip choices, which is why the documented
    ``learned --steps 0`` and ``awq`` rows differ; not a different algorithm."""
    from macq.pipeline import quantize

    model, tok = tiny_model("llama3"), tiny_tokenizer()
    base = {"bits": 3, "group_size": 32, "symmetric": False, "include_embeddings": True}
    a = quantize(model, tok, "awq", base, "c4", 8, 64, 0)
    folded = [k for k in a.float_tensors if "layernorm" in k and not torch.equal(a.float_tensors[k], model.state_dict()[k])]
    assert folded
    for bs in (8, 1):
        b = quantize(model, tok, "learned", {**base, "steps": 0, "kl_steps": 0, "batch_size": bs}, "c4", 8, 64, 0)
        assert a.records.keys() == b.records.keys() and "model.embed_tokens" in a.records
        for k, ra in a.records.items():
            rb = b.records[k]
            assert torch.equal(ra.codes, rb.codes) and torch.equal(ra.scales, rb.scales), k
            assert torch.equal(ra.zeros, rb.zeros), k
        assert a.float_tensors.keys() == b.float_tensors.keys()
        same = [torch.equal(a.float_tensors[k], b.float_tensors[k]) for k in folded]
        if bs == 8:
            assert all(same)
        else:
            assert not all(same)
            for k in folded:
                torch.testing.assert_close(a.float_tensors[k], b.float_tensors[k], rtol=2.5e-7, atol=0)
