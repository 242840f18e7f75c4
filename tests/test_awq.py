"""AWQ / AWQ→GPTQ on tiny models fed real bundled text."""

import pytest
import torch
import torch.nn.functional as F

from macq.data import calibration_samples
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules, set_weight
from macq.quantizers import awq_search as S
from macq.quantizers import make_config
from macq.quantizers import quantize_model as registry_quantize
from macq.quantizers.actquant import collect_input_stats
from macq.quantizers.awq import AWQConfig, AWQGPTQConfig, quantize_model
from macq.quantizers.calibration import capture_first_layer_inputs, module_inputs
from macq.quantizers.grid import fake_quantize
from macq.tiny import tiny_model, tiny_tokenizer

BITS, GROUP = 3, 32
FAST = dict(n_grid=10, clip_grid=10)   # coarser searches than the defaults keep the file quick


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(tiny_tokenizer(), "tinystories", 8, 64, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return calibration_samples(tiny_tokenizer(), "tinystories", 4, 64, seed=123)


def _rtn(model):
    for mod in quantizable_modules(model).values():
        w = get_weight(mod).detach()
        set_weight(mod, fake_quantize(w.reshape(w.shape[0], -1, GROUP), BITS, False).reshape(w.shape))
    return model


def _kl(ref, model, ids):
    with torch.no_grad():
        a, b = F.log_softmax(ref(ids).logits, -1), F.log_softmax(model(ids).logits, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.fixture(scope="module")
def llama_awq(calib):
    model = tiny_model("llama")
    qm = quantize_model(model, AWQConfig(bits=BITS, group_size=GROUP, **FAST), calib)
    return model, qm


def test_records_are_the_model_weights_and_to_torch_matches(llama_awq, held_out):
    model, qm = llama_awq
    assert set(qm.records) == set(quantizable_modules(model))
    for name, rec in qm.records.items():
        assert rec.bits == BITS and rec.group_size == GROUP and not rec.symmetric
        assert torch.equal(rec.dequantize(), get_weight(model.get_submodule(name)).detach())
    with torch.no_grad():
        assert torch.equal(model(held_out).logits, qm.to_torch()(held_out).logits)


def test_alpha_recorded_and_search_never_worse_than_nearest(llama_awq):
    _, qm = llama_awq
    scales = qm.method["stats"]["scales"]
    folded = {k: v for k, v in scales.items() if v["folded"]}
    assert len(folded) == 6   # 2 layers x (input_layernorm, post_attention_layernorm, up_proj); v->o is GQA
    assert [k for k, v in scales.items() if not v["folded"]] == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    for v in folded.values():
        assert 0.0 <= v["alpha"] < 1.0
        assert v["error"] <= v["error_rtn"]
    assert any(v["alpha"] > 0 and v["error"] < v["error_rtn"] for v in folded.values())


def test_awq_beats_rtn_on_real_activations(llama_awq, held_out):
    """First-layer block output on held-out text, and end-to-end KL vs the float model."""
    model, _ = llama_awq
    ref, rtn = tiny_model("llama"), _rtn(tiny_model("llama"))
    inp = capture_first_layer_inputs(ref, held_out)
    kw = inp.kwargs[0]
    with torch.no_grad():
        y = ref.model.layers[0](inp.hidden[0], **kw)
        err_awq = (model.model.layers[0](inp.hidden[0], **kw) - y).pow(2).sum()
        err_rtn = (rtn.model.layers[0](inp.hidden[0], **kw) - y).pow(2).sum()
    assert err_awq < err_rtn
    assert _kl(ref, model, held_out) < _kl(ref, rtn, held_out)


@pytest.mark.parametrize("arch,kw", [("qwen2", {}), ("gpt2", dict(salience="l2", duo_scaling=True, symmetric=True))])
def test_end_to_end_other_archs(arch, kw, calib, held_out):
    model = tiny_model(arch)
    qm = registry_quantize(model, "awq", calib=calib, bits=4, group_size=16, **FAST, **kw)
    assert all(r.symmetric == kw.get("symmetric", False) for r in qm.records.values())
    assert len(qm.records) == len(quantizable_modules(model))
    assert all(r.transposed == (arch == "gpt2") for r in qm.records.values())
    with torch.no_grad():
        torch.testing.assert_close(model(held_out).logits, qm.to_torch()(held_out).logits, rtol=0, atol=0)


def test_greedy_rounding_reduces_mean_output_error(calib):
    """On real activations: never increases |E[X]·(w − ŵ)| per row, reduces it overall, touches no protected channel."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    inp = capture_first_layer_inputs(model, calib)
    xs = []
    with module_inputs(layer, ["mlp.down_proj"], lambda _n, x: xs.append(x)):
        with torch.no_grad():
            layer(inp.hidden[0], **inp.kwargs[0])
    x = torch.cat(xs)
    w = get_weight(layer.mlp.down_proj).detach().float()
    codes, scale, zero, bias = S.nearest_codes(w, BITS, GROUP, False, torch.float16)
    mean = x.mean(0)
    protect = torch.zeros(w.shape[1], dtype=torch.bool)
    protect[x.abs().mean(0).topk(4).indices] = True
    new = S.greedy_round(w, codes, scale, zero, BITS, mean, protect)
    before = S.mean_error(w, S.dequant(codes, scale, zero, bias, BITS), mean).abs()
    after = S.mean_error(w, S.dequant(new, scale, zero, bias, BITS), mean).abs()
    assert (after <= before + 1e-6).all()
    assert after.sum() < 0.5 * before.sum()
    diff = (new.int() - codes.int()).reshape(w.shape)
    assert diff.abs().max() == 1 and (diff[:, protect] == 0).all()
    # The proxy is the real mean output error on these activations.
    w_hat = S.dequant(new, scale, zero, bias, BITS)
    torch.testing.assert_close(after, ((x @ (w - w_hat).T).mean(0)).abs(), rtol=1e-3, atol=1e-4)


def test_greedy_end_to_end(calib):
    model = tiny_model("gpt2")
    qm = quantize_model(model, AWQConfig(bits=BITS, group_size=GROUP, greedy_rounding=True, **FAST), calib[:4])
    ratios = [v["greedy_ratio"] for v in qm.method["stats"]["linears"].values()]
    assert len(ratios) == 8 and max(ratios) <= 1.0 and min(ratios) < 0.9
    for name, rec in qm.records.items():
        assert torch.equal(rec.dequantize(), get_weight(model.get_submodule(name)).detach())


def test_clip_search_per_group_never_worse():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    h = x.T @ x
    clip = S.search_clip(w, h, BITS, GROUP, False, torch.float16)
    assert clip.shape == (16, 2) and (clip <= 1).all() and (clip >= 0.5).all() and (clip < 1).any()
    def per_group(c):
        d = S.grouped(w - S.fq(w, BITS, GROUP, False, torch.float16, c), GROUP)
        hb = h.reshape(2, GROUP, 2, GROUP).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return torch.einsum("ogk,gkl,ogl->og", d, hb, d)
    assert (per_group(clip) <= per_group(1.0) + 1e-4).all()


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_picks_what_a_float64_scan_of_every_candidate_picks(sym, monkeypatch):
    """Searched a few rows at a time (a ragged last block), against every candidate scored in float64 with the
    grid written out here: scale rounded to fp16, codes ``clamp(round(w/s) + z)``."""
    monkeypatch.setattr(S, "CLIP_ELEMENTS", 3 * 256)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 256, generator=g) * torch.exp(0.5 * torch.randn(40, 256, generator=g))
    x = torch.randn(512, 256, generator=g) * torch.linspace(0.1, 3, 256)
    h = x.T @ x
    clip = S.search_clip(w, h, 4, 128, sym, torch.float16)          # [40, 2]
    wd, hd = w.double().view(40, 2, 128), h.double()
    hb = torch.stack([hd[k * 128:(k + 1) * 128, k * 128:(k + 1) * 128] for k in range(2)])
    factors = [1.0 - 0.5 * i / 20 for i in range(20)]
    errs = []
    for c in factors:
        c32 = torch.tensor(c, dtype=torch.float32).double()
        lo, hi = wd.amin(-1) * c32, wd.amax(-1) * c32
        if sym:
            s = (2 * torch.maximum(lo.abs(), hi.abs()) / 15).half().double()
            z = torch.full_like(s, 8.0)
        else:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            s = ((hi - lo) / 15).half().double()
            z = torch.round(-lo / s).clamp(0, 15)
        q = s[..., None] * ((torch.round(wd / s[..., None]) + z[..., None]).clamp(0, 15) - z[..., None])
        d = q - wd
        errs.append(torch.einsum("ogk,gkl,ogl->og", d, hb, d))
    errs = torch.stack(errs)                                          # [20, 40, 2]
    best = errs.argmin(0)
    dist = (clip.double()[None] - torch.tensor(factors, dtype=torch.float64)[:, None, None]).abs()
    picked = dist.argmin(0)                                           # the candidate each group kept
    assert (dist.min(0).values < 1e-6).all()
    assert (picked == best).double().mean() >= 0.97
    chosen = errs.gather(0, picked[None])[0]
    assert chosen.sum() <= 1.001 * errs.min(0).values.sum()


def test_awq_gptq_chaining(calib, held_out):
    ref, model = tiny_model("llama"), tiny_model("llama")
    qm = registry_quantize(model, "awq-gptq", calib=calib, bits=BITS, group_size=GROUP, **FAST)
    assert qm.method["method"] == "awq-gptq"
    for name, rec in qm.records.items():
        assert torch.equal(rec.dequantize(), get_weight(model.get_submodule(name)).detach())
    with torch.no_grad():
        assert torch.equal(model(held_out).logits, qm.to_torch()(held_out).logits)
    assert _kl(ref, model, held_out) < _kl(ref, _rtn(tiny_model("llama")), held_out)


def test_stats_rescale_is_exact(calib):
    """Folding s makes the linears' inputs X / s: rescaled statistics equal freshly collected ones."""
    from macq.arch import arch_spec
    from macq.quantizers.fold import fold_scales

    model = tiny_model("qwen2")
    layer, spec = model.model.layers[0], arch_spec(model)
    inp = capture_first_layer_inputs(model, calib[:2])
    grp = [spec.sequence[0]]
    st = collect_input_stats(layer, inp, grp, gram=True)[grp[0]]
    s = torch.exp(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    fold_scales(layer, spec.mappings[0], s)
    st.rescale(s)
    fresh = collect_input_stats(layer, inp, grp, gram=True)[grp[0]]
    torch.testing.assert_close(st.gram, fresh.gram, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(st.abs_mean, fresh.abs_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.mean, fresh.mean, rtol=1e-4, atol=1e-5)


def test_inputs_wider_than_the_tokens_are_kept_and_rank_alphas_as_the_gram_does(calib):
    """Where a group's input is wider than the calibration has tokens (down_proj at 8B: 14336 inputs, 4096
    tokens) the inputs are kept and the α search's error comes from them: the same α and errors as from the Gram,
    before and after a scale is folded into them."""
    from macq.arch import arch_spec
    from macq.quantizers.actquant import input_groups

    model = tiny_model("llama")
    layer, spec = model.model.layers[0], arch_spec(model)
    inp = capture_first_layer_inputs(model, calib[:1, :40])     # 40 tokens: fewer than some inputs are wide
    groups = input_groups(layer, spec.sequence)
    st = collect_input_stats(layer, inp, groups, gram=True)
    kept = {grp for grp, v in st.items() if v.x is not None}
    widths = {grp: v.gram.shape[0] for grp, v in st.items()}
    assert kept == {grp for grp, c in widths.items() if c > 40} and kept
    grp = next(iter(kept))
    v = st[grp]
    torch.testing.assert_close(v.x.double().T @ v.x.double(), v.gram, rtol=1e-5, atol=1e-4)
    w = torch.cat([get_weight(layer.get_submodule(n)).detach().float() for n in grp])
    for _ in range(2):
        a = S.search_scale(w, v.gram, v.abs_mean, BITS, GROUP, False, torch.float16, 10)
        b = S.search_scale(w, v.gram, v.abs_mean, BITS, GROUP, False, torch.float16, 10, x=v.x)
        assert a[1] == b[1] and torch.equal(a[0], b[0])
        assert b[2] == pytest.approx(a[2], rel=1e-4) and b[3] == pytest.approx(a[3], rel=1e-4)
        v.rescale(a[0] * 1.7)                                    # X / s: both forms follow
        torch.testing.assert_close(v.x.double().T @ v.x.double(), v.gram, rtol=1e-4, atol=1e-4)


def test_alpha_search_in_row_chunks_is_the_search_in_one(monkeypatch):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    h = (x.T @ x).double()
    sal = x.abs().mean(0)
    whole = S.search_scale(w, h, sal, BITS, GROUP, False, torch.float16, 10)
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", 64 * 10)            # 10 rows a chunk, the last one ragged
    chunked = S.search_scale(w, h, sal, BITS, GROUP, False, torch.float16, 10)
    assert chunked[1] == whole[1] and torch.equal(chunked[0], whole[0])
    assert chunked[2] == pytest.approx(whole[2], rel=1e-5) and chunked[3] == pytest.approx(whole[3], rel=1e-5)


@pytest.mark.parametrize("kw", [dict(bits=1), dict(salience="max"), dict(n_grid=0), dict(outlier_fraction=1.5),
                                dict(group_size=-1), dict(scale_dtype="int8")])
def test_bad_config(kw):
    with pytest.raises(MacqError):
        AWQConfig(**kw)


def test_bad_inputs(calib):
    with pytest.raises(MacqError):
        AWQGPTQConfig(greedy_rounding=True)
    with pytest.raises(MacqError):   # 48 does not divide the tiny model's input dims (64, 128)
        quantize_model(tiny_model("gpt2"), AWQConfig(group_size=48), calib[:1])
    with pytest.raises(MacqError):
        quantize_model(tiny_model("gpt2"), AWQConfig(), None)
    assert isinstance(make_config("awq", bits=3, group_size=64), AWQConfig)


def test_awq_gptq_static_grid_keeps_awqs_clipped_grid():
    """static_grid (the default): GPTQ rounds onto the per-group grid of AWQ's clipped weights, computed
    independently here with grid.affine_params; the re-derived (dynamic) grid moves away from it."""
    from macq.quantizers import grid
    from macq.quantizers.awq_search import clamp_to_clip
    from macq.quantizers.gptq import gptq_quantize

    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    x = torch.randn(512, 8) @ torch.randn(8, 128) + 0.1 * torch.randn(512, 128)   # correlated inputs
    h = (x.T @ x).double() / 512
    clamped = clamp_to_clip(w, torch.full((16, 2), 0.8), 64, False)
    want, _, _ = grid.affine_params(clamped.double().view(16, 2, 64), 3, False, "int", torch.float16)
    static = gptq_quantize(clamped, h, AWQGPTQConfig(bits=3, group_size=64).gptq_config())[0]
    dynamic = gptq_quantize(clamped, h, AWQGPTQConfig(bits=3, group_size=64, static_grid=False).gptq_config())[0]
    assert torch.equal(static.scales.float().view(16, 2), want.float().view(16, 2))
    assert not torch.equal(dynamic.scales.float().view(16, 2), want.float().view(16, 2))
    assert AWQGPTQConfig().static_grid and AWQGPTQConfig.from_dict(AWQGPTQConfig(static_grid=False).to_dict()).static_grid is False
    with pytest.raises(MacqError, match="--act-order needs --static-grid"):
        AWQGPTQConfig(act_order=True, static_grid=False)
