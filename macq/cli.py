"""``macq`` command line: quantize | export --target coreml|mlx | eval | bench | analyze | info | inspect | generate |
baseline | report.

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
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as a macq.run JSON file (for macq report)"),
    label: str = typer.Option("", help="--out: row label in reports"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Perplexity, KL / top-1 vs the unquantized model, size, and optionally latency.

    A .mlpackage runs through Core ML on macOS; on Linux its saved program is executed by MIL value
    inference (a graph check, labelled so, not a speed figure)."""
    from macq.evaluate import evaluate_any

    result, md = evaluate_any(model, dataset=dataset, context=context, stride=stride, max_tokens=max_tokens,
                              reference=reference, device=device, latency=latency, compute_units=compute_units,
                              progress=not as_json, tokenizer=tokenizer)
    if out is not None:
        from macq.results import save_run
        from macq.runs import run_from_eval

        save_run(run_from_eval(result, model, dataset, context, stride, max_tokens, tokenizer, label), out)
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
    fixed_shapes: bool = typer.Option(False, help="Core ML: fixed shapes (the ANE prefers them)"),
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
                            force=force, trust_remote_code=trust_remote_code, progress=not as_json)
    _emit(result, as_json, md)


@app.command()
def generate(path: str = typer.Argument(..., help="MLX export dir (runs through mlx_lm) or an HF/macq dir (torch)"),
             prompt: str = typer.Option("What is the capital of France?", "--prompt", "-p"),
             max_tokens: int = typer.Option(64), chat: bool = typer.Option(True, "--chat/--raw")) -> None:
    """Generate text from an export (MLX through mlx_lm) or a model (torch), greedy."""
    from macq.exporting import generate_any

    typer.echo(generate_any(path, prompt, max_tokens, chat))


@app.command()
def inspect(path: Path = typer.Argument(..., help="FILE.mlpackage"), as_json: bool = typer.Option(False, "--json")) -> None:
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
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as a macq.run JSON file (for macq report)"),
    label: str = typer.Option("", help="--out: row label in reports"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-token latency (prefill and decode, median of repeats after warm-up) and peak memory."""
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
