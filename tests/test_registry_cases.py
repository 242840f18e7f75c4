"""The three cases the registry exists for, each failing on the code before it: Gemma's (1 + w) norms under scale
folding, Phi-3's fused projections, and sliding-window attention in the Core ML wrapper (and what MLX does
with it). References: float64 recomputation of the fold, HF's own forward, mlx_lm's model."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from macq.arch import LLAMA, ScaleMapping, arch_spec
from macq.errors import MacqError
from macq.models import get_weight
from macq.quantizers import quantize_model
from macq.quantizers.fold import can_fold, fold_scales
from macq.tiny import tiny_model, tiny_tokenizer

IDS = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _with_random_norms(arch: str, **overrides):
    model = tiny_model(arch, **overrides)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _fold_all(model, mappings, seed=2) -> int:
    spec = arch_spec(model)
    g = torch.Generator().manual_seed(seed)
    n = 0
    for layer in model.get_submodule(spec.layers):
        for m in mappings:
            if can_fold(layer, m):
                c = get_weight(layer.get_submodule(m.linears[0])).shape[1]
                fold_scales(layer, m, torch.exp(torch.randn(c, generator=g)))
                n += 1
    return n


# ------------------------------------------------------------------------------------------ Gemma
@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_fold_into_one_plus_w_norm_is_exact(arch):
    model = _with_random_norms(arch)
    ref = _logits(model)
    spec = arch_spec(model)
    layer = model.get_submodule(spec.layers)[0]
    norm = layer.get_submodule("pre_feedforward_layernorm")
    w0 = norm.weight.detach().double().clone()
    s = torch.exp(torch.randn(w0.numel(), generator=torch.Generator().manual_seed(7)))
    (m,) = [m for m in spec.mappings if m.prev == "pre_feedforward_layernorm"]
    assert m.norm_offset == 1.0
    fold_scales(layer, m, s)
    want = ((1 + w0) / s.double() - 1).float()          # w' = (1 + w) / s - 1, in float64
    assert torch.equal(norm.weight.detach(), want)
    assert _fold_all(model, spec.mappings) == 6          # 2 layers x 4 mappings, v -> o skipped (GQA)
    assert _rel(_logits(model), ref) < 1e-5


def test_llama_row_on_gemma_changes_the_model():
    """Why Gemma needs its own row: Llama's mappings fold into post_attention_layernorm (which feeds no linear
    in Gemma) with w / s. The model changes by far more than float error."""
    model = _with_random_norms("gemma2")
    ref = _logits(model)
    gemma_layer = model.get_submodule("model.layers")[0]
    assert all(can_fold(gemma_layer, m) or m.prev == "self_attn.v_proj" for m in LLAMA.mappings)
    _fold_all(model, LLAMA.mappings)
    assert _rel(_logits(model), ref) > 1e-2


def test_gemma_awq_end_to_end_folds_the_right_norms():
    model = _with_random_norms("gemma3_text")
    qm = quantize_model(copy.deepcopy(model), "awq", calib=CALIB, bits=4, group_size=32, n_grid=4, clip_grid=4)
    folded = {k.split(".", 3)[3] for k, v in qm.method["stats"]["scales"].items() if v["folded"]}
    assert folded == {"input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj"}
    err = _rel(_logits(qm.to_torch()), _logits(model))
    assert err < 0.3, err


# ------------------------------------------------------------------------------------------ Phi-3
def test_phi3_fused_parts_resolve_and_fold_exactly():
    model = _with_random_norms("phi3")
    cfg = model.config
    spec = arch_spec(model).resolved(cfg)
    q = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    rows = {m.prev: m.rows for m in spec.mappings if m.part}
    assert rows == {"self_attn.qkv_proj": (q + kv, q + 2 * kv),
                    "mlp.gate_up_proj": (cfg.intermediate_size, 2 * cfg.intermediate_size)}
    ref = _logits(model)
    layer = model.model.layers[0]
    qkv0, gu0 = layer.self_attn.qkv_proj.weight.detach().clone(), layer.mlp.gate_up_proj.weight.detach().clone()
    _fold_all(model, [m for m in spec.mappings if m.part])
    assert _rel(_logits(model), ref) < 1e-5
    # only the feeding part of each fused producer was divided (q, k rows and gate rows untouched)
    qkv, gu = layer.self_attn.qkv_proj.weight.detach(), layer.mlp.gate_up_proj.weight.detach()
    assert torch.equal(qkv[:q + kv], qkv0[:q + kv]) and not torch.equal(qkv[q + kv:], qkv0[q + kv:])
    assert torch.equal(gu[:cfg.intermediate_size], gu0[:cfg.intermediate_size])
    assert not torch.equal(gu[cfg.intermediate_size:], gu0[cfg.intermediate_size:])
    assert _fold_all(model, spec.mappings, seed=5) == 8   # every mapping, both layers (Phi-3-mini: no GQA)
    assert _rel(_logits(model), ref) < 1e-5


def test_phi3_unresolved_part_refused():
    model = tiny_model("phi3")
    (m,) = [m for m in arch_spec(model).mappings if m.part == "v"]
    with pytest.raises(MacqError, match="unresolved rows"):
        fold_scales(model.model.layers[0], m, torch.ones(64))
    bad = replace(arch_spec(model), mappings=(ScaleMapping("self_attn.qkv_proj", ("self_attn.o_proj",), "x", part="z"),))
    with pytest.raises(MacqError, match="not a fused part"):
        bad.resolved(model.config)


def test_phi3_awq_and_smoothquant_use_the_parts():
    model = _with_random_norms("phi3")
    qm = quantize_model(copy.deepcopy(model), "awq", calib=CALIB, bits=4, group_size=32, n_grid=4, clip_grid=4)
    scales = qm.method["stats"]["scales"]
    assert all(v["folded"] for v in scales.values()) and len(scales) == 8
    assert set(qm.records) == {f"model.layers.{i}.{n}" for i in (0, 1) for n in
                               ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    sq = quantize_model(copy.deepcopy(model), "smoothquant", calib=CALIB)
    assert sum(v["folded"] for v in sq.method["stats"].values()) == 8


# ------------------------------------------------------------------------------------------ sliding windows
WINDOW_CASES = [
    ("mistral", {"sliding_window": 4}),                                   # every layer windowed: one banded mask
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]}),  # mixed: {layer_type: mask}
]


@pytest.mark.parametrize("arch,overrides", WINDOW_CASES)
def test_coreml_wrapper_masks_the_window(arch, overrides):
    """The traced wrapper (prefill 7, then 3 decode steps through its KV cache) against HF over 10 tokens with a
    window of 4: the old wrapper passed a plain causal mask, which transformers applies unchanged to every layer."""
    from converters.wrapper import CoreMLLM, causal_mask, prepare_model

    model = prepare_model(tiny_model(arch, **overrides))
    ref = _logits(model)[0]
    wrapper = CoreMLLM(model, 16, stateful=True)
    with torch.no_grad():
        out = [wrapper(IDS[:, :7].int(), torch.from_numpy(causal_mask(7, 0, None, np.float32)))[0]]
        out += [wrapper(IDS[:, i:i + 1].int(), torch.from_numpy(causal_mask(1, i, None, np.float32)))[0]
                for i in range(7, 10)]
    err = float((torch.cat(out).double() - ref).abs().max())
    assert err < 1e-4, err
    # and the window matters here: the same model with it switched off disagrees with HF
    assert float((_logits(tiny_model(arch))[0] - ref).abs().max()) > 1e-3


def test_coreml_refuses_window_layouts_it_cannot_mask():
    from converters.wrapper import window_masks

    cfg = tiny_model("mistral", sliding_window=4).config
    cfg.layer_types = ["sliding_attention", "full_attention"]   # a mix, but Mistral's forward takes one mask
    with pytest.raises(MacqError, match="full and sliding-window layers mixed"):
        window_masks(arch_spec("mistral"), cfg)


def test_mlx_export_says_when_mlx_lm_ignores_the_window(tmp_path):
    """mlx_lm's llama model (which loads Mistral) has no sliding window: the export says so, and the note is
    true: logits match HF within the window and differ past it."""
    pytest.importorskip("mlx_lm")
    from mlx_backend import export_mlx, load_mlx, mlx_logits

    model = tiny_model("mistral", sliding_window=4)
    qm = quantize_model(model, "rtn", bits=8, group_size=32, zero_point="float", symmetric=False)
    res = export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float32")
    assert any("ignores sliding windows" in n and "4 tokens" in n for n in res.notes)
    got = mlx_logits(load_mlx(tmp_path / "m"), IDS[0].numpy())
    want = _logits(qm.to_torch())[0].numpy()
    assert np.abs(got[:4] - want[:4]).max() < 1e-4
    assert np.abs(got[4:] - want[4:]).max() > 1e-3


def test_mlx_refuses_untied_gemma2(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_backend import export_mlx

    qm = quantize_model(tiny_model("gemma2", tie_word_embeddings=False), "rtn", bits=4, group_size=32)
    with pytest.raises(MacqError, match="always uses the embedding as lm_head"):
        export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "m").exists()


def test_context_limit_from_the_row_or_hf_names():
    from transformers import GPT2Config, OPTConfig

    from macq.arch import context_limit

    assert context_limit(GPT2Config(n_positions=77)) == 77                       # the gpt2 row: n_positions
    assert context_limit(OPTConfig(max_position_embeddings=99)) == 99            # not a row: the HF name


def test_mlx_refuses_gemma3_windows_it_cannot_express(tmp_path):
    """mlx_lm's gemma3_text knows windows only as "every p-th layer full"; full-then-sliding is not that."""
    pytest.importorskip("mlx_lm")
    from mlx_backend import export_mlx

    model = tiny_model("gemma3_text", layer_types=["full_attention", "sliding_attention"])
    qm = quantize_model(model, "rtn", bits=4, group_size=32)
    with pytest.raises(MacqError, match="only window layout mlx_lm's gemma3_text model expresses"):
        export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "m").exists()
