#!/usr/bin/env python
"""Diagnostic: how much of a 4-bit LUT row's loss is the tied embedding/head alone?

The float model with ONLY the embedding (tied: also the head) replaced by a 4-bit LUT record of groups of 16
rows, scored like ``bench_quality.py`` (same texts, windows and cached fp16 reference):

    python scripts/bench.py lut_embedding_probe --ref-cache /work/scratch/quality/ref
    python scripts/bench.py lut_embedding_probe --ref-cache /work/scratch/quality/ref --fisher

Default: macq's data-free k-means (what every LUT method gives heads). ``--fisher``: k-means weighted by the
empirical Fisher of the float model on ``--n-calib`` x ``--seq-len`` tokens of c4 (kmeans-cal's
``weighted_heads`` path). Its rows are in docs/results/lut-g16.md and docs/results/lut-outliers.md.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_quality import one_pass_scores, reference

from macq.data import eval_tokens
from macq.models import get_weight, load_model, set_weight
from macq.pipeline import calibration_ids
from macq.quantizers.kmeans_cal import KMeansCalConfig
from macq.quantizers.palettize import KMeansConfig, quantize_weight
from macq.quantizers.sensitivity import fisher_diagonal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-cache", required=True)
    ap.add_argument("--fisher", action="store_true")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--outlier-frac", type=float, default=0.0, help="fraction of the embedding kept in fp16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(None)
    name = "model.embed_tokens"
    emb = model.get_submodule(name)
    w = get_weight(emb).detach().float()
    if args.fisher:
        calib = calibration_ids(tok, "c4", args.n_calib, args.seq_len, 0)
        fisher = fisher_diagonal(model, calib, {name: emb}, progress=True)[name]
        rec = quantize_weight(w, KMeansCalConfig(bits=4, group_size=16, n_init=1, outlier_frac=args.outlier_frac).kmeans_config(), fisher)
    else:
        rec = quantize_weight(w, KMeansConfig(bits=4, group_size=16, n_init=1, outlier_frac=args.outlier_frac))
    with torch.no_grad():
        set_weight(emb, rec.dequantize())
    ref_args = argparse.Namespace(ref_cache=args.ref_cache, wait_ref=False)
    r = {"method": f"float decoder, embedding/head only: {'Fisher-weighted ' if args.fisher else ''}kmeans 4-bit g16"
                              f"{f' + {100 * args.outlier_frac:g}% outliers' if args.outlier_frac else ''}"}
    for d in ["wiki", "c4", "tinystories"]:
        ids = eval_tokens(tok, d, 1024)
        r.update({f"{d}_{k}": v for k, v in one_pass_scores(model.eval(), ids, reference(None, ids, d, ref_args)).items()})
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
