"""``macq`` command line: quantize | export --target coreml|mlx | eval | bench | analyze | info | inspect | generate |
baseline | report.

Every user error ends as one line on stderr (``error: ...``) with exit code 2, and no half-written output.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import signal
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional, get_type_hints

import typer

from macq.errors import MacqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs and deploy them to Apple silicon (Core ML, MLX).")

METHOD_HELP = "rtn|nf4|fp4|kmeans|uniform|gptq|awq|awq-gptq|smoothquant|mixed|dkm (default rtn)"
STREAM_HELP = ("on a local safetensors checkpoint: weight methods hold one tensor in memory at a time, calibrated "
               "methods one decoder layer (all but dkm; not kmeans-cal/mixed Fisher or KL sensitivities, learned's "
               "logits stage) (default: on when it applies)")
MODEL_HELP = "HF hub id, local HF directory, .gguf file, or a macq quantization dir (default: embedded SmolLM2-135M)"


def _emit(result: Any, as_json: bool, markdown: str | None = None) -> None:
    if as_json:
        data = _plain(result)
        if isinstance(data, dict):
            from macq.eval.memory import process_memory

            data.setdefault("memory", process_memory())
        typer.echo(json.dumps(data, indent=1))
    elif markdown is not None:
        typer.echo(markdown)


def _plain(x: Any) -> Any:
    if is_dataclass(x) and not isinstance(x, type):
        return _plain(asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (ValueError, RuntimeError):
            return str(x)
    return x


def _generated(fixed: Callable[..., None]):
    """A typer command whose signature is ``fixed``'s parameters followed by every method option generated
    from the config dataclasses (:mod:`macq.options`): ``quantize`` and ``export`` get the same flags."""
    from macq.options import typer_parameters

    def deco(impl: Callable[..., None]) -> Callable[..., None]:
        hints = get_type_hints(fixed)
        params = [p.replace(annotation=hints[p.name], kind=pyinspect.Parameter.KEYWORD_ONLY)
                  for p in pyinspect.signature(fixed).parameters.values()]
        params += typer_parameters()

        def command(**kw: Any) -> None:
            impl(**kw)

        command.__signature__ = pyinspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = impl.__name__, impl.__doc__
        return command
    return deco


def _notes(lines: list[str]) -> list[str]:
    """Choices macq made for the user (e.g. the group size): reported with the result, on stdout / in JSON,
    so that stderr carries nothing but a failure's one line."""
    return [f"note: {line}" for line in lines]


TARGETS = ("coreml", "mlx")
CALIB_DEFAULTS = {"calib_dataset": "c4", "n_calib": 128, "seq_len": 512, "seed": 0}


def _calibration(method: str, calib: dict[str, Any]) -> dict[str, Any]:
    """Calibration options with defaults filled; refused by name for methods that use no data, and the
    text checked (exists, is text) before any weight is loaded."""
    from macq.quantizers import method_spec

    given = [k for k, v in calib.items() if v is not None and k != "seed"]
    full = {k: CALIB_DEFAULTS[k] if v is None else v for k, v in calib.items()}
    if not method_spec(method).needs_calibration:
        if given:
            raise MacqError(f"--{given[0].replace('_', '-')} does not apply to --method {method} (it uses no calibration data)")
        return full
    if full["n_calib"] < 1 or full["seq_len"] < 2:
        raise MacqError(f"--n-calib {full['n_calib']} / --seq-len {full['seq_len']}: expected n >= 1 and seq_len >= 2")
    from macq.data import load_text

    load_text(full["calib_dataset"])
    return full


def _plan(model: str | None, method: str | None, target: str | None, mopts: dict[str, Any], calib: dict[str, Any],
          trust_remote_code: bool):
    """Everything decided before loading weights: ``(method, cfg, calibration, model config, notes)``."""
    from macq.options import given_method_options
    from macq.preflight import model_config, resolve_config

    method = method or "rtn"
    given = given_method_options(mopts)
    calib = _calibration(method, calib)
    config = model_config(model, trust_remote_code)
    cli = {"n_calib": calib["n_calib"], "seq_len": calib["seq_len"], "seed": calib["seed"],
           "dataset": calib["calib_dataset"], "target": target}
    cfg, notes = resolve_config(method, given, config, target, cli)
    if "device" in given:   # checked here, before any weight is read: a missing accelerator is the user's error
        from macq.device import resolve_device

        try:
            resolve_device(cfg.device)
        except MacqError as e:
            raise MacqError(f"--device {cfg.device}: {str(e).removeprefix('device: ')}") from None
    return method, cfg, calib, config, notes


@app.command("prepare-model")
def prepare_model(force: bool = typer.Option(False, help="convert again even if cached")) -> None:
    """Convert the embedded default model (SmolLM2-135M GGUF) into an HF checkpoint in the cache."""
    from macq.models import prepare_default_model

    typer.echo(str(prepare_default_model(force=force)))


def _quantize_options(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output directory (written atomically)"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    target: Optional[str] = typer.Option(None, help="runtime the quantization is for (mlx|coreml): its preferred "
                                         "defaults and limits apply; mixed: whose formats to choose from (or any)"),
    calib_dataset: Optional[str] = typer.Option(None, help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME (default c4)"),
    n_calib: Optional[int] = typer.Option(None, help="calibration sequences (default 128)"),
    seq_len: Optional[int] = typer.Option(None, help="calibration sequence length (default 512)"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling (and k-means) seed (default 0)"),
    force: bool = typer.Option(False, help="replace an existing output that macq wrote"),
    trust_remote_code: bool = typer.Option(False),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None: ...


@app.command()
@_generated(_quantize_options)
def quantize(model: str | None, output: Path, method: str | None, target: str | None, calib_dataset: str | None,
             n_calib: int | None, seq_len: int | None, seed: int | None, force: bool, trust_remote_code: bool,
             stream: bool | None, as_json: bool, **mopts: Any) -> None:
    """Quantize a model and save macq's quantization directory (records + float tensors + config)."""
    from macq.atomic import check_output
    from macq.pipeline import load_quantized_or_model
    from macq.pipeline import quantize as run_quantize
    from macq.preflight import check_target
    from macq.qmodel import is_quantized_dir

    if target not in (None, "any", *TARGETS):
        raise MacqError(f"--target {target!r}: expected coreml, mlx or any")
    check_output(output, force)
    if model is not None and is_quantized_dir(model):
        raise MacqError(f"model: {model} is already a macq quantization directory")
    method, cfg, calib, config, notes = _plan(model, method, target, mopts,
                                              {"calib_dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len,
                                               "seed": seed}, trust_remote_code)
    if target in TARGETS:
        check_target(target, method, cfg, config)
    from macq.quantizers import method_spec
    from macq.streaming import stream_quantize, stream_refusal, use_streaming

    src = use_streaming(model, method, stream, cfg=cfg)
    if src is None and (mopts.get("max_memory") is not None or mopts.get("act_dtype") is not None):
        flag = "--max-memory" if mopts.get("max_memory") is not None else "--act-dtype"
        why = stream_refusal(cfg) or "a local safetensors checkpoint, without --no-stream"
        raise MacqError(f"{flag} applies to the streamed path ({why})")
    if src is not None and method_spec(method).stream:  # calibrated: one decoder layer in memory at a time
        from macq.pipeline import stream_calibrated

        summary = stream_calibrated(src, output, method, cfg, calib["calib_dataset"], calib["n_calib"],
                                    calib["seq_len"], calib["seed"], source=model or "default", force=force,
                                    progress=not as_json, trust_remote_code=trust_remote_code)
        summary["notes"] = notes
        t = summary["timings"]
        _emit(summary, as_json, "\n".join([f"wrote {output} (streamed, calibrated): {summary['layers']} layers, "
                                           f"{summary['bits_per_weight']:.3f} bits/weight, "
                                           f"{summary['bytes'] / 2**20:.1f} MiB in {t['total_s']:.0f}s "
                                           f"({', '.join(f'{k} {v:.1f}' for k, v in t.items() if k != 'total_s')})",
                                           *_notes(notes)]))
        return
    if src is not None:  # weight method on a local checkpoint: one tensor in memory at a time
        summary = stream_quantize(src, output, method, cfg, source=model or "default", force=force,
                                  progress=not as_json, trust_remote_code=trust_remote_code)
        summary["notes"] = notes
        _emit(summary, as_json, "\n".join([f"wrote {output} (streamed): {summary['layers']} layers, "
                                           f"{summary['bits_per_weight']:.3f} bits/weight, "
                                           f"{summary['bytes'] / 2**20:.1f} MiB", *_notes(notes)]))
        return
    qm0, fp, tok = load_quantized_or_model(model, trust_remote_code)
    qm = run_quantize(fp, tok, method, cfg, calib["calib_dataset"], calib["n_calib"], calib["seq_len"], calib["seed"],
                      progress=not as_json, source=model or "default", copy_model=False)
    path = qm.save(output, tokenizer=tok, force=force)
    summary = {"output": str(path), "method": qm.method, "layers": len(qm.records),
               "bits_per_weight": round(qm.bits_per_weight(), 4), "bytes": qm.nbytes(), "notes": notes}
    _emit(summary, as_json, "\n".join([f"wrote {path}: {len(qm.records)} layers, {summary['bits_per_weight']:.3f} "
                                       f"bits/weight, {summary['bytes'] / 2**20:.1f} MiB", *_notes(notes)]))


@app.command()
def info(path: Path = typer.Argument(..., help="macq quantization directory"),
         as_json: bool = typer.Option(False, "--json")) -> None:
    """Per-layer formats and bits per weight of a macq quantization directory."""
    from macq.qmodel import QuantizedModel
    from macq.record import bits_per_weight

    qm = QuantizedModel.load(path)
    rows = [{"module": k, "kind": r.kind, "bits": r.bits, "shape": list(r.shape),
             "group_size": getattr(r, "group_size", None), "bpw": round(bits_per_weight(r), 4)}
            for k, r in qm.records.items()]
    data = {"path": str(path), "source": qm.source, "method": qm.method, "bits_per_weight": qm.bits_per_weight(),
            "bytes": qm.nbytes(), "layers": rows, "tied": qm.tied, "act_quant": qm.act_quant}
    lines = [f"{path}: method {qm.method.get('method')} from {qm.source or '?'}; "
             f"{qm.bits_per_weight():.3f} bits/weight over {len(rows)} layers; {qm.nbytes() / 2**20:.1f} MiB",
             "", "| module | kind | bits | group | shape | bpw |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['kind']} | {r['bits']} | {r['group_size']} | {r['shape']} | {r['bpw']} |" for r in rows]
    _emit(data, as_json, "\n".join(lines))


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + ", an MLX export dir, or a .mlpackage"),
    dataset: str = typer.Option("wiki", help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME"),
    context: Optional[int] = typer.Option(None, help="window length (default 512; a Core ML ANE export: its fixed context)"),
    stride: Optional[int] = typer.Option(None, help="window stride (default: context)"),
    max_tokens: Optional[int] = typer.Option(4096, help="evaluate the first N tokens of the eval split"),
    reference: Optional[str] = typer.Option(None, help="unquantized model for KL/top-1 (default: the quantization's source)"),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps"),
    latency: bool = typer.Option(False, help="also measure prefill/decode latency"),
    compute_units: str = typer.Option("ALL", help=".mlpackage on macOS: ALL|CPU_AND_NE|CPU_ONLY|CPU_AND_GPU"),
    tokenizer: Optional[str] = typer.Option(None, help=".mlpackage: tokenizer dir (default: the recorded source)"),
    decode_tokens: Optional[int] = typer.Option(None, help="Core ML ANE export: last N tokens of each window through the "
                                                "decode function (default: half the window; 0: all through prefill)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as a macq.run JSON file (for macq report)"),
    label: str = typer.Option("", help="--out: row label in reports"),
    kv_bits: Optional[list[int]] = typer.Option(None, "--kv-bits", help="MLX export: rows with mlx_lm's quantized KV "
                                                "cache at these bits (repeatable) next to the float-KV row: ppl, KL "
                                                "(default --context 2048)"),
    kv_group_size: int = typer.Option(64, help="--kv-bits: KV quantization group along the head dim"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Perplexity, KL / top-1 vs the unquantized model, size, and optionally latency.

    A .mlpackage runs through Core ML on macOS; on Linux its saved program is executed by MIL value
    inference (a graph check, labelled so, not a speed figure)."""
    from macq.evaluate import evaluate_any

    if context is not None and context < 2:
        raise MacqError(f"--context {context}: expected at least 2 tokens per window")
    if stride is not None and not 1 <= stride <= (context or 512):
        raise MacqError(f"--stride {stride}: expected 1 <= stride <= --context ({context or 512})")
    if decode_tokens is not None and decode_tokens < 0:
        raise MacqError(f"--decode-tokens {decode_tokens}: expected >= 0")
    if max_tokens is not None and max_tokens < 2:
        raise MacqError(f"--max-tokens {max_tokens}: expected at least 2 tokens")
    if kv_bits:
        from macq.evaluate import evaluate_kv

        result, md = evaluate_kv(model, kv_bits, dataset=dataset, context=context, max_tokens=max_tokens,
                                 kv_group_size=kv_group_size)
        return _emit(result, as_json, md)
    result, md = evaluate_any(model, dataset=dataset, context=context, stride=stride, max_tokens=max_tokens,
                              reference=reference, device=device, latency=latency, compute_units=compute_units,
                              progress=not as_json, tokenizer=tokenizer, decode_tokens=decode_tokens)
    if out is not None:
        from macq.results import save_run
        from macq.runs import run_from_eval

        ctx = result.get("context", context or 512)
        save_run(run_from_eval(result, model, dataset, ctx, stride, max_tokens, tokenizer, label), out)
    _emit(result, as_json, md)


TARGET_OPTIONS = {"mlx": ("dtype", "requantize_lut"),
                  "coreml": ("context", "stateful", "fixed_shapes", "allow_fallback", "graph", "prefill_len", "chunks",
                             "max_chunk_mb")}


def _export_options(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help="coreml | mlx"),
    output: Path = typer.Option(..., "-o", "--output", help="MLX directory or FILE.mlpackage"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=METHOD_HELP),
    calib_dataset: Optional[str] = typer.Option(None, help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME (default c4)"),
    n_calib: Optional[int] = typer.Option(None, help="calibration sequences (default 128)"),
    seq_len: Optional[int] = typer.Option(None, help="calibration sequence length (default 512)"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling (and k-means) seed (default 0)"),
    dtype: Optional[str] = typer.Option(None, help="MLX: float dtype of scales/biases and float layers (default float16)"),
    context: Optional[int] = typer.Option(None, help="Core ML: maximum context (KV cache length; default 512 "
                                          "or the model's maximum if smaller)"),
    stateful: Optional[bool] = typer.Option(None, "--stateful/--kv-io",
                                            help="Core ML: KV cache as state (default), or as inputs/outputs"),
    fixed_shapes: Optional[bool] = typer.Option(None, "--fixed-shapes", help="Core ML --graph hf: fixed shapes (one token per call)"),
    graph: Optional[str] = typer.Option(None, help="Core ML: ane (default: macq's ANE-shaped graph, fixed shapes, prefill+decode) "
                                        "| hf (transformers' model traced, flexible shapes)"),
    prefill_len: Optional[int] = typer.Option(None, help="Core ML ane: tokens per prefill call (default min(64, context))"),
    chunks: Optional[int] = typer.Option(None, help="Core ML ane: split the layers into N packages (+ embedding, head)"),
    max_chunk_mb: Optional[float] = typer.Option(None, help="Core ML ane: split the layers into packages of at most M MB"),
    requantize_lut: Optional[bool] = typer.Option(None, "--requantize-lut",
                                                  help="MLX: re-quantize LUT records (k-means/NF4) to affine, reported"),
    allow_fallback: Optional[bool] = typer.Option(None, "--allow-fallback",
                                                  help="Core ML: fall back where a record is not exactly expressible"),
    force: bool = typer.Option(False, help="replace an existing output that macq wrote"),
    trust_remote_code: bool = typer.Option(False),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream",
                                          help=STREAM_HELP + "; calibrated methods (and, with --stream, any method "
                                          "for Core ML) quantize into a temp dir first, then export its records"),
    as_json: bool = typer.Option(False, "--json"),
) -> None: ...


@app.command()
@_generated(_export_options)
def export(model: str | None, target: str, output: Path, method: str | None, calib_dataset: str | None,
           n_calib: int | None, seq_len: int | None, seed: int | None, dtype: str | None, context: int | None,
           stateful: bool | None, fixed_shapes: bool | None, graph: str | None, prefill_len: int | None,
           chunks: int | None, max_chunk_mb: float | None, requantize_lut: bool | None, allow_fallback: bool | None,
           force: bool, trust_remote_code: bool, stream: bool | None, as_json: bool, **mopts: Any) -> None:
    """Quantize (or read a macq quantization dir) and export for Core ML or MLX, never re-quantizing."""
    from macq.atomic import check_output
    from macq.evaluate import artifact_kind
    from macq.options import given_method_options
    from macq.preflight import check_target, model_config

    if target not in TARGETS:
        raise MacqError(f"--target {target!r}: expected coreml or mlx")
    tgt = {"dtype": dtype, "context": context, "stateful": stateful, "fixed_shapes": fixed_shapes,
           "requantize_lut": requantize_lut, "allow_fallback": allow_fallback, "graph": graph,
           "prefill_len": prefill_len, "chunks": chunks, "max_chunk_mb": max_chunk_mb}
    other = next(t for t in TARGETS if t != target)
    for k in TARGET_OPTIONS[other]:
        if tgt[k] is not None:
            raise MacqError(f"--{k.replace('_', '-')} does not apply to --target {target} (it is a {other} option)")
    tgt = {"dtype": dtype or "float16", "context": 512 if context is None else context,
           "stateful": True if stateful is None else stateful, "fixed_shapes": bool(fixed_shapes),
           "requantize_lut": bool(requantize_lut), "allow_fallback": bool(allow_fallback)}
    graph = graph or "ane"
    if graph not in ("ane", "hf"):
        raise MacqError(f"--graph {graph!r}: expected ane or hf")
    if graph == "hf" and (prefill_len, chunks, max_chunk_mb) != (None, None, None):
        raise MacqError("--prefill-len / --chunks / --max-chunk-mb: need --graph ane")
    if chunks is not None and chunks < 1:
        raise MacqError(f"--chunks {chunks}: expected a positive number of layer chunks")
    if max_chunk_mb is not None and max_chunk_mb <= 0:
        raise MacqError(f"--max-chunk-mb {max_chunk_mb}: expected a positive size")
    if prefill_len is not None and prefill_len < 1:
        raise MacqError(f"--prefill-len {prefill_len}: expected a positive number of tokens")
    if target == "coreml" and graph == "ane" and (fixed_shapes or stateful is False):
        raise MacqError("--fixed-shapes / --kv-io: need --graph hf (the ane graph is fixed-shape and stateful)")
    check_output(output, force)
    calib = {"calib_dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len, "seed": seed}
    kind = artifact_kind(model)
    if kind in ("mlx", "mlpackage"):
        raise MacqError(f"model: {model} is already an export ({kind}); export reads an HF model or a macq quantization dir")
    if kind == "macq":
        given = [k for k, v in {"method": method, **calib, **given_method_options(mopts)}.items() if v is not None]
        if given:
            raise MacqError(f"--{given[0].replace('_', '-')} does not apply: {model} is already quantized "
                            "(export writes its records as they are; quantize the float model instead)")
        config = model_config(model)
        method_name, cfg, calib_full, notes = "rtn", None, {k: CALIB_DEFAULTS[k] for k in calib}, []
    else:
        method_name, cfg, calib_full, config, notes = _plan(model, method, target, mopts, calib, trust_remote_code)
    if context is None:  # 512, or the model's own maximum if smaller
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
        tgt["context"] = min(512, max_pos)
    check_target(target, method_name, cfg, config, output=output, dtype=tgt["dtype"], context=tgt["context"],
                 requantize_lut=tgt["requantize_lut"], allow_fallback=tgt["allow_fallback"],
                 chunked=target == "coreml" and graph == "ane" and (chunks or max_chunk_mb) is not None)
    from macq.quantizers import method_spec
    from macq.streaming import use_streaming

    # a calibrated method that streams (or, asked with --stream, any method for Core ML) on a local checkpoint:
    # streamed quantization into a temporary dir, then the export of its records
    compose = kind != "macq" and (bool(method_spec(method_name).stream) or (target == "coreml" and bool(stream)))
    src = use_streaming(model, method_name, stream, cfg=cfg) if compose else None
    if src is not None:
        _export_via_stream(src, model, target, output, method_name, cfg, calib_full, tgt, graph, prefill_len,
                           chunks, max_chunk_mb, force, trust_remote_code, as_json, notes)
        return
    if kind != "macq":
        for k in ("max_memory", "act_dtype"):
            if mopts.get(k) is not None:
                raise MacqError(f"--{k.replace('_', '-')} applies to the streamed path (a local safetensors checkpoint, "
                                "a method that streams, without --no-stream)")
    _write_export(model, target, output, method_name, cfg, calib_full, tgt, graph, prefill_len, chunks, max_chunk_mb,
                  force, trust_remote_code, stream, as_json, notes)


def _write_export(model: str | None, target: str, output: Path, method_name: str, cfg: Any, calib_full: dict[str, Any],
                  tgt: dict[str, Any], graph: str, prefill_len: int | None, chunks: int | None, max_chunk_mb: float | None,
                  force: bool, trust_remote_code: bool, stream: bool | None, as_json: bool, notes: list[str],
                  extra: dict[str, Any] | None = None) -> None:
    """The export itself, once every option is checked: MLX streamed where it applies, else ``export_any``.
    ``extra``: fields merged into the result (a streamed quantization's summary)."""
    from macq.exporting import export_any

    if target == "coreml" and stream:
        raise MacqError("--stream: the Core ML export traces the whole model; streaming covers --target mlx")
    if target == "mlx" and stream is not False:
        from mlx_backend.stream import export_streamed

        streamed = export_streamed(model, output, method_name, cfg, stream, dtype=tgt["dtype"], force=force,
                                   requantize_lut=tgt["requantize_lut"], progress=not as_json,
                                   trust_remote_code=trust_remote_code)
        if streamed is not None:
            streamed[0]["notes"] = notes + list(streamed[0].get("notes") or [])
            _emit({**streamed[0], **(extra or {})}, as_json, "\n".join([streamed[1], *_notes(notes)]))
            return
    result, md = export_any(model, target, output, method_name, cfg, calib_dataset=calib_full["calib_dataset"],
                            n_calib=calib_full["n_calib"], seq_len=calib_full["seq_len"], seed=calib_full["seed"],
                            dtype=tgt["dtype"], context=tgt["context"], stateful=tgt["stateful"],
                            fixed_shapes=tgt["fixed_shapes"], requantize_lut=tgt["requantize_lut"],
                            allow_fallback=tgt["allow_fallback"], force=force, trust_remote_code=trust_remote_code,
                            progress=not as_json, graph=graph, prefill_len=prefill_len, chunks=chunks,
                            max_chunk_mb=max_chunk_mb)
    result["notes"] = notes + list(result.get("notes") or [])
    _emit({**result, **(extra or {})}, as_json, "\n".join([md, *_notes(notes)]))


def _export_via_stream(src: Path, model: str | None, target: str, output: Path, method_name: str, cfg: Any,
                       calib_full: dict[str, Any], tgt: dict[str, Any], graph: str, prefill_len: int | None,
                       chunks: int | None, max_chunk_mb: float | None, force: bool, trust_remote_code: bool,
                       as_json: bool, notes: list[str]) -> None:
    """``macq quantize --stream`` into a temporary quantization dir beside the output, then the export of that dir
    (records written as they are), then the dir removed: the two-step recipe as one command, so a calibrated
    export of an 8B checkpoint holds one decoder layer (quantization) and one chunk or tensor (export) at a time."""
    import shutil
    import tempfile

    from macq.pipeline import stream_calibrated
    from macq.quantizers import method_spec
    from macq.streaming import stream_quantize

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.quant-", dir=output.parent))
    try:
        if method_spec(method_name).stream:
            summary = stream_calibrated(src, tmp / "q", method_name, cfg, calib_full["calib_dataset"],
                                        calib_full["n_calib"], calib_full["seq_len"], calib_full["seed"],
                                        source=model or "default", progress=not as_json,
                                        trust_remote_code=trust_remote_code)
        else:
            summary = stream_quantize(src, tmp / "q", method_name, cfg, source=model or "default",
                                      progress=not as_json, trust_remote_code=trust_remote_code)
        notes = [*notes, f"quantized streamed ({method_name}), then exported from its records"]
        _write_export(str(tmp / "q"), target, output, "rtn", None, calib_full, tgt, graph, prefill_len, chunks,
                      max_chunk_mb, force, trust_remote_code, None, as_json, notes,
                      extra={"method": method_name, "quantization": summary})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@app.command()
def generate(path: str = typer.Argument(..., help="MLX export dir, Core ML ANE export (.mlpackage or chunk dir), or an HF/macq dir"),
             prompt: str = typer.Option("What is the capital of France?", "--prompt", "-p"),
             max_tokens: int = typer.Option(64), chat: bool = typer.Option(True, "--chat/--raw"),
             compute_units: str = typer.Option("ALL", help="Core ML export on macOS: ALL|CPU_AND_NE|CPU_ONLY|CPU_AND_GPU")) -> None:
    """Generate text from an export (MLX through mlx_lm; a Core ML ANE export through Core ML on macOS, MIL
    value inference elsewhere) or a model (torch), greedy."""
    from macq.exporting import generate_any

    if max_tokens < 1:
        raise MacqError(f"--max-tokens {max_tokens}: expected at least 1 new token")
    typer.echo(generate_any(path, prompt, max_tokens, chat, compute_units=compute_units))


@app.command()
def inspect(path: Path = typer.Argument(..., help="FILE.mlpackage or a chunked Core ML export dir"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Ops histogram, weight formats, size, bits/weight and ANE report of a Core ML package."""
    from macq.exporting import inspect_coreml

    data, md = inspect_coreml(path)
    _emit(data, as_json, md)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="method matrix: results dir (resumable); without it, the latency bench"),
    methods: str = typer.Option("fp16,rtn-int8,rtn-int4,nf4,fp4,kmeans4,gptq4,awq4,smoothquant-w8a8,mixed4",
                                help="matrix rows: catalogue names or LABEL=METHOD:k=v,... separated by ';'"),
    datasets: str = typer.Option("wiki,c4,tinystories", help="matrix: texts to score"),
    max_tokens: int = typer.Option(512, help="matrix: tokens scored per text"),
    context: int = typer.Option(256, help="matrix: window length"),
    calib_dataset: str = typer.Option("c4"),
    n_calib: int = typer.Option(16, help="matrix: calibration sequences (calibrated methods)"),
    seq_len: int = typer.Option(256, help="matrix: calibration sequence length"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
    force: bool = typer.Option(False, help="matrix: start over instead of resuming"),
    file_targets: str = typer.Option("mlx,coreml", help="matrix: export each row to these targets and report the "
                                     "file's bits/weight and size ('' for none)"),
    latency: bool = typer.Option(False, "--latency", help="latency bench (the default when no --output is given)"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32", help="float32|float16|bfloat16"),
    prompt_len: int = typer.Option(128),
    new_tokens: int = typer.Option(32),
    repeats: int = typer.Option(5),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as a macq.run JSON file (for macq report)"),
    label: str = typer.Option("", help="--out: row label in reports"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Method matrix with -o DIR (perplexity on several texts, KL/top-1, bits/weight, size, quantization time and
    peak memory; Markdown + PNGs; resumable), else per-token latency (prefill, decode) and peak memory."""
    if output is not None and not latency:
        from macq.studies import bench_matrix

        result, md = bench_matrix(model, methods, output, datasets=datasets, max_tokens=max_tokens, context=context,
                                  calib_dataset=calib_dataset, n_calib=n_calib, seq_len=seq_len, threads=threads,
                                  force=force, progress=not as_json, file_targets=file_targets)
        _emit(result, as_json, md)
        return
    from macq.evaluate import bench_latency

    result, md = bench_latency(model, device=device, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens,
                               repeats=repeats)
    if out is not None:
        from macq.results import save_run
        from macq.runs import run_from_bench

        save_run(run_from_bench(result, model, label), out)
    _emit(result, as_json, md)


@app.command()
def baseline(
    model: Optional[str] = typer.Argument(None, help="local HF directory (default: embedded SmolLM2-135M)"),
    runner: str = typer.Option(..., "--runner", help="bnb-nf4 | bnb-fp4 | bnb-int8 | gptq | awq | fp16"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Path = typer.Option(..., "--out", help="RUN.json (macq.run schema)"),
    dataset: str = typer.Option("wiki"),
    max_tokens: int = typer.Option(2048, help="evaluate the first N tokens of the eval split"),
    context: int = typer.Option(512),
    bits: int = typer.Option(4, help="gptq/awq"),
    group_size: int = typer.Option(128, help="gptq/awq"),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="gptq/awq (default: gptq sym, awq asym)"),
    calib_dataset: str = typer.Option("c4"),
    n_calib: int = typer.Option(16),
    seq_len: int = typer.Option(256),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    latency: bool = typer.Option(True, "--latency/--no-latency"),
    prompt_len: int = typer.Option(128),
    new_tokens: int = typer.Option(32),
    repeats: int = typer.Option(3),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads while timing"),
    compare: Optional[str] = typer.Option(None, help="gptq: a macq quantization dir of the same config, compared per layer"),
    label: str = typer.Option("", help="row label in reports"),
    force: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Quantize with a reference library (bitsandbytes, llm-compressor) and measure it with macq's evaluator."""
    from macq.baselines import BaselineConfig, run_baseline
    from macq.results import save_run

    if out.exists() and not force:
        raise MacqError(f"--out {out} exists (pass --force to overwrite)")
    cfg = BaselineConfig(runner=runner, device=device, dataset=dataset, max_tokens=max_tokens, context=context,
                         bits=bits, group_size=group_size, symmetric=symmetric, calib_dataset=calib_dataset,
                         n_calib=n_calib, seq_len=seq_len, seed=seed, latency=latency, prompt_len=prompt_len,
                         new_tokens=new_tokens, repeats=repeats, threads=threads, compare=compare)
    run = run_baseline(model, cfg, progress=not as_json)
    if label:
        run.label = label
    save_run(run, out)
    from macq.report import markdown_table, table_row

    _emit(run.to_dict(), as_json, markdown_table([table_row(run)]) + "".join(f"\nnote: {n}" for n in run.notes))


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="RUN.json files (macq.run schema) from any machines"),
    output: Path = typer.Option(..., "-o", "--output", help="report directory (written atomically)"),
    pending: Optional[list[str]] = typer.Option(None, "--pending", help="LABEL=REASON: an empty row saying why it was not run"),
    force: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Merge runs into a Markdown table and PNG plots; refuses runs of different models or texts."""
    from macq.report import build_report

    data, md = build_report([str(r) for r in runs], output, pending=pending, force=force)
    _emit(data, as_json, md)


@app.command()
def analyze(
    paths: Optional[list[str]] = typer.Argument(None, help="macq quantization directories (of one model)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="full study into this dir (JSON, Markdown, PNGs); without it, the "
                                               "distortion table of one quantization"),
    methods: Optional[str] = typer.Option(None, help="also quantize on the fly: catalogue names or LABEL=METHOD:k=v,..."),
    model: Optional[str] = typer.Option(None, help="the float model (default: the quantizations' source)"),
    dataset: str = typer.Option("wiki", help="study: text for the end-to-end metrics"),
    max_tokens: int = typer.Option(256, help="study: eval tokens"),
    context: int = typer.Option(128, help="study: eval window"),
    calib_dataset: str = typer.Option("c4"),
    n_calib: int = typer.Option(4, help="study: calibration sequences (layer output errors, calibrated methods)"),
    seq_len: int = typer.Option(128),
    func_layers: Optional[str] = typer.Option(None, help="study: decoder layers for one-linear-alone tests "
                                              "(default first,middle,last)"),
    sensitivity_label: Optional[str] = typer.Option(None, help="study: quantization used for layer sensitivity"),
    no_layer_sensitivity: bool = typer.Option(False, help="study: only the per-kind sensitivity"),
    layers: Optional[str] = typer.Option(None, help="study: only these decoder layers (comma-separated); others stay float"),
    fit_samples: int = typer.Option(1 << 18, help="study: weights per layer for the GGD fit (0 = all)"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
    force: bool = typer.Option(False),
    reference: Optional[str] = typer.Option(None, help="table: unquantized model (default: the quantization's source)"),
    plot: Optional[Path] = typer.Option(None, help="table: write a PNG of per-layer distortion vs the rate–distortion bound"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Weight statistics, bounds, NF4/FP4/k-means/affine contest, weight-vs-output error and layer sensitivity
    (-o DIR); or the per-layer distortion table (MSE, SQNR, Gaussian-bound gap) of one quantization."""
    paths = list(paths or [])
    if output is not None:
        from macq.studies import analyze_study

        data, md = analyze_study(paths, methods, model, output, dataset=dataset, max_tokens=max_tokens, context=context,
                                 calib_dataset=calib_dataset, n_calib=n_calib, seq_len=seq_len, func_layers=func_layers,
                                 sensitivity_label=sensitivity_label, fit_samples=fit_samples,
                                 no_layer_sensitivity=no_layer_sensitivity, layers=layers, threads=threads, force=force,
                                 progress=not as_json)
        _emit(data, as_json, md)
        return
    if len(paths) != 1 or methods:
        raise MacqError("analyze: without --output give exactly one macq directory (the distortion table)")
    from macq.evaluate import analyze_distortion

    data, md = analyze_distortion(paths[0], reference=reference, plot=plot)
    _emit(data, as_json, md)


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings drown the one line a user needs."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torch version.*has not been tested.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


class Interrupted(BaseException):
    """SIGINT / SIGTERM as an exception: it unwinds through every ``atomic_dir`` (removing its temp dir) and,
    being a BaseException, through library code that catches Exception. Click turns KeyboardInterrupt
    into a silent exit code, so macq raises its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _click_errors() -> tuple[type, ...]:
    """Usage-error types of the click that typer uses (typer >= 0.29 vendors its own ``typer._click``)."""
    out: list[type] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            out.append(__import__(mod, fromlist=["ClickException"]).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rv = app(args=argv, standalone_mode=False)
    except MacqError as e:
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(2)
    except Interrupted as e:
        typer.echo(f"error: interrupted by {signal.Signals(e.signum).name}; no output was written", err=True)
        sys.exit(128 + e.signum)
    except (typer.Exit, SystemExit) as e:  # --help, typer's own exits
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except _click_errors() as e:  # unknown options, bad values, missing arguments: one line, exit 2
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)  # type: ignore[attr-defined]
        sys.exit(2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if isinstance(rv, int) and rv:  # typer's non-standalone exit codes (e.g. 130 after KeyboardInterrupt)
        sys.exit(rv)


if __name__ == "__main__":
    main()
