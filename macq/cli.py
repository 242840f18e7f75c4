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
                  help="Quantize Hugging Face causal LMs and deploy them to Apple silicon (Core ML, MLX).\n\n"
                  "Start with: macq export --target mlx -o smol-mlx (the embedded SmolLM2-135M, RTN 4-bit). "
                  "Every error is one line; add --debug (or MACQ_DEBUG=1) for the traceback.")

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


def _method_help() -> str:
    """Every registered method with its one line (the registry is the list; nothing here can go stale)."""
    from macq.quantizers import METHODS

    return "; ".join(f"{n}: {s.summary}" for n, s in METHODS.items()) + " (default rtn; see macq methods)"


def _targets_help() -> str:
    from macq.targets import RUNTIMES

    return " | ".join(RUNTIMES) + " (see macq targets)"


def _generated(fixed: Callable[..., None], targets: bool = False):
    """A typer command whose signature is ``fixed``'s parameters followed by every method option generated
    from the config dataclasses (:mod:`macq.options`): ``quantize`` and ``export`` get the same flags.
    ``targets``: also every target option of the target table (:data:`macq.targets.OPTIONS`)."""
    from macq.options import target_parameters, typer_parameters

    def deco(impl: Callable[..., None]) -> Callable[..., None]:
        hints = get_type_hints(fixed)
        params = [p.replace(annotation=hints[p.name], kind=pyinspect.Parameter.KEYWORD_ONLY)
                  for p in pyinspect.signature(fixed).parameters.values()]
        params += typer_parameters() + (target_parameters() if targets else [])

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


def _run(req: Any, dry_run: bool, as_json: bool) -> None:
    """Plan once (every check, before any weight is read), print the plan, follow it, print the result."""
    from macq.plan import make_plan, markdown, run_plan

    plan = make_plan(req)
    if dry_run:
        _emit({"plan": plan.to_dict(), "notes": plan.notes}, as_json,
              "\n".join([plan.describe(), *_notes(plan.notes), "(dry run: nothing written)"]))
        return
    if not as_json:
        typer.echo(plan.describe())
    result = run_plan(plan, progress=not as_json)
    _emit(result, as_json, markdown(plan, result))


@app.command("prepare-model", epilog="Example: macq prepare-model")
def prepare_model(force: bool = typer.Option(False, "--force", help="convert again (replaces only what macq wrote)")) -> None:
    """Convert the embedded default model (SmolLM2-135M GGUF) into an HF checkpoint in the cache."""
    from macq.models import prepare_default_model

    typer.echo(str(prepare_default_model(force=force)))


def _guard_file(out: Path | None, force: bool, inputs: list[Any], flag: str = "--out") -> None:
    """The output guard for a single-file output (run JSON, PNG), before any work."""
    if out is not None:
        from macq.atomic import guard_output

        guard_output(out, force, inputs=inputs, flag=flag, kind="file")


P_MODEL, P_METHOD, P_CALIB, P_TARGET, P_OUT, P_PERF = ("Model and text", "Method", "Calibration", "Target", "Output",
                                                    "Performance")


def _quantize_options(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="output directory (written atomically)", rich_help_panel=P_OUT),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=_method_help(), rich_help_panel=P_METHOD),
    target: Optional[str] = typer.Option(None, help=f"runtime the quantization is for ({_targets_help()}): its preferred "
                                         "defaults and limits apply; mixed: whose formats to choose from (or any)",
                                         rich_help_panel=P_TARGET),
    calib_dataset: Optional[str] = typer.Option(None, help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME (default c4)",
                                                rich_help_panel=P_CALIB),
    n_calib: Optional[int] = typer.Option(None, help="calibration sequences (default 128)", rich_help_panel=P_CALIB),
    seq_len: Optional[int] = typer.Option(None, help="calibration sequence length (default 512)", rich_help_panel=P_CALIB),
    seed: Optional[int] = typer.Option(None, help="calibration sampling (and k-means) seed (default 0)",
                                       rich_help_panel=P_CALIB),
    force: bool = typer.Option(False, "--force", help="replace an existing output that macq wrote", rich_help_panel=P_OUT),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the model repository's own code",
                                           rich_help_panel=P_MODEL),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP, rich_help_panel=P_PERF),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (route, method config, notes) and stop",
                                 rich_help_panel=P_OUT),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON", rich_help_panel=P_OUT),
) -> None: ...


@app.command(epilog="Example: macq quantize --method gptq --bits 4 --target mlx -o smol-gptq4")
@_generated(_quantize_options)
def quantize(model: str | None, output: Path, method: str | None, target: str | None, calib_dataset: str | None,
             n_calib: int | None, seq_len: int | None, seed: int | None, force: bool, trust_remote_code: bool,
             stream: bool | None, dry_run: bool, as_json: bool, **mopts: Any) -> None:
    """Quantize a model and save macq's quantization directory (records + float tensors + config)."""
    from macq.options import given_method_options
    from macq.plan import Request

    req = Request(model=model, output=output, target="macq", runtime=target, method=method,
                  options=given_method_options(mopts), stream=stream, force=force, trust_remote_code=trust_remote_code,
                  calibration={"calib_dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len, "seed": seed})
    _run(req, dry_run, as_json)


@app.command(epilog="Example: macq methods --json")
def methods(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every quantization method: what it does, the records it writes, the targets that hold them, its cost."""
    from macq.quantizers import METHODS
    from macq.targets import RUNTIMES, TARGETS

    def holds(spec: Any, t: str) -> bool:
        h = TARGETS[t].holds
        return not (spec.activations and not h.activations) and (spec.records != "lut" or bool(h.lut_bits))

    rows = [{"method": n, "records": s.records, "calibrated": s.needs_calibration, "streams": s.streams,
             "targets": [t for t in RUNTIMES if holds(s, t)], "summary": s.summary, "cost": s.cost}
            for n, s in METHODS.items()]
    md = ["| method | records | data | targets | what it does | cost |", "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['records']} | {'calibration' if r['calibrated'] else 'none'} | "
           f"{', '.join(r['targets'])} | {r['summary']} | {r['cost']} |" for r in rows]
    _emit({"methods": rows}, as_json, "\n".join(md))


@app.command(epilog="Example: macq targets")
def targets(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every export target: what it writes, the records it holds exactly, its options."""
    from macq.targets import OPTIONS, TARGETS

    rows = [{"target": t.name, "summary": t.summary, "holds": t.holds.describe(),
             "options": {o: OPTIONS[o].help for o in t.options}, "defaults": t.defaults} for t in TARGETS.values()]
    md = ["| target | writes | holds | options |", "|---|---|---|---|"]
    md += [f"| {r['target']} | {r['summary']} | {r['holds']} | "
           f"{', '.join('--' + o.replace('_', '-') for o in r['options'])} |" for r in rows]
    _emit({"targets": rows}, as_json, "\n".join(md))


@app.command(epilog="Example: macq info smol-gptq4")
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


@app.command("eval", epilog="Example: macq eval smol-mlx --dataset c4 --out runs/mlx-c4.json")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + ", an MLX export dir, or a .mlpackage"),
    dataset: str = typer.Option("wiki", help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME"),
    context: Optional[int] = typer.Option(None, help="window length (default 512; a Core ML ANE export: its fixed context)"),
    stride: Optional[int] = typer.Option(None, help="window stride (default: context)"),
    max_tokens: Optional[int] = typer.Option(4096, help="evaluate the first N tokens of the eval split"),
    reference: Optional[str] = typer.Option(None, help="unquantized model for KL/top-1 (default: the quantization's source)"),
    device: str = typer.Option("auto", help="auto|cpu|cuda|mps"),
    latency: bool = typer.Option(False, "--latency", help="also measure prefill/decode latency"),
    compute_units: str = typer.Option("ALL", help=".mlpackage on macOS: ALL|CPU_AND_NE|CPU_ONLY|CPU_AND_GPU"),
    tokenizer: Optional[str] = typer.Option(None, help=".mlpackage: tokenizer dir (default: the recorded source)"),
    decode_tokens: Optional[int] = typer.Option(None, help="Core ML ANE export: last N tokens of each window through the "
                                                "decode function (default: half the window; 0: all through prefill)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the result as a macq.run JSON file (for macq report)"),
    label: str = typer.Option("", help="--out: row label in reports"),
    force: bool = typer.Option(False, "--force", help="--out: replace a run file macq wrote"),
    kv_bits: Optional[list[int]] = typer.Option(None, "--kv-bits", help="rows with a quantized KV cache at these bits "
                                                "(repeatable) next to the float-KV row: ppl, KL (default --context "
                                                "2048); an MLX export runs mlx_lm's cache, a checkpoint or macq "
                                                "quantization MLX's KV grid simulated in torch"),
    kv_group_size: int = typer.Option(64, help="--kv-bits: KV quantization group along the head dim"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Perplexity, KL / top-1 vs the unquantized model, size, and optionally latency.

    A .mlpackage runs through Core ML on macOS; on Linux its saved program is executed by MIL value
    inference (a graph check, labelled so, not a speed figure)."""
    from macq.evaluate import artifact_kind, evaluate_any

    if context is not None and context < 2:
        raise MacqError(f"--context {context}: expected at least 2 tokens per window")
    if stride is not None and not 1 <= stride <= (context or 512):
        raise MacqError(f"--stride {stride}: expected 1 <= stride <= --context ({context or 512})")
    if decode_tokens is not None and decode_tokens < 0:
        raise MacqError(f"--decode-tokens {decode_tokens}: expected >= 0")
    if max_tokens is not None and max_tokens < 2:
        raise MacqError(f"--max-tokens {max_tokens}: expected at least 2 tokens")
    _guard_file(out, force, [model, reference, tokenizer])
    if artifact_kind(model) in ("model", "macq"):   # the tokenizer loads and fits the embedding, before any work
        from macq.integrity import check_tokenizer
        from macq.models import resolve_model_path
        from macq.preflight import model_config

        check_tokenizer(resolve_model_path(model), model_config(model))
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


def _export_options(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help=_targets_help(), rich_help_panel=P_TARGET),
    output: Path = typer.Option(..., "-o", "--output", help="MLX directory, FILE.mlpackage, or a chunked export's "
                                "directory (written atomically)", rich_help_panel=P_OUT),
    method: Optional[str] = typer.Option(None, "--method", "-m", help=_method_help(), rich_help_panel=P_METHOD),
    calib_dataset: Optional[str] = typer.Option(None, help="wiki|c4|tinystories, a .txt/.jsonl file, or hf:NAME (default c4)",
                                                rich_help_panel=P_CALIB),
    n_calib: Optional[int] = typer.Option(None, help="calibration sequences (default 128)", rich_help_panel=P_CALIB),
    seq_len: Optional[int] = typer.Option(None, help="calibration sequence length (default 512)", rich_help_panel=P_CALIB),
    seed: Optional[int] = typer.Option(None, help="calibration sampling (and k-means) seed (default 0)",
                                       rich_help_panel=P_CALIB),
    force: bool = typer.Option(False, "--force", help="replace an existing output that macq wrote", rich_help_panel=P_OUT),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="run the model repository's own code",
                                           rich_help_panel=P_MODEL),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help=STREAM_HELP, rich_help_panel=P_PERF),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (route, method config, notes) and stop",
                                 rich_help_panel=P_OUT),
    as_json: bool = typer.Option(False, "--json", rich_help_panel=P_OUT),
) -> None: ...


@app.command(epilog="Example: macq export --target coreml --method kmeans-cal --bits 4 -o smol.mlpackage")
@_generated(_export_options, targets=True)
def export(model: str | None, target: str, output: Path, method: str | None, calib_dataset: str | None,
           n_calib: int | None, seq_len: int | None, seed: int | None, force: bool, trust_remote_code: bool,
           stream: bool | None, dry_run: bool, as_json: bool, **opts: Any) -> None:
    """Quantize (or read a macq quantization dir) and export for a target, never re-quantizing."""
    from macq.options import given_method_options
    from macq.plan import Request
    from macq.targets import OPTIONS, target_spec

    req = Request(model=model, output=output, target=target, method=method,
                  options=given_method_options({k: v for k, v in opts.items() if k not in OPTIONS}),
                  target_options={k: v for k, v in opts.items() if k in OPTIONS and v is not None},
                  stream=stream, force=force, trust_remote_code=trust_remote_code,
                  calibration={"calib_dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len, "seed": seed})
    target_spec(target, runtimes_only=True)   # a quantization directory is macq quantize's output
    _run(req, dry_run, as_json)


@app.command(epilog="Example: macq generate smol-mlx -p 'What is the capital of France?'")
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


@app.command(epilog="Example: macq inspect smol.mlpackage")
def inspect(path: Path = typer.Argument(..., help="FILE.mlpackage or a chunked Core ML export dir"),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Ops histogram, weight formats, size, bits/weight and ANE report of a Core ML package."""
    from macq.exporting import inspect_coreml

    data, md = inspect_coreml(path)
    _emit(data, as_json, md)


@app.command(epilog="Example: macq bench -o bench-out --methods 'rtn-int4,gptq4'")
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
    force: bool = typer.Option(False, "--force", help="matrix: start over instead of resuming"),
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
    _guard_file(out, force, [model])
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


@app.command(epilog="Example: macq baseline --runner bnb-nf4 --out runs/bnb-nf4.json")
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
    force: bool = typer.Option(False, "--force", help="replace an output that macq wrote"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Quantize with a reference library (bitsandbytes, llm-compressor) and measure it with macq's evaluator."""
    from macq.baselines import BaselineConfig, run_baseline
    from macq.results import save_run

    _guard_file(out, force, [model, compare])
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


@app.command(epilog="Example: macq report runs/*.json -o report")
def report(
    runs: list[Path] = typer.Argument(..., help="RUN.json files (macq.run schema) from any machines"),
    output: Path = typer.Option(..., "-o", "--output", help="report directory (written atomically)"),
    pending: Optional[list[str]] = typer.Option(None, "--pending", help="LABEL=REASON: an empty row saying why it was not run"),
    force: bool = typer.Option(False, "--force", help="replace an output that macq wrote"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Merge runs into a Markdown table and PNG plots; refuses runs of different models or texts."""
    from macq.report import build_report

    data, md = build_report([str(r) for r in runs], output, pending=pending, force=force)
    _emit(data, as_json, md)


@app.command(epilog="Example: macq analyze smol-gptq4 --plot distortion.png")
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
    layer_sensitivity: bool = typer.Option(True, "--layer-sensitivity/--kind-sensitivity-only",
                                           help="study: per-layer sensitivity too, or only the per-kind one"),
    layers: Optional[str] = typer.Option(None, help="study: only these decoder layers (comma-separated); others stay float"),
    fit_samples: int = typer.Option(1 << 18, help="study: weights per layer for the GGD fit (0 = all)"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
    force: bool = typer.Option(False, "--force", help="replace an output that macq wrote"),
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
                                 no_layer_sensitivity=not layer_sensitivity, layers=layers, threads=threads, force=force,
                                 progress=not as_json)
        _emit(data, as_json, md)
        return
    if len(paths) != 1 or methods:
        raise MacqError("analyze: without --output give exactly one macq directory (the distortion table)")
    from macq.evaluate import analyze_distortion

    data, md = analyze_distortion(paths[0], reference=reference, plot=plot, force=force)
    _emit(data, as_json, md)


def _quiet_libraries() -> None:
    """Library progress bars and advisory warnings drown the one line a user needs."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torch version.*has not been tested.*")
    warnings.filterwarnings("ignore", message=".*coreai-torch has only been validated.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # torchao (pulled in by coreai-opt, imported by coremltools) logs kernels it cannot load on this CPU and
    # torch's pytree deprecations: advisory lines that would break "stderr is one error line or nothing"
    for name in ("torchao", "torch.utils._pytree", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
    # Once: later presses are ignored while the unwinding removes temp dirs, so cleanup is never cut short and
    # no second traceback appears however often ctrl-C is pressed.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _interruptible_commands() -> None:
    """A KeyboardInterrupt raised inside a command (a library that installs its own SIGINT handler) becomes
    :class:`Interrupted` before click sees it: click would print a blank line and abort."""
    import functools

    for c in app.registered_commands:
        fn = c.callback
        if fn is None or getattr(fn, "_macq_interruptible", False):
            continue

        @functools.wraps(fn)
        def wrapped(*a: Any, _fn: Callable[..., Any] = fn, **k: Any) -> Any:
            try:
                return _fn(*a, **k)
            except KeyboardInterrupt:
                raise Interrupted(signal.SIGINT) from None

        wrapped._macq_interruptible = True  # type: ignore[attr-defined]
        c.callback = wrapped


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


def _os_message(e: OSError) -> str:
    """Disk full, permission, link loops, missing paths: what happened to which path, in one line."""
    import errno

    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.ELOOP: "too many levels of symbolic links", errno.ENOENT: "no such file or directory",
            errno.EROFS: "read-only file system", errno.ENAMETOOLONG: "file name too long"}.get(e.errno or -1)
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
    return f"{where + ': ' if where else ''}{what or e.strerror or type(e).__name__}"


def _unexpected(e: BaseException) -> str:
    """Anything else (a corrupt file a library choked on, an out-of-range value deep inside): one line."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + first if first else ''} (run with --debug or MACQ_DEBUG=1 for the traceback)"


def main(argv: list[str] | None = None) -> None:
    """The console entry point: the one error boundary. Every failure ends as one ``error:`` line on stderr with
    exit code 2 (an interrupt: 130 / 143); ``--debug`` (anywhere on the line) or ``MACQ_DEBUG=1`` re-raises
    instead, for the traceback."""
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("MACQ_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    _quiet_libraries()
    _interruptible_commands()
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        rv = app(args=args, standalone_mode=False)
        if isinstance(rv, int) and rv:  # typer's non-standalone exit codes (e.g. 130 after KeyboardInterrupt)
            code = rv
    except Interrupted as e:
        typer.echo(f"error: interrupted by {signal.Signals(e.signum).name}; no output was written", err=True)
        code = 128 + e.signum
    except (typer.Exit, SystemExit) as e:  # --help, typer's own exits
        c = getattr(e, "exit_code", getattr(e, "code", 0))
        code = c if isinstance(c, int) else 0
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        code = 130
    except MacqError as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(str(e))}", err=True)
        code = 2
    except _click_errors() as e:  # unknown options, bad values, missing arguments: one line, exit 2
        typer.echo(f"error: {_one_line(e.format_message())}", err=True)  # type: ignore[attr-defined]
        code = 2
    except OSError as e:
        if debug:
            raise
        typer.echo(f"error: {_one_line(_os_message(e))}", err=True)
        code = 2
    except (Exception, RecursionError, MemoryError) as e:  # noqa: BLE001 - the boundary: no traceback, ever
        if debug:
            raise
        typer.echo(f"error: {_one_line(_unexpected(e))}", err=True)
        code = 2
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
