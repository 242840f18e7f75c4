"""Render an analysis (schema ``macq.analyze/1``) or a bench matrix (``macq.bench/1``) as Markdown and PNGs.

Plots are written through a temp name and renamed, at a modest dpi, so committed figures stay small.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from macq.analysis import bounds, stats
from macq.atomic import PNG_SOFTWARE


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain))
    tmp.replace(path)


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def _axes(ax, xlabel: str, ylabel: str, legend_size: int = 7) -> None:
    """The finish every line/scatter plot here shares: axis labels, a light grid, a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _savefig(fig, path: Path, dpi: int = 90) -> None:
    """Lay out and write the figure atomically (temp file + rename), then free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    tmp.replace(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "").replace("_proj", "")


# ----------------------------------------------------------------------------- analyze
def analysis_markdown(res: dict[str, Any]) -> str:
    s, ws, pl = res["summary"], res["weight_stats"], res["per_layer"]
    st = res["settings"]
    lines = [f"# macq analyze ({res['schema']})", "",
             f"Model `{res['model']}`; {len(res['layers'])} linears; eval {st['eval_tokens']} tokens in windows of "
             f"{st['context']}; calibration {st['calib_shape'][0]}x{st['calib_shape'][1]} tokens; run time "
             f"{res['timings']['total_s']:.0f} s.", "", "## Methods (pooled over layers, weighted by weight count)", ""]
    rows = []
    for lb, m in res["methods"].items():
        r = {"label": lb, "family": m["family"], "bpw": m["bits_per_weight"], "folded": m["folded"]}
        r.update(s["methods"].get(lb, {}))
        rows.append(r)
    lines.append(md_table(rows, ["label", "family", "bpw", "normalized_mse", "gap_gauss_bits", "gap_slb_bits",
                                 "gap_lloyd_max_bits", "amplification"]))
    betas = [ws[n]["ggd_beta"] for n in res["layers"]]
    kurt = [ws[n]["excess_kurtosis"] for n in res["layers"]]
    lines += ["", "## Weight statistics", "",
              f"GGD shape β over layers: median {np.median(betas):.3f}, range {min(betas):.3f}–{max(betas):.3f}; "
              f"excess kurtosis median {np.median(kurt):.2f}; layers where the GGD fits the histogram better "
              f"than a Gaussian (smaller KL): {sum(ws[n].get('kl_hist_ggd', 0) < ws[n].get('kl_hist_gauss', 0) for n in res['layers'])}"
              f"/{len(res['layers'])}.", ""]
    by_kind: dict[str, list[str]] = {}
    for n in res["layers"]:
        by_kind.setdefault(n.split(".")[-1], []).append(n)
    krows = []
    for k, ns in by_kind.items():
        krows.append({"kind": k, "layers": len(ns), "median_beta": float(np.median([ws[n]["ggd_beta"] for n in ns])),
                      "median_excess_kurtosis": float(np.median([ws[n]["excess_kurtosis"] for n in ns])),
                      "mean_frac_3sigma": float(np.mean([ws[n]["outlier_frac_3sigma"] for n in ns])),
                      "mean_frac_6sigma": float(np.mean([ws[n]["outlier_frac_6sigma"] for n in ns])),
                      "median_kl_ggd": float(np.median([ws[n].get("kl_hist_ggd", math.nan) for n in ns])),
                      "median_kl_gauss": float(np.median([ws[n].get("kl_hist_gauss", math.nan) for n in ns])),
                      "median_N_over_var": float(np.median([ws[n]["entropy_power_ratio"] for n in ns]))})
    lines.append(md_table(krows, list(krows[0])))
    c = s.get("contest", {})
    lines += ["", "## NF4 vs FP4 vs k-means vs affine (4-bit, per layer, smallest gap to the Gaussian bound)", ""]
    if "wins" in c:
        lines.append(md_table([{"label": lb, "bpw": res["methods"][lb]["bits_per_weight"], "layers_won": w["n"],
                                "median_beta_of_won": w["median_beta"], "layers_won_by_raw_mse": w["n_by_raw_mse"]}
                               for lb, w in c["wins"].items()],
                              ["label", "bpw", "layers_won", "median_beta_of_won", "layers_won_by_raw_mse"]))
        if c.get("nf4_edge_vs_beta"):
            lines += ["", "NF4's edge (other's gap − NF4's gap, bits) against β over layers:", ""]
            lines.append(md_table([{"vs": k, **v} for k, v in c["nf4_edge_vs_beta"].items()],
                                  ["vs", "mean_edge_bits", "spearman", "p"]))
    else:
        lines.append(c.get("note", ""))
    lines += ["", "## Weight error vs output error", "", "Over layers (per method):", ""]
    crow = []
    for lb, cs in s["correlations"]["over_layers"].items():
        for what, v in cs.items():
            crow.append({"label": lb, "pair": what, **v})
    lines.append(md_table(crow, ["label", "pair", "n", "pearson_loglog", "pearson_p", "spearman", "spearman_p",
                                 "loglog_slope"]))
    om = s["correlations"].get("over_methods", {})
    if om:
        lines += ["", "Over methods (per layer, across methods; summary over layers):", ""]
        lines.append(md_table([{"pair": k, **v} for k, v in om.items()],
                              ["pair", "n_groups", "n_per_group", "median_spearman", "median_pearson_loglog",
                               "share_spearman_p_lt_0.05", "share_positive"]))
    if "pooled_weight_mse_vs_alone_kl" in s["correlations"]:
        v = s["correlations"]["pooled_weight_mse_vs_alone_kl"]
        lines += ["", f"Pooled (every method × linear of the end-to-end subset, n={v['n']}): weight MSE vs KL of that "
                      f"linear alone, Pearson log-log r={v['pearson_loglog']:.3f} (p={v['pearson_p']:.2g}), Spearman "
                      f"ρ={v['spearman']:.3f} (p={v['spearman_p']:.2g})."]
    arow = []
    for n, d in res["alone"].items():
        for lb, v in d.items():
            arow.append({"layer": _short(n), "label": lb, "weight_mse": pl[n][lb]["weight_mse"],
                         "output_mse": pl[n][lb]["output_mse"], "amplification": pl[n][lb]["amplification"], **v})
    if arow:
        lines += ["", f"One linear alone (layers {res['settings']['func_layers']}; baseline ppl "
                      f"{res['baseline']['ppl']:.3f}):", ""]
        lines.append(md_table(arow, ["layer", "label", "weight_mse", "output_mse", "amplification", "kl", "logits_mse",
                                     "delta_ce", "top1"]))
    sens = res["sensitivity"]
    lines += ["", f"## Layer sensitivity (`{sens['label']}` on one decoder layer / one kind alone; ranked by KL)", ""]
    if sens["by_kind"]:
        lines.append(md_table(sorted(sens["by_kind"], key=lambda r: r["rank"]),
                              ["rank", "kind", "n_modules", "kl", "delta_ce", "delta_ppl", "top1"]))
    if sens["by_layer"]:
        lines += ["", "Decoder layers (top 5 and bottom 3 when more than 8):", ""]
        ranked = sorted(sens["by_layer"], key=lambda r: r["rank"])
        shown = ranked if len(ranked) <= 8 else ranked[:5] + ranked[-3:]
        lines.append(md_table(shown, ["rank", "layer", "kl", "delta_ce", "delta_ppl", "top1"]))
    if "first_last" in sens:
        fl = sens["first_last"]
        lines += ["", f"First layer: rank {fl['first_rank']}/{fl['n_layers']}, KL {fl['first_kl']:.3g} "
                      f"({fl['first_over_median']:.2f}× the median layer); last layer: rank {fl['last_rank']}, KL "
                      f"{fl['last_kl']:.3g} ({fl['last_over_median']:.2f}× the median)."]
    return "\n".join(lines) + "\n"


def plot_histograms(model, res: dict[str, Any], path: Path, names: list[str] | None = None) -> None:
    """Weight histograms (log density) with the moment-matched Gaussian and the ML-fitted GGD."""
    plt = _plt()
    from macq.models import get_weight

    ws = res["weight_stats"]
    if not names:
        by_beta = sorted(res["layers"], key=lambda n: ws[n]["ggd_beta"])
        names = list(dict.fromkeys([by_beta[0], by_beta[len(by_beta) // 2], by_beta[-1]]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3))
    for ax, n in zip(np.atleast_1d(axes), names):
        x = stats.as_float64(get_weight(model.get_submodule(n)))
        s = ws[n]
        sd = math.sqrt(s["variance"])
        lim = 8 * sd
        ax.hist(x, bins=160, range=(s["mean"] - lim, s["mean"] + lim), density=True, color="0.75", label="weights")
        g = np.linspace(s["mean"] - lim, s["mean"] + lim, 400)
        ax.plot(g, np.exp(-0.5 * ((g - s["mean"]) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), "C0--", lw=1,
                label=f"Gaussian (KL {s['kl_hist_gauss']:.3f})")
        ax.plot(g, stats.ggd_pdf(g, s["ggd_beta"], s["ggd_alpha"], s["mean"]), "C3", lw=1,
                label=f"GGD β={s['ggd_beta']:.2f} (KL {s['kl_hist_ggd']:.3f})")
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-4 / sd, 1e-3))
        ax.set_title(_short(n), fontsize=9)
        ax.legend(fontsize=7)
    _savefig(fig, path)


def plot_rd(res: dict[str, Any], path: Path) -> None:
    """Pooled normalized distortion vs rate: Gaussian bound, GGD Shannon lower bound, Lloyd-Max for the
    fitted GGDs, and every weight-only method's (bits per weight, D/σ²) point."""
    plt = _plt()
    ws, names = res["weight_stats"], res["layers"]
    n = np.array([ws[k]["n"] for k in names], dtype=float)
    betas = [ws[k]["ggd_beta"] for k in names]
    epr = np.array([bounds.entropy_power_ratio(b) for b in betas])
    r = np.linspace(1, 9, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(r, 2.0 ** (-2 * r), "k--", lw=1, label="Gaussian bound σ²2^(-2R)")
    ax.semilogy(r, np.sum(n * epr) / n.sum() * 2.0 ** (-2 * r), "C2:", lw=1.2, label="Shannon lower bound (fitted GGD)")
    lm = [np.sum(n * np.array([bounds.lloyd_max_mse(b, k) for b in betas])) / n.sum() for k in bounds.LM_BITS]
    ax.semilogy(bounds.LM_BITS, lm, "C1s-", ms=4, lw=0.8, label="Lloyd-Max (fitted GGD, no metadata)")
    for i, (lb, m) in enumerate(res["summary"]["methods"].items()):
        ax.semilogy([m["bpw"]], [m["normalized_mse"]], "o", color=f"C{(i + 3) % 10}", label=lb)
    _axes(ax, "bits per weight (effective, metadata charged)", "D / σ² (pooled over layers)", 7)
    _savefig(fig, path)


def plot_scatter(res: dict[str, Any], path: Path) -> None:
    """Weight MSE vs layer output MSE (every layer, every method) and vs KL of that linear alone, log-log."""
    plt = _plt()
    pl, labels = res["per_layer"], list(res["summary"]["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("output_mse", "layer output MSE (calibration activations)",
               [(n, lb, pl[n][lb]["weight_mse"], pl[n][lb]["output_mse"]) for n in res["layers"] for lb in labels]),
              ("kl", "KL of the linear alone (nats/token)",
               [(n, lb, pl[n][lb]["weight_mse"], res["alone"][n][lb]["kl"]) for n in res["alone"] for lb in labels
                if lb in res["alone"][n]])]
    for ax, (_, ylabel, pts) in zip(axes, panels):
        for i, lb in enumerate(labels):
            xs = [p[2] for p in pts if p[1] == lb]
            ys = [p[3] for p in pts if p[1] == lb]
            ax.loglog(xs, ys, ".", color=f"C{i % 10}", ms=4, alpha=0.7, label=lb)
        xs = np.array([p[2] for p in pts])
        ys = np.array([p[3] for p in pts])
        m = (xs > 0) & (ys > 0)
        if m.sum() >= 3:
            c = stats.correlation(xs[m], ys[m])
            k, b = np.polyfit(np.log10(xs[m]), np.log10(ys[m]), 1)
            g = np.logspace(np.log10(xs[m].min()), np.log10(xs[m].max()), 20)
            ax.loglog(g, 10 ** b * g ** k, "k-", lw=1,
                      label=f"fit slope {k:.2f}; r={c['pearson_loglog']:.2f}, ρ={c['spearman']:.2f}")
        _axes(ax, "weight MSE", ylabel, 6)
    _savefig(fig, path)


def plot_sensitivity(res: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sens = res["sensitivity"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    if sens["by_layer"]:
        axes[0].bar([r["layer"] for r in sens["by_layer"]], [r["kl"] for r in sens["by_layer"]], color="C0")
        axes[0].set_xlabel("decoder layer alone quantized")
        axes[0].set_ylabel("KL vs float (nats/token)")
    if sens["by_kind"]:
        rows = sorted(sens["by_kind"], key=lambda r: -r["kl"])
        axes[1].bar([_short(r["kind"]) for r in rows], [r["kl"] for r in rows], color="C1")
        axes[1].set_xlabel("kind alone (all layers)")
        axes[1].tick_params(axis="x", labelrotation=45)
    fig.suptitle(f"sensitivity: {sens['label']}", fontsize=9)
    _savefig(fig, path)


def write_analysis(res: dict[str, Any], model, out: Path) -> dict[str, str]:
    """``analysis.json``, ``analysis.md`` and four PNGs into ``out`` (an existing directory)."""
    files = {"json": out / "analysis.json", "markdown": out / "analysis.md", "histograms": out / "histograms.png",
             "rate_distortion": out / "rate_distortion.png", "weight_vs_output": out / "weight_vs_output.png",
             "sensitivity": out / "sensitivity.png"}
    write_json(res, files["json"])
    files["markdown"].write_text(analysis_markdown(res))
    plot_histograms(model, res, files["histograms"], res["settings"].get("hist_layers") or None)
    if res["summary"]["methods"]:
        plot_rd(res, files["rate_distortion"])
        plot_scatter(res, files["weight_vs_output"])
    plot_sensitivity(res, files["sensitivity"])
    return {k: str(v) for k, v in files.items() if v.exists()}


# ----------------------------------------------------------------------------- bench matrix
def collapse_notes(notes: list[str]) -> list[str]:
    """Per-layer notes (``target: module.path: text``) folded into one line per distinct text with a count."""
    import re

    out: dict[str, int] = {}
    for n in notes:
        m = re.match(r"^(\w+): ([\w.]+\.[\w.]+): (.*)$", n)
        key = f"{m.group(1)}: {{}} layer(s): {m.group(3)}" if m else n
        out[key] = out.get(key, 0) + 1
    return [k.format(c) if "{}" in k else k for k, c in out.items()]


def bench_markdown(rows: list[dict[str, Any]], settings: dict[str, Any], seconds: float, skipped: list[str]) -> str:
    sets = settings["datasets"]
    cols = ["label", "bpw", "size_mib"] + [f"ppl_{d}" for d in sets] + [f"kl_{sets[0]}", f"top1_{sets[0]}"]
    cols += [c for d in sets[1:] for c in (f"kl_{d}",)] + ["quantize_s", "peak_mib"]
    targets = settings.get("file_targets", [])
    cols[3:3] = [f"file_{k}_{t}" for t in targets for k in ("bpw", "mib")]
    head = (f"# macq bench ({settings['model']})\n\nPerplexity on the first {settings['max_tokens']} tokens of each text's "
            f"evaluation half, windows of {settings['context']}; KL/top-1 against the fp16-rounded model; calibration "
            f"{settings['calib_dataset']} {settings['n_calib']}x{settings['seq_len']}; quantize_s / peak_mib: wall time "
            f"and peak process RSS of quantization. This run: {seconds:.0f} s"
            + (f" (resumed: {', '.join(skipped)} read from results.json)" if skipped else "") + ".\n\n")
    if targets:
        head += ("bpw: the record's rate (metadata charged); file_bpw_T / file_mib_T: bits per quantized weight as "
                 "stored in target T's export (its dtypes and layout) and the export's size on disk; empty where "
                 "T cannot hold the records without re-quantizing them.\n\n")
    notes = [f"- {r['label']}: {n}" for r in rows for n in collapse_notes(r.get("file_notes") or [])]
    return head + md_table(rows, cols) + "\n" + ("\nExport notes:\n" + "\n".join(notes) + "\n" if notes else "")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and perplexity (smaller is better)."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plot_bench(rows: list[dict[str, Any]], sets: list[str], pareto_path: Path, bars_path: Path) -> None:
    plt = _plt()
    d0 = sets[0]
    pts = [(r["size_mib"], r[f"ppl_{d0}"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (r, (x, y)) in enumerate(zip(rows, pts)):
        ax.plot(x, y, "o", color=f"C{i % 10}")
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=0.8, label="Pareto front")
    _axes(ax, "deployed size (MiB)", f"perplexity ({d0})", 7)
    _savefig(fig, pareto_path)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(rows))
    w = 0.8 / max(1, len(sets))
    for j, d in enumerate(sets):
        axes[0].bar(x + j * w, [r[f"ppl_{d}"] for r in rows], w, label=d)
        axes[1].bar(x + j * w, [r[f"kl_{d}"] for r in rows], w, label=d)
    axes[2].bar(x, [r["bpw"] for r in rows], color="C4")
    for ax, t in zip(axes, ("perplexity", "KL vs fp16 (nats/token)", "bits per weight")):
        ax.set_xticks(x + (0.4 - w / 2 if ax is not axes[2] else 0))
        ax.set_xticklabels([r["label"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(t, fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    _savefig(fig, bars_path)
