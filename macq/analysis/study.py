"""One model, several quantizations of it: every analysis of ``macq analyze`` in one call.

The caller (the CLI's ``analyze``) loads or builds the quantizations; this module only measures. Returns
one JSON-able dict (schema :data:`SCHEMA`) that :mod:`.report` renders. What is measured where, and on
how much data, is recorded in ``settings`` so a report never hides its budget.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from macq.analysis import bounds, stats
from macq.analysis.functional import LayerInputs, alone_effect, input_grams, output_error, score
from macq.analysis.sensitivity import sensitivity, split_name
from macq.errors import MacqError
from macq.eval.agreement import reference_logprobs
from macq.models import get_weight
from macq.progress import track

SCHEMA = "macq.analyze/1"
FAMILIES = {"rtn": "affine", "gptq": "affine", "awq": "affine", "awq-gptq": "affine", "nf4": "nf4", "fp4": "fp4",
            "kmeans": "kmeans", "uniform": "palette-uniform", "smoothquant": "affine", "mixed": "mixed", "dkm": "kmeans"}


@dataclass
class StudyOptions:
    """What to measure and on how much data (all of it is reported with the results)."""

    func_layers: list[int] | None = None   # decoder layers whose linears get the end-to-end alone test; None: first/middle/last
    sensitivity_label: str | None = None   # quantization used for layer sensitivity; None: the first one
    by_layer: bool = True
    by_kind: bool = True
    fit_samples: int = 1 << 18             # weights per layer used by the GGD fit (seeded subsample); 0: all
    seed: int = 0
    hist_layers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fit_samples < 0:
            raise MacqError(f"--fit-samples {self.fit_samples}: expected >= 0")
        if self.func_layers is not None and any(i < 0 for i in self.func_layers):
            raise MacqError(f"--func-layers {self.func_layers}: expected layer indices >= 0")


def family(method: dict[str, Any]) -> str:
    return FAMILIES.get(str(method.get("method")), str(method.get("method")))


def nominal_bits(method: dict[str, Any]) -> int | None:
    if method.get("method") in ("nf4", "fp4"):
        return 4
    b = method.get("bits", method.get("weight_bits"))
    return int(b) if isinstance(b, (int, float)) else None


def folded(qm, model: nn.Module) -> bool:
    """True when the quantization changed float tensors the reference also has (AWQ / SmoothQuant scale
    folding): its records are then in a rescaled basis and weight-space errors against the float weights
    would be meaningless, so such methods are scored end-to-end only."""
    sd = model.state_dict()
    for k, v in qm.float_tensors.items():
        if k in sd and v.shape == sd[k].shape and v.is_floating_point() and not torch.equal(v.float(), sd[k].float()):
            return True
    return False


def _fit_sample(w: torch.Tensor, n: int, seed: int) -> np.ndarray:
    x = stats.as_float64(w)
    if n and x.size > n:
        x = np.random.default_rng(seed).choice(x, size=n, replace=False)
    return x


def layer_statistics(model: nn.Module, names: list[str], opts: StudyOptions, progress: bool = False) -> dict[str, dict]:
    out = {}
    for n in track(names, "weight statistics", enabled=progress):
        w = get_weight(model.get_submodule(n)).detach()
        s = stats.weight_stats(w)
        if opts.fit_samples and w.numel() > opts.fit_samples:  # refit β on the subsample, keep full-data moments
            fit = stats.fit_ggd(_fit_sample(w, opts.fit_samples, opts.seed), loc=s["mean"])
            s.update(ggd_beta=fit["beta"], ggd_alpha=fit["alpha"], ggd_nll=fit["nll"])
        out[n] = s
    return out


def run_study(model: nn.Module, quantizations: dict[str, Any], eval_ids: torch.Tensor, calib_ids: torch.Tensor,
              context: int = 128, opts: StudyOptions | None = None, progress: bool = False) -> dict[str, Any]:
    """All analyses on float ``model`` against ``{label: QuantizedModel}``. ``eval_ids`` (1-D) feed the
    end-to-end metrics in windows of ``context``; ``calib_ids`` ``[n, T]`` feed the layer-output errors."""
    opts = opts or StudyOptions()
    if not quantizations:
        raise MacqError("analyze: nothing to analyze (give macq dirs or --methods)")
    t0 = time.perf_counter()
    model.eval()
    labels = list(quantizations)
    sens_label = opts.sensitivity_label or labels[0]
    if sens_label not in quantizations:
        raise MacqError(f"--sensitivity-label {sens_label!r}: not one of {', '.join(labels)}")
    is_folded = {lb: folded(qm, model) for lb, qm in quantizations.items()}
    names = [n for n in quantizations[labels[0]].records if all(n in qm.records for qm in quantizations.values())]
    weight_labels = [lb for lb in labels if not is_folded[lb]]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    wstats = layer_statistics(model, names, opts, progress)
    timings["weight_statistics_s"] = time.perf_counter() - t

    t = time.perf_counter()
    grams = input_grams(model, names, calib_ids)
    timings["calibration_grams_s"] = time.perf_counter() - t

    methods: dict[str, Any] = {}
    per_layer: dict[str, dict[str, dict]] = {n: {} for n in names}
    t = time.perf_counter()
    for lb in labels:
        qm = quantizations[lb]
        methods[lb] = {"method": qm.method, "family": family(qm.method), "nominal_bits": nominal_bits(qm.method),
                       "bits_per_weight": qm.bits_per_weight(), "folded": is_folded[lb]}
        if is_folded[lb]:
            continue
        for n in names:
            rec = qm.records[n]
            w = get_weight(model.get_submodule(n)).detach().float()
            w_hat = rec.dequantize(torch.float32)
            bpw = rec.storage_bits() / (rec.shape[0] * rec.shape[1])
            s = wstats[n]
            row = {"bpw": bpw, **output_error(w, w_hat, grams[n])}
            row["sqnr_db"] = 10 * math.log10((s["variance"] + s["mean"] ** 2) / row["weight_mse"]) if row["weight_mse"] > 0 else math.inf
            row.update(bounds.gaps(s["variance"], s["ggd_beta"], bpw, row["weight_mse"]))
            per_layer[n][lb] = row
    timings["weight_and_output_errors_s"] = time.perf_counter() - t
    del grams

    # bounds per layer at each method's effective rate are in the gaps; the layer's own yardsticks at 2/3/4 bits:
    for n in names:
        s = wstats[n]
        if not math.isfinite(s["ggd_beta"]):  # a constant layer: no shape to fit, no yardstick
            s["lloyd_max"], s["entropy_power_ratio"] = {}, math.nan
            continue
        s["lloyd_max"] = {f"{b}bit": s["variance"] * bounds.lloyd_max_mse(s["ggd_beta"], b) for b in (2, 3, 4)}
        s["entropy_power_ratio"] = bounds.entropy_power_ratio(s["ggd_beta"])

    # ---- end-to-end: reference log-probs once, then one linear alone, then sensitivity
    t = time.perf_counter()
    ref = reference_logprobs(model, eval_ids, context=context)
    base = score(model, eval_ids, ref)
    cache = LayerInputs(model, eval_ids, ref)
    n_layers = 1 + max((split_name(model, n)[0] or 0) for n in names)
    func_layers = opts.func_layers if opts.func_layers is not None else sorted({0, n_layers // 2, n_layers - 1})
    func_names = [n for n in names if split_name(model, n)[0] in func_layers]
    alone: dict[str, dict[str, dict]] = {n: {} for n in func_names}
    jobs = [(lb, n) for lb in labels for n in func_names]
    for lb, n in track(jobs, "one linear alone", enabled=progress):
        rec = quantizations[lb].records[n]
        if is_folded[lb]:
            continue
        alone[n][lb] = alone_effect(model, {n: rec.dequantize(torch.float32)}, eval_ids, ref, base,
                                    start=split_name(model, n)[0] or 0, cache=cache)
    timings["alone_effect_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sens_qm = quantizations[sens_label]
    if is_folded[sens_label]:
        raise MacqError(f"--sensitivity-label {sens_label}: folds scales into float weights; pick a weight-only method")
    sens = sensitivity(model, {n: sens_qm.records[n].dequantize(torch.float32) for n in names}, eval_ids, ref, base,
                       by_layer=opts.by_layer, by_kind=opts.by_kind, cache=cache)
    sens["label"] = sens_label
    timings["sensitivity_s"] = time.perf_counter() - t

    result = {"schema": SCHEMA, "model": getattr(model.config, "_name_or_path", ""), "labels": labels,
              "methods": methods, "layers": names, "weight_stats": wstats, "per_layer": per_layer,
              "alone": alone, "baseline": base, "sensitivity": sens,
              "settings": {"context": context, "eval_tokens": int(eval_ids.numel()),
                           "calib_shape": list(calib_ids.shape), "func_layers": func_layers, **asdict(opts)}}
    result["summary"] = summarize(result, weight_labels)
    timings["total_s"] = time.perf_counter() - t0
    result["timings"] = timings
    return result


def _pooled(rows: list[tuple[int, dict]], key: str) -> float:
    tot = sum(n for n, _ in rows)
    return sum(n * r[key] for n, r in rows) / tot if tot else math.nan


def summarize(res: dict[str, Any], weight_labels: list[str]) -> dict[str, Any]:
    """Per-method pooled gaps, the NF4/FP4/k-means/affine contest, and the correlation tables."""
    ws, pl, names = res["weight_stats"], res["per_layer"], res["layers"]
    out: dict[str, Any] = {"methods": {}, "correlations": {"over_layers": {}, "over_methods": {}}}
    for lb in weight_labels:
        rows = [(ws[n]["n"], pl[n][lb]) for n in names]
        norm = [(ws[n]["n"], {"d": pl[n][lb]["weight_mse"] / ws[n]["variance"]}) for n in names]
        out["methods"][lb] = {k: _pooled(rows, k) for k in ("bpw", "gap_gauss_bits", "gap_slb_bits", "gap_lloyd_max_bits",
                                                           "amplification")}
        out["methods"][lb]["normalized_mse"] = _pooled(norm, "d")
        out["correlations"]["over_layers"][lb] = {
            "weight_vs_output_mse": stats.correlation([pl[n][lb]["weight_mse"] for n in names],
                                                      [pl[n][lb]["output_mse"] for n in names]),
            "weight_rel_vs_output_rel": stats.correlation([pl[n][lb]["weight_rel"] for n in names],
                                                          [pl[n][lb]["output_rel"] for n in names])}
        al = [n for n in res["alone"] if lb in res["alone"][n]]
        if len(al) >= 3:
            out["correlations"]["over_layers"][lb]["weight_mse_vs_alone_kl"] = stats.correlation(
                [pl[n][lb]["weight_mse"] for n in al], [res["alone"][n][lb]["kl"] for n in al])
            out["correlations"]["over_layers"][lb]["output_mse_vs_alone_kl"] = stats.correlation(
                [pl[n][lb]["output_mse"] for n in al], [res["alone"][n][lb]["kl"] for n in al])
    # over methods: per layer, across methods; summarised by the median and the share significant at 5 %
    if len(weight_labels) >= 3:
        per = [stats.correlation([pl[n][lb]["weight_mse"] for lb in weight_labels],
                                 [pl[n][lb]["output_mse"] for lb in weight_labels]) for n in names]
        out["correlations"]["over_methods"]["weight_vs_output_mse"] = _corr_summary(per)
        al = [n for n in res["alone"] if all(lb in res["alone"][n] for lb in weight_labels)]
        per_kl = [stats.correlation([pl[n][lb]["weight_mse"] for lb in weight_labels],
                                    [res["alone"][n][lb]["kl"] for lb in weight_labels]) for n in al]
        if per_kl:
            out["correlations"]["over_methods"]["weight_mse_vs_alone_kl"] = _corr_summary(per_kl)
        pairs = [(pl[n][lb]["weight_mse"], res["alone"][n][lb]["kl"]) for n in al for lb in weight_labels]
        if len(pairs) >= 3:
            out["correlations"]["pooled_weight_mse_vs_alone_kl"] = stats.correlation(*zip(*pairs))
    out["contest"] = contest(res, weight_labels)
    return out


def _corr_summary(per: list[dict[str, float]]) -> dict[str, Any]:
    rho = [c["spearman"] for c in per if math.isfinite(c["spearman"])]
    r = [c["pearson_loglog"] for c in per if math.isfinite(c["pearson_loglog"])]
    return {"n_groups": len(per), "n_per_group": per[0]["n"] if per else 0,
            "median_spearman": statistics.median(rho) if rho else math.nan,
            "median_pearson_loglog": statistics.median(r) if r else math.nan,
            "share_spearman_p_lt_0.05": sum(c["spearman_p"] < 0.05 for c in per) / len(per) if per else math.nan,
            "share_positive": sum(c["spearman"] > 0 for c in per) / len(per) if per else math.nan}


def contest(res: dict[str, Any], weight_labels: list[str]) -> dict[str, Any]:
    """NF4 vs FP4 vs k-means vs affine at 4 bits: per layer the family with the smallest gap to the Gaussian
    bound (a rate-normalised distortion, since their metadata rates differ), and whether winning follows β."""
    m = res["methods"]
    cand = [lb for lb in weight_labels if m[lb]["nominal_bits"] == 4 and m[lb]["family"] in ("affine", "nf4", "fp4", "kmeans")]
    if len(cand) < 2:
        return {"labels": cand, "note": "needs at least two 4-bit weight-only methods of different families"}
    ws, pl = res["weight_stats"], res["per_layer"]
    wins: dict[str, list[float]] = {lb: [] for lb in cand}
    wins_mse: dict[str, int] = {lb: 0 for lb in cand}
    winners = {}
    for n in res["layers"]:
        best = min(cand, key=lambda lb: pl[n][lb]["gap_gauss_bits"])
        winners[n] = best
        wins[best].append(ws[n]["ggd_beta"])
        wins_mse[min(cand, key=lambda lb: pl[n][lb]["weight_mse"])] += 1
    betas = [ws[n]["ggd_beta"] for n in res["layers"]]
    out: dict[str, Any] = {"labels": cand, "winner": winners,
                           "wins": {lb: {"n": len(b), "median_beta": statistics.median(b) if b else None,
                                         "n_by_raw_mse": wins_mse[lb]} for lb, b in wins.items()}}
    fam = {m[lb]["family"]: lb for lb in cand}
    # Does NF4's edge over the others follow β? Spearman of β against the gap difference, over layers.
    if "nf4" in fam:
        out["nf4_edge_vs_beta"] = {}
        for other in cand:
            if other == fam["nf4"]:
                continue
            diff = [pl[n][other]["gap_gauss_bits"] - pl[n][fam["nf4"]]["gap_gauss_bits"] for n in res["layers"]]
            rho, p = stats.spearman(betas, diff)
            out["nf4_edge_vs_beta"][other] = {"spearman": rho, "p": p, "mean_edge_bits": float(np.mean(diff))}
    return out
