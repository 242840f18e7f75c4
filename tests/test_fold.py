"""Scale folding must leave the float model's function unchanged (it only moves ranges around)."""

import pytest
import torch

from macq.arch import ScaleMapping, arch_spec
from macq.errors import MacqError
from macq.models import get_weight
from macq.quantizers.fold import can_fold, fold_scales, foldable_mappings
from macq.tiny import tiny_model

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _randomise_norms(model):
    """Norm weights (and LayerNorm biases) away from 1 / 0 so that folding into them is really exercised."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 4}),
                                            ("qwen2", {}), ("gpt2", {})])
def test_fold_is_exact(arch, overrides):
    model = tiny_model(arch, **overrides)
    _randomise_norms(model)
    ref = _logits(model)
    spec = arch_spec(model)
    g = torch.Generator().manual_seed(2)
    folded = 0
    for layer in model.get_submodule(spec.layers):
        for m in foldable_mappings(layer, spec.mappings):
            c = get_weight(layer.get_submodule(m.linears[0])).shape[1]
            before = get_weight(layer.get_submodule(m.linears[0])).detach().clone()
            fold_scales(layer, m, torch.exp(torch.randn(c, generator=g)))   # scales spanning ~e^±3
            assert not torch.allclose(before, get_weight(layer.get_submodule(m.linears[0])))
            folded += 1
    out = _logits(model)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-5, rel
    # GQA (tiny llama/qwen2 default: 4 heads / 2 KV heads) skips v_proj -> o_proj; MHA folds it.
    n_map = len(spec.mappings) * len(model.get_submodule(spec.layers))
    gqa = arch in ("llama", "qwen2") and not overrides
    assert folded == (n_map - 2 if gqa else n_map)


def test_gqa_mapping_refused():
    model = tiny_model("llama")  # 4 heads, 2 KV heads: v_proj out 32, o_proj in 64
    layer = model.model.layers[0]
    m = ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")
    assert not can_fold(layer, m)
    with pytest.raises(MacqError):
        fold_scales(layer, m, torch.ones(64))


def test_bad_scales_refused():
    model = tiny_model("gpt2")
    layer = model.transformer.h[0]
    m = arch_spec(model).mappings[0]
    for bad in (torch.zeros(64), torch.full((64,), float("nan")), -torch.ones(64)):
        with pytest.raises(MacqError):
            fold_scales(layer, m, bad)
