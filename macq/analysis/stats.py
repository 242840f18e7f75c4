"""Per-layer weight statistics and the correlation tests used across the analysis.

Why a generalized Gaussian (GGD): ``f(x) = β / (2 α Γ(1/β)) exp(-(|x-μ|/α)^β)`` contains the Gaussian
(β = 2) and the Laplacian (β = 1) as special cases, so its maximum-likelihood shape β is one number that
says how far a layer is from the "weights are Gaussian" premise behind NF4 (β < 2: heavier tails and a
sharper peak). The fit fixes ``μ`` at the sample mean (weights are centred; freeing μ moves the MLE of β
by far less than its sampling error on 10^5+ weights) and profiles the scale out in closed form:
for a given β, ``α̂^β = (β/n) Σ|x-μ|^β``, which leaves a one-dimensional concave-enough problem in log β.

The histogram KL says how well a fitted density describes the layer as a whole: the empirical bin
probabilities ``p_i`` against the model's probability of the same bin ``q_i`` (CDF differences, two open
tail bins included), ``KL = Σ p_i log(p_i / q_i)`` in nats. It depends on the binning, so it is only
comparable between the two models (GGD vs Gaussian) on the same layer and bins.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import optimize, special

HIST_BINS = 120
HIST_RANGE_SIGMAS = 6.0


def as_float64(w: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        w = w.detach().to(torch.float64).cpu().numpy()
    return np.asarray(w, dtype=np.float64).ravel()


def ggd_profile_nll(beta: float, absdev: np.ndarray) -> tuple[float, float]:
    """Mean negative log-likelihood per sample at shape ``beta`` with the scale profiled out; and that scale."""
    m = float(np.mean(absdev ** beta))
    alpha = (beta * m) ** (1.0 / beta)
    # -log f = -log β + log 2 + log α + lgamma(1/β) + (|x|/α)^β ; the last term averages to 1/β at α̂.
    nll = -math.log(beta) + math.log(2.0) + math.log(alpha) + special.gammaln(1.0 / beta) + 1.0 / beta
    return nll, alpha


def fit_ggd(x: torch.Tensor | np.ndarray, loc: float | None = None, beta_range: tuple[float, float] = (0.1, 20.0)
            ) -> dict[str, float]:
    """Maximum-likelihood generalized-Gaussian fit ``{beta, alpha, loc, nll}`` (``loc`` defaults to the mean).

    Bounded Brent search over ``log β``; the profile likelihood is smooth and unimodal in practice."""
    a = as_float64(x)
    mu = float(a.mean()) if loc is None else float(loc)
    absdev = np.abs(a - mu)
    if not np.any(absdev > 0):
        return {"beta": float("nan"), "alpha": 0.0, "loc": mu, "nll": float("nan")}
    lo, hi = math.log(beta_range[0]), math.log(beta_range[1])
    res = optimize.minimize_scalar(lambda lb: ggd_profile_nll(math.exp(lb), absdev)[0], bounds=(lo, hi),
                                   method="bounded", options={"xatol": 1e-7})
    beta = math.exp(float(res.x))
    nll, alpha = ggd_profile_nll(beta, absdev)
    return {"beta": beta, "alpha": alpha, "loc": mu, "nll": nll}


def ggd_cdf(x: np.ndarray, beta: float, alpha: float, loc: float = 0.0) -> np.ndarray:
    """CDF of the GGD: ``1/2 + sign(z)/2 · P(1/β, |z/α|^β)`` with P the regularized lower incomplete gamma."""
    z = (np.asarray(x, dtype=np.float64) - loc) / alpha
    return 0.5 + 0.5 * np.sign(z) * special.gammainc(1.0 / beta, np.abs(z) ** beta)


def ggd_pdf(x: np.ndarray, beta: float, alpha: float, loc: float = 0.0) -> np.ndarray:
    z = np.abs((np.asarray(x, dtype=np.float64) - loc) / alpha)
    return beta / (2 * alpha * special.gamma(1.0 / beta)) * np.exp(-(z ** beta))


def ggd_variance(beta: float, alpha: float) -> float:
    return alpha * alpha * math.exp(special.gammaln(3.0 / beta) - special.gammaln(1.0 / beta))


def histogram_kl(x: np.ndarray, cdf, bins: int = HIST_BINS, span: float = HIST_RANGE_SIGMAS) -> float:
    """KL (nats) of the empirical bin probabilities to a model's, bins of equal width over mean ± span·σ
    plus one open bin on each side (so every sample counts). Empty empirical bins contribute 0."""
    mu, sd = float(x.mean()), float(x.std())
    edges = np.linspace(mu - span * sd, mu + span * sd, bins + 1)
    counts = np.concatenate([[np.sum(x < edges[0])], np.histogram(x, bins=edges)[0], [np.sum(x > edges[-1])]])
    p = counts / counts.sum()
    c = cdf(edges)
    q = np.concatenate([[c[0]], np.diff(c), [1.0 - c[-1]]])
    q = np.maximum(q, 1e-300)
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def weight_stats(w: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Variance, excess kurtosis, outlier fractions (>3σ, >6σ from the mean), GGD fit, histogram KLs."""
    x = as_float64(w)
    mu, var = float(x.mean()), float(x.var())
    sd = math.sqrt(var)
    z = np.abs(x - mu) / sd if sd > 0 else np.zeros_like(x)
    kurt = float(np.mean(z ** 4) - 3.0) if sd > 0 else float("nan")
    fit = fit_ggd(x, loc=mu)
    out: dict[str, Any] = {"n": int(x.size), "mean": mu, "variance": var, "excess_kurtosis": kurt,
                           "outlier_frac_3sigma": float(np.mean(z > 3)), "outlier_frac_6sigma": float(np.mean(z > 6)),
                           "ggd_beta": fit["beta"], "ggd_alpha": fit["alpha"], "ggd_nll": fit["nll"]}
    if sd > 0:
        out["kl_hist_ggd"] = histogram_kl(x, lambda e: ggd_cdf(e, fit["beta"], fit["alpha"], mu))
        out["kl_hist_gauss"] = histogram_kl(x, lambda e: 0.5 * special.erfc(-(e - mu) / (sd * math.sqrt(2))))
    return out


# ----------------------------------------------------------------------------- correlations
def _t_pvalue(r: float, n: int) -> float:
    """Two-sided p-value of a correlation ``r`` on ``n`` pairs under H0 (Student t, n-2 dof)."""
    if n < 3 or not math.isfinite(r):
        return float("nan")
    if abs(r) >= 1.0:
        return 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * special.stdtr(n - 2, -abs(t)))


def pearson(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value; nan if fewer than 3 pairs or a constant series."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan"), float("nan")
    a, b = a - a.mean(), b - b.mean()
    r = float(np.clip(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)), -1.0, 1.0))
    return r, _t_pvalue(r, a.size)


def ranks(x) -> np.ndarray:
    """1-based ranks, ties get their average rank (as Spearman's rho needs)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(a.size)
    sa = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sa[j + 1] == sa[i]:
            j += 1
        r[order[i: j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(x, y) -> tuple[float, float]:
    """Spearman rho (Pearson on average ranks) and its t-approximation p-value (as scipy.stats.spearmanr)."""
    return pearson(ranks(x), ranks(y))


def loglog_pearson(x, y) -> tuple[float, float]:
    """Pearson r of ``log10 x`` vs ``log10 y`` over pairs where both are positive (errors span decades)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m = (a > 0) & (b > 0) & np.isfinite(a) & np.isfinite(b)
    return pearson(np.log10(a[m]), np.log10(b[m]))


def correlation(x, y) -> dict[str, float]:
    """The correlation summary the report prints: n, Pearson log-log r/p, Spearman rho/p, log-log slope."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r, p = loglog_pearson(a, b)
    rho, ps = spearman(a, b)
    m = (a > 0) & (b > 0)
    slope = float(np.polyfit(np.log10(a[m]), np.log10(b[m]), 1)[0]) if m.sum() >= 2 and np.ptp(a[m]) > 0 else float("nan")
    return {"n": int(a.size), "pearson_loglog": r, "pearson_p": p, "spearman": rho, "spearman_p": ps,
            "loglog_slope": slope}
