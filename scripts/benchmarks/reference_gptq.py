#!/usr/bin/env python
"""macq GPTQ next to llm-compressor's GPTQModifier on identical data and settings, in one run.

llm-compressor 0.14.0.1 pins transformers<=5.17 and numpy 2.4.6, which clash with macq's venv, so it
lives in its own venv (``.venv-llmc``, created by ``--setup``: CPU torch 2.13.0 from the local wheel
first, then ``llmcompressor==0.14.0.1``). This script, run from macq's venv:

1. draws the calibration ids with macq and saves them (``calib.pt``), so both libraries see the same tokens;
2. runs llm-compressor's ``oneshot`` + ``GPTQModifier`` in ``.venv-llmc`` (``--worker`` mode of this same
   file, which imports nothing from macq) on the default model directory, timing the ``oneshot`` call,
   and saves its quantize-dequantized decoder linears plus their scales / zero-points;
3. runs macq's GPTQ with the *matching* settings and times it: llm-compressor computes group parameters
   once from the original weights (= macq ``static_groups``) and calibrates all linears of a decoder
   layer from one pass (= macq ``true_sequential=False``), with the quantized layer feeding the next
   (both); act-order off in both (llm-compressor's default is static act-order; ``--act-order`` turns it
   on in both);
4. evaluates fp, RTN, llm-compressor and macq with macq's evaluator (wiki perplexity, KL vs fp) and prints
   a Markdown table with the wall-time ratio. Both run on this machine's CPU in the same session, so
   their times compare (each with ``--threads`` torch threads).

    python scripts/bench.py reference_gptq --setup                       # once (~1 min, PyPI)
    python scripts/bench.py reference_gptq --bits 3 --group-size 64 --n 16 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-llmc"


def setup_venv() -> None:
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)            # the CPU wheel on local disk, first
    subprocess.run(pip + ["llmcompressor==0.14.0.1"], check=True)


# ------------------------------------------------------------------------------------------------
# Worker: runs inside .venv-llmc; only llm-compressor, torch, transformers, datasets.

def worker(a: argparse.Namespace) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    ids = torch.load(out / "calib.pt")
    # macq's default-model dir keeps the GGUF ``quantization_config`` in config.json, although its
    # safetensors are plain fp32; oneshot reads the on-disk config and refuses "gguf"-quantized models.
    # Give it a view of the dir with that entry removed (weights symlinked, not copied).
    src = out / "llmc_src_model"
    src.mkdir(exist_ok=True)
    for f in Path(a.model_dir).iterdir():
        if f.name != "config.json" and not (src / f.name).exists():
            (src / f.name).symlink_to(f.resolve())
    config = json.loads((Path(a.model_dir) / "config.json").read_text())
    config.pop("quantization_config", None)
    (src / "config.json").write_text(json.dumps(config, indent=1))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.symmetric, strategy="group",
                               group_size=a.group_size, actorder="static" if a.act_order else None)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], dampening_frac=a.damp, block_size=128,
                          actorder="static" if a.act_order else None)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=a.batch_size, shuffle_calibration_samples=False,
            pipeline="sequential")
    secs = time.perf_counter() - t0
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            tensors[name + ".weight"] = mod.weight.detach().float().clone()
            for p in ("weight_scale", "weight_zero_point"):
                if hasattr(mod, p):
                    tensors[f"{name}.{p}"] = getattr(mod, p).detach().clone()
    torch.save(tensors, out / "llmc_weights.pt")
    (out / "llmc_time.json").write_text(json.dumps({"oneshot_secs": secs}))


# ------------------------------------------------------------------------------------------------
# Driver: macq's venv.

def grid_check(w, scale, zp, bits: int, group: int) -> float:
    """Largest distance of llm-compressor's weights from its own group grid (0 = on the grid)."""
    import torch

    out, inp = w.shape
    s = scale.float().view(out, -1, 1)
    z = zp.float().view(out, -1, 1) if zp is not None else torch.zeros_like(s)
    wg = w.view(out, inp // group, group)
    q = (torch.round(wg / s) + z).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # compressed-tensors: signed
    return float(((q - z) * s - wg).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="create .venv-llmc and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "out" / "reference_gptq"))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dataset", default="c4")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.setup:
        setup_venv()
        return 0
    if a.worker:
        worker(a)
        return 0
    from outputs import check_scratch

    check_scratch(Path(a.out), "reference-gptq-work", inputs=(a.model_dir,))

    import torch

    from macq.data import calibration_samples, eval_tokens
    from macq.eval.agreement import agreement_from_reference, reference_logprobs
    from macq.eval.perplexity import perplexity
    from macq.models import load_model, prepare_default_model, set_weight
    from macq.quantizers import quantize_model
    from macq.quantizers.gptq import GPTQConfig

    torch.set_num_threads(a.threads)
    if not (VENV / "bin" / "python").exists():
        print("creating .venv-llmc (llm-compressor 0.14.0.1, torch 2.13.0 CPU) ...", file=sys.stderr)
        setup_venv()
    model_dir = a.model_dir or str(prepare_default_model())
    out = Path(a.out)
    fp, tok = load_model(model_dir)
    calib = calibration_samples(tok, a.dataset, a.n, a.seq_len)
    torch.save(calib, out / "calib.pt")

    # llm-compressor, in its own venv and process (its import and model load are outside the timing).
    cmd = [str(VENV / "bin" / "python"), __file__, "--worker", "--model-dir", model_dir, "--out", str(out),
           "--bits", str(a.bits), "--group-size", str(a.group_size), "--damp", str(a.damp),
           "--batch-size", str(a.batch_size), "--threads", str(a.threads)]
    cmd += ["--symmetric"] * a.symmetric + ["--act-order"] * a.act_order
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    llmc_proc_secs = time.perf_counter() - t0
    llmc_secs = json.loads((out / "llmc_time.json").read_text())["oneshot_secs"]
    llmc_t = torch.load(out / "llmc_weights.pt")

    # macq with the matching settings, on the same ids, same threads.
    import copy
    m_macq = copy.deepcopy(fp)
    cfg = GPTQConfig(bits=a.bits, group_size=a.group_size, symmetric=a.symmetric, damp_percent=a.damp,
                     block_size=128, act_order=a.act_order, static_groups=True, true_sequential=False,
                     batch_size=a.batch_size, mse_clip=False)  # llm-compressor's minmax observer: no range search
    t0 = time.perf_counter()
    qm = quantize_model(m_macq, "gptq", cfg, calib)
    macq_secs = time.perf_counter() - t0

    m_llmc = copy.deepcopy(fp)
    off_grid, diff, err = 0.0, 0.0, 0.0  # ‖W_macq − W_llmc‖² and ‖W_llmc − W_fp‖², summed over linears
    for name in qm.records:
        w_llmc, w_macq = llmc_t[name + ".weight"], qm.records[name].dequantize()
        diff += float(((w_macq - w_llmc) ** 2).sum())
        err += float(((w_llmc - fp.get_submodule(name).weight.detach()) ** 2).sum())
        set_weight(m_llmc.get_submodule(name), llmc_t[name + ".weight"])
        if name + ".weight_scale" in llmc_t:
            off_grid = max(off_grid, grid_check(llmc_t[name + ".weight"], llmc_t[name + ".weight_scale"],
                                                llmc_t.get(name + ".weight_zero_point"),
                                                a.bits, a.group_size))
    m_rtn = copy.deepcopy(fp)
    qr = quantize_model(m_rtn, "rtn", bits=a.bits, group_size=a.group_size, symmetric=a.symmetric, zero_point="int")
    qr.apply_to(m_rtn)

    ids = eval_tokens(tok, "wiki", a.eval_tokens)
    ref = reference_logprobs(fp, ids, a.context)
    rows = []
    for label, m, secs in (("fp32", fp, None), ("RTN", m_rtn, None), ("llm-compressor GPTQ", m_llmc, llmc_secs),
                           ("macq GPTQ", m_macq, macq_secs)):
        ppl = perplexity(m, ids, a.context).ppl
        kl = agreement_from_reference(ref, m, ids, a.context).kl if m is not fp else 0.0
        rows.append((label, ppl, kl, secs))
    sym = "sym" if a.symmetric else "asym"
    print(f"\n{a.bits}-bit g{a.group_size} {sym}, damp {a.damp}, block 128, act-order "
          f"{'static' if a.act_order else 'off'}, static groups, per-layer calibration pass; calibration "
          f"{a.n}×{a.seq_len} tokens of {a.dataset} (identical ids); eval: first {ids.numel()} tokens of wiki "
          f"(eval half), context {a.context}; CPU, {a.threads} torch threads each.\n")
    print("| method | wiki ppl | KL vs fp | quantization wall time (s) |")
    print("|---|---:|---:|---:|")
    for label, ppl, kl, secs in rows:
        print(f"| {label} | {ppl:.3f} | {kl:.4f} | {'' if secs is None else f'{secs:.1f}'} |")
    print(f"\nwall-time ratio llm-compressor oneshot / macq GPTQ: {llmc_secs / macq_secs:.2f} "
          f"(llm-compressor process incl. import + load: {llmc_proc_secs:.1f} s); "
          f"llm-compressor weights' max distance from their own grid: {off_grid:.2e}; "
          f"‖W_macq − W_llmc‖ / ‖W_llmc − W_fp‖ = {(diff / err) ** 0.5:.3f}")
    (out / "result.json").write_text(json.dumps({"args": vars(a), "rows": rows, "ratio": llmc_secs / macq_secs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
