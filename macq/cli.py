"""``macq`` command line: quantize | export --target coreml|mlx | eval | bench | analyze | info | inspect | generate.

Every user error ends as one line on stderr (``error: ...``) with exit code 2, and no half-written output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from macq.errors import MacqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Hugging Face causal LMs and deploy them to Apple silicon (Core ML, MLX).")

MODEL_HELP = "HF hub id, local HF directory, .gguf file, or a macq quantization dir (default: embedded SmolLM2-135M)"


def _emit(result: Any, as_json: bool, markdown: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(_plain(result), indent=1))
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


def _quant_options(**kw: Any) -> dict[str, Any]:
    opts = dict(kw)
    if opts.get("skip"):
        opts["skip"] = tuple(s for s in opts["skip"].split(",") if s)
    else:
        opts.pop("skip", None)
    for flag in ("include_embeddings", "include_lm_head"):
        if not opts.get(flag):
            opts.pop(flag, None)
    return opts


# Options shared by quantize and export (typer needs them spelled out per command).
def _method_opt():
    return typer.Option("rtn", "--method", "-m", help="rtn|nf4|fp4|kmeans|uniform|gptq|awq|awq-gptq|smoothquant|mixed|dkm")


@app.command("prepare-model")
def prepare_model(force: bool = typer.Option(False, help="convert again even if cached")) -> None:
    """Convert the embedded default model (SmolLM2-135M GGUF) into an HF checkpoint in the cache."""
    from macq.models import prepare_default_model

    typer.echo(str(prepare_default_model(force=force)))


@app.command()
def quantize(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output directory (written atomically)"),
    method: str = _method_opt(),
    bits: Optional[int] = typer.Option(None, help="bits per weight code (method default if unset)"),
    group_size: Optional[int] = typer.Option(None, help="affine: input elements per group (0 per-channel, -1 per-tensor); "
                                             "palettization: output channels per LUT"),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric"),
    zero_point: Optional[str] = typer.Option(None, help="asymmetric affine: int | float (MLX's bias form)"),
    granularity: Optional[str] = typer.Option(None, help="palettization: per_tensor | per_grouped_channel"),
    block_size: Optional[int] = typer.Option(None, help="NF4/FP4 absmax block size"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant"),
    mse_clip: Optional[bool] = typer.Option(None, "--mse-clip/--no-mse-clip"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order"),
    damp_percent: Optional[float] = typer.Option(None),
    alpha: Optional[float] = typer.Option(None, help="SmoothQuant migration strength"),
    target_bpw: Optional[float] = typer.Option(None, help="mixed: bits-per-weight budget, metadata included"),
    target: Optional[str] = typer.Option(None, help="mixed: runtime whose formats to choose from (mlx|coreml|any)"),
    recipe: Optional[str] = typer.Option(None, help="mixed: a fixed recipe instead of the allocator"),
    include_embeddings: bool = typer.Option(False, help="also quantize the token embedding"),
    include_lm_head: bool = typer.Option(False, help="also quantize the lm_head (tied: the embedding)"),
    skip: Optional[str] = typer.Option(None, help="comma-separated substrings of module names to keep float"),
    calib_dataset: str = typer.Option("c4", help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME"),
    n_calib: int = typer.Option(128, help="calibration sequences"),
    seq_len: int = typer.Option(512, help="calibration sequence length"),
    seed: int = typer.Option(0),
    force: bool = typer.Option(False, help="overwrite the output directory"),
    trust_remote_code: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Quantize a model and save macq's quantization directory (records + float tensors + config)."""
    from macq.pipeline import config_for, load_quantized_or_model
    from macq.pipeline import quantize as run_quantize

    if output.exists() and not force:
        raise MacqError(f"--output {output} exists (pass --force to overwrite)")
    opts = _quant_options(bits=bits, group_size=group_size, symmetric=symmetric, zero_point=zero_point,
                          granularity=granularity, block_size=block_size, double_quant=double_quant,
                          mse_clip=mse_clip, act_order=act_order, damp_percent=damp_percent, alpha=alpha,
                          target_bpw=target_bpw, target=target, recipe=recipe, include_embeddings=include_embeddings,
                          include_lm_head=include_lm_head, skip=skip)
    cfg = config_for(method, opts)  # validate before loading anything
    qm0, fp, tok = load_quantized_or_model(model, trust_remote_code)
    if qm0 is not None:
        raise MacqError(f"model: {model} is already a macq quantization directory")
    qm = run_quantize(fp, tok, method, cfg, calib_dataset, n_calib, seq_len, seed, progress=not as_json,
                      source=model or "default", copy_model=False)
    path = qm.save(output, tokenizer=tok, force=force)
    summary = {"output": str(path), "method": qm.method, "layers": len(qm.records),
               "bits_per_weight": round(qm.bits_per_weight(), 4), "bytes": qm.nbytes()}
    _emit(summary, as_json, f"wrote {path}: {len(qm.records)} layers, {summary['bits_per_weight']:.3f} bits/weight, "
                            f"{summary['bytes'] / 2**20:.1f} MiB")


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
    context: int = typer.Option(512, help="window length"),
    stride: Optional[int] = typer.Option(None, help="window stride (default: context)"),
    max_tokens: Optional[int] = typer.Option(4096, help="evaluate the first N tokens of the eval split"),
    reference: Optional[str] = typer.Option(None, help="unquantized model for KL/top-1 (default: the quantization's source)"),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps"),
    latency: bool = typer.Option(False, help="also measure prefill/decode latency"),
    compute_units: str = typer.Option("ALL", help=".mlpackage on macOS: ALL|CPU_AND_NE|CPU_ONLY|CPU_AND_GPU"),
    tokenizer: Optional[str] = typer.Option(None, help=".mlpackage: tokenizer dir (default: the recorded source)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Perplexity, KL / top-1 vs the unquantized model, size, and optionally latency.

    A .mlpackage runs through Core ML on macOS; on Linux its saved program is executed by MIL value
    inference (a graph check, labelled so, not a speed figure)."""
    from macq.evaluate import evaluate_any

    result, md = evaluate_any(model, dataset=dataset, context=context, stride=stride, max_tokens=max_tokens,
                              reference=reference, device=device, latency=latency, compute_units=compute_units,
                              progress=not as_json, tokenizer=tokenizer)
    _emit(result, as_json, md)


@app.command()
def export(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help="coreml | mlx"),
    output: Path = typer.Option(..., "-o", "--output", help="MLX directory or FILE.mlpackage"),
    method: str = _method_opt(),
    bits: Optional[int] = typer.Option(None),
    group_size: Optional[int] = typer.Option(None),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric"),
    zero_point: Optional[str] = typer.Option(None),
    granularity: Optional[str] = typer.Option(None),
    block_size: Optional[int] = typer.Option(None),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant"),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order"),
    target_bpw: Optional[float] = typer.Option(None),
    recipe: Optional[str] = typer.Option(None),
    steps: Optional[int] = typer.Option(None, help="dkm: fine-tuning steps"),
    lr: Optional[float] = typer.Option(None, help="dkm: learning rate"),
    include_embeddings: bool = typer.Option(False),
    include_lm_head: bool = typer.Option(False),
    calib_dataset: str = typer.Option("c4"),
    n_calib: int = typer.Option(128),
    seq_len: int = typer.Option(512),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("float16", help="MLX: float dtype of scales/biases and float layers"),
    context: int = typer.Option(512, help="Core ML: maximum context (KV cache length)"),
    stateful: bool = typer.Option(True, "--stateful/--kv-io", help="Core ML: KV cache as state, or as inputs/outputs"),
    fixed_shapes: bool = typer.Option(False, help="Core ML --graph hf: fixed shapes (one token per call)"),
    graph: str = typer.Option("ane", help="Core ML: ane (macq's ANE-shaped graph, fixed shapes, prefill+decode) | "
                               "hf (transformers' model traced, flexible shapes)"),
    prefill_len: Optional[int] = typer.Option(None, help="Core ML ane: tokens per prefill call (default min(64, context))"),
    chunks: Optional[int] = typer.Option(None, help="Core ML ane: split the layers into N packages (+ embedding, head)"),
    max_chunk_mb: Optional[float] = typer.Option(None, help="Core ML ane: split the layers into packages of at most M MB"),
    requantize_lut: bool = typer.Option(False, help="MLX: re-quantize LUT records (k-means/NF4) to affine, reported"),
    allow_fallback: bool = typer.Option(False, help="Core ML: fall back where a record is not exactly expressible"),
    force: bool = typer.Option(False),
    trust_remote_code: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Quantize (or read a macq quantization dir) and export for Core ML or MLX, never re-quantizing."""
    from macq.exporting import export_any

    if target not in ("coreml", "mlx"):
        raise MacqError(f"--target {target!r}: expected coreml or mlx")
    if graph not in ("ane", "hf"):
        raise MacqError(f"--graph {graph!r}: expected ane or hf")
    if target == "coreml" and graph == "hf" and (prefill_len, chunks, max_chunk_mb) != (None, None, None):
        raise MacqError("--prefill-len / --chunks / --max-chunk-mb: need --graph ane")
    if chunks is not None and chunks < 1:
        raise MacqError(f"--chunks {chunks}: expected a positive number of layer chunks")
    if max_chunk_mb is not None and max_chunk_mb <= 0:
        raise MacqError(f"--max-chunk-mb {max_chunk_mb}: expected a positive size")
    if prefill_len is not None and prefill_len < 1:
        raise MacqError(f"--prefill-len {prefill_len}: expected a positive number of tokens")
    if target == "coreml" and graph == "ane" and (fixed_shapes or not stateful):
        raise MacqError("--fixed-shapes / --kv-io: need --graph hf (the ane graph is fixed-shape and stateful)")
    if output.exists() and not force:
        raise MacqError(f"--output {output} exists (pass --force to overwrite)")
    opts = _quant_options(bits=bits, group_size=group_size, symmetric=symmetric, zero_point=zero_point,
                          granularity=granularity, block_size=block_size, double_quant=double_quant,
                          act_order=act_order, target_bpw=target_bpw, recipe=recipe, steps=steps, lr=lr,
                          include_embeddings=include_embeddings, include_lm_head=include_lm_head)
    if method == "mixed":
        opts.setdefault("target", target)
    from macq.evaluate import artifact_kind
    from macq.pipeline import config_for

    if model is None or artifact_kind(model) != "macq":
        opts = config_for(method, opts)  # validate before loading anything
    result, md = export_any(model, target, output, method, opts, calib_dataset=calib_dataset, n_calib=n_calib,
                            seq_len=seq_len, seed=seed, dtype=dtype, context=context, stateful=stateful,
                            fixed_shapes=fixed_shapes, requantize_lut=requantize_lut, allow_fallback=allow_fallback,
                            force=force, trust_remote_code=trust_remote_code, progress=not as_json, graph=graph,
                            prefill_len=prefill_len, chunks=chunks, max_chunk_mb=max_chunk_mb)
    _emit(result, as_json, md)


@app.command()
def generate(path: str = typer.Argument(..., help="MLX export dir, Core ML ANE export (.mlpackage or chunk dir), or an HF/macq dir"),
             prompt: str = typer.Option("What is the capital of France?", "--prompt", "-p"),
             max_tokens: int = typer.Option(64), chat: bool = typer.Option(True, "--chat/--raw"),
             compute_units: str = typer.Option("ALL", help="Core ML export on macOS: ALL|CPU_AND_NE|CPU_ONLY|CPU_AND_GPU")) -> None:
    """Generate text from an export (MLX through mlx_lm; a Core ML ANE export through Core ML on macOS, MIL
    value inference elsewhere) or a model (torch), greedy."""
    from macq.exporting import generate_any

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
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("float32", help="float32|float16|bfloat16"),
    prompt_len: int = typer.Option(128),
    new_tokens: int = typer.Option(32),
    repeats: int = typer.Option(5),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-token latency (prefill and decode, median of repeats after warm-up) and peak memory."""
    from macq.evaluate import bench_latency

    result, md = bench_latency(model, device=device, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens,
                               repeats=repeats)
    _emit(result, as_json, md)


@app.command()
def analyze(
    path: str = typer.Argument(..., help="macq quantization directory"),
    reference: Optional[str] = typer.Option(None, help="unquantized model (default: the quantization's source)"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of per-layer distortion vs the rate–distortion bound"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-layer weight distortion (MSE, SQNR, gap to the Gaussian rate–distortion bound at the effective rate)."""
    from macq.evaluate import analyze_distortion

    data, md = analyze_distortion(path, reference=reference, plot=plot)
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


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except MacqError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:  # --help, typer's own exits
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(e, click.ClickException):
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
