"""The transformers seams (cache keyword rename in 5.24) stay crossed on both sides."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from converters.wrapper import _OneHotCache, _SliceCache
from macq.compat import cache_keyword, output_cache
from macq.tiny import tiny_model


@pytest.mark.parametrize("call", [
    lambda c, k, v: c.update(k, v, 0, kwargs={"cache_position": None}),   # transformers >= 5.24
    lambda c, k, v: c.update(k, v, 0, cache_kwargs={"cache_position": None}),  # < 5.24
    lambda c, k, v: c.update(k, v, 0, {"cache_position": None}),          # positional
    lambda c, k, v: c.update(k, v, 0),
])
def test_caches_accept_every_update_convention(call):
    kc, vc = torch.zeros(2, 1, 3, 8, 4), torch.zeros(2, 1, 3, 8, 4)
    k, v = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    ko, vo = call(_SliceCache(kc, vc, 1, 3), k, v)
    assert torch.equal(ko[:, :, 1:3], k) and torch.equal(vo[:, :, 1:3], v)
    assert torch.equal(kc[0, :, :, 1:3], k) and kc[1].abs().sum() == 0
    onehot = (torch.arange(8) == 5).float().unsqueeze(-1)
    k1 = torch.randn(1, 3, 1, 4)
    ko, _ = call(_OneHotCache(kc, vc, onehot, 5), k1, k1)
    assert torch.equal(ko[0, :, 5], k1[0, :, 0]) and torch.equal(kc[0, 0, :, 5], k1[0, :, 0])


def test_cache_keyword_is_what_forward_takes():
    model = tiny_model("llama", seed=0).eval()
    kw = cache_keyword(model)
    assert kw in inspect.signature(model.forward).parameters
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        full = model(input_ids=ids).logits[:, -1]
        out = model(input_ids=ids[:, :3], use_cache=True)
        step = model(input_ids=ids[:, 3:], use_cache=True, **{kw: output_cache(out)}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert kw == ("cache" if (major, minor) >= (5, 24) else "past_key_values")
