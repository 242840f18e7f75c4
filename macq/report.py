"""``macq report``: merge run files from any machines into one Markdown table and PNG plots.

Runs are only put side by side when they measured the same source model (hash) on the same evaluation
text (hash of the scored token ids); :func:`macq.results.check_comparable` refuses anything else before
a file is written. Latency-only runs (``macq bench --out``) carry no text and join any text's table.
Rows that could not be measured (e.g. CUDA rows when no GPU was available) can be listed with
``pending`` so the table shows them empty and says why, instead of leaving them out silently.

The directory (``report.md``, ``runs.json``, ``speed.png``, ``ppl_vs_size.png``, ``latency_vs_bits.png``)
is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from macq.atomic import PNG_SOFTWARE, atomic_dir, guard_output, write_marker
from macq.errors import MacqError
from macq.results import RunResult, check_comparable, load_run

PNG_METADATA = {"Software": PNG_SOFTWARE}
COLUMNS = ("row", "runtime", "device", "bits/weight", "size (MiB)", "ppl", "KL (nats)", "top-1", "prefill tok/s",
           "decode tok/s", "decode ms/tok", "peak MiB")


def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def table_row(r: RunResult) -> dict[str, str]:
    ppl = r.metrics.get("ppl")
    ppl_s = "" if ppl is None or ppl.value is None else (
        f"{ppl.value:.3f} ± {ppl.stderr:.3f}" if ppl.stderr is not None else f"{ppl.value:.3f}")
    return {"row": r.row_label(), "runtime": r.runtime, "device": f"{r.device_kind}: {r.device_name}",
            "bits/weight": _f(r.metric("bits_per_weight"), ".3f"), "size (MiB)": _f(r.metric("size"), ".1f"),
            "ppl": ppl_s, "KL (nats)": _f(r.metric("kl"), ".4f"), "top-1": _f(r.metric("top1"), ".3f"),
            "prefill tok/s": _f(r.metric("prefill_tokens_per_s"), ".1f"),
            "decode tok/s": _f(r.metric("decode_tokens_per_s"), ".1f"),
            "decode ms/tok": _f(r.metric("decode_ms_per_token"), ".2f"), "peak MiB": _f(r.metric("peak_memory"), ".0f")}


def markdown_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows]
    return "\n".join(out)


def parse_pending(items: list[str]) -> list[dict[str, str]]:
    """``LABEL=REASON`` -> an empty table row labelled with its reason."""
    rows = []
    for it in items:
        label, sep, reason = it.partition("=")
        if not sep or not label.strip() or not reason.strip():
            raise MacqError(f"--pending {it!r}: expected LABEL=REASON, e.g. 'bnb-nf4 cuda=not run: no GPU lent'")
        rows.append({"row": label.strip(), "runtime": reason.strip()})
    return rows


def weight_section(r: RunResult) -> str:
    """Per-layer weight comparison of one run (reference library vs macq's record of the same config)."""
    from macq.baselines.weights import summary

    s = summary(r.layers)
    has_macq = "macq_mse" in s
    head = (f"### {r.row_label()}: weights, {s['layers']} layers ({s['n']} weights)\n\n"
            f"Weight-count-weighted: reference bpw {s['ref_bpw']:.3f}, MSE {s['ref_mse']:.3e}, gap to the R–D bound "
            f"{s['ref_gap_bits']:.3f} bits")
    if has_macq:
        head += (f"; macq bpw {s['macq_bpw']:.3f}, MSE {s['macq_mse']:.3e}, gap {s['macq_gap_bits']:.3f} bits; "
                 f"**{s['layers_equal']} of {s['layers']} layers bit-equal** (largest |Δw| {s['max_abs_diff']:.3g})")
    cols = ("layer", "ref bpw", "ref MSE", "ref SQNR dB", "ref gap bits") + (
        ("macq MSE", "macq SQNR dB", "macq gap bits", "max |Δw|", "equal") if has_macq else ())
    rows = []
    for x in r.layers:
        row = {"layer": x["layer"], "ref bpw": f"{x['ref_bpw']:.3f}", "ref MSE": f"{x['ref_mse']:.3e}",
               "ref SQNR dB": f"{x['ref_sqnr_db']:.2f}", "ref gap bits": f"{x['ref_gap_bits']:.3f}"}
        if has_macq:
            row.update({"macq MSE": f"{x['macq_mse']:.3e}", "macq SQNR dB": f"{x['macq_sqnr_db']:.2f}",
                        "macq gap bits": f"{x['macq_gap_bits']:.3f}", "max |Δw|": f"{x['max_abs_diff']:.3g}",
                        "equal": "yes" if x["equal"] else "no"})
        rows.append(row)
    return head + "\n\n" + markdown_table(rows, cols)


def _plots(runs: list[RunResult], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    speed = [r for r in runs if r.metric("decode_tokens_per_s") or r.metric("prefill_tokens_per_s")]
    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(speed) + 1.8))
        labels = [f"{r.row_label()} [{r.runtime} / {r.device_kind}]" for r in speed]
        for ax, key, title in ((axes[0], "prefill_tokens_per_s", "prefill tokens/s"),
                               (axes[1], "decode_tokens_per_s", "decode tokens/s")):
            ax.barh(range(len(speed)), [r.metric(key) or 0.0 for r in speed], color="tab:blue")
            ax.set_yticks(range(len(speed)))
            ax.set_yticklabels(labels if ax is axes[0] else [""] * len(speed), fontsize=8)
            ax.set_title(title)
            ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=110, metadata=PNG_METADATA)
        plt.close(fig)
        written.append("speed.png")
    for name, xkey, ykey, xl, yl in (("ppl_vs_size.png", "size", "ppl", "size (MiB)", "perplexity"),
                                     ("latency_vs_bits.png", "bits_per_weight", "decode_ms_per_token",
                                      "bits per weight", "decode ms/token")):
        pts = [r for r in runs if r.metric(xkey) is not None and r.metric(ykey) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in pts:
            ax.scatter(r.metric(xkey), r.metric(ykey))
            ax.annotate(f"{r.row_label()} [{r.device_kind}]", (r.metric(xkey), r.metric(ykey)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, metadata=PNG_METADATA)
        plt.close(fig)
        written.append(name)
    return written


def build_report(paths: list[str], out: Path, pending: list[str] | None = None, force: bool = False) -> tuple[dict[str, Any], str]:
    guard_output(out, force, inputs=paths)
    pend = parse_pending(pending or [])
    runs = [load_run(p) for p in paths]
    check_comparable(runs)
    base = next((r for r in runs if r.eval_text_hash), runs[0])
    rows = [table_row(r) for r in runs] + pend
    lines = [f"# macq report: {base.model_id}", "",
             f"Model hash `{base.model_hash}`; evaluation text: {base.eval_text_id} (`{base.eval_text_hash}`).",
             "KL is KL(float ‖ row) per scored token against the fp32 model; ppl ± delta-method standard error.", "",
             markdown_table(rows), ""]
    for r in runs:
        if r.notes:
            lines.append(f"- {r.row_label()}: " + "; ".join(r.notes))
    lines.append("")
    for r in runs:
        if r.layers:
            lines += [weight_section(r), ""]
    md = "\n".join(lines)
    with atomic_dir(out) as tmp:
        plots = _plots(runs, tmp)
        (tmp / "report.md").write_text(md + "\n" + "".join(f"\n![{p}]({p})\n" for p in plots))
        (tmp / "runs.json").write_text(json.dumps([r.to_dict() for r in runs], indent=1))
        write_marker(tmp, "report")
    return {"output": str(out), "runs": len(runs), "pending": len(pend), "plots": plots}, md
