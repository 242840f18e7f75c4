"""What ``macq eval | bench | analyze`` run: dispatch on what the path is, call the shared evaluator,
and format a Markdown table. The numbers come from macq.eval; this module only wires and formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from macq.atomic import PNG_SOFTWARE, atomic_file, guard_output
from macq.errors import MacqError
from macq.markdown import md_table  # noqa: F401  (re-exported: commands format their tables with it)


def artifact_kind(path: str | None) -> str:
    """``mlpackage`` | ``coreai`` | ``mlx`` | ``macq`` | ``model`` (HF dir, hub id, gguf, or the default)."""
    if path is None:
        return "model"
    p = Path(path)
    if p.suffix == ".mlpackage":
        if not p.exists():
            raise MacqError(f"model: {path} does not exist")
        return "mlpackage"
    if (p / "coreml_manifest.json").is_file():   # converters.chunks.MANIFEST: a chunked Core ML export
        return "mlpackage"
    if p.suffix == ".aimodel" or (p / "coreai_manifest.json").is_file():   # a Core AI export (coreai_backend)
        return "coreai"
    if (p / "manifest.json").is_file():
        return "macq"
    cfg = p / "config.json"
    try:
        if cfg.is_file() and "quantization" in json.loads(cfg.read_text()):
            return "mlx"
    except (ValueError, UnicodeDecodeError, TypeError):
        return "model"   # a broken config.json: reading it as a model says so in one line, naming the file
    return "model"


def evaluate_torch(model, tokenizer, dataset: str, context: int, stride: int | None, max_tokens: int | None,
                   reference=None, device: str = "auto", latency: bool = False, progress: bool = False,
                   ref_logprobs=None) -> dict[str, Any]:
    """Perplexity (+ KL / top-1 vs ``reference``) of a torch model on the eval split of ``dataset``."""
    from macq.data import eval_tokens
    from macq.device import resolve_device
    from macq.eval import agreement, perplexity

    dev = resolve_device(device)
    ids = eval_tokens(tokenizer, dataset, max_tokens)
    model.to(dev)
    ppl = perplexity(model, ids, context=context, stride=stride, device=dev, progress=progress)
    out: dict[str, Any] = {"dataset": dataset, "n_tokens": ppl.n_tokens, "context": context,
                           "ppl": ppl.ppl, "ppl_stderr": ppl.stderr, "device": str(dev)}
    if reference is not None:
        reference.to(dev)
        ag = agreement(reference, model, ids, context=context, stride=stride, device=dev, progress=progress)
        out.update({"kl": ag.kl, "top1": ag.top1, "logits_mse": ag.logits_mse})
    if latency:
        from macq.eval import latency as measure_latency

        lat = measure_latency(model, device=dev)
        out.update({"prefill_ms": lat.prefill_ms, "decode_ms_per_token": lat.decode_ms_per_token,
                    "tokens_per_s": lat.tokens_per_s, "prefill_tokens_per_s": lat.prefill_tokens_per_s,
                    "prompt_len": lat.prompt_len})
    return out


def evaluate_any(path: str | None, dataset: str = "wiki", context: int | None = 512, stride: int | None = None,
                 max_tokens: int | None = 4096, reference: str | None = None, device: str = "auto",
                 latency: bool = False, compute_units: str = "ALL", progress: bool = False,
                 tokenizer: str | None = None, decode_tokens: int | None = None):
    """``context=None``: 512, or a Core ML ANE export's own fixed context."""
    kind = artifact_kind(path)
    if decode_tokens is not None and kind not in ("mlpackage", "coreai"):
        raise MacqError("--decode-tokens: only for a Core ML or Core AI export")
    if kind not in ("mlpackage", "coreai"):
        context = 512 if context is None else context
    if kind == "mlx":
        from mlx_backend.runner import eval_mlx

        ref_model = None
        if reference is not None:  # KL / top-1 against the float model, from the same MLX passes
            from macq.models import load_model

            ref_model, _ = load_model(None if reference == "default" else reference, with_tokenizer=False)
        res = eval_mlx(path, dataset=dataset, context=context, max_tokens=max_tokens, stride=stride,
                       reference=ref_model, speed_repeats=3 if latency else 1)
        res = dict(res, artifact="mlx", path=path)
        return res, md_table([res], [c for c in ("artifact", "ppl", "kl", "top1", "n_tokens", "tokens_per_s",
                                                  "prefill_tokens_per_s") if c in res])
    if kind in ("mlpackage", "coreai"):
        kw = dict(dataset=dataset, max_tokens=max_tokens, tokenizer=tokenizer, context=context, stride=stride,
                  reference=reference, decode_tokens=decode_tokens)
        res = (evaluate_coreai(path, **kw) if kind == "coreai" else
               evaluate_mlpackage(path, compute_units=compute_units, **kw))
        md = md_table([res], [c for c in ("artifact", "backend", "compute_units", "ppl", "kl", "top1", "n_tokens",
                                          "context", "prefill_ms_per_token", "decode_ms_per_token") if c in res])
        return res, md + "".join(f"\nnote: {n}" for n in res["notes"])

    from macq.pipeline import load_quantized_or_model, reference_model_for

    qm, model, tok = load_quantized_or_model(path)
    ref = None
    if qm is not None:
        ref = reference_model_for(qm, reference)
    elif reference is not None:
        from macq.models import load_model

        ref, _ = load_model(reference, with_tokenizer=False)
    res = evaluate_torch(model, tok, dataset, context, stride, max_tokens, ref, device, latency, progress)
    res["model"] = path or "default"
    if qm is not None:
        res.update({"method": qm.method.get("method"), "bits_per_weight": qm.bits_per_weight(),
                    "bytes": qm.nbytes()})
    cols = [c for c in ("model", "method", "bits_per_weight", "ppl", "ppl_stderr", "kl", "top1", "n_tokens",
                        "prefill_ms", "decode_ms_per_token") if c in res]
    return res, md_table([res], cols)


def _reference_fn(reference: str | None):
    """Window ids -> float logits ``[n, vocab]`` of the float model ``reference`` (None: no KL)."""
    if reference is None:
        return None
    import torch

    from macq.models import load_model

    ref_model, _ = load_model(None if reference == "default" else reference, with_tokenizer=False)
    ref_model.eval()

    def fn(win):
        with torch.inference_mode():
            return ref_model(torch.as_tensor(win, dtype=torch.long)[None]).logits[0].float().numpy()

    return fn


def _source_tokens(src: str | None, path: str, dataset: str, max_tokens: int | None):
    from transformers import AutoTokenizer

    from macq.data import eval_tokens
    from macq.models import resolve_model_path

    if not src:
        raise MacqError(f"{path} does not record its source model: pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None if src == "default" else src))
    return eval_tokens(tok, dataset, max_tokens)


def _check_context(context: int | None, limit: int) -> int:
    if context is not None and not 2 <= context <= limit:
        raise MacqError(f"--context {context}: expected 2..{limit} (the export's fixed context)")
    return limit if context is None else context


def _runner_result(artifact: str, path: str, dataset: str, r, context: int | None) -> dict[str, Any]:
    out = {"artifact": artifact, "path": str(path), "backend": r.backend, "compute_units": r.compute_units,
           "dataset": dataset, "ppl": r.perplexity, "ppl_stderr": r.ppl_stderr, "n_tokens": r.n_tokens,
           "prefill_ms_per_token": r.prefill_ms_per_token, "decode_ms_per_token": r.decode_ms_per_token,
           "notes": r.notes}
    if context is not None:
        out["context"] = context
    if r.kl is not None:
        out.update({"kl": r.kl, "top1": r.top1})
    return out


def evaluate_mlpackage(path: str, dataset: str = "wiki", max_tokens: int | None = 512, compute_units: str = "ALL",
                       tokenizer: str | None = None, context: int | None = None, stride: int | None = None,
                       reference: str | None = None, decode_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity (and with ``reference`` KL / top-1 against that float model, run on the same windows) and
    per-token latency of a Core ML export: Core ML prediction on macOS; elsewhere the saved program run by
    MIL value inference, which checks the graph and is *not* a speed figure. An ANE export is scored on
    macq's windows of ``context`` tokens (default: its fixed context); the traced (flexible) path on
    windows of its own context length, without KL."""
    import coremltools as ct

    from converters.ane_runner import predict_ane
    from converters.chunks import is_ane_export, read_manifest
    from converters.predict import predict_coreml

    ane = is_ane_export(path)
    if ane:
        src = tokenizer or read_manifest(path)[0].source or None
    else:
        src = tokenizer or ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata.get("macq.source")
    if not ane and (reference is not None or decode_tokens is not None or stride is not None):
        raise MacqError(f"{path}: --reference / --decode-tokens / --stride need an ANE export (the default graph)")
    ctx = _check_context(context, read_manifest(path)[0].context) if ane else None
    ids = _source_tokens(src, path, dataset, max_tokens)
    if not ane:
        r = predict_coreml(path, ids.numpy(), compute_units=compute_units)
    else:
        r = predict_ane(path, ids.numpy(), compute_units=compute_units, context=ctx, stride=stride,
                        decode=decode_tokens, reference=_reference_fn(reference))
    return _runner_result("coreml", path, dataset, r, ctx)


def evaluate_coreai(path: str, dataset: str = "wiki", max_tokens: int | None = 512, tokenizer: str | None = None,
                    context: int | None = None, stride: int | None = None, reference: str | None = None,
                    decode_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity (and KL / top-1 against ``reference``) of a Core AI export run in the Core AI runtime, prefill
    and decode functions and KV state as deployed, on macq's windows (default: the export's fixed context). On
    macOS 27 the OS runtime on the export's hardware; on Linux the runtime's CPU path over the saved program
    (a check of the file's numbers, not a device speed)."""
    from coreai_backend.export import read_manifest
    from coreai_backend.runner import predict_coreai

    manifest = read_manifest(path)[0]
    ctx = _check_context(context, manifest.context)
    ids = _source_tokens(tokenizer or manifest.source or None, path, dataset, max_tokens)
    r = predict_coreai(path, ids.numpy(), context=ctx, stride=stride, decode=decode_tokens,
                       reference=_reference_fn(reference))
    return _runner_result("coreai", path, dataset, r, ctx)


def bench_latency(path: str | None, device: str = "auto", dtype: str = "float32", prompt_len: int = 128,
                  new_tokens: int = 32, repeats: int = 5):
    from macq.device import resolve_device
    from macq.eval import latency
    from macq.eval.memory import peak_rss_bytes
    from macq.pipeline import load_quantized_or_model, torch_dtype

    dev = resolve_device(device)
    _, model, _ = load_quantized_or_model(path)
    model.to(device=dev, dtype=torch_dtype(dtype))
    lat = latency(model, prompt_len=prompt_len, new_tokens=new_tokens, device=dev, repeats=repeats)
    res = {"model": path or "default", "device": str(dev), "dtype": dtype, "prompt_len": prompt_len,
           "new_tokens": new_tokens, "prefill_ms": lat.prefill_ms, "decode_ms_per_token": lat.decode_ms_per_token,
           "tokens_per_s": lat.tokens_per_s, "peak_rss_mib": peak_rss_bytes() / 2**20}
    return res, md_table([res], list(res))


def analyze_distortion(path: str, reference: str | None = None, plot: Path | None = None, force: bool = False):
    from macq.eval.distortion import distortion_table
    from macq.pipeline import reference_model_for
    from macq.qmodel import QuantizedModel

    if artifact_kind(path) != "macq":
        raise MacqError(f"analyze: {path} is not a macq quantization directory")
    if plot is not None:
        guard_output(plot, force, inputs=[path, reference], flag="--plot", kind="file")
    qm = QuantizedModel.load(path)
    ref = reference_model_for(qm, reference)
    if ref is None:
        raise MacqError("analyze: the unquantized source model is unknown; pass --reference")
    table = distortion_table(qm, ref)  # per-layer rows, then an overall row named "(all)"
    rows, summary = table[:-1], table[-1]
    if plot is not None:
        _plot_distortion(rows, plot)
    md = md_table(rows, [c for c in ("name", "bpw", "mse", "sqnr_db", "rd_bound_mse", "gap_bits") if c in summary])
    md += "\n\n" + md_table([summary], list(summary))
    return {"layers": rows, "summary": summary}, md


def _plot_distortion(rows: list[dict[str, Any]], out: Path) -> None:
    """SQNR per layer next to the Gaussian rate–distortion bound at each layer's effective rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    sqnr = [r["sqnr_db"] for r in rows]
    bound = [10 * np.log10(2.0 ** (2 * r["bpw"])) for r in rows]  # σ²/D(R) in dB
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.12), 4))
    ax.plot(x, bound, label="rate–distortion bound (Gaussian, effective rate)", color="gray", ls="--")
    ax.plot(x, sqnr, label="measured SQNR", marker=".", lw=0.8)
    ax.set_xlabel("layer (quantization order)")
    ax.set_ylabel("SQNR (dB)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)


KV_CONTEXT = 2048   # default window for --kv-bits: a quantized cache's error grows with the positions attended


def evaluate_kv(path: str | None, kv_bits: list[int], *, dataset: str = "wiki", context: int | None = None,
                max_tokens: int | None = 4096, kv_group_size: int = 64) -> tuple[dict[str, Any], str]:
    """``macq eval PATH --kv-bits 8 --kv-bits 4``: the float-KV row and one row per KV width (perplexity, KL / top-1
    against the float-KV row, same weights). An MLX export runs through mlx_lm's own quantized KV cache; a
    checkpoint or a macq quantization through the torch simulation of that cache (:mod:`macq.eval.kvsim`)."""
    from macq.data import eval_tokens
    from macq.eval.kvsim import check_kv, kv_logits_fn, kv_rows

    kind = artifact_kind(path)
    for b in kv_bits:
        check_kv(b, kv_group_size)
    context = context or KV_CONTEXT
    if kind == "mlx":
        from mlx_backend.runner import eval_mlx_kv

        rows = eval_mlx_kv(path, kv_bits=tuple(kv_bits), dataset=dataset, context=context,
                           max_tokens=max_tokens, kv_group_size=kv_group_size)
        runtime = "mlx_lm QuantizedKVCache"
    elif kind in ("model", "macq"):
        from macq.pipeline import load_quantized_or_model

        _, model, tok = load_quantized_or_model(path)
        model.eval()
        ids = eval_tokens(tok, dataset, max_tokens)
        fns = {b: kv_logits_fn(model, b, kv_group_size) for b in kv_bits}   # head-dim checks before any pass
        rows = kv_rows(model, fns.__getitem__, ids, tuple(kv_bits), kv_group_size, context)
        runtime = "torch, MLX's affine KV grid simulated"
    else:
        raise MacqError(f"--kv-bits: needs a checkpoint, a macq quantization or an MLX export, not a {kind} "
                        f"artifact ({path})")
    result = {"artifact": kind, "path": path, "dataset": dataset, "kv_runtime": runtime, "kv_rows": rows}
    return result, md_table(rows, ["kv", "ppl", "kl", "top1", "n_tokens", "context"])
