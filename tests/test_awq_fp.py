"""AWQ / AWQ→GPTQ on MLX's float grids (mxfp4, nvfp4, mxfp8): records on the grid in MLX's bytes, exported and
read back by mlx (``mx.dequantize``) to the records' exact values, output error below RTN's (``mx.quantize``'s)
on correlated inputs, and the combinations that cannot work refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macq.data import calibration_samples
from macq.errors import MacqError
from macq.microscale import fp_format
from macq.models import get_weight, quantizable_modules
from macq.quantizers import awq_search as S
from macq.quantizers import make_config, quantize_model
from macq.quantizers.awq import AWQConfig, AWQGPTQConfig
from macq.quantizers.mxfp import mlx_fp_quantize, round_on
from macq.record import FPRecord
from macq.tiny import save_tiny_model, tiny_model, tiny_tokenizer

MODES = ("mxfp4", "nvfp4", "mxfp8")
FAST = dict(n_grid=10, clip_grid=10)


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(tiny_tokenizer(), "tinystories", 8, 64, seed=0)


def _valid_bytes(rec: FPRecord) -> None:
    """Every element code fits the format and is not a NaN pattern; every scale byte decodes to a finite,
    positive (or, for an all-zero block, zero) scale."""
    fmt = rec.format
    assert int(rec.codes.max()) < 2 ** fmt.bits
    if fmt.element == "e4m3":
        assert not ((rec.codes & 0x7F) == 0x7F).any()
    s = rec.block_scales()
    assert torch.isfinite(s).all() and (s >= 0).all()
    assert torch.isfinite(rec.dequantize()).all()


@pytest.mark.parametrize("method,mode", [("awq", m) for m in MODES] + [("awq-gptq", "nvfp4")])
def test_records_on_grid_export_reads_back_in_mlx(tmp_path, calib, method, mode):
    """The quantized model's weights are the records' values; the MLX export loads in mlx_lm, which rebuilds each
    layer in the mode and ``mx.dequantize`` gives back the record's exact value (float32 run); logits match torch."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_backend import export_mlx, load_mlx, mlx_logits

    model = tiny_model("llama")
    cfg = make_config(method, mode=mode, include_embeddings=True, **FAST)
    qm = quantize_model(model, method, cfg, calib=calib)
    assert set(qm.records) == set(quantizable_modules(model, True, False))
    for name, rec in qm.records.items():
        assert isinstance(rec, FPRecord) and rec.mode == mode, name
        _valid_bytes(rec)
        if name in quantizable_modules(model):       # decoder linears: the model holds exactly the record
            assert torch.equal(rec.dequantize(), get_weight(model.get_submodule(name)).detach()), name
    changed = [v["scale_changed"] for v in qm.method["stats"]["linears"].values()]
    if mode != "mxfp8":      # the clip search really chose other scale bytes than MLX's somewhere
        assert max(changed) > 0
    export_mlx(qm, tmp_path / "m", dtype="float32", tokenizer=save_tiny_model(tmp_path / "hf", "llama"))
    loaded = load_mlx(tmp_path / "m")
    for name, rec in qm.records.items():
        mod = loaded[0]
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        assert mod.mode == mode and mod.group_size == fp_format(mode).group_size, name
        w = mx.dequantize(mod.weight, mod.scales, None, mod.group_size, mod.bits, mode=mode, dtype=mx.float32)
        np.testing.assert_array_equal(np.array(w), rec.dequantize().numpy(), err_msg=name)
    ids = np.array([3, 17, 101, 7, 250, 33, 480, 12, 64, 9, 300, 2], dtype=np.int64)
    with torch.no_grad():
        lt = qm.to_torch()(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert float(np.abs(mlx_logits(loaded, ids) - lt).max() / np.abs(lt).max()) < 1e-4


def _correlated(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with correlated channels and a few salient ones (AWQ's setting): ``(X [t, n], H = XᵀX)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.2 + torch.eye(n))
    x[:, torch.randperm(n, generator=g)[:8]] *= 12.0
    return x, x.T.double() @ x.double()


def _out_err(w_hat: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    d = w_hat.double() - w.double()
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("mode", MODES)
def test_scale_and_clip_search_beat_rtn_output_error(mode):
    """One linear, AWQ's two searches on a float grid: α over the salience powers, then each block's scale byte on
    the output error; the rounded weight (unscaled back: what the folded model computes) has a layer-output
    error ‖X(Ŵ − W)ᵀ‖², recomputed here in float64 from the codes, well below ``mx.quantize``'s RTN."""
    x, h = _correlated()
    fmt = fp_format(mode)
    w = (torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05).half().float()
    codes, byte = mlx_fp_quantize(w, mode)
    rtn = FPRecord(codes=codes, scales=byte, mode=mode).dequantize()
    quant = S.fp_fake_quant(fmt, torch.float16)
    s, alpha, err, err0 = S.search_scale(w, h.float(), x.abs().mean(0), fmt.bits, fmt.group_size, True,
                                         torch.float16, 10, quant=quant)
    assert alpha > 0 and err < err0
    ws = w * s
    byte, div = S.search_fp_scales(ws, h / (s.double().unsqueeze(0) * s.double().unsqueeze(1)), fmt, torch.float16)
    codes, _ = round_on(S.grouped(ws, fmt.group_size).double(), div, fmt)
    rec = FPRecord(codes=codes.reshape(w.shape), scales=byte[..., 0], mode=mode)
    ours, base = _out_err(rec.dequantize() / s, w, h), _out_err(rtn, w, h)
    assert ours < {"mxfp4": 0.85, "nvfp4": 0.5, "mxfp8": 0.93}[mode] * base, (ours, base)   # measured 0.78 / 0.34 / 0.87


@pytest.mark.parametrize("mode", ("mxfp4", "nvfp4"))
def test_block_scale_choice_never_worse_per_block(mode):
    """The clip search's choice is never worse than MLX's own byte on each block's output error d_g H_gg d_gᵀ."""
    _, h = _correlated(128, seed=2)
    fmt = fp_format(mode)
    g = fmt.group_size
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05).half().float()
    byte, div = S.search_fp_scales(w, h.float(), fmt, torch.float16)
    wg = S.grouped(w, g).double()
    hb = S.block_diagonal(h, g).double()

    def block_err(d_codes_div) -> torch.Tensor:
        d = round_on(wg, d_codes_div, fmt)[1] - wg
        return torch.einsum("ogk,gkl,ogl->og", d, hb, d)

    codes, mlx_byte = mlx_fp_quantize(w, mode)
    mlx_div = FPRecord(codes=codes, scales=mlx_byte, mode=mode).block_scales().double().unsqueeze(-1)
    ours, theirs = block_err(div), block_err(mlx_div)
    assert bool((ours <= theirs * (1 + 1e-6) + 1e-12).all())
    assert float(ours.sum()) < 0.95 * float(theirs.sum())
    assert bool((byte[..., 0] != mlx_byte).any())


def test_bad_combinations_refused():
    with pytest.raises(MacqError, match="--group-size 64: --mode nvfp4 stores 4-bit codes with one scale per 16"):
        AWQConfig(mode="nvfp4", group_size=64)
    with pytest.raises(MacqError, match="--bits 3: --mode mxfp4"):
        AWQConfig(mode="mxfp4", bits=3)
    with pytest.raises(MacqError, match="--greedy-rounding: integer-grid only, not --mode mxfp4"):
        AWQConfig(mode="mxfp4", greedy_rounding=True)
    with pytest.raises(MacqError, match="--mode 'fp4': expected one of affine, mxfp4, nvfp4, mxfp8"):
        AWQConfig(mode="fp4")
    with pytest.raises(MacqError, match="--act-order: --mode nvfp4 blocks are contiguous input columns"):
        AWQGPTQConfig(mode="nvfp4", act_order=True)
    with pytest.raises(MacqError, match="--mode mxfp4: learned tunes continuous affine scales"):
        make_config("learned", mode="mxfp4")
    cfg = AWQConfig(mode="mxfp8")
    assert (cfg.bits, cfg.group_size) == (8, 32) and AWQConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_refuses_learned_float_mode_before_work(tmp_path, capsys):
    from macq.cli import main

    src = save_tiny_model(tmp_path / "hf", "llama")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), "--method", "learned", "--mode", "nvfp4", "-o", str(tmp_path / "q")])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "--mode nvfp4: learned tunes continuous affine scales" in err[0], err
    assert not (tmp_path / "q").exists()
