"""Every path on every registry row: a tiny random model per family (``macq.tiny.TINY_CONFIGS``, built from the real
HF config classes) run through the row's facts against HF itself, RTN / NF4 / k-means, GPTQ, AWQ and SmoothQuant
folding (exact on the float model), the MLX export loaded by ``mlx_lm.load`` and the Core ML export run by MIL
value inference (or refused in one line, before any conversion, for families without a Core ML definition).

References: HF's own modules and forward (norms, embeddings, windows, logits), float64 recomputation of the
norm formula, mlx_lm's model (logits of our export), the MIL program of our package (logits).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from macq.arch import ARCHITECTURES, FAMILIES, arch_spec
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.quantizers import quantize_model
from macq.quantizers.awq import AWQConfig, fold_model
from macq.quantizers.fold import can_fold
from macq.quantizers.smoothquant import smooth_model
from macq.tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

CASES = list(TINY_CONFIGS)
IDS = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))


def family_model(arch: str) -> torch.nn.Module:
    """The tiny model with every norm weight (and LayerNorm bias) moved away from its neutral value, so that
    folding into a norm, and Gemma's 1 + w, are really exercised."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_row_has_a_tiny_model():
    covered = {tiny_model(a).config.model_type for a in CASES}
    assert covered == set(ARCHITECTURES), set(ARCHITECTURES) ^ covered
    assert len({row.family for row in FAMILIES}) == len(FAMILIES)


# ------------------------------------------------------------------------------------------ the row vs HF
def _norm_reference(x: torch.Tensor, mod: torch.nn.Module, kind: str, offset: float) -> torch.Tensor:
    """The row's formula in float64 from the module's own parameters."""
    x = x.double()
    eps = next(getattr(mod, a) for a in ("variance_epsilon", "eps") if hasattr(mod, a))
    if kind == "rms":
        xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        xh = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    y = xh * (offset + mod.weight.double())
    return y + mod.bias.double() if getattr(mod, "bias", None) is not None else y


@pytest.mark.parametrize("arch", CASES)
def test_row_matches_hf(arch):
    model = family_model(arch)
    spec, cfg = arch_spec(model), model.config
    layers = model.get_submodule(spec.layers)
    layer = layers[0]
    # every linear of a layer is in the GPTQ sequence exactly once, and nothing else is
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)}
    seq = [n for grp in spec.sequence for n in grp]
    assert sorted(seq) == sorted(linears)
    assert {n for n in linears if is_conv1d(layer.get_submodule(n))} == set(spec.conv1d)
    # norm formula (Gemma: 1 + w), per layer and final
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    norms = {name: layer.get_submodule(name) for name in spec.norms} | {spec.final_norm: model.get_submodule(spec.final_norm)}
    # the row lists every norm of the layer
    assert set(spec.norms) == {n for n, m in layer.named_children() if hasattr(m, "weight") and m.weight.dim() == 1}
    for name, mod in norms.items():
        with torch.no_grad():
            got = mod(x).double()
        assert torch.allclose(got, _norm_reference(x, mod, spec.norm.kind, spec.norm.offset), atol=1e-5, rtol=1e-5), name
    # per-head q/k norms: same formula, over head_dim
    for name in spec.attention.qk_norms:
        mod = layer.get_submodule(name)
        xh = torch.randn(2, 3, mod.weight.numel(), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.allclose(mod(xh).double(), _norm_reference(xh, mod, "rms", spec.norm.offset), atol=1e-5)
    # what the first decoder layer receives = embedding rows x the row's multiplier (+ learned positions)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, a, kw) -> None:
        seen["x"] = a[0] if a else kw["hidden_states"]
    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    logits(model)
    h.remove()
    want = model.get_submodule(spec.embed).weight[IDS[0]].double() * spec.embedding_multiplier(cfg)
    for extra in spec.extra_embeds:
        want = want + model.get_submodule(extra).weight[: IDS.shape[1]].double()
    assert torch.allclose(seen["x"][0].double(), want, rtol=1e-3, atol=1e-5)
    # fused projections: the parts tile the rows exactly
    for f in spec.fused:
        sl = spec.fused_slices(cfg)[f.module]
        assert sorted(sl.values())[0][0] == 0 and max(e for _, e in sl.values()) == get_weight(layer.get_submodule(f.module)).shape[0]
    # sliding windows: HF attention modules that store one agree with the row
    windows = spec.layer_windows(cfg)
    for i, lay in enumerate(layers):
        attn = lay.get_submodule(spec.sequence[1][0].rpartition(".")[0])
        if hasattr(attn, "sliding_window"):
            assert attn.sliding_window == windows[i]
    assert spec.max_positions(cfg) == 256
    a_cap, f_cap = spec.softcaps(cfg)
    assert (a_cap is not None) == (arch == "gemma2") and (f_cap is not None) == (arch == "gemma2")


# ------------------------------------------------------------------------------------------ weight methods
@pytest.mark.parametrize("arch", CASES)
def test_weight_methods(arch, tmp_path):
    model = family_model(arch)
    ref = logits(model)
    n_linear = len(quantizable_modules(model))
    # RTN also quantizes the embedding (Gemma's is scaled by sqrt(hidden) in forward, GPT-2's is tied to lm_head)
    bounds = {"rtn": ({"bits": 8, "group_size": 0, "include_embeddings": True}, 0.05), "nf4": ({"block_size": 64}, 0.5),
              "kmeans": ({"bits": 4, "group_size": 16, "n_init": 1, "n_iter": 10}, 0.5)}
    errs = {}
    for method, (kw, bound) in bounds.items():
        qm = quantize_model(copy.deepcopy(model), method, **kw)
        assert len(qm.records) == n_linear + kw.get("include_embeddings", False)
        errs[method] = err = rel(logits(qm.to_torch()), ref)
        assert err < bound, (method, err)
        if method == "rtn":   # the directory round trip rebuilds the same model
            qm.save(tmp_path / "q", tokenizer=tiny_tokenizer())
            assert torch.equal(logits(QuantizedModel.load(tmp_path / "q").to_torch()), logits(qm.to_torch()))
    print(f"\n{arch}: logits rel err " + " ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    assert errs["rtn"] < errs["nf4"] / 4 and errs["rtn"] < errs["kmeans"] / 4   # 8 bits: a 16x finer grid


@pytest.mark.parametrize("arch", CASES)
def test_gptq_beats_rtn_on_calibration(arch):
    """Same grid (3-bit asymmetric g32, min/max): GPTQ's error feedback lowers the error on its own data."""
    model = family_model(arch)
    ref = logits(model, CALIB)
    kw = dict(bits=3, group_size=32, symmetric=False)
    rtn = quantize_model(copy.deepcopy(model), "rtn", **kw)
    gptq = quantize_model(copy.deepcopy(model), "gptq", calib=CALIB, mse_clip=False, **kw)
    assert gptq.records.keys() == rtn.records.keys()
    e_rtn, e_gptq = rel(logits(rtn.to_torch(), CALIB), ref), rel(logits(gptq.to_torch(), CALIB), ref)
    print(f"\n{arch}: logits rel err on calibration rtn {e_rtn:.4f} gptq {e_gptq:.4f}")
    assert e_gptq < e_rtn


# ------------------------------------------------------------------------------------------ folding
def _expected_folds(model) -> int:
    """Mappings whose producer's (part's) channels line up with the linears' inputs (GQA skips v -> o);
    every mapping out of a norm must be among them."""
    spec = arch_spec(model).resolved(model.config)
    layer = model.get_submodule(spec.layers)[0]
    ok = [m for m in spec.mappings if can_fold(layer, m)]
    assert {m.prev for m in spec.mappings if m.prev in spec.norms} <= {m.prev for m in ok}
    return len(ok) * len(model.get_submodule(spec.layers))


@pytest.mark.parametrize("arch", CASES)
def test_awq_and_smoothquant_folding_exact(arch):
    model = family_model(arch)
    ref = logits(model)
    for name, fold in (("awq", lambda m: fold_model(m, AWQConfig(bits=3, group_size=32, n_grid=4), CALIB)),
                       ("smoothquant", lambda m: smooth_model(m, CALIB, alpha=0.5))):
        m = copy.deepcopy(model)
        stats = fold(m)
        folded = [k for k, v in stats.items() if v["folded"]]
        assert len(folded) == _expected_folds(model), (name, stats)
        err = rel(logits(m), ref)
        assert err < 1e-5, (name, err)


# ------------------------------------------------------------------------------------------ MLX
@pytest.mark.parametrize("arch", CASES)
def test_mlx_export_loads_and_matches_torch(arch, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_backend import export_mlx, load_mlx, mlx_logits

    model = family_model(arch)
    qm = quantize_model(model, "rtn", bits=4, group_size=32, symmetric=False, zero_point="float",
                        include_embeddings=True)
    export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float32")
    from mlx_lm.utils import _get_classes, load_config  # the module mlx_lm picks is the row's model type

    assert _get_classes(load_config(tmp_path / "m"))[0].__module__ == f"mlx_lm.models.{arch_spec(model).mlx.model_type}"
    got = mlx_logits(load_mlx(tmp_path / "m"), IDS[0].numpy())
    want = logits(qm.to_torch())[0].numpy()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\n{arch}: mlx_lm vs torch (same records) max rel err {err:.2e}")
    assert err < 1e-4


# ------------------------------------------------------------------------------------------ Core ML
# One conversion per family (a conversion costs ~20 s on 2 loaded cores; llama3 differs from llama only in
# rope constants). Mistral runs with a 4-token window over 8 tokens: the MIL program must hide keys past it.
CORE_CASES = [a for a in CASES if a != "llama3"]
CORE_OVERRIDES = {"mistral": {"sliding_window": 4}}


@pytest.mark.parametrize("arch", CORE_CASES)
def test_coreml_export_runs_or_is_refused_early(arch, tmp_path, monkeypatch):
    pytest.importorskip("coremltools")
    import converters.convert as cc
    from converters import export_coreml

    model = family_model(arch)
    for k, v in CORE_OVERRIDES.get(arch, {}).items():
        setattr(model.config, k, v)
    spec = arch_spec(model)
    qm = quantize_model(model, "rtn", bits=4, group_size=32, symmetric=False)
    if spec.coreml is None:
        def never(*_a, **_k):
            raise AssertionError("conversion started for a refused family")
        monkeypatch.setattr(cc, "convert_torch", never)
        with pytest.raises(MacqError, match=f"does not support the {spec.family} family"):
            export_coreml(qm, tmp_path / "m.mlpackage", context=16)
        assert not (tmp_path / "m.mlpackage").exists()
        return
    from converters.inspect import load_program
    from converters.mil_runner import run_mil
    from converters.wrapper import causal_mask

    t0 = time.perf_counter()
    res = export_coreml(qm, tmp_path / "m.mlpackage", context=16, graph="hf")  # the traced graph: windows, q/k norms
    prog, _ = load_program(res.path)
    ids = IDS[:, :8].numpy().astype(np.int32)
    out, state = run_mil(res.path, {"input_ids": ids[:, :6], "causal_mask": causal_mask(6, 0)}, program=prog)
    steps = [out["logits"][0]]
    for i in (6, 7):
        out, state = run_mil(res.path, {"input_ids": ids[:, i:i + 1], "causal_mask": causal_mask(1, i)}, state, prog)
        steps.append(out["logits"][0])
    got = np.concatenate(steps).astype(np.float32)
    want = logits(qm.to_torch(), IDS[:, :8])[0].numpy()
    err = float(np.abs(got - want).max())
    print(f"\n{arch}: Core ML (MIL) vs torch max abs logit err {err:.2e} ({time.perf_counter() - t0:.1f}s)")
    assert err < 3e-2
