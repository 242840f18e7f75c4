"""Agreement with the reference: KL, top-1, centred-logit MSE against a float64 recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from macq.errors import MacqError
from macq.eval import agreement, agreement_from_reference, reference_logprobs, windows
from macq.tiny import TINY_VOCAB, tiny_model


@pytest.fixture(scope="module")
def ref():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def perturbed():
    m = tiny_model("llama", seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY_VOCAB, (260,), generator=torch.Generator().manual_seed(0))


def _by_hand(ref, model, ids, context, stride):
    kl, top1, mse = [], [], []
    for w in windows(ids.numel(), context, stride):
        x = ids[None, w.begin:w.end]
        with torch.no_grad():
            lr = log_softmax(ref(input_ids=x).logits[0].double().numpy(), axis=-1)
            lq = log_softmax(model(input_ids=x).logits[0].double().numpy(), axis=-1)
        sl = slice(w.score_from - 1 - w.begin, w.end - 1 - w.begin)
        lr, lq = lr[sl], lq[sl]
        kl.append((np.exp(lr) * (lr - lq)).sum(-1))
        top1.append(lr.argmax(-1) == lq.argmax(-1))
        d = lr - lq
        mse.append(((d - d.mean(-1, keepdims=True)) ** 2).mean(-1))
    kl, top1, mse = map(np.concatenate, (kl, top1, mse))
    return kl, top1, mse


def test_identical_models_agree_perfectly(ref, ids):
    res = agreement(ref, ref, ids, context=96)
    assert res.kl == pytest.approx(0.0, abs=1e-7) and res.kl_p99 == pytest.approx(0.0, abs=1e-6)
    assert res.top1 == 1.0
    assert res.logits_mse == pytest.approx(0.0, abs=1e-10)
    assert res.n_tokens == sum(w.n_scored for w in windows(ids.numel(), 96))


@pytest.mark.parametrize("stride", [96, 40])
def test_perturbed_model_matches_float64(ref, perturbed, ids, stride):
    res = agreement(ref, perturbed, ids, context=96, stride=stride)
    kl, top1, mse = _by_hand(ref, perturbed, ids, 96, stride)
    assert res.n_tokens == kl.size
    assert res.kl > 1e-3  # the perturbation is visible
    assert res.kl == pytest.approx(kl.mean(), rel=1e-4)
    assert res.kl_p99 == pytest.approx(np.quantile(kl, 0.99), rel=1e-3)
    assert res.top1 == pytest.approx(top1.mean(), abs=1.5 / kl.size)  # an fp32 tie may flip one argmax
    assert res.top1 < 1.0
    assert res.logits_mse == pytest.approx(mse.mean(), rel=1e-4)


def test_logits_mse_ignores_a_constant_shift(ref, ids):
    shifted = lambda x: ref(input_ids=x, use_cache=False).logits + 3.0  # noqa: E731
    res = agreement(ref, shifted, ids, context=96)
    assert res.logits_mse == pytest.approx(0.0, abs=1e-9) and res.kl == pytest.approx(0.0, abs=1e-6)


def test_from_reference_equals_streaming(ref, perturbed, ids):
    lp = reference_logprobs(ref, ids, context=96, stride=40)
    ws = windows(ids.numel(), 96, 40)
    assert len(lp) == len(ws) and all(t.shape == (w.n_scored, TINY_VOCAB) for t, w in zip(lp, ws))
    assert all(t.dtype == torch.float32 for t in lp)
    assert lp.nbytes() == sum(w.n_scored for w in ws) * TINY_VOCAB * 4
    a = agreement_from_reference(lp, perturbed, ids)
    b = agreement(ref, perturbed, ids, context=96, stride=40)
    for f in ("kl", "kl_p99", "top1", "logits_mse"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6)
    assert (a.n_tokens, a.context, a.stride) == (b.n_tokens, 96, 40)


def test_mismatched_reference_is_rejected(ref, perturbed, ids):
    lp = reference_logprobs(ref, ids, context=96)
    with pytest.raises(MacqError, match="context=96"):
        agreement_from_reference(lp, perturbed, ids, context=64)
    with pytest.raises(MacqError, match="do not match"):
        agreement_from_reference(list(lp)[:-1], perturbed, ids, context=96)


def test_token_stats_chunking_is_exact():
    from macq.eval.agreement import token_stats

    g = torch.Generator().manual_seed(11)
    r = torch.log_softmax(torch.randn(300, 40, generator=g), -1)
    q = torch.log_softmax(torch.randn(300, 40, generator=g), -1)
    a, b = token_stats(r, q, chunk=7), token_stats(r, q, chunk=1000)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].shape == (300,) and (a[0] > 0).all()
