"""Mixed precision vs uniform formats vs llama.cpp-style recipes on the default model (MLX target).

Prints a Markdown table: bpw (all scales/biases charged), wiki perplexity (evaluation half, first
``--eval-tokens`` tokens, context 512) and KL(fp || quantized) per token against the float model, plus the
Spearman rank correlation between the Hessian proxy and the KL sensitivity where both were measured.

Caveat printed in the header: the default model's linear weights are dequantized GGUF Q4_1 (4-bit
asymmetric, blocks of 32), so 4-bit g32 re-quantization is nearly free; the interesting range is below
4 bpw.

    python scripts/bench.py bench_mixed --targets 3.0 3.5 4.0 4.5 --kl-formats a3g64b a4g64b
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

from macq.data import calibration_samples, eval_tokens
from macq.eval.agreement import token_stats
from macq.eval.perplexity import nll_from_logits, scored_logits, window_batches, windows
from macq.models import DEFAULT_MODEL_CAVEAT, get_weight, load_model, quantizable_modules
from macq.quantizers.formats import Format, candidate_formats
from macq.quantizers.mixed import MixedConfig, allocation_summary, quantize_model, sensitivity_table
from macq.quantizers.sensitivity import spearman

BENCH_FORMATS = ("a2g32b", "a2g64b", "a2g128b", "a3g32b", "a3g64b", "a3g128b", "a4g64b", "a4g128b", "a5g64b",
                 "a6g64b", "a8g64b")


def evaluate(model, ids: torch.Tensor, ref: list[torch.Tensor] | None, context: int) -> dict:
    """Perplexity and (if ``ref`` given) mean KL vs the reference log-probs, from one pass of forwards."""
    nll, kl, lps = [], [], []
    with torch.inference_mode():
        for i, batch in enumerate(window_batches(windows(ids.numel(), context), 1)):
            for _, logits, targets in scored_logits(model, ids, batch, torch.device("cpu")):
                nll.append(nll_from_logits(logits, targets).double())
                lp = torch.log_softmax(logits.float(), -1)
                if ref is None:
                    lps.append(lp)
                else:
                    kl.append(token_stats(ref[i], lp)[0].double())
    out = {"ppl": math.exp(float(torch.cat(nll).mean()))}
    if ref is not None:
        out["kl"] = float(torch.cat(kl).mean())
    else:
        out["ref"] = lps
    return out


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5])
    ap.add_argument("--formats", nargs="+", default=list(BENCH_FORMATS), help="candidate MLX formats")
    ap.add_argument("--uniform", nargs="+", default=["a3g128b", "a3g64b", "a4g128b", "a4g64b"])
    ap.add_argument("--recipes", nargs="*", default=["q3_k_m-like", "q4_k_m-like"])
    ap.add_argument("--kl-formats", nargs="*", default=["a3g64b", "a4g64b"],
                    help="formats for KL sensitivity (per decoder layer); empty: skip")
    ap.add_argument("--kl-targets", type=float, nargs="*", default=[4.0])
    ap.add_argument("--kl-tokens", type=int, default=128, help="calibration tokens per KL measurement")
    ap.add_argument("--kl-compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also allocate by proxy and Fisher at the KL formats/granularity")
    ap.add_argument("--gptq-targets", type=float, nargs="*", default=[])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, help="also write rows and tables here")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)

    t0 = time.time()
    model, tok = load_model(args.model)
    calib = calibration_samples(tok, "wiki", args.n_calib, args.seq_len)
    ids = eval_tokens(tok, "wiki", args.eval_tokens)
    fmts = candidate_formats("mlx", args.formats)
    print(f"# Mixed precision, target mlx — {args.model or 'default model'}\n", flush=True)
    if args.model is None:
        print(f"Caveat: {DEFAULT_MODEL_CAVEAT}.\n")
    print(f"wiki eval split, first {ids.numel()} tokens, context {args.context}; calibration wiki "
          f"{args.n_calib}x{args.seq_len}; candidate formats {', '.join(f.name for f in fmts)}\n", flush=True)

    base = evaluate(model, ids, None, args.context)
    ref = base.pop("ref")
    rows = [{"method": "fp32", "bpw": 16.0, "ppl": base["ppl"], "kl": 0.0, "detail": ""}]
    print("| method | target | bpw | wiki ppl | KL vs fp | allocation |\n|---|---|---|---|---|---|", flush=True)

    def emit(method: str, target, qm) -> None:
        ev = evaluate(qm.to_torch(), ids, ref, args.context)
        row = {"method": method, "target": target, "bpw": qm.bits_per_weight(), **ev,
               "detail": allocation_summary(qm.method.get("allocation", {}))}
        rows.append(row)
        det = ", ".join(f"{k}:{v}" for k, v in row["detail"].items())
        tgt = "" if target is None else f"{target:g}"
        print(f"| {method} | {tgt} | {row['bpw']:.3f} | {row['ppl']:.2f} | {row['kl']:.4f} | {det} |", flush=True)

    print(f"| fp32 |  | 16 | {base['ppl']:.2f} | 0 | |", flush=True)
    for name in args.uniform:
        misfit = [m for m, mod in quantizable_modules(model).items()
                  if not Format.parse(name).fits(tuple(get_weight(mod).shape))]
        if misfit:
            print(f"| uniform {name} | | | | | skipped: does not fit {misfit[0]} and {len(misfit) - 1} more |")
            continue
        emit(f"uniform {name}", None, uniform(model, name))
    t = time.time()
    proxy = sensitivity_table(model, MixedConfig(formats=tuple(args.formats), sensitivity="proxy"), calib)
    t_proxy = time.time() - t
    for target in args.targets:
        emit("mixed proxy/rtn", target, quantize_model(model, MixedConfig(
            target_bpw=target, formats=tuple(args.formats)), calib, table=proxy))
    t = time.time()
    fisher = sensitivity_table(model, MixedConfig(formats=tuple(args.formats), sensitivity="fisher"), calib)
    t_fisher = time.time() - t
    for target in args.targets:
        emit("mixed fisher/rtn", target, quantize_model(model, MixedConfig(
            target_bpw=target, formats=tuple(args.formats)), calib, table=fisher))
    for target in args.gptq_targets:
        emit("mixed fisher/gptq", target, quantize_model(copy.deepcopy(model), MixedConfig(
            target_bpw=target, formats=tuple(args.formats), base_method="gptq"), calib, table=fisher))
    for name in args.recipes:
        emit(f"recipe {name}", None, quantize_model(model, MixedConfig(recipe=name), calib))

    extra = {"proxy_seconds": t_proxy, "fisher_seconds": t_fisher}
    if args.kl_formats:
        n_seq = max(1, args.kl_tokens // args.seq_len)
        kl_cfg = MixedConfig(formats=tuple(args.kl_formats), sensitivity="kl", granularity="layer",
                             kl_samples=n_seq)
        kl_calib = calib[:n_seq, : min(args.kl_tokens, args.seq_len)]
        t = time.time()
        kl_table = sensitivity_table(model, kl_cfg, kl_calib)
        extra["kl_seconds"] = time.time() - t
        sub = [fmts.index(f) for f in kl_table.formats]
        proxy_layer = proxy.grouped(kl_table.members)
        rho_all = spearman(proxy_layer.errors[:, sub], kl_table.errors)
        rho_fmt = {f.name: spearman(proxy_layer.errors[:, j], kl_table.errors[:, i])
                   for i, (f, j) in enumerate(zip(kl_table.formats, sub))}
        fisher_layer = fisher.grouped(kl_table.members)
        rho_fisher = spearman(fisher_layer.errors[:, sub], kl_table.errors)
        rho_fisher_fmt = {f.name: spearman(fisher_layer.errors[:, j], kl_table.errors[:, i])
                          for i, (f, j) in enumerate(zip(kl_table.formats, sub))}
        extra.update(spearman_all=rho_all, spearman_per_format=rho_fmt, spearman_fisher_all=rho_fisher,
                     spearman_fisher_per_format=rho_fisher_fmt, kl_table=kl_table.to_dict())
        for target in args.kl_targets:
            cfg = MixedConfig(target_bpw=target, formats=tuple(args.kl_formats), granularity="layer")
            emit("mixed KL/rtn (per layer)", target, quantize_model(model, cfg, calib, table=kl_table))
            if not args.kl_compare:
                continue
            emit("mixed proxy/rtn (per layer, KL formats)", target,
                 quantize_model(model, cfg, calib, table=proxy_layer_subset(proxy_layer, sub)))
            emit("mixed fisher/rtn (per layer, KL formats)", target,
                 quantize_model(model, cfg, calib, table=proxy_layer_subset(fisher_layer, sub)))
        print(f"\nKL sensitivity: {len(kl_table.units)} decoder layers x {', '.join(args.kl_formats)}, "
              f"{kl_calib.numel()} calibration tokens per measurement, {extra['kl_seconds']:.0f} s. "
              f"Spearman(proxy, KL) over all (layer, format) pairs: {rho_all:.3f}; per format across layers: "
              + ", ".join(f"{k} {v:.3f}" for k, v in rho_fmt.items())
              + f". Spearman(fisher, KL): all pairs {rho_fisher:.3f}; per format "
              + ", ".join(f"{k} {v:.3f}" for k, v in rho_fisher_fmt.items()))
    print(f"\nHessian proxy: {len(proxy.units)} linears x {len(fmts)} formats in {t_proxy:.0f} s; Fisher: "
          f"{t_fisher:.0f} s ({calib.shape[0]} backward passes). "
          f"Total {time.time() - t0:.0f} s on {torch.get_num_threads()} CPU threads.", flush=True)
    if args.json:
        write_json(args.json, "bench_mixed", {"rows": rows, **extra, "proxy": proxy.to_dict(),
                                              "fisher": fisher.to_dict()})


def uniform(model, name: str):
    """Every decoder linear in one format (RTN): the baseline a mixed allocation must beat."""
    from macq.qmodel import QuantizedModel
    from macq.quantizers.formats import Format
    from macq.quantizers.mixed import quantize_assignment

    cfg = MixedConfig(formats=(name,))
    mods = quantizable_modules(model)
    records = quantize_assignment(model, {m: Format.parse(name) for m in mods}, cfg, None)
    return QuantizedModel.from_model(model, records, method={"method": "uniform", "format": name,
                                                             "allocation": {m: name for m in mods}})


def proxy_layer_subset(table, cols):
    """The same table restricted to the format columns ``cols``."""
    from macq.quantizers.sensitivity import SensitivityTable

    return SensitivityTable(table.units, table.members, [table.formats[j] for j in cols], table.errors[:, cols],
                            table.bpw[:, cols], table.sizes, table.kind, table.notes)


if __name__ == "__main__":
    sys.exit(main())
