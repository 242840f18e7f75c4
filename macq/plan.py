"""The planner: every decision about a quantize / export run, made once, before any weight is read.

:func:`make_plan` takes a :class:`Request` (what the user asked, the same from the CLI, the library, ``macq
bench`` and the scripts) and returns a :class:`Plan`: where the records come from (a saved quantization, or a
method run on a model), the route (read a saved directory; stream one tensor at a time; stream one decoder layer
at a time; or in memory), the method config with the target's defaults and the automatic group size filled in,
the target's options, and notes on what was chosen. Every refusal that depends only on options and file headers
happens here. :func:`run_plan` follows the plan: it opens the records (:class:`Records`) and hands them to the
target's writer, the row of :data:`macq.targets.TARGETS`; there is one path per target.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from macq.atomic import guard_output
from macq.errors import MacqError
from macq.qmodel import Records
from macq.targets import TARGETS, TargetSpec, target_options, target_spec

CALIB_DEFAULTS = {"calib_dataset": "c4", "n_calib": 128, "seq_len": 512, "seed": 0}
ROUTES = {"read": "read a saved quantization", "stream": "streamed, one tensor in memory at a time",
          "stream-layers": "streamed, one decoder layer in memory at a time", "memory": "the whole model in memory"}
STREAM_ONLY = ("max_memory", "act_dtype")   # method options that only the layer-streamed route reads


@dataclass
class Request:
    """What a user asked for. ``target`` is the row that writes (``macq`` for a quantization directory);
    ``runtime``, for a quantization directory, is the target whose defaults and limits apply (``any``: none)."""

    model: str | None = None
    output: str | Path = ""
    target: str = "macq"
    runtime: str | None = None
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)          # method options given (config field names)
    calibration: dict[str, Any] = field(default_factory=dict)      # calib_dataset, n_calib, seq_len, seed
    target_options: dict[str, Any] = field(default_factory=dict)   # given target options (see macq.targets.OPTIONS)
    stream: bool | None = None
    force: bool = False
    trust_remote_code: bool = False


@dataclass
class Plan:
    request: Request
    target: TargetSpec
    runtime: TargetSpec | None
    source: str                      # "quantization" (a saved macq directory) | "model"
    route: str                       # a key of ROUTES
    method: str | None
    cfg: Any
    calibration: dict[str, Any] | None
    config: Any                      # the model's HF config
    target_options: dict[str, Any]
    checkpoint: Path | None = None   # the local safetensors directory the streamed routes read
    notes: list[str] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return Path(self.request.output)

    @property
    def source_name(self) -> str:
        return self.request.model or "default"

    def describe(self) -> str:
        what = f"records of {self.request.model}" if self.source == "quantization" else \
            f"{self.method} on {self.source_name}"
        return f"plan: {what} -> {self.target.name} {self.output} ({ROUTES[self.route]})"

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.name, "runtime": self.runtime.name if self.runtime else None,
                "source": self.source, "model": self.source_name, "route": self.route, "method": self.method,
                "config": self.cfg.to_dict() if self.cfg is not None else None, "calibration": self.calibration,
                "target_options": self.target_options, "output": str(self.output)}


# ------------------------------------------------------------------------------------------------ deciding
def _calibration(method: str, calib: dict[str, Any]) -> dict[str, Any] | None:
    """Calibration options with defaults filled; refused by name for methods that use no data, and the text
    checked (exists, is text) before any weight is loaded."""
    from macq.quantizers import method_spec

    given = [k for k, v in calib.items() if v is not None and k != "seed"]
    full = {k: calib.get(k) if calib.get(k) is not None else v for k, v in CALIB_DEFAULTS.items()}
    if not method_spec(method).needs_calibration:
        if given:
            raise MacqError(f"--{given[0].replace('_', '-')} does not apply to --method {method} (it uses no calibration data)")
        return None
    if full["n_calib"] < 1 or full["seq_len"] < 2:
        raise MacqError(f"--n-calib {full['n_calib']} / --seq-len {full['seq_len']}: expected n >= 1 and seq_len >= 2")
    from macq.data import load_text

    load_text(full["calib_dataset"])
    return full


def _inputs(model: str | None) -> list[Path]:
    """The local paths a run reads (the output must neither be nor contain nor lie inside them)."""
    from macq.models import default_model_dir

    if model is None or model == "default":
        return [default_model_dir()]
    p = Path(model)
    return [p.parent if p.suffix == ".gguf" else p] if p.exists() else []


def _route(plan: Plan) -> str:
    """read | stream | stream-layers | memory, from the method, the source and ``--stream``."""
    from macq.quantizers import METHODS, method_spec
    from macq.streaming import stream_refusal, streamable_source

    flag, method = plan.request.stream, plan.method
    if plan.source == "quantization":
        if flag:
            raise MacqError(f"--stream: {plan.request.model} is a saved quantization; its records are always read "
                            "one at a time")
        return "read"
    spec = method_spec(method)
    if flag is False:
        return "memory"
    if not spec.streams:
        if flag:
            covered = ", ".join(n for n, s in METHODS.items() if s.streams)
            why = f" ({spec.whole_model})" if spec.whole_model else ""
            raise MacqError(f"--stream: --method {method} runs on the in-memory path only{why}; streaming covers {covered}")
        return "memory"
    reason = stream_refusal(plan.cfg) if spec.kind != "weight" else ""
    if reason:
        if flag:
            raise MacqError(f"--stream: {reason}")
        return "memory"
    m = plan.request.model
    src = streamable_source(m) if m is None or Path(m).exists() else None
    if src is None:
        if flag:
            raise MacqError(f"--stream: {m} is not a local Hugging Face safetensors checkpoint")
        return "memory"
    plan.checkpoint = src
    return "stream" if spec.kind == "weight" else "stream-layers"


def make_plan(req: Request) -> Plan:
    """Decide everything about ``req`` and check it, reading only ``config.json`` and file headers."""
    from macq.evaluate import artifact_kind
    from macq.integrity import check_tokenizer
    from macq.models import resolve_model_path
    from macq.preflight import model_config, resolve_config

    target = target_spec(req.target)
    if target.name == "macq":
        if req.runtime not in (None, "any"):
            runtime: TargetSpec | None = target_spec(req.runtime, runtimes_only=True)
        else:
            runtime = None
    else:
        runtime = target
    topts = target_options(target, req.target_options)
    guard_output(req.output, req.force, inputs=_inputs(req.model))
    kind = artifact_kind(req.model)
    if kind in ("mlx", "mlpackage"):
        raise MacqError(f"model: {req.model} is already an export ({kind}); give an HF model or a macq quantization dir")
    notes: list[str] = []
    if kind == "macq":
        if target.name == "macq":
            raise MacqError(f"model: {req.model} is already a macq quantization directory")
        given = [k for k, v in {"method": req.method, **req.calibration, **req.options}.items() if v is not None]
        if given:
            raise MacqError(f"--{given[0].replace('_', '-')} does not apply: {req.model} is already quantized "
                            "(export writes its records as they are; quantize the float model instead)")
        plan = Plan(req, target, runtime, "quantization", "read", None, None, None, model_config(req.model),
                    topts, notes=notes)
    else:
        method = req.method or "rtn"
        calib = _calibration(method, req.calibration)
        config = model_config(req.model, req.trust_remote_code)
        c = calib or {k: req.calibration.get(k) for k in CALIB_DEFAULTS}
        cli = {"n_calib": c["n_calib"], "seq_len": c["seq_len"], "seed": c["seed"], "dataset": c["calib_dataset"],
               "target": req.runtime if target.name == "macq" else target.name}
        cfg, notes = resolve_config(method, dict(req.options), config, runtime.name if runtime else None, cli)
        if "device" in req.options:   # before any weight is read: a missing accelerator is the user's error
            from macq.device import resolve_device

            try:
                resolve_device(cfg.device)
            except MacqError as e:
                raise MacqError(f"--device {cfg.device}: {str(e).removeprefix('device: ')}") from None
        plan = Plan(req, target, runtime, "model", "memory", method, cfg, calib, config, topts, notes=notes)
    check_tokenizer(req.model if plan.source == "quantization" else resolve_model_path(req.model), plan.config,
                    req.trust_remote_code)   # loads, and fits the embedding: on every route, before any work
    if "context" in topts and topts["context"] is None:   # 512, or the model's own maximum when smaller
        max_pos = getattr(plan.config, "max_position_embeddings", None) or getattr(plan.config, "n_positions", None)
        topts["context"] = min(512, max_pos or 512)
    target.check(plan)
    plan.route = _route(plan)
    if plan.route != "stream-layers":
        from macq.streaming import stream_refusal

        why = (stream_refusal(plan.cfg) if plan.cfg is not None else "") or \
            "a calibrated method, one decoder layer at a time, on a local safetensors checkpoint, without --no-stream"
        for k in STREAM_ONLY:
            if req.options.get(k) is not None:
                raise MacqError(f"--{k.replace('_', '-')} applies to the streamed path ({why})")
    if plan.route == "stream-layers" and target.name != "macq":
        plan.notes.append(f"quantized streamed ({plan.method}) into a temporary directory, then exported from its records")
    return plan


# ------------------------------------------------------------------------------------------------ routes
def _streamed(plan: Plan, progress: bool) -> Records:
    from macq.streaming import iter_quantized, plan_stream

    sp = plan_stream(plan.checkpoint, plan.cfg, plan.request.trust_remote_code)
    return Records(sp.config, plan.source_name, {**plan.cfg.to_dict(), "streamed": True}, sp.tied, {}, sp.src,
                   lambda: iter_quantized(sp, plan.method, plan.cfg, progress), None, True)


def _in_memory(plan: Plan, progress: bool) -> Records:
    from macq.pipeline import load_quantized_or_model, quantize

    _, fp, tok = load_quantized_or_model(plan.request.model, plan.request.trust_remote_code)
    c = plan.calibration or CALIB_DEFAULTS
    qm = quantize(fp, tok, plan.method, plan.cfg, c["calib_dataset"], c["n_calib"], c["seq_len"], c["seed"],
                  progress=progress, source=plan.source_name, copy_model=False)
    return Records.of(qm, tok)


def _layer_streamed(plan: Plan, out: Path, progress: bool) -> dict[str, Any]:
    from macq.pipeline import stream_calibrated

    c = plan.calibration or CALIB_DEFAULTS
    return stream_calibrated(plan.checkpoint, out, plan.method, plan.cfg, c["calib_dataset"], c["n_calib"],
                             c["seq_len"], c["seed"], source=plan.source_name, force=True, progress=progress,
                             trust_remote_code=plan.request.trust_remote_code)


@contextmanager
def _scratch(output: Path) -> Iterator[Path]:
    """A temporary directory beside the output (same file system, removed whatever happens)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.quant-", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ running
def run_plan(plan: Plan, progress: bool = False) -> dict[str, Any]:
    """Follow ``plan``: open its records and write them with the target's writer. Returns the result the commands
    print (``plan`` and ``notes`` included)."""
    t, out, force = plan.target, plan.output, plan.request.force
    if plan.route == "stream-layers" and t.name == "macq":
        result = _layer_streamed(plan, out, progress)
    elif plan.route == "stream-layers" or (plan.route == "stream" and t.whole_model):
        with _scratch(out) as tmp:   # the quantization first, into a temporary directory, then its records
            q = tmp / "q"
            if plan.route == "stream-layers":
                summary = _layer_streamed(plan, q, progress)
            else:
                summary = {**TARGETS["macq"].write(_streamed(plan, progress), q, {}, False), "streamed": True}
            result = {**t.write(Records.from_dir(q), out, plan.target_options, force), "quantization": summary}
    else:
        records = Records.from_dir(plan.request.model) if plan.route == "read" else \
            _streamed(plan, progress) if plan.route == "stream" else _in_memory(plan, progress)
        result = t.write(records, out, plan.target_options, force)
    result["target"] = t.name
    result["streamed"] = plan.route != "memory"
    result["notes"] = plan.notes + list(result.get("notes") or [])
    result["plan"] = plan.to_dict()
    return result


def markdown(plan: Plan, result: dict[str, Any]) -> str:
    """The lines a command prints for ``result``."""
    path = result.get("output") or result.get("path")
    if plan.target.name == "macq":
        how = {"stream": " (streamed)", "stream-layers": " (streamed, calibrated)"}.get(plan.route, "")
        lines = [f"wrote {path}{how}: {result['layers']} layers, "
                 f"{result['bits_per_weight']:.3f} bits/weight, {result['bytes'] / 2**20:.1f} MiB"]
        t = result.get("timings")
        if t:
            lines[0] += f" in {t['total_s']:.0f}s ({', '.join(f'{k} {v:.1f}' for k, v in t.items() if k != 'total_s')})"
    else:
        lines = [f"exported {path} ({plan.target.name}{', streamed' if result['streamed'] else ''}): "
                 f"{result.get('bytes_on_disk', 0) / 2**20:.1f} MiB on disk, "
                 f"{result.get('bits_per_weight', float('nan')):.3f} bits/weight over quantized layers"]
        chunks = result.get("chunks") or []
        lines += [f"chunk: {c['path']} ({c['bytes'] / 2**20:.1f} MiB, layers {c['layers'][0]}..{c['layers'][1] - 1})"
                  for c in chunks if len(chunks) > 1]
        lines += [f"ANE: {line}" for line in result.get("ane_report") or []]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def run(req: Request, progress: bool = False) -> dict[str, Any]:
    """The library's one call: plan ``req`` and follow the plan (what ``macq quantize`` / ``macq export`` run)."""
    return run_plan(make_plan(req), progress)
