#!/usr/bin/env python
"""Benchmark (not a test): Core ML package size vs fp16 for k-means 4-bit, NF4 and int4 g32 records on the
default model, and macq's k-means vs coremltools' own ``palettize_weights`` (weight MSE, wall time).

    python scripts/bench.py coreml_sizes [--context 256] [--out /tmp/coreml_sizes] [--skip-ct]

Prints Markdown. Sizes are whole packages (the fp16 tied embedding, ~56 MB for SmolLM2, is in every row);
bits/weight is over the compressed weights only, read back from each file.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _export(qm, out: Path, context: int, reuse: bool = False):
    from converters import ExportResult, export_coreml
    from converters.inspect import inspect_mlpackage

    if reuse and out.exists():  # exports are atomic: an existing package is complete
        i = inspect_mlpackage(out)
        return ExportResult(out, i["bytes_on_disk"], i["bits_per_weight"], i["ops"], i["ane_report"], ["reused"]), float("nan")
    t = time.perf_counter()
    res = export_coreml(qm, out, context=context, force=True)
    return res, time.perf_counter() - t


def _quantize(model, method: str, **kw):
    from macq.quantizers import quantize_model

    t = time.perf_counter()
    qm = quantize_model(copy.deepcopy(model), method, **kw)
    return qm, time.perf_counter() - t


def _ct_palettize(fp16_path: Path, names: list[str], out: Path):
    """coremltools' k-means on the fp16 export, restricted to the same linears; returns (weights, seconds)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from converters.inspect import load_program

    ml = ct.models.MLModel(str(fp16_path), skip_model_load=True)
    prog, _ = load_program(fp16_path)
    consts = {op.name: op for op in prog.functions["main"].operations if op.op_type == "const"}
    targets = {}
    for name in names:
        key = "model_" + name.replace(".", "_") + "_weight"
        hit = [n for n in consts if n.startswith(key)]
        if len(hit) == 1:
            targets[name] = hit[0]
    op_cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16,
                                    weight_threshold=1)
    cfg = cto.OptimizationConfig(op_name_configs={c: op_cfg for c in targets.values()})
    t = time.perf_counter()
    pal = cto.palettize_weights(ml, cfg)
    secs = time.perf_counter() - t
    pal.save(str(out))
    prog2, _ = load_program(out)
    luts = [o for o in prog2.functions["main"].operations if o.op_type == "constexpr_lut_to_dense"]
    weights = {}
    for name, cname in targets.items():
        op = next((o for o in luts if o.name.startswith(cname)), None)
        if op is not None:
            weights[name] = np.asarray(op.materialized_val_inference(), dtype=np.float32)
    return weights, secs, len(targets)


def main() -> None:
    from outputs import check_scratch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("/tmp/coreml_sizes"))
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse packages already in --out")
    ap.add_argument("--ct-layers", type=int, default=4,
                    help="decoder layers in the macq vs coremltools k-means comparison (sklearn k-means is slow)")
    args = ap.parse_args()
    check_scratch(args.out, "coreml-sizes-scratch")
    torch.manual_seed(0)

    from converters.inspect import inspect_mlpackage
    from macq.models import DEFAULT_MODEL_CAVEAT, get_weight, load_model, quantizable_modules
    from macq.qmodel import QuantizedModel

    model, _ = load_model(None)
    model.eval()
    rows = []
    base, t_base = _export(QuantizedModel.from_model(model, {}), args.out / "fp16.mlpackage", args.context, args.reuse)
    rows.append(("fp16 (no records)", "-", base, 0.0, t_base))
    runs = [("k-means 4-bit, 16-row grouped LUT", "kmeans", dict(bits=4, granularity="per_grouped_channel", group_size=16)),
            ("NF4 (block 64, double quant)", "nf4", {}),
            ("int4 affine g32 (RTN, symmetric)", "rtn", dict(bits=4, group_size=32, symmetric=True))]
    qms = {}
    for label, method, kw in runs:
        qm, tq = _quantize(model, method, **kw)
        qms[method] = (qm, tq)
        res, te = _export(qm, args.out / f"{method}.mlpackage", args.context, args.reuse)
        rows.append((label, f"{qm.bits_per_weight():.3f}", res, tq, te))
        print(f"[{label}] notes: {res.notes[:1]}{' …' if len(res.notes) > 1 else ''}", flush=True)

    print(f"\n## Core ML export sizes (default model, context {args.context}, iOS18, fp16 compute)\n")
    print("| records | record bits/w | package MB | vs fp16 | file bits/w (compressed weights) | quantize s | export s |")
    print("|---|---|---|---|---|---|---|")
    for label, rbits, res, tq, te in rows:
        print(f"| {label} | {rbits} | {res.bytes_on_disk / 1e6:.1f} | {res.bytes_on_disk / base.bytes_on_disk:.3f} | "
              f"{res.bits_per_weight:.3f} | {tq:.1f} | {te:.1f} |")
    lin = {n: get_weight(m).detach().float() for n, m in quantizable_modules(model).items()}
    n_lin = sum(w.numel() for w in lin.values())
    print(f"\nquantized linears: {len(lin)} ({n_lin / 1e6:.1f} M weights); caveat: {DEFAULT_MODEL_CAVEAT}")
    for label, _, res, _, _ in rows[1:]:
        fmts = inspect_mlpackage(res.path)["formats"]
        print(f"- {label}: " + ", ".join(f"{k} ×{v['count']} ({v['bits_per_weight']:.3f} b/w)" for k, v in fmts.items()))

    if args.skip_ct:
        return
    from macq.quantizers import make_config, method_spec

    subset = [n for n in lin if int(n.split(".")[2]) < args.ct_layers]
    qm, _ = qms["kmeans"]
    cfg = make_config("kmeans", bits=4, granularity="per_grouped_channel", group_size=16)
    fn = method_spec("kmeans").load()[1]
    t = time.perf_counter()
    for n in subset:  # time macq's k-means on exactly the weights coremltools gets
        fn(lin[n], cfg)
    t_macq = time.perf_counter() - t
    ct_w, t_ct, n_ct = _ct_palettize(base.path, subset, args.out / "ct_kmeans.mlpackage")
    common = [n for n in subset if n in ct_w]
    if not common:
        print(f"\ncoremltools comparison: no palettized weight matched by name ({n_ct} targets)")
        return
    se_m = sum(float(((qm.records[n].dequantize() - lin[n]) ** 2).sum()) for n in common)
    se_c = sum(float(((torch.from_numpy(ct_w[n]) - lin[n]) ** 2).sum()) for n in common)
    n = sum(lin[k].numel() for k in common)
    ct_size = inspect_mlpackage(args.out / "ct_kmeans.mlpackage")
    print(f"\n## k-means 4-bit, 16-row grouped LUT: macq vs coremltools palettize_weights "
          f"(decoder layers 0..{args.ct_layers - 1})\n")
    print("| implementation | linears | weight MSE | rel. to macq | wall s | file bits/w (those linears) |")
    print("|---|---|---|---|---|---|")
    print(f"| macq kmeans (n_init 4, LUT fp16) | {len(common)} | {se_m / n:.4e} | 1.000 | {t_macq:.1f} | "
          f"{4 + 16 * 16 / (16 * lin[common[0]].shape[1]):.3f} (q_proj) |")
    print(f"| coremltools OpPalettizerConfig(kmeans, per_grouped_channel, 16) | {len(common)}/{n_ct} | {se_c / n:.4e} | "
          f"{se_c / se_m:.3f} | {t_ct:.1f} | {ct_size['bits_per_weight']:.3f} |")
    print(f"\nwall-time ratio coremltools / macq: {t_ct / t_macq:.2f} (macq: k-means of those weights only; "
          "coremltools: palettize_weights incl. its MIL round trip; 2 CPU cores shared with other jobs)")
    shutil.rmtree(args.out / "ct_kmeans.mlpackage", ignore_errors=True)


if __name__ == "__main__":
    main()
