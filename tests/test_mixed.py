"""Mixed precision: format costs, sensitivities, recipes and the driver, on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from macq.errors import MacqError
from macq.quantizers.formats import TARGET_FORMATS, Format, candidate_formats, to_bias_form
from macq.quantizers.mixed import MixedConfig, quantize_model, sensitivity_table
from macq.quantizers.recipes import recipe_assignment, recipe_bpw, use_more_bits
from macq.quantizers.sensitivity import hessian_error, kl_sensitivity, make_units, spearman
from macq.tiny import tiny_model


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama_table(calib):
    return sensitivity_table(tiny_model("llama"), MixedConfig(sensitivity="proxy"), calib)


# ----------------------------------------------------------------------------------------- formats
def test_format_cost_matches_the_records_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    for shape in ((32, 128), (48, 64)):
        w = torch.randn(shape, generator=g)
        for f in TARGET_FORMATS["any"]:
            if not f.fits(shape):
                assert f.bits_per_weight(shape) == float("inf")
                continue
            rec = f.quantize(w)
            assert rec.storage_bits() == f.storage_bits(shape), f.name
            # a float element's error is relative: E2M1 keeps 1 mantissa bit, E4M3 3 (not the width's uniform step)
            width = {"mxfp4": 1, "nvfp4": 1, "mxfp8": 3}.get(f.name, f.bits - 1)
            assert (rec.dequantize() - w).pow(2).mean() < w.var() * 4.0 ** -width, f.name


def test_targets_list_only_what_the_runtime_stores():
    mlx = candidate_formats("mlx")
    assert len(mlx) == 21 and all(f.zero == "bias" for f in mlx if f.kind == "affine")
    assert [f.name for f in mlx if f.kind == "fp"] == ["mxfp4", "nvfp4", "mxfp8"]
    assert [Format.parse(m).bits_per_weight((64, 64)) for m in ("mxfp4", "nvfp4", "mxfp8")] == [4.25, 4.5, 8.25]
    assert Format.parse("a4g64b").bits_per_weight((64, 64)) == 4.5           # fp16 scale + fp16 bias per 64
    assert Format.parse("a4g64z").bits_per_weight((64, 64)) == 4 + 20 / 64   # fp16 scale + 4-bit zero
    assert Format.parse("lut4c16").bits_per_weight((32, 64)) == 4 + 16 * 16 / (16 * 64)
    core = candidate_formats("coreml")
    assert {f.bits for f in core if f.kind == "affine"} == {4, 8}
    assert {f.bits for f in core if f.kind == "lut"} == {2, 3, 4, 6, 8}
    with pytest.raises(MacqError, match="not supported by target 'mlx'"):
        candidate_formats("mlx", ("lut4c16",))
    with pytest.raises(MacqError, match="not supported by target 'coreml'"):
        candidate_formats("coreml", ("a3g64b",))
    with pytest.raises(MacqError, match="expected a<bits>"):
        Format.parse("q4_0")
    with pytest.raises(MacqError, match="format fp mode='mxfp4': expected one of"):
        Format("fp", 4, 16, "none", "mxfp4")                  # mxfp4's block is 32, not 16
    assert [f.name for f in candidate_formats("any", ("a3g64b", "lut2c16"))] == ["a3g64b", "lut2c16"]


def test_bias_form_keeps_the_weights():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    rec = Format.parse("a3g32z").quantize(w)
    b = to_bias_form(rec)
    assert b.zeros is None and b.biases.dtype == torch.float16
    assert torch.allclose(b.dequantize(), rec.dequantize(), atol=2e-3)
    assert b.storage_bits() == Format.parse("a3g32b").storage_bits((16, 64))


# ----------------------------------------------------------------------------------------- sensitivity
def test_proxy_is_the_output_error_on_calibration_inputs(calib, llama_table):
    model = tiny_model("llama")
    layer = model.model.layers[0]
    xs = []
    h = layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    h.remove()
    x = torch.cat(xs)
    name, j = "model.layers.0.self_attn.q_proj", 4
    w = layer.self_attn.q_proj.weight.detach()
    d = w - llama_table.formats[j].quantize(w).dequantize()
    direct = float((x @ d.T).pow(2).sum()) * 2 / x.shape[0]
    assert llama_table.errors[llama_table.units.index(name), j] == pytest.approx(direct, rel=1e-4)
    H = 2 * x.T @ x / x.shape[0]
    assert hessian_error(w, w - d, H) == pytest.approx(direct, rel=1e-4)


def test_proxy_falls_with_bits(llama_table):
    t = llama_table
    by = {f.name: i for i, f in enumerate(t.formats)}
    assert (t.errors[:, by["a2g64b"]] > t.errors[:, by["a4g64b"]]).all()
    assert (t.errors[:, by["a4g64b"]] > t.errors[:, by["a8g64b"]]).all()
    assert torch.isinf(t.bpw[t.units.index("model.layers.0.self_attn.q_proj"), by["a4g128b"]])  # in=64


def test_kl_sensitivity_restores_the_model_and_ranks_bits(calib):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = {n: model.get_submodule(n) for n in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj")}
    fmts = [Format.parse("a2g32b"), Format.parse("a8g32b")]
    t = kl_sensitivity(model, calib[:2], fmts, mods)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert t.errors.shape == (2, 2) and (t.errors[:, 0] > t.errors[:, 1]).all() and (t.errors >= 0).all()


def test_units_and_grouping(llama_table):
    units = make_units(llama_table.units, "sublayer", "model.layers")
    assert list(units) == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                           "model.layers.1.mlp"]
    g = llama_table.grouped(units)
    assert g.errors.shape == (4, len(g.formats)) and sum(g.sizes) == sum(llama_table.sizes)
    assert torch.allclose(g.errors.sum(0), llama_table.errors.sum(0))
    assert list(make_units(["lm_head", "model.layers.3.mlp.up_proj"], "layer", "model.layers")) == \
        ["lm_head", "model.layers.3"]


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, float("inf")])) == \
        pytest.approx(0.8660254, rel=1e-6)


# ----------------------------------------------------------------------------------------- driver
@pytest.mark.parametrize("target", [3.0, 3.25, 4.0, 5.1])
def test_driver_meets_target_from_below(calib, llama_table, target):
    model = tiny_model("llama")
    qm = quantize_model(model, MixedConfig(target_bpw=target), calib, table=llama_table)
    bpw = qm.bits_per_weight()
    assert target - 0.01 <= bpw <= target + 1e-12
    assert qm.method["achieved_bpw"] == bpw and set(qm.method["allocation"]) == set(qm.records)
    assert len(set(qm.method["allocation"].values())) > 1          # actually mixed, not uniform


def test_driver_error_falls_with_budget(calib, llama_table):
    errs = [quantize_model(tiny_model("llama"), MixedConfig(target_bpw=t), calib, table=llama_table)
            .method["total_error"] for t in (2.75, 3.0, 3.5, 4.0, 5.0)]
    assert all(b <= a for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0]


def test_driver_refuses_below_floor_and_caps_above(calib, llama_table):
    with pytest.raises(MacqError, match="below the floor"):
        quantize_model(tiny_model("llama"), MixedConfig(target_bpw=2.2), calib, table=llama_table)
    qm = quantize_model(tiny_model("llama"), MixedConfig(target_bpw=20.0), calib, table=llama_table)
    assert any("best format" in n for n in qm.method["notes"])


def test_gptq_base_method_and_layer_units(calib):
    model = tiny_model("llama")
    cfg = MixedConfig(target_bpw=3.5, base_method="gptq", granularity="layer", sensitivity="proxy")
    qm = quantize_model(model, cfg, calib)
    assert 3.49 <= qm.bits_per_weight() <= 3.5
    assert all(r.biases is not None and r.zeros is None for r in qm.records.values())  # MLX bias form
    per_layer = {}
    for m, f in qm.method["allocation"].items():
        per_layer.setdefault(m.split(".")[2], set()).add(f)
    assert all(len(v) == 1 for v in per_layer.values())             # one format per decoder layer


def test_coreml_target_tied_embeddings_and_roundtrip(calib, tmp_path):
    model = tiny_model("qwen2")
    cfg = MixedConfig(target_bpw=4.0, target="coreml", include_embeddings=True, sensitivity="proxy",
                      formats=("a4g32z", "a8g64s", "lut2c16", "lut4c16"))  # k-means is slow: a subset
    qm = quantize_model(model, cfg, calib)
    assert 3.99 <= qm.bits_per_weight() <= 4.0
    assert "model.embed_tokens" in qm.method["allocation"] and qm.tied == {"lm_head": "model.embed_tokens"}
    allowed = {f.name for f in TARGET_FORMATS["coreml"]}
    assert set(qm.method["allocation"].values()) <= allowed
    from macq.qmodel import QuantizedModel
    back = QuantizedModel.load(qm.save(tmp_path / "q"))
    assert back.bits_per_weight() == qm.bits_per_weight() and back.method["allocation"] == qm.method["allocation"]


def test_gpt2_conv1d(calib):
    qm = quantize_model(tiny_model("gpt2"), MixedConfig(target_bpw=3.0, formats=("a2g64b", "a3g64b", "a4g64b"),
                                                           sensitivity="proxy"),
                        calib)
    assert 2.99 <= qm.bits_per_weight() <= 3.0 and all(r.transposed for r in qm.records.values())


def test_config_validation():
    for kw, msg in ((dict(target="tflite"), "--target"), (dict(base_method="awq"), "--base-method"),
                    (dict(sensitivity="hutchinson"), "--sensitivity"), (dict(recipe="q9"), "--recipe"),
                    (dict(granularity="head"), "granularity"), (dict(formats=("lut4c16",)), "not supported")):
        with pytest.raises(MacqError, match=msg):
            MixedConfig(**kw)


# ----------------------------------------------------------------------------------------- recipes
def test_use_more_bits_is_llama_cpp_rule():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_recipe_assignment_and_computed_bpw(calib):
    model = tiny_model("llama", num_hidden_layers=8)
    qm = quantize_model(model, MixedConfig(recipe="q4_k_m-like"), calib)
    alloc = qm.method["allocation"]
    # use_more_bits(i, 8): layers 0, 3, 6, 7
    assert alloc["model.layers.0.self_attn.v_proj"] == "a6g64b" and alloc["model.layers.2.self_attn.v_proj"] == "a4g64b"
    assert alloc["model.layers.3.mlp.down_proj"] == "a6g64b" and alloc["model.layers.4.mlp.down_proj"] == "a4g64b"
    assert alloc["model.layers.3.mlp.up_proj"] == "a4g64b" and alloc["model.layers.3.self_attn.o_proj"] == "a4g64b"
    shapes = {n: tuple(r.shape) for n, r in qm.records.items()}
    fmts = recipe_assignment("q4_k_m-like", list(shapes), "model.layers", 8)
    assert recipe_bpw(fmts, shapes) == pytest.approx(qm.bits_per_weight(), abs=1e-12)
    assert 4.5 < qm.bits_per_weight() < 6.5
    with pytest.raises(MacqError, match="not supported by target 'coreml'"):
        quantize_model(tiny_model("llama"), MixedConfig(recipe="q3_k_m-like", target="coreml"), calib)


def test_fisher_sensitivity_tracks_kl(calib):
    """The Fisher estimate is a loss increase in nats: same order as the measured KL, same ranking by bits."""
    model = tiny_model("gpt2")                                        # Conv1D: Fisher transposed to [out, in]
    cfg = MixedConfig(sensitivity="fisher", formats=("a2g64b", "a4g64b", "a8g64b"))
    t = sensitivity_table(model, cfg, calib)
    assert all(p.requires_grad for p in model.parameters())          # requires_grad restored
    assert (t.errors[:, 0] > t.errors[:, 1]).all() and (t.errors[:, 1] > t.errors[:, 2]).all()
    qm = quantize_model(model, MixedConfig(target_bpw=3.5, sensitivity="fisher", formats=cfg.formats), calib,
                        table=t)
    assert 3.49 <= qm.bits_per_weight() <= 3.5


def test_mixed_model_exports_to_mlx_at_the_allocated_rate(calib, llama_table, tmp_path):
    """Per-layer formats become MLX per-module overrides; the written bits match the allocator's cost."""
    pytest.importorskip("mlx_lm")
    from macq.tiny import tiny_tokenizer
    from mlx_backend.export import export_mlx

    qm = quantize_model(tiny_model("llama"), MixedConfig(target_bpw=3.25), calib, table=llama_table)
    res = export_mlx(qm, tmp_path / "mlx", tokenizer=tiny_tokenizer())
    assert res.bits_per_weight == pytest.approx(qm.bits_per_weight(), abs=1e-12) == 3.25


def test_allocator_mixes_mlx_modes_and_mlx_lm_loads_them(calib, tmp_path):
    """The budgeted allocator chooses among affine and float modes; each module's mode reaches mlx_lm's config as
    a per-module override, mlx_lm loads it, and every layer's weights are the records' (``mx.dequantize``)."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten

    from macq.tiny import tiny_tokenizer
    from mlx_backend.export import export_mlx
    from mlx_backend.runner import load_mlx

    model = tiny_model("llama")
    cfg = MixedConfig(target_bpw=5.0, sensitivity="proxy", formats=("a3g64b", "mxfp4", "nvfp4", "mxfp8"))
    qm = quantize_model(model, cfg, calib)
    names = {qm.method["allocation"][m] for m in qm.method["allocation"]}
    assert {"mxfp8"} <= names and names & {"mxfp4", "nvfp4", "a3g64b"}, names   # a mixture, not one format
    assert 4.9 <= qm.bits_per_weight() <= 5.0
    res = export_mlx(qm, tmp_path / "mlx", tokenizer=tiny_tokenizer())
    assert res.bits_per_weight == pytest.approx(qm.bits_per_weight(), abs=1e-12)
    net, _ = load_mlx(tmp_path / "mlx")
    q = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    params = dict(tree_flatten(net.parameters()))
    for path, rec in qm.records.items():
        fmt = qm.method["allocation"][path]
        mode = fmt if fmt in ("mxfp4", "nvfp4", "mxfp8") else "affine"
        key = path.removeprefix("model.") if path.startswith("model.") else path
        entry = q.get(f"model.{key}", q.get(key, {"mode": q["mode"], "bits": q["bits"], "group_size": q["group_size"]}))
        assert entry["mode"] == mode, (path, entry)
        w = mx.dequantize(params[f"model.{key}.weight"], params[f"model.{key}.scales"],
                          params.get(f"model.{key}.biases"), group_size=entry["group_size"], bits=entry["bits"],
                          mode=mode)
        np.testing.assert_array_equal(np.array(w.astype(mx.float32)), rec.dequantize(torch.float16).float().numpy())
