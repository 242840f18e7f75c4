"""Data-free 4-bit LUTs on the default model: macq's Lloyd vs the exact optimum vs coremltools' PostTrainingPalettizer.

For every decoder linear (and the embedding), groups of ``--lut-group`` output rows: the weight SSE of
macq ``--solver lloyd``, macq ``--solver exact`` and coremltools' own clustering routine (the one
``PostTrainingPalettizer`` runs per block), then the perplexity / KL / top-1 of the model whose decoder holds each
solver's LUTs (the embedding float, or ``--embedding lloyd|exact``), with the evaluation of
``scripts/benchmarks/bench_quality.py`` (first 1024 tokens of wiki, c4, tinystories; 512-token windows).

    python scripts/bench.py kmeans_solver_probe --ref-cache /work/scratch/quality/ref --json probe.json
    python scripts/bench.py kmeans_solver_probe --layers 2 --no-eval       # a quick look at the SSE gap only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def coremltools_lut(w: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """``w`` palettized by coremltools' PostTrainingPalettizer routine, block by block (fp16 LUT values)."""
    from coremltools.optimize.torch._utils.k_means import KMeans, KMeansConfig

    cfg = KMeansConfig(n_bits=bits, block_size=rows, axis=0)
    out = torch.empty_like(w)
    for b in range(0, w.shape[0], rows):
        cents, cl = KMeans._cluster_weights_1d(w[b:b + rows], None, cfg)
        out[b:b + rows] = cents[cl].reshape(rows, -1).half().float()
    return out


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--lut-group", type=int, default=16)
    ap.add_argument("--layers", type=int, help="only the first N decoder layers (and no embedding)")
    ap.add_argument("--embedding", choices=("float", "lloyd", "exact"), default="float")
    ap.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ref-cache", help="bench_quality.py's cache of the fp16 reference log-probs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    torch.set_num_threads(args.threads)
    from bench_quality import one_pass_scores, reference

    from macq.arch import arch_spec
    from macq.benchmark import fp16_copy
    from macq.data import eval_tokens
    from macq.models import get_weight, load_model, quantizable_modules, set_weight
    from macq.quantizers.palettize import KMeansConfig, quantize_weight

    model, tok = load_model(None)
    emb = arch_spec(model).embed
    names = [n for n in quantizable_modules(model, include_embeddings=False)
             if args.layers is None or int(n.split(".layers.")[1].split(".")[0]) < args.layers]
    solvers = {"lloyd": lambda w: quantize_weight(w, KMeansConfig(bits=args.bits, group_size=args.lut_group, n_init=1,
                                                                  solver="lloyd")).dequantize(),
               "exact": lambda w: quantize_weight(w, KMeansConfig(bits=args.bits, group_size=args.lut_group,
                                                                  solver="exact")).dequantize(),
               "coremltools": lambda w: coremltools_lut(w, args.bits, args.lut_group)}
    weights: dict[str, dict[str, torch.Tensor]] = {k: {} for k in solvers}
    sse = {k: 0.0 for k in solvers}
    secs = {k: 0.0 for k in solvers}
    for n in names:
        w = get_weight(model.get_submodule(n)).detach().float()
        for k, fn in solvers.items():
            t = time.perf_counter()
            q = fn(w)
            secs[k] += time.perf_counter() - t
            sse[k] += float((q - w).double().pow(2).sum())
            weights[k][n] = q.half()
    report = {"tensors": len(names), "sse": sse, "sse_vs_exact": {k: v / sse["exact"] - 1 for k, v in sse.items()},
              "seconds": secs, "rows": []}
    print(json.dumps({k: report[k] for k in ("tensors", "sse_vs_exact", "seconds")}), flush=True)
    if args.eval:
        class Ref:
            ref_cache, wait_ref = args.ref_cache, False
        evals = {d: eval_tokens(tok, d, 1024) for d in ("wiki", "c4", "tinystories")}
        ref = fp16_copy(model)                                   # bench_quality's reference: the fp16 model
        refs = {d: reference(ref, ids, d, Ref) for d, ids in evals.items()}
        del ref
        if args.embedding != "float":
            e = get_weight(model.get_submodule(emb)).detach().float()
            with torch.no_grad():
                set_weight(model.get_submodule(emb), solvers[args.embedding](e))
        for k in solvers:
            with torch.no_grad():
                for n in names:
                    set_weight(model.get_submodule(n), weights[k][n].float())
            row = {"decoder": k, "embedding": args.embedding}
            for d, ids in evals.items():
                row.update({f"{d}_{m}": v for m, v in one_pass_scores(model, ids, refs[d]).items()})
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        write_json(args.json, "kmeans_solver_probe", report)


if __name__ == "__main__":
    main()
