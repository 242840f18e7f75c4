#!/usr/bin/env python
"""Benchmark: macq's MLX export against ``mlx_lm.convert`` on the default model, all measured through mlx_lm.

Rows (each an MLX directory loaded with ``mlx_lm.load``):

* ``macq rtn``: RTN 4-bit g64, ``symmetric=False, zero_point="float"`` (MLX's own affine algorithm) on the
  weights rounded to fp16 first (``mlx_lm.convert`` casts to fp16 before quantizing), embedding included
  (mlx_lm quantizes ``Embedding`` too; it is tied, so it is also the output projection);
* ``macq gptq`` / ``macq awq`` / ``macq awq-gptq`` (``--methods``): decoder linears by that method, the
  embedding by the same RTN as above so that sizes compare like for like;
* ``mlx_lm.convert``: ``convert(hf, out, quantize=True, q_bits=4, q_group_size=64, dtype="float16")`` on a
  copy of the HF dir whose config.json also carries ``rope_theta`` at top level (see below);
* ``mlx_lm.convert (raw config)``: the same on the unmodified dir. transformers 5 nests ``rope_theta`` in
  ``rope_parameters``, which mlx_lm 0.32's llama ignores (it falls back to theta 10000), so this row shows
  what a user of ``mlx_lm.convert`` gets today. macq's exporter writes ``rope_theta`` itself.

Perplexity: wiki eval split (first half of the bundled text), ``--windows`` non-overlapping windows of
``--context`` tokens, same windows as ``macq eval``. Default 2 x 256: mlx on a shared 2-core Linux CPU
runs this 135M model at ~3 tokens/s, so 4 x 512 would take most of an hour for four rows.
Decode tokens/s: mlx_lm's KV-cache loop (``generate_step``), ``--decode-tokens`` after a
``--speed-prompt``-token prompt, rows run alternately ``--repeats`` times, medians (the CPU is shared).
The float model's torch fp32 perplexity on the same windows is the reference row.
All exports store fp16 (scales, biases, norms). Off macOS they are *computed* in fp32
(``--compute-dtype``): mlx's CPU build has no native fp16 arithmetic and its fp16 quantized matmul is
~40x slower than fp32; upcasting is exact for the stored values, so ppl reflects the stored weights.

Caveat: the default model ships as GGUF Q4_1 (4-bit asymmetric g32), so its 4-bit re-quantization is
cheaper than for a model trained in float.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from macq.models import default_model_dir, get_weight, load_model  # noqa: E402
from macq.qmodel import QuantizedModel  # noqa: E402
from mlx_backend import export_mlx  # noqa: E402
from mlx_backend.runner import decode_speed, default_compute_dtype, generate_mlx, load_mlx, logits_fn  # noqa: E402


# ------------------------------------------------------------------------------------------ builders
def rtn_mlx_config(bits: int, group: int, include_embeddings: bool):
    from macq.quantizers.rtn import RTNConfig

    return RTNConfig(bits=bits, group_size=group, symmetric=False, zero_point="float",
                     include_embeddings=include_embeddings, include_lm_head=include_embeddings)


def fp16_rounded(model):
    """What mlx_lm.convert quantizes: the weights cast to fp16 (kept in fp32 tensors for torch maths)."""
    import copy

    m = copy.deepcopy(model)       # .half() is refused on a model whose config names a (gguf) quantization
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def add_rtn_embedding(qm: QuantizedModel, model, bits: int, group: int) -> QuantizedModel:
    """Give a decoder-only quantization the same embedding record mlx_lm.convert would make."""
    from macq.arch import arch_spec
    from macq.quantizers.rtn import quantize_weight

    spec = arch_spec(model)
    emb = get_weight(model.get_submodule(spec.embed)).detach().float()
    qm.records[spec.embed] = quantize_weight(emb, rtn_mlx_config(bits, group, True))
    qm.float_tensors.pop(f"{spec.embed}.weight", None)
    if getattr(model.config, "tie_word_embeddings", False):
        qm.float_tensors.pop(f"{spec.lm_head}.weight", None)
        qm.tied[spec.lm_head] = spec.embed
    return qm


def quantize_with_macq(method: str, model, tok, args) -> QuantizedModel:
    """One slot per method name; calibrated methods get ``--n-calib`` x ``--seq-len`` c4 windows."""
    from macq.pipeline import calibration_ids
    from macq.quantizers import method_spec, quantize_model

    base = fp16_rounded(model)
    if method == "rtn":
        records_cfg = rtn_mlx_config(args.bits, args.group_size, True)
        return quantize_model(base, "rtn", records_cfg, source="default")
    spec = method_spec(method)
    calib = calibration_ids(tok, "c4", args.n_calib, args.seq_len) if spec.needs_calibration else None
    qm = quantize_model(fp16_rounded(model), method, calib=calib, bits=args.bits, group_size=args.group_size,
                        symmetric=False, source="default")
    return add_rtn_embedding(qm, base, args.bits, args.group_size)


def reused(path: Path, args) -> bool:
    return bool(args.reuse) and (path / "config.json").is_file()


def build_macq(method: str, work: Path, model, tok, hf_dir: Path, args) -> tuple[Path, dict[str, Any]]:
    if reused(work / f"macq-{method}", args):
        return work / f"macq-{method}", {"reused": True}
    t0 = time.perf_counter()
    qm = quantize_with_macq(method, model, tok, args)
    t1 = time.perf_counter()
    res = export_mlx(qm, work / f"macq-{method}", tokenizer=hf_dir, dtype="float16", force=True)
    return res.path, {"quantize_s": t1 - t0, "export_s": time.perf_counter() - t1, "notes": res.notes}


def rope_patched_copy(hf_dir: Path, work: Path) -> Path:
    """The HF dir with ``rope_theta`` (and ``rope_scaling``) lifted to config.json's top level."""
    out = work / "hf-rope-patched"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_mlx_convert(hf_dir: Path, out: Path, args) -> tuple[Path, dict[str, Any]]:
    from mlx_lm.convert import convert

    if reused(out, args):
        return out, {"reused": True}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    convert(str(hf_dir), str(out), quantize=True, q_bits=args.bits, q_group_size=args.group_size, dtype="float16")
    return out, {"quantize_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ measuring
def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("model*.safetensors")) / 2 ** 20


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor equality of two MLX dirs' safetensors (same keys, dtypes and bits)."""
    import mlx.core as mx

    ta, tb = {}, {}
    for f in a.glob("model*.safetensors"):
        ta.update(mx.load(str(f)))
    for f in b.glob("model*.safetensors"):
        tb.update(mx.load(str(f)))
    common = sorted(ta.keys() & tb.keys())
    same = [k for k in common if ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
            and mx.array_equal(ta[k], tb[k]).item()]
    packed = [k for k in common if ta[k].dtype == mx.uint32]
    return {"keys_a": len(ta), "keys_b": len(tb), "common": len(common), "identical": len(same),
            "packed_identical": sum(k in same for k in packed), "packed": len(packed),
            "differing": [k for k in common if k not in same][:5]}


def mlx_perplexity(loaded, ids, context: int) -> float:
    from macq.eval.perplexity import perplexity

    return perplexity(logits_fn(loaded), ids, context=context).ppl


def measure(dirs: dict[str, Path], ids, args) -> dict[str, dict[str, Any]]:
    loaded = {name: load_mlx(p, args.compute_dtype) for name, p in dirs.items()}
    out: dict[str, dict[str, Any]] = {}
    for name, m in loaded.items():
        t0 = time.perf_counter()
        out[name] = {"ppl": mlx_perplexity(m, ids, args.context), "ppl_s": time.perf_counter() - t0,
                     "disk_mib": disk_mib(dirs[name])}
    prompt = ids[:args.speed_prompt].tolist()
    speeds: dict[str, list[dict[str, float]]] = {n: [] for n in loaded}
    for _ in range(args.repeats):
        for name, m in loaded.items():           # alternate rows: shared-CPU noise hits all alike
            speeds[name].append(decode_speed(m, prompt, args.decode_tokens))
    for name, runs in speeds.items():
        out[name]["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
        out[name]["prefill_tokens_per_s"] = statistics.median(r["prefill_tokens_per_s"] for r in runs)
        out[name]["tokens_per_s_runs"] = [round(r["tokens_per_s"], 2) for r in runs]
    return out


def torch_reference_ppl(model, ids, context: int) -> float:
    from macq.eval.perplexity import perplexity

    return perplexity(model, ids, context=context).ppl


# ------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict[str, Any]], ref: str) -> str:
    cols = ["row", "ppl", "disk_mib", "tokens_per_s", "decode_ratio", "prefill_tokens_per_s",
            "weights_identical_to_ref"]
    base = next((r for r in rows if r["row"] == ref), None)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if base and r.get("tokens_per_s") and base.get("tokens_per_s"):
            r["decode_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from outputs import add_force, check_json, check_scratch, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="rtn", help="comma list of macq methods (rtn,gptq,awq,awq-gptq)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--speed-prompt", type=int, default=32, help="prompt tokens before the timed decode")
    ap.add_argument("--compute-dtype", default=default_compute_dtype(),
                    help="upcast stored params for mlx arithmetic (default: float32 off macOS; 'none' = stored)")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-raw-convert", action="store_true", help="skip the unpatched mlx_lm.convert row")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--work", type=Path, default=None, help="keep the exports here (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="keep exports already in --work instead of rebuilding")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    add_force(ap)
    args = ap.parse_args(argv)
    check_json(args.json, args.force)
    if args.work is not None:          # exports and a patched model copy are replaced there
        check_scratch(args.work, "compare-mlx-work", inputs=(args.json,), flag="--work")
    if args.compute_dtype in ("none", "None", ""):
        args.compute_dtype = None

    from macq.data import eval_tokens

    torch.manual_seed(0)
    model, tok = load_model(None)
    hf_dir = default_model_dir()
    work = args.work or Path(tempfile.mkdtemp(prefix="compare_mlx-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = eval_tokens(tok, "wiki", args.windows * args.context)

    dirs: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}
    ref = "mlx_lm.convert"
    p, info[ref] = build_mlx_convert(rope_patched_copy(hf_dir, work), work / "mlx_lm-convert", args)
    dirs[ref] = p
    if not args.no_raw_convert:
        p, info["mlx_lm.convert (raw config)"] = build_mlx_convert(hf_dir, work / "mlx_lm-convert-raw", args)
        dirs["mlx_lm.convert (raw config)"] = p
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        try:
            p, info[f"macq {method}"] = build_macq(method, work, model, tok, hf_dir, args)
            dirs[f"macq {method}"] = p
        except Exception as e:  # a method that is not there yet must not sink the whole table
            print(f"[compare_mlx] macq {method}: skipped ({type(e).__name__}: {e})", file=sys.stderr)

    results = measure(dirs, ids, args)
    rows = [{"row": "float (torch fp32)", "ppl": torch_reference_ppl(model, ids, args.context)}]
    for name, r in results.items():
        row = {"row": name, **r, **{k: v for k, v in info[name].items() if k != "notes"}}
        if name != ref:
            cmp = compare_weights(dirs[name], dirs[ref])
            row["weights_identical_to_ref"] = f"{cmp['identical']}/{cmp['common']} tensors"
            row["weights_compare"] = cmp
        rows.append(row)
    gen = None
    if "macq rtn" in dirs:
        gen = generate_mlx(load_mlx(dirs["macq rtn"], args.compute_dtype), args.prompt, max_tokens=args.gen_tokens)

    print(f"\nMLX comparison on SmolLM2-135M-Instruct: {args.bits}-bit g{args.group_size}, fp16 storage, "
          f"mlx compute {args.compute_dtype or 'as stored'}; wiki {args.windows}x{args.context} tokens; decode "
          f"{args.decode_tokens} tokens after a {args.speed_prompt}-token prompt, median of {args.repeats} "
          f"alternating runs (decode_ratio relative to {ref})\n")
    print(markdown(rows, ref))
    if gen is not None:
        print(f"\nmlx_lm.generate on the macq rtn export, chat prompt {args.prompt!r}:\n{gen}")
    if args.json:
        write_json(args.json, "compare_mlx", {"rows": rows, "generation": gen,
                                              "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
