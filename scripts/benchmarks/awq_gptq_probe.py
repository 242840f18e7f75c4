#!/usr/bin/env python
"""Why does AWQ→GPTQ trail AWQ alone? Per-linear output error on calibration *and* held-out tokens.

    python scripts/bench.py awq_gptq_probe --layers 0 14 29 --n-calib 16 --seq-len 256 --bits 3 --group-size 64

For each linear of the chosen layers of the float default model, the input Gram matrices ``H`` are collected
on the calibration windows (c4, seed 0) and on held-out windows (c4, seed 1, and wiki). Each rounding of the
weight is scored by ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (relative layer-output error) on each set:

* ``nearest``: RTN on the full range; ``awq-clip``: AWQ's per-group clip search then nearest (what ``awq``
  does per linear after its scales); ``awq-gptq``: the current chaining (weights clamped to AWQ's clip, GPTQ
  with dynamic groups, i.e. the grid re-derived from the error-updated weights); ``awq-gptq-static``: GPTQ on
  AWQ's clipped grid held fixed (static groups). No AWQ scale folding here: this isolates the rounding step.
"""

from __future__ import annotations

import argparse
import json

import torch

from macq.models import get_weight, load_model


def grams(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    from macq.quantizers.hessian import HessianAccumulator

    acc: dict[str, HessianAccumulator] = {}
    handles = []
    for n in names:
        def hook(_m, args, _n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            acc.setdefault(_n, HessianAccumulator(x.shape[-1], torch.device("cpu"))).add(x)
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i:i + 1], use_cache=False)
    for h in handles:
        h.remove()
    return {n: a.H.clone() for n, a in acc.items()}


def rel_err(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    d, w64 = (wq - w).double(), w.double()
    return float(((d @ H) * d).sum() / ((w64 @ H) * w64).sum())


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    torch.set_num_threads(args.threads)
    from macq.pipeline import calibration_ids
    from macq.quantizers import awq_search as S
    from macq.quantizers.gptq import GPTQConfig, gptq_quantize

    model, tok = load_model(None)
    names = [f"model.layers.{i}.{n}" for i in args.layers for n in
             ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    sets = {"calib c4": calibration_ids(tok, "c4", args.n_calib, args.seq_len, 0),
            "held-out c4": calibration_ids(tok, "c4", args.n_calib, args.seq_len, 1),
            "held-out wiki": calibration_ids(tok, "wiki", args.n_calib, args.seq_len, 0)}
    H = {k: grams(model, ids, names) for k, ids in sets.items()}
    b, g, sd = args.bits, args.group_size, torch.float16
    rows = []
    for n in names:
        w = get_weight(model.get_submodule(n)).detach().float()
        hc = H["calib c4"][n]
        clip = S.search_clip(w, hc.float(), b, g, False, sd, 20, 0.5)
        clamped = S.clamp_to_clip(w, clip, g, False)
        cands = {"nearest": S.fq(w, b, g, False, sd), "awq-clip": S.fq(w, b, g, False, sd, clip)}
        for label, static in (("awq-gptq", False), ("awq-gptq-static", True)):
            cfg = GPTQConfig(bits=b, group_size=g, symmetric=False, mse_clip=False, static_groups=static)
            cands[label] = gptq_quantize(clamped, hc, cfg)[0].dequantize()
        for label, wq in cands.items():
            rows.append({"linear": n.removeprefix("model.layers."), "rounding": label,
                         **{k: rel_err(w, wq, H[k][n]) for k in sets}})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| rounding | " + " | ".join(f"mean rel. output error, {k}" for k in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for label in dict.fromkeys(r["rounding"] for r in rows):
        sel = [r for r in rows if r["rounding"] == label]
        print(f"| {label} | " + " | ".join(f"{sum(r[k] for r in sel) / len(sel):.4f}" for k in sets) + " |")
    if args.json:
        write_json(args.json, "awq_gptq_probe", rows)


if __name__ == "__main__":
    main()
