#!/usr/bin/env python
"""RTN vs AWQ vs AWQ→GPTQ (same grid, asymmetric int zero-point) and SmoothQuant W8A8 on the default model.

Caveat that shapes this table: the default model (SmolLM2-135M-Instruct from GGUF Q4_1) has linear
weights that are *dequantized Q4_1* (4-bit asymmetric, blocks of 32). Re-quantizing at 4-bit g32
asymmetric is nearly free and says nothing; methods separate at 3 (and 2) bits and coarser groups.
Group 128 does not divide SmolLM2's hidden size (576 = 4.5 x 128), so the default group here is 64
(every method raises on a group that does not divide an input dim rather than silently changing it).

Calibration: ``--n`` windows of ``--seq-len`` tokens from the calibration half of a bundled text (c4).
Evaluation: first ``--eval-tokens`` tokens of the wiki evaluation half (held out), 512-token windows;
perplexity and KL(fp ‖ quantized) per token on the same positions (macq.eval). bpw charges every scale
and zero-point. SmoothQuant rows are evaluated with the activation fake-quant hooks installed
(``QuantizedModel.to_torch``), so they are honest W8A8 numbers.

    python scripts/bench.py bench_awq --n 16 --seq-len 512            # the modest config used in the report
    python scripts/bench.py bench_awq --configs 3:64 --methods rtn,awq
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--n", type=int, default=16, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dataset", default="c4")
    ap.add_argument("--eval-dataset", default="wiki")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--configs", default="4:64,3:64", help="bits:group list for the weight-only methods")
    ap.add_argument("--methods", default="rtn,awq,awq-gptq,smoothquant")
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ alpha grid points")
    ap.add_argument("--clip-grid", type=int, default=20, help="AWQ clip ratios tried per group")
    ap.add_argument("--greedy", action="store_true", help="also run AWQ with greedy rounding")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    add_force(ap)
    a = ap.parse_args(argv)
    check_json(a.json, a.force)
    if a.threads:
        torch.set_num_threads(a.threads)

    from macq.data import calibration_samples, eval_tokens
    from macq.eval.agreement import agreement_from_reference, reference_logprobs
    from macq.eval.perplexity import perplexity
    from macq.models import load_model
    from macq.quantizers import quantize_model

    fp, tok = load_model(a.model)
    calib = calibration_samples(tok, a.dataset, a.n, a.seq_len)
    ids = eval_tokens(tok, a.eval_dataset, a.eval_tokens)
    ref = reference_logprobs(fp, ids, a.context)
    rows = [{"method": "fp32", "bits": 32, "group": "-", "bpw": 32.0, "ppl": perplexity(fp, ids, a.context).ppl,
             "kl": 0.0, "top1": 1.0, "time_s": 0.0}]

    def run(label: str, method: str, show_bits: int | str, show_group: int | str, **kw) -> None:
        model = copy.deepcopy(fp)
        t = time.time()
        qm = quantize_model(model, method, calib=calib, **kw)
        dt = time.time() - t
        q = qm.to_torch()
        ag = agreement_from_reference(ref, q, ids, a.context)
        row = {"method": label, "bits": show_bits, "group": show_group, "bpw": qm.bits_per_weight(),
               "ppl": perplexity(q, ids, a.context).ppl, "kl": ag.kl, "top1": ag.top1, "time_s": dt}
        rows.append(row)
        print(json.dumps(row), flush=True)

    methods = a.methods.split(",")
    for spec in a.configs.split(","):
        bits, group = map(int, spec.split(":"))
        common = dict(bits=bits, group_size=group, symmetric=False)
        awq_kw = dict(common, n_grid=a.n_grid, clip_grid=a.clip_grid)
        if "rtn" in methods:
            run("rtn", "rtn", bits, group, **common)
        if "awq" in methods:
            run("awq", "awq", bits, group, **awq_kw)
            if a.greedy:
                run("awq+greedy", "awq", bits, group, greedy_rounding=True, **awq_kw)
        if "awq-gptq" in methods:
            run("awq→gptq", "awq-gptq", bits, group, **awq_kw)
    if "smoothquant" in methods:
        run("smoothquant W8A8 (per-token)", "smoothquant", "W8A8", "per-ch", alpha=0.5, act_mode="per_token")
        run("no smoothing W8A8 (per-token)", "smoothquant", "W8A8", "per-ch", smooth=False, act_mode="per_token")

    print(f"\nCalibration: {a.n} x {a.seq_len} tokens of {a.dataset}; AWQ grids: {a.n_grid} alphas, "
          f"{a.clip_grid} clip ratios; eval: first {ids.numel()} tokens of "
          f"{a.eval_dataset} (eval half), context {a.context}. Weight-only rows: asymmetric int zero-point, "
          "fp16 scales. Default model weights are dequantized Q4_1 (4-bit g32 asym is nearly free).\n")
    print("| method | bits | group | bpw | wiki ppl | KL vs fp (nats) | top-1 agree | quant time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['group']} | {r['bpw']:.3f} | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['top1']:.3f} | {r['time_s']:.0f} |")
    if a.json:
        write_json(a.json, "bench_awq", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
