"""Core AI formats on the default model: macq's records against coreai-opt's own compression, at equal size.

    python scripts/coreai_quality.py [--n-calib 32] [--seq-len 512] [--max-tokens 4096] [--json out.json]

Rows (decoder linears only on every row; embeddings / lm_head stay fp16 everywhere, so sizes compare):

* coreai-opt ``KMeansPalettizer`` 4-bit, per grouped channel (32 output channels share one LUT): Apple's iOS
  preset, data-free; and the same with ``calibration_mode`` (sensitivity-weighted k-means, squared gradients of
  the next-token loss on the calibration text);
* macq ``kmeans-cal`` with the same layout (4-bit, groups of 32 output channels, fp16 LUT): identical storage;
* coreai-opt ``Quantizer`` int4 per block of 32 (``QuantizerConfig.presets.w4_per_block``, symmetric), the macOS
  preset, eager mode on the ``nn.Linear`` modules;
* macq ``gptq``, ``learned`` and data-free ``rtn --mse-clip`` int4 g32 symmetric (fp16 scale per 32 weights):
  identical storage.

Every row is evaluated the same way in torch (fp32 compute on the dequantized weights): perplexity on the
held-out splits of wiki, c4 and tinystories (context 512), and KL / top-1 against the fp16-rounded model.
Calibration for every calibrated row: the same c4 sequences (macq.pipeline.calibration_ids).
Caveat: the default model's linear weights are dequantized Q4_1 (4-bit asymmetric, blocks of 32), so 4-bit
block-32 grids sit close to the source grid; palettization (per 32 output rows) does not share that grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch

from macq.models import DEFAULT_MODEL_CAVEAT, load_model

TEXTS = ("wiki", "c4", "tinystories")


def coreai_opt_kmeans(model, calib: torch.Tensor | None) -> torch.nn.Module:
    """coreai-opt 4-bit k-means per group of 32 output channels (lm_head excluded), optionally calibrated."""
    from coreai_opt import ExportBackend
    from coreai_opt.palettization.config.palettization_config import KMeansPalettizerConfig
    from coreai_opt.palettization.kmeans.palettizer import KMeansPalettizer

    m = copy.deepcopy(model)
    preset = KMeansPalettizerConfig.presets.w4(group_size=32)
    cfg = KMeansPalettizerConfig(global_config=preset.global_config, module_name_configs={"lm_head": None})
    pal = KMeansPalettizer(m, cfg)
    example = calib[:1] if calib is not None else torch.zeros(1, 8, dtype=torch.long)
    pm = pal.prepare((example,))
    if calib is not None:
        def loss_fn(out, target):
            logits = out.logits[:, :-1].float()
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))

        with pal.calibration_mode(loss_fn=loss_fn) as helper:
            for i in range(calib.shape[0]):
                x = calib[i:i + 1]
                helper.step(pm(x), x)
    return pal.finalize(backend=ExportBackend.Torch)


def coreai_opt_int4(model) -> torch.nn.Module:
    """coreai-opt int4 per-block-32 weight quantization (its w4_per_block preset) on the decoder linears."""
    from coreai_opt import ExportBackend
    from coreai_opt.quantization import Quantizer, QuantizerConfig
    from coreai_opt.quantization.config.quantization_config import ExecutionMode

    m = copy.deepcopy(model)
    base = QuantizerConfig.presets.w4_per_block()
    cfg = QuantizerConfig(global_config=None, module_type_configs={torch.nn.Linear: base.global_config},
                          module_name_configs={"lm_head": None}, execution_mode=ExecutionMode.EAGER)
    q = Quantizer(m, cfg)
    x = torch.zeros(1, 8, dtype=torch.long)
    pm = q.prepare((x,))
    with q.calibration_mode(), torch.no_grad():
        pm(x)                      # weight-only min/max: the weights alone decide, the input does not matter
    return q.finalize(backend=ExportBackend.Torch)


# macq rows: (method, options), each stored exactly like the coreai-opt row of its format
MACQ_ROWS = {
    "macq-kmeans-cal": ("kmeans-cal", {"bits": 4, "granularity": "per_grouped_channel", "group_size": 32}),
    "macq-gptq": ("gptq", {"bits": 4, "group_size": 32, "symmetric": True}),
    "macq-learned": ("learned", {"bits": 4, "group_size": 32, "symmetric": True}),
    "macq-rtn-mse": ("rtn", {"bits": 4, "group_size": 32, "symmetric": True, "mse_clip": True}),
}


def lut_bits(shapes, group_rows: int = 32, bits: int = 4) -> float:
    """Stored bits per weight of 4-bit LUTs shared by ``group_rows`` output channels (fp16 LUT entries)."""
    n = sum(o * i for o, i in shapes)
    return sum(o * i * bits + (o // group_rows) * (2 ** bits) * 16 for o, i in shapes) / n


def int4_bits(shapes, block: int = 32) -> float:
    """int4 codes + one fp16 scale per block (symmetric: the zero offset is a constant, not stored per block)."""
    n = sum(o * i for o, i in shapes)
    return sum(o * i * 4 + o * (i // block) * 16 for o, i in shapes) / n


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rows", default="opt-int4,macq-gptq,macq-learned,opt-kmeans,opt-kmeans-cal,macq-kmeans-cal")
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    warnings.filterwarnings("ignore")
    from macq.benchmark import fp16_copy
    from macq.data import eval_tokens
    from macq.eval import agreement_from_reference, perplexity, reference_logprobs
    from macq.models import get_weight, quantizable_modules
    from macq.pipeline import calibration_ids, quantize

    t_start = time.perf_counter()
    model, tok = load_model(None)
    shapes = [tuple(get_weight(m).shape) for m in quantizable_modules(model).values()]
    ids = {t: eval_tokens(tok, t, args.max_tokens) for t in TEXTS}
    ref = fp16_copy(model)
    ref_lp = {t: reference_logprobs(ref, ids[t], context=512) for t in TEXTS}
    calib = calibration_ids(tok, "c4", args.n_calib, args.seq_len, 0)
    rows: list[dict] = []

    def score(label: str, qmodel, bpw: float, secs: float) -> None:
        r = {"method": label, "bpw": bpw, "seconds": secs}
        for t in TEXTS:
            r[f"ppl_{t}"] = perplexity(qmodel, ids[t], context=512).ppl
            r[f"kl_{t}"] = agreement_from_reference(ref_lp[t], qmodel, ids[t], context=512).kl
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            write_json(args.json, "coreai_quality", {"rows": rows, "args": vars(args)})

    score("fp16", ref, 16.0, 0.0)
    for row in args.rows.split(","):
        t0 = time.perf_counter()
        if row == "opt-kmeans":
            score("coreai-opt KMeansPalettizer 4-bit g32 (data-free)", coreai_opt_kmeans(model, None).eval(),
                  lut_bits(shapes), time.perf_counter() - t0)
        elif row == "opt-kmeans-cal":
            score("coreai-opt KMeansPalettizer 4-bit g32 + calibration_mode", coreai_opt_kmeans(model, calib).eval(),
                  lut_bits(shapes), time.perf_counter() - t0)
        elif row == "opt-int4":
            score("coreai-opt Quantizer int4 block 32 (sym)", coreai_opt_int4(model).eval(), int4_bits(shapes),
                  time.perf_counter() - t0)
        elif row in MACQ_ROWS:
            method, opts = MACQ_ROWS[row]
            qm = quantize(model, tok, method, opts, "c4", args.n_calib, args.seq_len, 0, progress=False, copy_model=True)
            score(f"macq {method}{' --mse-clip' if opts.get('mse_clip') else ''} 4-bit g32"
                  + (" (sym)" if opts.get("symmetric") else ""), qm.to_torch(),
                  qm.bits_per_weight(), time.perf_counter() - t0)
        else:
            raise SystemExit(f"unknown row {row}")
    print(f"\n{DEFAULT_MODEL_CAVEAT}. Total {time.perf_counter() - t_start:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads.")
    cols = ["method", "bpw"] + [f"ppl_{t}" for t in TEXTS] + [f"kl_{t}" for t in TEXTS] + ["seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
