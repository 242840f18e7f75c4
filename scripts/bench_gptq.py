#!/usr/bin/env python
"""GPTQ vs RTN (same grid) vs fp on the default model: perplexity, KL to fp, bpw, time and memory.

Caveat that shapes this table: the default model (SmolLM2-135M-Instruct from GGUF Q4_1) has linear
weights that are *dequantized Q4_1* (4-bit asymmetric, g32). Re-quantizing at 4-bit g32 asymmetric is
nearly free and says nothing about a method, so the comparison is at g64 (the largest MLX group that
divides hidden 576 = 4.5·128, so g128 is impossible here) and, where methods really differ, 3 and 2 bits,
symmetric and asymmetric.

Calibration: ``--n`` windows of ``--seq-len`` tokens from the calibration half of a bundled text
(default c4). Evaluation: the first ``--eval-tokens`` tokens of the wiki evaluation half (held out from
calibration), 512-token non-overlapping windows; KL(fp ‖ quantized) per token on the same positions.
Time and peak RSS cover the quantization call only (GPTQ: calibration forwards + Hessians + solves).

    python scripts/bench_gptq.py --n 32 --seq-len 512          # modest config (about 25 min on 2 cores)
    python scripts/bench_gptq.py --configs 3:64 --sym asym     # one row pair
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--n", type=int, default=128, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dataset", default="c4", help="calibration text (bundled c4 | wiki | tinystories | file)")
    ap.add_argument("--eval-dataset", default="wiki")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--configs", default="4:64,3:64,2:64",
                    help="bits:group[:sym|asym] list (hidden 576 = 4.5·128: g128 does not divide it)")
    ap.add_argument("--sym", default="sym,asym", help="sym,asym | sym | asym")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--act-order", action="store_true", help="GPTQ act_order (with static groups)")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from macq.data import calibration_samples, eval_tokens
    from macq.eval.agreement import token_stats
    from macq.eval.memory import measure_peak_detail
    from macq.eval.perplexity import nll_from_logits, scored_logits, window_batches, windows
    from macq.models import load_model
    from macq.qmodel import QuantizedModel
    from macq.quantizers import quantize_model
    from macq.quantizers.gptq import GPTQConfig, gptq_layers

    fp, tok = load_model(a.model)
    calib = calibration_samples(tok, a.dataset, a.n, a.seq_len)
    ids = eval_tokens(tok, a.eval_dataset, a.eval_tokens)
    ws = windows(ids.numel(), a.context)
    ref: list[torch.Tensor] = []
    rows: list[dict] = []

    @torch.inference_mode()
    def evaluate(name: str, model, bpw: float, secs: float | None, mem, extra: str = "") -> None:
        """Perplexity (exactly macq.eval.perplexity's windows and NLL) and KL / top-1 vs fp from ONE
        forward per window: the fp log-probs are kept from the fp row (about 0.8 GB at 4096 tokens)."""
        nll, kl, top1 = [], [], []
        for i, batch in enumerate(window_batches(ws, 1)):
            for _, logits, targets in scored_logits(model, ids, batch, torch.device("cpu")):
                nll.append(nll_from_logits(logits, targets).double())
                lp = torch.log_softmax(logits.float(), -1)
                if len(ref) < len(ws):
                    ref.append(lp)
                k, t, _ = token_stats(ref[i], lp)
                kl.append(k), top1.append(t)
        row = {"method": name, "bpw": bpw, "ppl": float(torch.cat(nll).mean().exp()),
               "kl": float(torch.cat(kl).double().mean()), "top1": float(torch.cat(top1).double().mean()), "secs": secs,
               "peak_rss_mb": None if mem is None else mem.peak_bytes / 2**20,
               "delta_rss_mb": None if mem is None or mem.delta_bytes is None else mem.delta_bytes / 2**20,
               "note": extra}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    evaluate("fp32", fp, 32.0, None, None)
    for spec in a.configs.split(","):
        bits, group = (int(x) for x in spec.split(":")[:2])
        for sym in spec.split(":")[2:] or a.sym.split(","):
            symmetric = sym == "sym"
            label = f"{bits}-bit g{group} {sym}"
            if "rtn" in a.methods:
                m = copy.deepcopy(fp)
                t0 = time.perf_counter()
                qm, mem = measure_peak_detail(lambda: quantize_model(m, "rtn", bits=bits, group_size=group,
                                                                      symmetric=symmetric, zero_point="int"))
                secs = time.perf_counter() - t0
                evaluate(f"RTN {label}", qm.apply_to(m), qm.bits_per_weight(), secs, mem)
            if "gptq" in a.methods:
                m = copy.deepcopy(fp)
                cfg = GPTQConfig(bits=bits, group_size=group, symmetric=symmetric, act_order=a.act_order,
                                 static_groups=a.act_order, true_sequential=not a.no_true_sequential,
                                 batch_size=a.batch_size, device=a.device)
                t0 = time.perf_counter()
                (records, stats), mem = measure_peak_detail(lambda: gptq_layers(m, cfg, calib, progress=True))
                secs = time.perf_counter() - t0
                qm = QuantizedModel.from_model(m.cpu(), records, method=cfg.to_dict())
                damped = sum(s["damp"] > cfg.damp_percent for s in stats.values())
                evaluate(f"GPTQ {label}", m, qm.bits_per_weight(), secs, mem,
                         f"{damped} layers needed extra damping" if damped else "")
            m = None  # free the copy before the next config

    print(f"\nModel: {a.model or 'SmolLM2-135M-Instruct (default; linears are dequantized Q4_1)'}; calibration "
          f"{a.n}×{a.seq_len} tokens of {a.dataset}; eval: first {ids.numel()} tokens of {a.eval_dataset} "
          f"(eval half), context {a.context}; device {a.device}, torch threads {torch.get_num_threads()}"
          f"{'; act_order+static_groups' if a.act_order else ''}"
          f"{'; true_sequential off' if a.no_true_sequential else ''}.\n")
    print("| method | bpw | wiki ppl | KL vs fp (nats/token) | top-1 agree | quant time (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = "" if r["secs"] is None else f"{r['secs']:.1f}"
        mem = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        print(f"| {r['method']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {t} | {mem} |"
              + (f" {r['note']}" if r["note"] else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
