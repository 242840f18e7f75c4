"""LUT records with fp16 outliers (SqueezeLLM's dense-and-sparse): config, record, quantizers, Core ML, MLX, CLI.

References: the record's own definition recomputed by hand (overwrite at the positions), float64 least squares for
the LUT refit, the Core ML file read back (``constexpr_*`` value inference) and run (MIL value inference) against
transformers on the same dequantized weights (fp16 program vs fp32 torch: logits within 3e-2, as the other
Core ML tests).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from converters import export_coreml
from converters.inspect import chain_value, load_program, weight_chains
from converters.mil_runner import run_mil
from converters.weights import slice_rows
from converters.wrapper import causal_mask
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.quantizers.kmeans_cal import KMeansCalConfig, lut_gptq, lut_rows, output_error, palettize_linear, refit_lut
from macq.quantizers.outliers import attach_outliers, outlier_mask
from macq.quantizers.palettize import KMeansConfig, _groups, quantize_weight
from macq.record import LUTRecord, bits_per_weight
from macq.tiny import tiny_model

LOGIT_TOL = 3e-2


def _heavy(out: int = 64, inp: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(2.5)).sample((out, inp)) * 0.02 + 1e-4 * torch.randn(out, inp, generator=g)


def _small_record() -> LUTRecord:
    idx = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.uint8)
    lut = torch.tensor([[-1.0, -0.25, 0.25, 1.0]], dtype=torch.float16)
    return LUTRecord(indices=idx, lut=lut, bits=2, outlier_pos=torch.tensor([1, 6]),
                     outlier_values=torch.tensor([7.5, -3.0], dtype=torch.float16))


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("cls", [KMeansConfig, KMeansCalConfig])
def test_outlier_frac_validates_and_round_trips(cls):
    cfg = cls(outlier_frac=0.005)
    assert cls.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["outlier_frac"] == 0.005
    for bad in (-0.01, 0.1, 0.5):
        with pytest.raises(MacqError, match=r"--outlier-frac .*\[0, 0\.1\)"):
            cls(outlier_frac=bad)


# ------------------------------------------------------------------------------------------ record
def test_record_overwrites_counts_bits_and_round_trips():
    rec = _small_record()
    want = torch.tensor([[-1.0, 7.5, 0.25, 1.0], [1.0, 0.25, -3.0, -1.0]])    # dense, then overwritten at 1 and 6
    assert torch.equal(rec.dequantize(), want)
    assert torch.equal(rec.dense()[0, 1], torch.tensor(-0.25))
    # 8 indices × 2 bits + 4 fp16 LUT entries + 1-bit mask over 8 weights + 2 fp16 values
    assert rec.storage_bits() == 8 * 2 + 4 * 16 + 8 + 2 * 16
    back = LUTRecord.from_tensors(json.loads(json.dumps(rec.meta())), rec.to_tensors())
    assert torch.equal(back.outlier_pos, rec.outlier_pos) and torch.equal(back.outlier_values, rec.outlier_values)
    assert torch.equal(back.dequantize(), want)


@pytest.mark.parametrize("kw,msg", [
    ({"outlier_pos": torch.tensor([1])}, "come together"),
    ({"outlier_pos": torch.tensor([1, 2]), "outlier_values": torch.tensor([1.0], dtype=torch.float16)}, "equal length"),
    ({"outlier_pos": torch.tensor([1]), "outlier_values": torch.tensor([1.0])}, "expected float16"),
    ({"outlier_pos": torch.tensor([8]), "outlier_values": torch.tensor([1.0], dtype=torch.float16)}, "outside the 8"),
    ({"outlier_pos": torch.tensor([3, 2]), "outlier_values": torch.tensor([1.0, 2.0], dtype=torch.float16)},
     "strictly increasing"),
    ({"outlier_pos": torch.tensor([1.0]), "outlier_values": torch.tensor([1.0], dtype=torch.float16)}, "integer dtype"),
    ({"outlier_pos": torch.tensor([1]), "outlier_values": torch.tensor([float("inf")], dtype=torch.float16)}, "NaN or inf"),
])
def test_record_rejects_bad_outliers(kw, msg):
    with pytest.raises(MacqError, match=msg):
        LUTRecord(indices=torch.zeros(2, 4, dtype=torch.uint8), lut=torch.zeros(1, 4), bits=2, **kw)


def test_save_load_keeps_outliers(tmp_path):
    model = tiny_model("llama")
    recs = {n: quantize_weight(get_weight(m).detach().float(), KMeansConfig(group_size=16, outlier_frac=0.01, n_init=1))
            for n, m in list(quantizable_modules(model).items())[:3]}
    qm = QuantizedModel.from_model(model, recs)
    back = QuantizedModel.load(qm.save(tmp_path / "q"))
    for n, r in recs.items():
        assert r.n_outliers == round(0.01 * r.indices.numel()) > 0
        assert torch.equal(back.records[n].dequantize(), r.dequantize()), n
        assert back.records[n].storage_bits() == r.storage_bits()


# ------------------------------------------------------------------------------------------ data-free k-means
def test_kmeans_outliers_are_kept_exactly_and_left_out_of_the_fit():
    w = _heavy()
    cfg = KMeansConfig(bits=3, group_size=16, outlier_frac=0.01, n_init=1)
    rec = quantize_weight(w, cfg)
    mask = outlier_mask(rec)
    assert rec.n_outliers == int(mask.sum()) == round(0.01 * w.numel())
    # the selection: the largest distances from the group mean, one threshold for the whole tensor
    x = _groups(w, cfg)
    dev = (x - x.mean(1, keepdim=True)).abs().reshape(w.shape)
    assert dev[mask].min() >= dev[~mask].max()
    assert torch.equal(rec.dequantize()[mask], w[mask].half().float())
    # left out of the fit: every LUT entry lies within its group's non-outlier range (an outlier would pull the
    # extreme centroid beyond it, as in the plain fit of the same tensor)
    lo = torch.where(mask, torch.inf, w).reshape(x.shape).amin(1, keepdim=True)
    hi = torch.where(mask, -torch.inf, w).reshape(x.shape).amax(1, keepdim=True)
    lut = rec.lut.float()
    assert bool(((lut >= lo - 1e-3 * (hi - lo)) & (lut <= hi + 1e-3 * (hi - lo))).all())
    plain = quantize_weight(w, KMeansConfig(bits=3, group_size=16, n_init=1))
    assert bool(((plain.lut.float() > hi) | (plain.lut.float() < lo)).any())
    # and the weight error drops by much more than the outliers' share
    err = (rec.dequantize() - w).pow(2).sum()
    assert err < 0.7 * (plain.dequantize() - w).pow(2).sum()
    assert bits_per_weight(rec) == pytest.approx(bits_per_weight(plain) + 1 + 16 * 0.01, abs=1e-3)


def test_weighted_fit_selects_by_distance_not_sensitivity():
    w = torch.randn(16, 64)
    imp = torch.ones(16, 64)
    imp[3, 5] = 1e6                                        # a weight that matters a lot: weighted in the fit...
    w[3, 5] = w.mean()
    rec = quantize_weight(w, KMeansConfig(bits=2, granularity="per_tensor", weighted=True, outlier_frac=2 / w.numel(),
                                          n_init=1), imp)
    mask = outlier_mask(rec)
    dev = (w - w.mean()).abs()
    assert not mask[3, 5] and int(mask.sum()) == 2 and dev[mask].min() >= dev[~mask].max()   # ...not an outlier
    assert (rec.lut.float() - w[3, 5]).abs().min() < 1e-3 * dev.max()     # the heavy weight owns a LUT entry


def test_attach_outliers_picks_an_index_whose_fp16_sum_is_exact():
    # v = 1000.5 (fp16 spacing 0.5 there): from lut 0.25 the residual 1000.25 rounds to even (1000.0) and the sum
    # 1000.25 rounds to 1000.0, missing v; from lut 999.0 (within a factor 2, Sterbenz) the residual 1.5 is exact
    rec = LUTRecord(indices=torch.zeros(1, 4, dtype=torch.uint8), lut=torch.tensor([[0.25, 999.0]]), bits=1)
    out = attach_outliers(rec, torch.tensor([2]), torch.tensor([1000.5]))
    r, exact = out.outlier_residuals()
    assert bool(exact.all()) and int(out.indices[0, 2]) == 1 and float(out.dequantize()[0, 2]) == 1000.5
    near = attach_outliers(LUTRecord(indices=rec.indices, lut=torch.tensor([[0.25, -0.25]]), bits=1),
                           torch.tensor([2]), torch.tensor([1000.5]))
    assert not bool(near.outlier_residuals()[1].all())   # no entry admits it: reported, the exporter refuses
    from converters.weights import plan_layouts

    with pytest.raises(MacqError, match="cannot be written exactly"):
        plan_layouts({"a": near})
    w = _heavy(32, 64, seed=2) * 50                         # heavy tails in fp16's coarse range
    rec = quantize_weight(w, KMeansConfig(bits=4, group_size=16, outlier_frac=0.05, n_init=1))
    assert bool(rec.outlier_residuals()[1].all())


# ------------------------------------------------------------------------------------------ kmeans-cal
def test_refit_with_fixed_outliers_is_the_least_squares_optimum():
    torch.manual_seed(0)
    out, inp, k = 6, 10, 4
    w = torch.randn(out, inp, dtype=torch.float64)
    x = torch.randn(40, inp, dtype=torch.float64)
    H = x.T @ x / 40
    idx = torch.randint(0, k, (out, inp))
    fixed = torch.zeros(out, inp, dtype=torch.bool)
    fixed[0, 3] = fixed[4, 7] = fixed[5, 0] = True
    v = w.clone()
    v[fixed] = w[fixed] + 0.01                             # outliers held at (slightly off) values
    got = refit_lut(torch.where(fixed, w - v, w), H, idx, torch.zeros(1, k), ridge=0.0, fixed=fixed)[0]
    # brute force: vec over rows of (Ŵ_r - w_r) L, Ŵ = one-hot(idx) c outside fixed, v at fixed; H = L Lᵀ
    L = torch.linalg.cholesky(H)
    J = torch.nn.functional.one_hot(idx, k).double() * (~fixed).unsqueeze(-1)
    A = torch.cat([L.T @ J[r] for r in range(out)])
    t = torch.cat([L.T @ (w[r] - torch.where(fixed[r], v[r], 0.0)) for r in range(out)])
    want = torch.linalg.lstsq(A, t.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_feedback_holds_outliers_and_identity_hessian_is_nearest():
    w = _heavy(16, 32, seed=1)
    rec = quantize_weight(w, KMeansConfig(bits=3, group_size=16, outlier_frac=0.02, n_init=1))
    fixed = outlier_mask(rec)
    idx = lut_gptq(w, torch.eye(32), lut_rows(rec), fixed=fixed)
    assert torch.equal(idx[~fixed], rec.indices.long()[~fixed])


def test_palettize_linear_with_outliers_keeps_them_and_never_worse_than_nearest():
    torch.manual_seed(0)
    w = _heavy(32, 64, seed=3)
    x = torch.randn(256, 64) * torch.linspace(0.2, 3, 64)
    H = x.T @ x / 256
    cfg = KMeansCalConfig(bits=3, group_size=16, outlier_frac=0.02, n_init=1)
    rec, info = palettize_linear(w, H, torch.diagonal(H).expand_as(w).clone(), cfg)
    mask = outlier_mask(rec)
    assert rec.n_outliers == round(0.02 * w.numel())
    assert torch.equal(rec.dequantize()[mask], w[mask].half().float())
    assert bool(rec.outlier_residuals()[1].all())
    assert info["out_err"] == pytest.approx(output_error(w, rec.dequantize(), H)) and info["out_err"] <= info["out_err_nearest"]
    plain, pinfo = palettize_linear(w, H, torch.diagonal(H).expand_as(w).clone(), KMeansCalConfig(bits=3, group_size=16,
                                                                                                  n_init=1))
    assert info["out_err"] < pinfo["out_err"]


def test_slice_rows_keeps_outliers():
    w = _heavy(96, 64)
    rec = quantize_weight(w, KMeansConfig(bits=4, group_size=16, outlier_frac=0.02, n_init=1))
    parts = [slice_rows(rec, a, b) for a, b in ((0, 32), (32, 96))]
    assert sum(p.n_outliers for p in parts) == rec.n_outliers
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), rec.dequantize())


# ------------------------------------------------------------------------------------------ Core ML
def _outlier_qm(arch: str = "llama", seed: int = 0) -> QuantizedModel:
    model = tiny_model(arch, seed=seed)
    cfg = KMeansConfig(bits=4, group_size=16, outlier_frac=0.02, n_init=1)
    recs = {n: quantize_weight(get_weight(m).detach().float(), cfg) for n, m in quantizable_modules(model).items()}
    recs["lm_head"] = quantize_weight(model.lm_head.weight.detach().float(), replace(cfg, outlier_frac=0.0))
    return QuantizedModel.from_model(model, recs)


def test_hf_export_reads_back_bit_exact_and_runs(tmp_path):
    qm = _outlier_qm()
    res = export_coreml(qm, tmp_path / "o.mlpackage", context=32, graph="hf")
    prog, _ = load_program(res.path)
    chains = weight_chains(prog)
    assert len(chains) == len(qm.records)
    for name, rec in qm.records.items():
        (c,) = [c for c in chains if name.replace(".", "_") + "_" in c["name"]]
        kind = "lut_to_dense+sparse_to_dense" if rec.n_outliers else "lut_to_dense"
        assert c["kind"] == kind and c["code_dtype"] == "uint4", name
        got, want = chain_value(c), rec.dequantize(torch.float32).half().numpy()
        assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16)), name
        assert c["bits"] == rec.storage_bits(), name          # the file holds what the record charges
    ops = [op for op in prog.functions["main"].operations]
    assert not [op for op in ops if op.op_type == "linear" and op.weight.op.op_type == "add"]
    # only runtime weights leave linear: the head's plain LUT (a compile-time constexpr) still feeds a linear
    (head,) = [c for c in chains if c["kind"] == "lut_to_dense"]
    assert {u.op_type for u in head["op"].outputs[0].child_ops} == {"linear"}
    assert any("sparse fp16 outliers summed by a runtime add" in line for line in res.ane_report)
    ids = np.array([[5, 17, 200, 3, 99, 410]], dtype=np.int32)
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids).long()).logits[0].numpy()
    out, _ = run_mil(res.path, {"input_ids": ids, "causal_mask": causal_mask(6, 0)}, None, program=prog)
    assert np.abs(out["logits"][0].astype(np.float32) - ref).max() < LOGIT_TOL


def test_ane_export_reads_back_bit_exact_and_runs(tmp_path):
    from converters.ane_runner import AneSession

    qm = _outlier_qm(seed=3)
    res = export_coreml(qm, tmp_path / "ane.mlpackage", context=32, prefill_len=8)
    prog, _ = load_program(res.path)

    def h(a):
        a = np.ascontiguousarray(np.asarray(a).reshape(a.shape[0], a.shape[1]))
        return hashlib.blake2b(a.view(np.uint16).tobytes() + str(a.shape).encode(), digest_size=16).hexdigest()

    want = {h(r.dequantize(torch.float32).half().numpy()) for r in qm.records.values()}
    for fn in ("prefill", "decode"):
        chains = weight_chains(prog, fn)
        assert {c["kind"] for c in chains} == {"lut_to_dense+sparse_to_dense", "lut_to_dense"}
        assert {h(chain_value(c)) for c in chains} == want
    ids = np.array([11, 250, 3, 77, 5, 9, 100, 200, 300, 1], dtype=np.int64)
    s = AneSession(res.path, backend="mil")
    got = np.concatenate([s.feed(ids[:8]), s.feed(ids[8:], prefill=False)])
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(got.astype(np.float32) - ref).max() < LOGIT_TOL


# ------------------------------------------------------------------------------------------ MLX, CLI
def test_mlx_refuses_then_requantizes_the_outliers_too():
    from mlx_backend.layout import layer_layout, mlx_quantize_record

    rec = quantize_weight(_heavy(32, 64), KMeansConfig(bits=4, group_size=16, outlier_frac=0.02, n_init=1))
    with pytest.raises(MacqError, match="look-up-table codes"):
        layer_layout("a", rec, torch.float16)
    out = layer_layout("a", rec, torch.float32, requant=(8, 32))
    ref = mlx_quantize_record(rec.dequantize(), 8, 32, torch.float32)     # mx.quantize of the full weight
    assert all(torch.equal(t, layer_layout("a", ref, torch.float32).tensors[k]) for k, t in out.tensors.items())
    mask = outlier_mask(rec)
    # what MLX gets holds the outliers (8-bit: within half a step of their values), not the dense LUT values there
    step = (ref.scales.float().abs().max()).item()
    assert (ref.dequantize()[mask] - rec.dequantize()[mask]).abs().max() <= 0.51 * step
    assert (rec.dense()[mask] - rec.dequantize()[mask]).abs().min() > step


from tests.test_cli import run_main as _run_main  # noqa: E402  (the same in-process CLI runner)


def test_cli_option_and_bad_value(tmp_path, monkeypatch, capsys):
    from macq.tiny import save_tiny_model

    tiny = save_tiny_model(tmp_path / "tiny", "llama")
    code, out, _ = _run_main(monkeypatch, capsys, "quantize", "--help")
    assert code == 0 and "--outlier-frac" in out
    code, _, err = _run_main(monkeypatch, capsys, "quantize", tiny, "--method", "kmeans", "--outlier-frac", "0.2",
                            "-o", tmp_path / "q")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --outlier-frac 0.2"), err
    assert not (tmp_path / "q").exists()
    code, out, err = _run_main(monkeypatch, capsys, "quantize", tiny, "--method", "kmeans", "--group-size", "16",
                              "--outlier-frac", "0.01", "-o", tmp_path / "ok", "--json")
    assert code == 0, err
    qm = QuantizedModel.load(tmp_path / "ok")
    assert all(r.n_outliers == round(0.01 * r.indices.numel()) for r in qm.records.values())
    assert json.loads(out)["bits_per_weight"] == pytest.approx(qm.bits_per_weight(), abs=1e-4)
