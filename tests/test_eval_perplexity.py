"""Perplexity: windows, exact token accounting, and agreement with a float64 recomputation by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from macq.errors import MacqError
from macq.eval import nll_from_logits, perplexity, windows
from macq.tiny import TINY_VOCAB, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY_VOCAB, (300,), generator=torch.Generator().manual_seed(0))


def _hf_guide_scored(n: int, context: int, stride: int) -> list[tuple[int, int, list[int]]]:
    """The HF guide's loop written out: labels[:-trg_len] = -100, then the model's internal shift drops
    the window's first position. Returns (begin, end, scored absolute positions) per window."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        labels = [-100] * (len(labels) - trg_len) + labels[len(labels) - trg_len:]
        scored = [t for t in labels[1:] if t != -100]
        out.append((begin, end, scored))
        prev_end = end
        if end == n:
            break
    return out


def _by_hand(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int, list[int]]:
    nll, scored_all = [], []
    for begin, end, scored in _hf_guide_scored(ids.numel(), context, stride):
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:end]).logits[0].double().numpy()
        lp = log_softmax(logits, axis=-1)
        for t in scored:
            nll.append(-lp[t - 1 - begin, int(ids[t])])
        scored_all += scored
    return math.exp(float(np.mean(nll))), len(nll), scored_all


def _scored_positions(n: int, context: int, stride: int) -> list[int]:
    return [t for w in windows(n, context, stride) for t in range(w.score_from, w.end)]


def test_windows_non_overlapping_skip_each_window_first_token():
    pos = _scored_positions(300, 128, 128)
    assert pos == list(range(1, 128)) + list(range(129, 256)) + list(range(257, 300))


def test_windows_overlapping_score_every_token_but_the_first_once():
    ws = windows(300, 128, 64)
    assert [(w.begin, w.end, w.score_from) for w in ws] == [(0, 128, 1), (64, 192, 128), (128, 256, 192),
                                                           (192, 300, 256)]
    assert _scored_positions(300, 128, 64) == list(range(1, 300))


@pytest.mark.parametrize("stride", [128, 64, 50])
def test_perplexity_matches_float64_recomputation(model, ids, stride):
    res = perplexity(model, ids, context=128, stride=stride)
    want_ppl, want_n, want_pos = _by_hand(model, ids, 128, stride)
    assert want_pos == _scored_positions(ids.numel(), 128, stride)
    assert res.n_tokens == want_n
    assert res.ppl == pytest.approx(want_ppl, rel=1e-5)
    assert res.nll == pytest.approx(math.log(want_ppl), rel=1e-5)
    assert res.n_windows == len(windows(ids.numel(), 128, stride))
    assert (res.context, res.stride) == (128, stride)


def test_stderr_is_delta_method(model, ids):
    res = perplexity(model, ids, context=128)
    nll = []
    for w in windows(ids.numel(), 128):
        with torch.no_grad():
            lg = model(input_ids=ids[None, w.begin:w.end]).logits[0].double().numpy()
        lp = log_softmax(lg, axis=-1)
        nll += [-lp[t - 1 - w.begin, int(ids[t])] for t in range(w.score_from, w.end)]
    nll = np.array(nll)
    se = nll.std(ddof=1) / math.sqrt(len(nll))
    assert res.stderr == pytest.approx(math.exp(nll.mean()) * se, rel=1e-4)


def test_batching_and_callable_give_same_result(model, ids):
    a = perplexity(model, ids, context=100, stride=60)
    b = perplexity(model, ids, context=100, stride=60, batch_size=3)
    c = perplexity(lambda x: model(input_ids=x, use_cache=False).logits.numpy(), ids, context=100, stride=60)
    assert b.ppl == pytest.approx(a.ppl, rel=1e-5) and b.n_tokens == a.n_tokens
    assert c.ppl == pytest.approx(a.ppl, rel=1e-6)


def test_uniform_logits_give_vocab_size():
    m = tiny_model("llama", seed=2)
    with torch.no_grad():
        m.lm_head.weight.zero_()
    ids = torch.randint(0, TINY_VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    res = perplexity(m, ids, context=64, stride=32)
    assert res.ppl == pytest.approx(TINY_VOCAB, rel=1e-6)
    assert res.stderr == pytest.approx(0.0, abs=1e-6)


def test_nll_from_logits_matches_numpy():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 50, generator=g).half()  # fp16 in, fp32 math inside
    targets = torch.randint(0, 50, (3, 7), generator=g)
    got = nll_from_logits(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    lp = log_softmax(logits.double().numpy(), axis=-1)
    want = -np.take_along_axis(lp, targets.numpy()[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_line_errors(model, ids):
    with pytest.raises(MacqError, match="stride"):
        perplexity(model, ids, context=64, stride=65)
    with pytest.raises(MacqError, match="at least 2 tokens"):
        perplexity(model, ids[:1], context=64)
    with pytest.raises(MacqError, match="1-D"):
        perplexity(model, ids.view(3, 100), context=64)
    with pytest.raises(MacqError, match="exceeds the model's 256 positions"):
        perplexity(model, ids, context=300)


@pytest.mark.slow
def test_default_model_wiki_perplexity():
    from macq.data import eval_tokens
    from macq.models import load_model

    model, tok = load_model(None)
    ids = eval_tokens(tok, "wiki", max_tokens=4096)
    res = perplexity(model, ids, context=512)
    print(f"\nSmolLM2-135M wiki ppl (first {ids.numel()} eval tokens, ctx 512): {res.ppl:.3f} "
          f"+- {res.stderr:.3f} over {res.n_tokens} tokens")
    assert ids.numel() == 4096
    assert 15 <= res.ppl <= 25
