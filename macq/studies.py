"""What ``macq analyze`` and ``macq bench`` (the method matrix) run: load or build the quantizations,
hand them to the evaluator (:mod:`macq.analysis`), write the results. App layer: may quantize.

Method specs (``--methods``): items separated by ``;``; an item is comma-separated catalogue names (below) or
one ``LABEL=METHOD:key=value,key=value`` (values parsed as int, float, true/false, else string), e.g.
``nf4,fp4;r3=rtn:bits=3,group_size=64,symmetric=false``.
Groups are 64 by default: the default model's hidden size 576 is not a multiple of 128.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from macq.atomic import atomic_dir, guard_output, write_marker
from macq.errors import MacqError
from macq.targets import TARGETS

AFFINE4 = {"bits": 4, "group_size": 64, "symmetric": False}
AFFINE3 = {"bits": 3, "group_size": 64, "symmetric": False}
CATALOGUE: dict[str, tuple[str, dict[str, Any]]] = {
    "fp16": ("fp16", {}),
    "rtn-int8": ("rtn", {"bits": 8, "group_size": 0, "symmetric": True}),
    "rtn-int4": ("rtn", dict(AFFINE4)),
    "rtn-int3": ("rtn", dict(AFFINE3)),
    "rtn-int4-sym": ("rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    "nf4": ("nf4", {}),
    "fp4": ("fp4", {}),
    "kmeans4": ("kmeans", {"bits": 4, "granularity": "per_grouped_channel", "group_size": 16}),
    "kmeans3": ("kmeans", {"bits": 3, "granularity": "per_grouped_channel", "group_size": 16}),
    "gptq4": ("gptq", dict(AFFINE4)),
    "gptq3": ("gptq", dict(AFFINE3)),
    "awq4": ("awq", dict(AFFINE4)),
    "awq3": ("awq", dict(AFFINE3)),
    "smoothquant-w8a8": ("smoothquant", {}),
    "mixed4": ("mixed", {"target_bpw": 4.5}),
}
BENCH_DEFAULT = "fp16,rtn-int8,rtn-int4,nf4,fp4,kmeans4,gptq4,awq4,smoothquant-w8a8,mixed4"
ANALYZE_DEFAULT = "rtn-int4,nf4,fp4,kmeans4,rtn-int3,kmeans3"
BENCH_SCHEMA = "macq.bench/1"
FILE_TARGETS = tuple(n for n, t in TARGETS.items() if t.file_column)   # the target table says which


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def _value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_methods(text: str) -> list[MethodSpec]:
    """Catalogue names and ``LABEL=METHOD:k=v,...`` items separated by ``;`` (or ``,`` between catalogue names).
    Every config is built here, so a bad option fails before anything slow runs."""
    from macq.pipeline import config_for

    items = [x.strip() for chunk in text.split(";") for x in ([chunk] if "=" in chunk else chunk.split(",")) if x.strip()]
    if not items:
        raise MacqError("--methods: empty")
    out: list[MethodSpec] = []
    for it in items:
        if it in CATALOGUE:
            m, o = CATALOGUE[it]
            spec = MethodSpec(it, m, dict(o))
        elif "=" in it.split(":")[0]:
            label, _, rest = it.partition("=")
            method, _, opts = rest.partition(":")
            kv = {}
            for pair in filter(None, opts.split(",")):
                k, eq, v = pair.partition("=")
                if not eq:
                    raise MacqError(f"--methods {it!r}: option {pair!r} is not key=value")
                kv[k.strip().replace("-", "_")] = _value(v.strip())
            spec = MethodSpec(label.strip(), method.strip(), kv)
        else:
            raise MacqError(f"--methods {it!r}: not a catalogue name ({', '.join(CATALOGUE)}) nor LABEL=METHOD:k=v,...")
        if spec.method != "fp16":
            config_for(spec.method, spec.options)
        if any(s.label == spec.label for s in out):
            raise MacqError(f"--methods: label {spec.label!r} given twice")
        out.append(spec)
    return out


def _layers(text: str | None, option: str = "--func-layers") -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MacqError(f"{option} {text!r}: expected comma-separated layer indices") from None
    if any(i < 0 for i in out):
        raise MacqError(f"{option} {text!r}: expected layer indices >= 0")
    return out


# ----------------------------------------------------------------------------- analyze
def analyze_study(paths: list[str], methods: str | None, model: str | None, output: Path, *, dataset: str = "wiki",
                  max_tokens: int = 256, context: int = 128, calib_dataset: str = "c4", n_calib: int = 4,
                  seq_len: int = 128, func_layers: str | None = None, sensitivity_label: str | None = None,
                  fit_samples: int = 1 << 18, no_layer_sensitivity: bool = False, layers: str | None = None,
                  seed: int = 0, threads: int | None = None,
                  force: bool = False, progress: bool = False) -> tuple[dict[str, Any], str]:
    """Load each macq dir in ``paths`` and quantize ``methods`` on the fly, then run the study into ``output``."""
    import torch

    from macq.analysis.report import write_analysis
    from macq.analysis.study import StudyOptions, folded, run_study
    from macq.arch import arch_spec
    from macq.data import calibration_samples, eval_tokens
    from macq.models import load_model
    from macq.pipeline import quantize
    from macq.qmodel import QuantizedModel, is_quantized_dir
    from macq.quantizers import method_spec

    guard_output(output, force, inputs=[*paths, model])
    for p in paths:
        if not is_quantized_dir(p):
            raise MacqError(f"analyze: {p} is not a macq quantization directory")
    specs = parse_methods(methods) if methods else []
    if any(s.method == "fp16" for s in specs):
        raise MacqError("--methods: fp16 is the reference of analyze, not a quantization of it")
    _layers(layers, "--layers")
    opts = StudyOptions(func_layers=_layers(func_layers), sensitivity_label=sensitivity_label, fit_samples=fit_samples,
                        by_layer=not no_layer_sensitivity, seed=seed)
    if not paths and not specs:
        raise MacqError("analyze: give macq quantization dirs and/or --methods")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded = {Path(p).name: QuantizedModel.load(p) for p in paths}
    sources = {qm.source for qm in loaded.values()}
    src = model or (sources.pop() if len(sources) == 1 else None)
    if loaded and src is None:
        raise MacqError("analyze: the quantizations name different (or no) sources; pass --model")
    fp, tok = load_model(None if src in (None, "default") else src)
    fp.eval()
    quants: dict[str, Any] = dict(loaded)
    qtimes = {}
    keep = _layers(layers, "--layers")
    skip: tuple[str, ...] = ()
    if keep is not None:  # a subset of decoder layers: the others stay float (registry path + index + ".")
        prefix = arch_spec(fp).layers
        n_layers = len(fp.get_submodule(prefix))
        if any(i >= n_layers for i in keep):
            raise MacqError(f"--layers {layers}: the model has {n_layers} decoder layers")
        skip = tuple(f"{prefix}.{i}." for i in range(n_layers) if i not in keep)
        for qm in loaded.values():
            qm.records = {k: v for k, v in qm.records.items() if not any(k.startswith(x) for x in skip)}
    for s in specs:
        t = time.perf_counter()
        o = dict(s.options)
        if skip:
            if "skip" not in {f.name for f in fields(method_spec(s.method).load()[0])}:
                raise MacqError(f"--layers: --method {s.method} cannot leave layers float; run it without --layers")
            o["skip"] = tuple(o.get("skip", ())) + skip
        qm = quantize(fp, tok, s.method, o, calib_dataset, n_calib, seq_len, seed, progress=progress,
                      source=src or "default", copy_model=True)
        if not folded(qm, fp):  # the float tensors only tell folded methods apart; drop the rest (memory)
            qm.float_tensors = {}
        quants[s.label] = qm
        qtimes[s.label] = time.perf_counter() - t
    for qm in loaded.values():
        if not folded(qm, fp):
            qm.float_tensors = {}
    eval_ids = eval_tokens(tok, dataset, max_tokens)
    calib = calibration_samples(tok, calib_dataset, n_calib, seq_len, seed)
    res = run_study(fp, quants, eval_ids, calib, context=context, opts=opts, progress=progress)
    res["model"] = src or "default"
    res["settings"].update({"dataset": dataset, "calib_dataset": calib_dataset, "torch_threads": torch.get_num_threads()})
    res["timings"]["quantize_s"] = qtimes
    res["timings"]["wall_s"] = time.perf_counter() - t0
    with atomic_dir(output) as tmp:
        files = write_analysis(res, fp, Path(tmp))
        write_marker(Path(tmp), "analysis")
    files = {k: str(output / Path(v).name) for k, v in files.items()}
    md = (output / "analysis.md").read_text()
    return {"output": str(output), "files": files, "summary": res["summary"], "timings": res["timings"]}, md



# ----------------------------------------------------------------------------- bench (method matrix)
def _load_results(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows already measured under the same settings (resume); a file from other settings is refused."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MacqError(f"--output {path}: results.json is not valid JSON") from None
    if data.get("schema") != BENCH_SCHEMA:
        raise MacqError(f"--output {path}: not a {BENCH_SCHEMA} results file")
    if data.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(data.get("settings", {}))
                      if settings.get(k) != data.get("settings", {}).get(k))
        raise MacqError(f"--output {path.parent}: its results were measured with other settings ({', '.join(diff)}); "
                        "use another --output or --force")
    return list(data.get("rows", []))


def _save_results(path: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from macq.analysis.report import write_json

    write_json({"schema": BENCH_SCHEMA, "settings": settings, "rows": rows}, path)


def file_rates(qm: Any, targets: list[str], tokenizer: Any = None) -> dict[str, Any]:
    """Export ``qm`` to each target in a temp dir and read what the file holds: bits per weight over the
    quantized layers as stored (``file_bpw_<target>``, every scale/zero/LUT charged, in the file's dtypes)
    and the export's size on disk (``file_mib_<target>``). A target that cannot hold the records without
    re-quantizing them (MLX and lookup tables) gets ``None`` and a note: the bench never re-quantizes."""
    import tempfile

    from macq.qmodel import Records
    from macq.targets import TARGETS, target_options

    out: dict[str, Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="macq-bench-files-") as tmp:
        for t in targets:
            spec = TARGETS[t]
            try:   # the target's own writer, with its defaults (Core ML: a short context keeps the bench quick)
                opts = target_options(spec, {"context": 128} if "context" in spec.options else {})
                r = spec.write(Records.of(qm, tokenizer), Path(tmp) / f"{t}{spec.suffix}", opts)
                out[f"file_bpw_{t}"], out[f"file_mib_{t}"] = r["bits_per_weight"], r["bytes_on_disk"] / 2**20
                notes += [f"{t}: {n}" for n in (r.get("notes") or [])]
            except MacqError as e:
                out[f"file_bpw_{t}"] = out[f"file_mib_{t}"] = None
                msg = str(e)
                notes.append(f"{t}: not exported: {msg if len(msg) <= 160 else msg[:157] + '...'}")
    from macq.analysis.report import collapse_notes

    out["file_notes"] = collapse_notes(notes)
    return out


def bench_matrix(model: str | None, methods: str, output: Path, *, datasets: str = "wiki,c4,tinystories",
                 max_tokens: int = 512, context: int = 256, calib_dataset: str = "c4", n_calib: int = 16,
                 seq_len: int = 256, seed: int = 0, threads: int | None = None, force: bool = False,
                 progress: bool = False, file_targets: str = ",".join(FILE_TARGETS)) -> tuple[dict[str, Any], str]:
    """Quantize ``model`` with every method, score each on every text against the fp16-rounded model,
    save after every row (``output/results.json``) and skip rows already there. Then the report + PNGs."""
    import shutil

    import torch

    from macq.analysis.functional import score
    from macq.analysis.report import bench_markdown, plot_bench
    from macq.benchmark import fp16_copy
    from macq.data import load_text
    from macq.eval import reference_logprobs
    from macq.eval.memory import measure_peak_detail
    from macq.models import load_model
    from macq.pipeline import quantize

    guard_output(output, force, inputs=[model], resume="bench")
    specs = parse_methods(methods)
    targets = [t for t in file_targets.split(",") if t]
    if any(t not in FILE_TARGETS for t in targets):
        raise MacqError(f"--file-targets {file_targets!r}: expected a comma-separated subset of {','.join(FILE_TARGETS)}")
    sets = [d for d in datasets.split(",") if d]
    if not sets:
        raise MacqError("--datasets: empty")
    for d in sets:
        load_text(d)
    if max_tokens < 2 or context < 2:
        raise MacqError(f"--max-tokens {max_tokens} / --context {context}: expected >= 2")
    settings = {"model": model or "default", "datasets": sets, "max_tokens": max_tokens, "context": context,
                "calib_dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len, "seed": seed,
                "file_targets": targets}
    if force and output.exists():   # the guard above let only a bench directory macq wrote get here
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    write_marker(output, "bench")
    results_path = output / "results.json"
    rows = _load_results(results_path, settings)
    done = {r["label"] for r in rows}
    for r in rows:
        for sp in specs:
            if sp.label == r["label"] and (sp.method, sp.options) != (r["method"], r["options"]):
                raise MacqError(f"--methods: row {sp.label!r} in {results_path} was measured as {r['method']} "
                                f"{r['options']}; give this one another label")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    todo = [s for s in specs if s.label not in done]
    if todo:
        from macq.data import eval_tokens

        fp, tok = load_model(model)
        fp.eval()
        ref_model = fp16_copy(fp)
        ids = {d: eval_tokens(tok, d, max_tokens) for d in sets}
        refs = {d: reference_logprobs(ref_model, ids[d], context=context) for d in sets}
        fp_params = sum(p.numel() for p in fp.parameters())
        for s in todo:
            t = time.perf_counter()
            if s.method == "fp16":
                qmodel, qm, secs, peak_mib = ref_model, None, 0.0, None
            else:
                qm, peak = measure_peak_detail(lambda s=s: quantize(fp, tok, s.method, dict(s.options), calib_dataset,
                                                                    n_calib, seq_len, seed, progress=progress,
                                                                    copy_model=True))
                secs, peak_mib = time.perf_counter() - t, peak.peak_bytes / 2**20
                qmodel = qm.to_torch()
            row: dict[str, Any] = {"label": s.label, "method": s.method, "options": s.options,
                                   "bpw": qm.bits_per_weight() if qm else 16.0,
                                   "size_mib": (qm.nbytes() if qm else fp_params * 2) / 2**20,
                                   "quantize_s": secs, "peak_mib": peak_mib,
                                   "act_quant": bool(qm.act_quant) if qm else False}
            if qm is not None:
                t_files = time.perf_counter()
                row.update(file_rates(qm, targets, tok))
                row["export_s"] = time.perf_counter() - t_files
            else:  # the float reference: nothing quantized, every weight stored as fp16 by both exporters
                row.update({**{f"file_bpw_{t}": 16.0 for t in targets}, "file_notes": []})
            for d in sets:
                sc = score(qmodel, ids[d], refs[d])
                row.update({f"ppl_{d}": sc["ppl"], f"kl_{d}": sc["kl"], f"top1_{d}": sc["top1"]})
            row["eval_s"] = time.perf_counter() - t - secs - row.get("export_s", 0.0)
            rows.append(row)
            _save_results(results_path, settings, rows)
            del qmodel, qm
    order = {s.label: i for i, s in enumerate(specs)}
    shown = sorted([r for r in rows if r["label"] in order], key=lambda r: order[r["label"]])
    md = bench_markdown(shown, settings, time.perf_counter() - t0, skipped=sorted(done & set(order)))
    (output / "report.md").write_text(md)
    plot_bench(shown, sets, output / "pareto.png", output / "methods.png")
    return {"output": str(output), "settings": settings, "rows": shown}, md

