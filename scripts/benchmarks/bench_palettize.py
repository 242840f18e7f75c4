"""macq k-means palettization vs coremltools' own palettizer on real layers of the default model.

Prints a Markdown table: weight MSE of each (summed over the chosen layers, against the fp32 weights), wall
time of each and the speed ratio. coremltools runs as a Core ML pipeline runs it, on fp16 weights: its
k-means is then the optimal 1-D ``kmeans1d`` for groups of >= 10000 weights and scikit-learn below that
(``--ct-dtype float32`` forces scikit-learn everywhere).

    python scripts/bench.py bench_palettize [--bits 2 3 4] [--layers 0 14 29]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from macq.models import get_weight, load_model
from macq.quantizers.palettize import KMeansConfig, quantize_weight


def coreml_palettize(w: torch.Tensor, bits: int, granularity: str, group_size: int, dtype: str) -> torch.Tensor:
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    block = [group_size, 0] if granularity == "per_grouped_channel" else [0, 0]
    params = palettize_weights.blockwise_compress(w.numpy().astype(dtype), "KMEANS", bits, block)
    return torch.from_numpy(palettize_weights.decompress(params).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--modules", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--ct-dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    model, _ = load_model(None, with_tokenizer=False)
    names = [f"model.layers.{i}.{m}" for i in args.layers for m in args.modules]
    weights = {n: get_weight(model.get_submodule(n)).detach().float().clone() for n in names}
    del model
    n_el = sum(w.numel() for w in weights.values())
    shapes = sorted({tuple(w.shape) for w in weights.values()})
    print(f"{len(weights)} layers ({', '.join(args.modules)} of layers {args.layers}; shapes {shapes}), "
          f"{n_el} weights; coremltools on {args.ct_dtype} weights; torch threads {torch.get_num_threads()}\n")
    print("| bits | granularity | MSE macq | MSE coremltools | macq / ct MSE | time macq (s) | time ct (s) "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for gran in ("per_grouped_channel", "per_tensor"):
        for bits in args.bits:
            se = {"macq": 0.0, "ct": 0.0}
            tm = {"macq": 0.0, "ct": 0.0}
            cfg = KMeansConfig(bits=bits, granularity=gran, group_size=args.group_size)
            for w in weights.values():
                t0 = time.perf_counter()
                rec = quantize_weight(w, cfg)
                tm["macq"] += time.perf_counter() - t0
                se["macq"] += float((rec.dequantize() - w).pow(2).sum())
                t0 = time.perf_counter()
                d = coreml_palettize(w, bits, gran, args.group_size, args.ct_dtype)
                tm["ct"] += time.perf_counter() - t0
                se["ct"] += float((d - w).pow(2).sum())
            g = f"{gran} (g{args.group_size})" if gran == "per_grouped_channel" else gran
            print(f"| {bits} | {g} | {se['macq'] / n_el:.4e} | {se['ct'] / n_el:.4e} | {se['macq'] / se['ct']:.4f} "
                  f"| {tm['macq']:.2f} | {tm['ct']:.2f} | {tm['ct'] / tm['macq']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
