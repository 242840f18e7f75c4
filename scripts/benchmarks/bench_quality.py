#!/usr/bin/env python
"""Quality at equal size: every row quantizes the same tensors — decoder linears *and* the tied
embedding/head — from the same calibration tokens, and is scored on three texts.

    python scripts/bench.py bench_quality --rows rtn awq learned --bits 3 --json out.json
    python scripts/bench.py bench_quality --rows kmeans kmeans-cal ct-skm ct-ptp --bits 4 --json lut.json

Affine rows (``--group-size`` inputs per group, asymmetric): ``rtn`` is MLX's own algorithm (bit-identical to
``mlx_lm.convert -q``, embedding included, as mlx_lm does); ``awq`` / ``gptq`` / ``awq-gptq`` / ``learned`` /
``learned-rtn`` quantize the decoder by that method and the embedding by RTN with MSE clipping at the same
bits and group (:func:`macq.quantizers.head_records`); with ``--kl-steps N`` a ``learned`` row is followed by a
``learned+kl`` row: the method's logits stage run on that block-wise result (``--save`` / ``--load`` keep the
block-wise quantization, so the stage can be re-run without it). LUT rows (``--lut-group`` output rows per LUT, 1 =
per-channel): ``kmeans`` (data-free), ``kmeans-cal`` (calibrated), ``ct-skm`` / ``ct-ptp`` (coremltools'
``SKMPalettizer`` / ``PostTrainingPalettizer`` on the same model and calibration ids; they skip the
embedding, so macq's embedding k-means record is applied to their models to keep the tensors equal).

Calibration: ``--n-calib`` x ``--seq-len`` windows of ``--calib-dataset`` (second half of the bundled text,
seed 0), the same ids for every row. Evaluation: the first ``--eval-tokens`` tokens of the first half of
wiki, c4 and tinystories, context 512, against the fp16-rounded model (KL, top-1). Seconds and peak memory
are per quantization (calibration included) with ``--threads`` torch threads on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from outputs import add_force, check_json, check_scratch, write_json

from macq.models import DEFAULT_MODEL_CAVEAT, load_model

AFFINE = {"rtn", "awq", "gptq", "awq-gptq", "awq-gptq-dynamic", "learned", "learned-rtn"}
LUT = {"kmeans", "kmeans-cal", "kmeans-cal-hessian", "ct-skm", "ct-ptp"}


def macq_options(row: str, args) -> tuple[str, dict[str, Any]]:
    if row in AFFINE:
        base = {"bits": args.bits, "group_size": args.group_size, "symmetric": False, "include_embeddings": True}
        if row == "rtn":
            return "rtn", {**base, "zero_point": "float"}
        if row == "awq-gptq-dynamic":      # the chaining before static_grid ("AWQ→GPTQ trails AWQ")
            return "awq-gptq", {**base, "static_grid": False}
        if row == "learned-rtn":
            return "learned", {**base, "init": "rtn", "steps": args.steps, "batch_size": args.learned_batch,
                               "eval_every": args.eval_every, "kl_steps": 0}
        if row == "learned":
            return "learned", {**base, "steps": args.steps, "batch_size": args.learned_batch, "eval_every": args.eval_every,
                               "kl_steps": 0}
        return row, base
    base = {"bits": args.bits, "granularity": "per_grouped_channel", "group_size": args.lut_group,
            "include_embeddings": True, "n_init": args.n_init}
    if row.startswith("kmeans") and args.outlier_frac:
        base["outlier_frac"] = args.outlier_frac
    if row.startswith("kmeans-cal") and args.refit_rounds is not None:
        base["refit_rounds"] = args.refit_rounds
    if row.startswith("kmeans-cal"):
        base["weighted_heads"] = args.weighted_heads
    if row == "kmeans-cal-hessian":
        return "kmeans-cal", {**base, "sensitivity": "hessian"}
    return row, base


def coremltools_palettize(model, calib: torch.Tensor, row: str, args):
    """coremltools.optimize.torch's palettizer on a copy of ``model``; returns the palettized torch model."""
    import copy

    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
        SKMPalettizer,
        SKMPalettizerConfig,
    )

    from macq.models import tied_embeddings

    m = copy.deepcopy(model)
    op = {"n_bits": args.bits, "granularity": "per_grouped_channel", "group_size": args.lut_group}
    if args.lut_group == 1:
        op = {"n_bits": args.bits, "granularity": "per_grouped_channel", "group_size": 1}
    if row == "ct-ptp":
        cfg = PostTrainingPalettizerConfig.from_dict({"global_config": op})
        return PostTrainingPalettizer(m, cfg).compress()
    # A tied lm_head is the embedding's parameter: SKMPalettizer's sensitivity dict (named_parameters with
    # duplicates removed) has no "lm_head.weight" and compress() raises KeyError after the whole Fisher pass
    # (coremltools 8.x). The head is skipped by name; the shared tensor is palettized as the embedding.
    names = {"lm_head": None} if tied_embeddings(m) else {}
    cfg = SKMPalettizerConfig.from_dict({"global_config": op, "module_name_configs": names,
                                         "calibration_nsamples": calib.shape[0]})

    def loader():
        for i in range(calib.shape[0]):
            yield calib[i:i + 1]

    def loss_fn(mod, batch):
        return mod(input_ids=batch, labels=batch, use_cache=False).loss

    return SKMPalettizer(m, cfg).compress(dataloader=loader(), loss_fn=loss_fn)


def lut_file_size(qmodel, model, bits: int, lut_group: int) -> dict[str, float]:
    """bits/weight and size of a coremltools-palettized torch model *as macq's LUT file would hold it*: each
    tensor macq quantizes (decoder linears + embedding) whose every ``lut_group`` rows hold at most ``2**bits``
    distinct values is charged ``bits`` per weight plus an fp16 LUT of ``2**bits`` entries per group (exactly
    :meth:`LUTRecord.storage_bits`); any other tensor, and every remaining float tensor, 16 bits."""
    from macq.arch import arch_spec
    from macq.models import get_weight, quantizable_modules

    names = list(quantizable_modules(model, include_embeddings=True))
    qbits, n, palettized = 0, 0, 0
    seen = set()
    for name in names:
        w = get_weight(qmodel.get_submodule(name)).detach()
        seen.add(id(qmodel.get_submodule(name).weight))
        groups = w.reshape(-1, lut_group * w.shape[-1]) if w.shape[0] % lut_group == 0 else w.reshape(1, -1)
        ok = all(torch.unique(g).numel() <= 2 ** bits for g in groups)
        palettized += ok
        qbits += w.numel() * bits + groups.shape[0] * 2 ** bits * 16 if ok else w.numel() * 16
        n += w.numel()
    rest = sum(p.numel() for p in qmodel.parameters() if id(p) not in seen) * 16
    assert arch_spec(model).embed in names
    return {"bpw": qbits / n, "size_mib": (qbits + rest) / 8 / 2**20, "palettized_tensors": f"{palettized}/{len(names)}"}


def torch_forward(model):
    """``ids [T] -> logits [T, vocab]`` of a torch causal LM (one sequence, no cache)."""
    return lambda x: model(input_ids=x[None], use_cache=False).logits[0]


def mlx_forward(loaded):
    """``ids [T] -> logits [T, vocab]`` (float32) through mlx_lm: an ``mlx_lm.load``-ed ``(model, tokenizer)``."""
    from mlx_backend.runner import logits_fn

    fn = logits_fn(loaded)
    return lambda x: torch.from_numpy(fn(x[None].numpy())[0])


@torch.inference_mode()
def window_logprobs(model, ids: torch.Tensor, context: int = 512, forward=None) -> list[torch.Tensor]:
    """Log-probs ``[context - 1, vocab]`` of each non-overlapping window (first token of a window unscored).
    ``forward`` (``ids [T] -> logits [T, vocab]``) replaces the torch ``model`` call, e.g. :func:`mlx_forward`."""
    fwd = forward or torch_forward(model)
    return [torch.log_softmax(fwd(ids[s:s + context])[:-1].float(), -1)
            for s in range(0, ids.numel() - 1, context) if ids[s:s + context].numel() > 1]


@torch.inference_mode()
def one_pass_scores(model, ids: torch.Tensor, ref: list[torch.Tensor], context: int = 512,
                    forward=None) -> dict[str, float]:
    """Perplexity, mean KL(ref || model) and top-1 agreement from one forward per window (the CPU is scarce)."""
    nll, kl, top1, n = 0.0, 0.0, 0.0, 0
    for s, r in zip(range(0, ids.numel() - 1, context), ref):
        chunk = ids[s:s + context]
        lp = window_logprobs(model, chunk, context, forward)[0]
        tgt = chunk[1:]
        nll += float(-lp.gather(1, tgt[:, None]).sum())
        kl += float((r.exp() * (r - lp)).sum())
        top1 += float((r.argmax(-1) == lp.argmax(-1)).sum())
        n += tgt.numel()
    return {"ppl": float(torch.exp(torch.tensor(nll / n))), "kl": kl / n, "top1": top1 / n}


def reference(ref, ids: torch.Tensor, dataset: str, args) -> list[torch.Tensor]:
    """The fp16 model's window log-probs, cached in ``--ref-cache`` so that one process per row (the CPU is
    shared fairly per process) computes them once; a process finding no cache waits for it with ``--wait-ref``."""
    import os
    from pathlib import Path

    if not args.ref_cache:
        return window_logprobs(ref, ids)
    path = Path(args.ref_cache) / f"ref-{dataset}-{ids.numel()}.pt"
    while args.wait_ref and not path.exists():
        time.sleep(10)
    if path.exists():
        return torch.load(path)
    lp = window_logprobs(ref, ids)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(lp, tmp)
    tmp.rename(path)
    return lp


def write_mlx_calibration(tok, calib: torch.Tensor) -> str:
    """``~/.cache/mlx-lm/calibration_v5.txt`` holding macq's calibration windows as text, so that
    ``mlx_lm.awq`` / ``gptq`` / ``dwq`` (which download that file otherwise) run offline on the same tokens
    (re-tokenised by mlx_lm; with ``--num-samples N --sequence-length L`` it takes the whole file)."""
    from pathlib import Path

    path = Path.home() / ".cache/mlx-lm/calibration_v5.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(tok.decode(row.tolist()) for row in calib))
    return str(path)


def logits_stage(model, qm, qmodel, calib: torch.Tensor, args) -> dict[str, Any]:
    """``--method learned``'s logits stage (:func:`macq.quantizers.learned_kl.tune_logits`, the very function the
    method calls with ``kl_steps``) run on the block-wise result ``qm``; writes the tuned records into ``qmodel``.
    Bit-identical to quantizing with ``kl_steps`` (the teacher is the same float model, the stage seeds itself),
    so one block-wise run gives both rows."""
    from macq.models import set_weight
    from macq.quantizers.learned_kl import teacher_logprobs, tune_logits

    calib = calib[:args.kl_rows]
    teacher = teacher_logprobs(model, calib)
    recs, stats = tune_logits(qmodel, qm.records, calib, teacher, steps=args.kl_steps, lr=args.kl_lr,
                              batch_size=args.kl_batch, eval_every=args.kl_eval_every, holdout=args.kl_holdout,
                              seed=0, progress=True)
    with torch.no_grad():
        for name, rec in recs.items():
            set_weight(qmodel.get_submodule(name), rec.dequantize(torch.float32))
    return stats


def save_blockwise(qm, tok, info: dict[str, Any], path: str) -> None:
    from pathlib import Path

    qm.save(path, tokenizer=tok, force=True)
    (Path(path) / "bench.json").write_text(json.dumps(info))


def load_blockwise(path: str):
    from pathlib import Path

    from macq.qmodel import QuantizedModel

    return QuantizedModel.load(path), json.loads((Path(path) / "bench.json").read_text())


def mlx_rows(args, calib: torch.Tensor, score, out: list[dict[str, Any]]) -> None:
    """``--runtime mlx``: each row's MLX directory from a child process (:mod:`mlx_rows`), scored through mlx_lm
    on the same windows and against the same reference as the torch rows."""
    from pathlib import Path

    import numpy as np
    from compare_mlx import rope_patched_copy
    from mlx_rows import MLX_TOOLS, build_row, dense_mlx, mlx_file_size

    from macq.models import default_model_dir
    from mlx_backend.runner import load_mlx

    work = Path(args.mlx_work)
    work.mkdir(parents=True, exist_ok=True)
    ids_path = work / f"calib-{args.calib_dataset}-{args.n_calib}x{args.seq_len}.npy"
    np.save(ids_path, calib.numpy().astype(np.int32))
    hf_dir = rope_patched_copy(default_model_dir(), work)
    for row in args.rows:
        method, opts = (None, None) if row in MLX_TOOLS else mlx_macq_options(row, args)
        mdir, info = build_row(row, method, opts, args, hf_dir, ids_path, work)
        label = f"{row} {args.bits}-bit g{args.group_size}"
        if mdir is None:
            r = {"method": label, "failed": True, **info}
            out.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                write_json(args.json, "bench_quality", out)
            continue
        from mlx_backend.runner import default_compute_dtype

        loaded = load_mlx(mdir, default_compute_dtype())
        if args.mlx_dense:
            dense_mlx(loaded)
        score(label, None, {**mlx_file_size(mdir), **info, "mlx_dir": str(mdir), "options": opts,
                            "mlx_dense": args.mlx_dense}, forward=mlx_forward(loaded))


def mlx_macq_options(row: str, args) -> tuple[str, dict[str, Any]]:
    """A macq row's CLI options under ``--runtime mlx``: as :func:`macq_options`, but ``learned`` runs whole
    (block-wise pass and logits stage in one ``macq quantize``, as a user runs it)."""
    method, opts = macq_options(row, args)
    if method == "learned":
        opts = {**opts, "kl_steps": args.kl_steps, "kl_lr": args.kl_lr, "kl_batch": args.kl_batch,
                "kl_eval_every": args.kl_eval_every, "kl_holdout": args.kl_holdout, "kl_rows": args.kl_rows}
    return method, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=[])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lut-group", type=int, default=16)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-dataset", default="c4")
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--datasets", nargs="+", default=["wiki", "c4", "tinystories"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp16-row", action="store_true")
    ap.add_argument("--ref-cache", help="directory caching the fp16 reference log-probs")
    ap.add_argument("--wait-ref", action="store_true", help="wait for another process to fill --ref-cache")
    ap.add_argument("--n-init", type=int, default=1, help="k-means restarts (kmeans, kmeans-cal rows)")
    ap.add_argument("--refit-rounds", type=int, help="kmeans-cal LUT refits (default: the method's)")
    ap.add_argument("--outlier-frac", type=float, default=0.0,
                    help="kmeans / kmeans-cal rows: fraction of each tensor kept in fp16 (dense-and-sparse)")
    ap.add_argument("--weighted-heads", action=argparse.BooleanOptionalAction, default=True,
                    help="kmeans-cal: Fisher-weighted embedding / head LUT (the method's default; --no-weighted-heads: "
                         "the data-free k-means every other LUT method uses)")
    ap.add_argument("--learned-batch", type=int, default=1, help="calibration sequences per learned step")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--kl-steps", type=int, default=40,
                    help="learned rows: also score the logits-KL stage run on the block-wise result (row 'learned+kl')")
    ap.add_argument("--kl-lr", type=float, default=3e-3)
    ap.add_argument("--kl-batch", type=int, default=1)
    ap.add_argument("--kl-eval-every", type=int, default=10)
    ap.add_argument("--kl-holdout", type=int, default=2)
    ap.add_argument("--kl-rows", type=int, default=8)
    ap.add_argument("--save", help="learned rows: save the block-wise quantization here (macq dir + bench.json)")
    ap.add_argument("--load", help="learned rows: take the block-wise quantization saved by --save instead of quantizing")
    ap.add_argument("--write-mlx-calibration", action="store_true",
                    help="write the calibration windows to ~/.cache/mlx-lm/calibration_v5.txt and exit")
    ap.add_argument("--runtime", choices=("torch", "mlx"), default="torch",
                    help="mlx: every row is quantized by a child process, written as an MLX directory and scored "
                         "through mlx_lm (scripts/benchmarks/mlx_rows.py); rows mlx-convert/mlx-awq/mlx-gptq/mlx-dwq need it")
    ap.add_argument("--mlx-work", help="--runtime mlx: directory keeping each row's quantization, MLX dir and log")
    ap.add_argument("--reuse", action="store_true",
                    help="--runtime mlx: reuse a row's MLX dir made by the same command (mlx-lm rows) or a macq "
                         "quantization whose manifest records the same config and calibration (macq rows)")
    ap.add_argument("--mlx-dense", action=argparse.BooleanOptionalAction, default=True,
                    help="--runtime mlx: score with the quantized layers dequantized by mlx (mlx_rows.dense_mlx; the "
                         "CPU build's quantized matmul is ~25x slower); --no-mlx-dense: mlx's quantized kernels")
    ap.add_argument("--dwq-lr", type=float, default=1e-6, help="mlx-dwq: --learning-rate (the tool's default 1e-6)")
    ap.add_argument("--dwq-repeat", type=int, default=1,
                    help="mlx-dwq: passes over the training sequences (the tool makes one pass over its data)")
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    from mlx_rows import MLX_TOOLS

    if any(r in MLX_TOOLS for r in args.rows) and args.runtime != "mlx":
        ap.error(f"rows {sorted(MLX_TOOLS)} need --runtime mlx")
    if args.runtime == "mlx" and not args.mlx_work:
        ap.error("--runtime mlx needs --mlx-work DIR")
    if args.runtime == "mlx" and any(r not in AFFINE and r not in MLX_TOOLS for r in args.rows):
        ap.error("--runtime mlx: only affine rows (MLX has no LUT format)")
    check_json(args.json, args.force)
    if args.runtime == "mlx":          # its rows' directories are rebuilt or reused there
        check_scratch(args.mlx_work, "mlx-rows-work", inputs=(args.json,), flag="--mlx-work")
    torch.set_num_threads(args.threads)
    from macq.benchmark import fp16_copy
    from macq.data import eval_tokens
    from macq.eval.memory import measure_peak_detail
    from macq.pipeline import calibration_ids, quantize

    model, tok = load_model(None)
    if args.write_mlx_calibration:
        print(write_mlx_calibration(tok, calibration_ids(tok, args.calib_dataset, args.n_calib, args.seq_len, 0)))
        return
    ref = fp16_copy(model) if (args.fp16_row or not args.wait_ref) else None   # memory: the machine is shared
    evals = {d: eval_tokens(tok, d, args.eval_tokens) for d in args.datasets}
    ref_lp: dict[str, list[torch.Tensor]] = {}   # filled when the first row is scored (quantize first, then wait)
    out: list[dict[str, Any]] = []

    def score(label: str, qmodel, extra: dict[str, Any], forward=None) -> None:
        r = {"method": label, **extra}
        for d, ids in evals.items():
            if d not in ref_lp:
                ref_lp[d] = reference(ref, ids, d, args)
            r.update({f"{d}_{k}": v for k, v in one_pass_scores(qmodel, ids, ref_lp[d], forward=forward).items()})
        out.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            write_json(args.json, "bench_quality", out)

    if args.fp16_row:
        score("fp16", ref, {"bpw": 16.0, "size_mib": sum(p.numel() for p in model.parameters()) * 2 / 2**20})
    calib = calibration_ids(tok, args.calib_dataset, args.n_calib, args.seq_len, 0)
    if args.runtime == "mlx":
        mlx_rows(args, calib, score, out)
        print(f"Caveat: {DEFAULT_MODEL_CAVEAT}.")
        return
    for row in args.rows:
        t0 = time.perf_counter()
        if row.startswith("ct-"):
            from macq.arch import arch_spec
            from macq.models import get_weight, set_weight
            from macq.quantizers.palettize import KMeansConfig, quantize_weight

            qmodel, peak = measure_peak_detail(lambda: coremltools_palettize(model, calib, row, args))
            secs = time.perf_counter() - t0
            timing = {"seconds": secs, "peak_mib": peak.peak_bytes / 2**20}
            label = f"{row} {args.bits}-bit LUT g{args.lut_group}"
            qmodel = qmodel.float().eval()
            emb = arch_spec(model).embed
            size = lut_file_size(qmodel, model, args.bits, args.lut_group)
            if size["palettized_tensors"].split("/")[0] == size["palettized_tensors"].split("/")[1]:
                score(f"{label} (its own embedding LUT)", qmodel, {**size, **timing})   # what the tool gives
            # the same embedding record as macq's rows, so that only the decoder differs
            rec = quantize_weight(get_weight(model.get_submodule(emb)).detach().float(),
                                  KMeansConfig(bits=args.bits, group_size=args.lut_group, n_init=args.n_init))
            with torch.no_grad():
                set_weight(qmodel.get_submodule(emb), rec.dequantize())
            score(f"{label} (macq k-means embedding)", qmodel,
                  {**lut_file_size(qmodel, model, args.bits, args.lut_group), **timing})
            continue
        method, opts = macq_options(row, args)
        if args.load and row.startswith("learned"):
            qm, info = load_blockwise(args.load)
        else:
            qm, peak = measure_peak_detail(lambda: quantize(model, tok, method, dict(opts), args.calib_dataset,
                                                            args.n_calib, args.seq_len, 0, progress=True,
                                                            copy_model=len(args.rows) > 1 or args.kl_steps > 0))
            info = {"bpw": qm.bits_per_weight(), "size_mib": qm.nbytes() / 2**20, "seconds": time.perf_counter() - t0,
                    "peak_mib": peak.peak_bytes / 2**20}
            if args.save and row.startswith("learned"):
                save_blockwise(qm, tok, info, args.save)
        grp = f"g{args.group_size}" if row in AFFINE else f"LUT g{args.lut_group}"
        if opts.get("outlier_frac"):
            grp += f" + {100 * opts['outlier_frac']:g}% fp16 outliers"
        info["options"] = opts
        linears = qm.method.get("stats", {}).get("linears", {})
        if linears and all("out_err" in st for st in linears.values()):   # kmeans-cal: layer-output errors
            info["out_err"] = {k: sum(st.get(k, 0.0) for st in linears.values()) for k in ("out_err_nearest", "out_err")}
            info["refit_kept"] = sum(st["refit"] > 0 for st in linears.values())
            info["feedback_kept"] = qm.method["stats"]["feedback_kept"]
        qmodel = qm.to_torch()
        if not args.load:                                  # a loaded block-wise result was scored when it was saved
            score(f"{row} {args.bits}-bit {grp}", qmodel, info)
        if args.kl_steps and row.startswith("learned"):
            t1 = time.perf_counter()
            stage, peak = measure_peak_detail(lambda: logits_stage(model, qm, qmodel, calib, args))
            score(f"{row}+kl {args.bits}-bit {grp}", qmodel,
                  {**info, "seconds": info["seconds"] + time.perf_counter() - t1,
                   "peak_mib": max(info["peak_mib"], peak.peak_bytes / 2**20), "kl_stage": stage})
    print(f"Caveat: {DEFAULT_MODEL_CAVEAT}.")


if __name__ == "__main__":
    main()
