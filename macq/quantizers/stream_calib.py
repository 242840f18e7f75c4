"""Streaming calibrated quantization (GPTQ, AWQ, AWQ->GPTQ, SmoothQuant, kmeans-cal, learned, mixed): one decoder
layer in memory at a time.

Each method plugs in through ``MethodSpec.stream`` (its ``layer_quantizer``, the same per-layer step its in-memory
path drives) and its config's ``stream_refusal()`` (options that need the whole model at once: mixed's Fisher or
KL sensitivities; refused before any weight is read). Gradients of the whole model's loss (kmeans-cal's Fisher
diagonal, learned's logits stage) come from :mod:`macq.quantizers.stream_grad`, also one layer at a time, through
``LayerJob.backward`` and ``LayerJob.finish``. Nothing here knows a method by name.

The in-memory path (:func:`macq.quantizers.calibration.layerwise`) loads the whole model in float32 first; an
8B model needs ~32 GB before any work. Here the model is a skeleton whose *parameters* are meta tensors (no
storage) and whose buffers are real (rotary frequencies, embedding scales: computed by the modules' own
constructors, exactly as the in-memory model computes them). Then:

1. the parameters outside the decoder layers that run before the first layer (embeddings; not the final norm
   or lm_head) are read from the checkpoint in float32 (a quantized embedding, when asked, is written back
   dequantized first, as the in-memory path does), the calibration batches are run up to the first layer and
   its inputs captured into an :class:`~macq.quantizers.activations.ActivationStore`; those parameters are
   dropped again;
2. for each decoder layer ``i``: its parameters are read from the checkpoint (:class:`~macq.shards.TensorStore`,
   one tensor at a time) in float32 onto the method's device; the method's own per-layer step runs
   (``MethodSpec.stream`` -> :class:`~macq.quantizers.calibration.LayerJob`, the same function the in-memory
   path drives); the quantized layer produces the next layer's inputs (skipped after the last layer); the
   layer's records and float tensors (AWQ's folded norms and biases included) are appended to the sharded
   writers; the layer goes back to meta;
   A method that must see the whole float model before quantizing (mixed: sensitivities, then one allocation)
   gets a first pass of the same shape over the float layers (``LayerJob.prepass``), nothing written;
3. the tensors outside the layers are copied (or quantized, for ``--include-embeddings`` / ``--include-lm-head``,
   with the same data-free quantizer as :func:`macq.quantizers.head_records`) tensor by tensor.

Float tensors keep the checkpoint's dtype where that holds their value exactly (everything GPTQ leaves
alone), else float32 (AWQ's folded norms): the in-memory path stores float32 copies of the same values.
With float32 activations the records equal the in-memory path's bit for bit (same ops, same batches, same
order: tests); fp16 activations round each layer's inputs once (see :mod:`macq.quantizers.activations`).
The output is the directory :func:`macq.streaming.stream_quantize` writes, through :class:`macq.qmodel.QuantDirWriter`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.progress import LayerLog, StageTimes, stage
from macq.qmodel import SHARD_BYTES, QuantDirWriter
from macq.quantizers.activations import ACT_DTYPES, ActivationStore, Budget
from macq.quantizers.calibration import LayerInputs, batch_calls, capture_first_layer_inputs, end_reuse
from macq.quantizers.meta_layers import _move_buffers, _set_param, materialize, release, skeleton
from macq.record import record_to
from macq.streaming import finite, plan_stream, quantize_stored, stream_refusal

TIMING_KEYS = {"capture": "capture_s", "hessian": "hessian_s", "cholesky": "cholesky_s", "columns": "column_loop_s",
               "grid": "grid_search_s", "search": "search_s", "round": "round_s", "forward": "forward_s", "io": "io_s"}


def _float_out(t: torch.Tensor, stored: torch.dtype) -> torch.Tensor:
    """The checkpoint's dtype when it holds ``t`` exactly (unchanged tensors), else float32 (folded ones)."""
    t = t.detach().cpu()
    if stored != t.dtype and t.is_floating_point() and stored.is_floating_point:
        narrow = t.to(stored)
        if torch.equal(narrow.to(t.dtype), t):
            return narrow
    return t


def stream_calibrate(src: str | Path, out: str | Path, method: str, cfg: Any, calib_ids: torch.Tensor, *,
                     source: str = "", calibration: dict[str, Any] | None = None, force: bool = False,
                     progress: bool = False, shard_bytes: int = SHARD_BYTES,
                     trust_remote_code: bool = False) -> dict[str, Any]:
    """Quantize the checkpoint at ``src`` with a calibrated method into the macq quantization directory
    ``out``, one decoder layer in memory at a time. Returns the CLI summary (with ``timings`` per stage and
    the activation store's ``activations`` counts, and ``gemm``: the probe's float32 GEMM rate and each stage's
    achieved rate against it, :meth:`macq.progress.StageTimes.rates`)."""
    from macq.arch import arch_spec
    from macq.device import resolve_device
    from macq.models import quantizable_modules
    from macq.quantizers import head_quantizer, method_spec
    from macq.quantizers.base import check_model_inputs

    spec = method_spec(method)
    if not spec.stream:
        raise MacqError(f"--method {method}: has no streaming calibrated path")
    cls, _ = spec.load()
    check_model_inputs(method, cfg, cls, calib_ids)
    reason = stream_refusal(cfg)
    if reason:
        raise MacqError(f"--stream: {reason}")
    out = Path(out)
    if out.exists() and not force:
        raise MacqError(f"output: {out} exists (pass --force to overwrite)")
    device = resolve_device(getattr(cfg, "device", "cpu"))
    plan = plan_stream(src, cfg, trust_remote_code)
    store = plan.store
    model = skeleton(plan.config, trust_remote_code)
    aspec = arch_spec(model)
    layers = model.get_submodule(aspec.layers)
    job = spec.layer_quantizer()(model, cfg, device)
    device = job.device            # where the method computes (AWQ: the CPU)
    heads = {n for n in quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head)
             if not n.startswith(plan.layers_prefix)} if spec.heads or spec.stream_heads else set()
    hname, hcfg, hfn = head_quantizer(cfg) if heads else ("", None, None)
    act_dtype = ACT_DTYPES[cfg.act_dtype]
    budget = Budget(cfg.max_memory_bytes, out.parent, f".{out.name}.acts-")
    t_start = time.perf_counter()

    outside = [(kind, name, key, tr) for kind, name, key, tr in plan.order if not name.startswith(plan.layers_prefix)]
    log = LayerLog(plan.n_layers, f"{method} (streamed)", enabled=progress)
    timer = StageTimes(str(device), probe=True)
    try:
        with timer, QuantDirWriter.create(out, plan.config, source=source or str(src), tokenizer=plan.src,
                                          shard_bytes=shard_bytes) as w:
            # 1. heads first (the decoder is calibrated on the quantized embedding), then the first layer's inputs
            head_recs: dict[str, Any] = {}
            with stage("io"):
                for kind, name, key, tr in outside:
                    if kind == "record" and name in heads and name not in job.own_heads:
                        rec = quantize_stored(store, key, tr, hname, hcfg, hfn)
                        rec.transposed = tr
                        head_recs[name] = rec
            if job.backward is not None:
                # 1a. gradients of the whole model's loss (kmeans-cal's Fisher), layer by layer in reverse
                from macq.quantizers.stream_grad import LayerStream

                over = {n: r.dequantize(torch.float32) for n, r in head_recs.items()}
                stream = LayerStream(plan, model, device, budget, over)
                stream.progress, stream.description = progress, f"{method} (streamed, gradients)"
                head_recs.update(job.backward(stream, calib_ids))

            def capture() -> LayerInputs:
                with stage("capture"):
                    early = tuple(n + "." for n in (aspec.lm_head, aspec.final_norm) if n)  # run after the layers only
                    outer = [n for n, _ in model.named_parameters(remove_duplicate=False)
                             if not n.startswith(plan.layers_prefix) and not n.startswith(early)]
                    for n in outer:
                        _set_param(model, n, finite(n, store[n]).to(device, torch.float32))
                    if aspec.embed in head_recs:
                        emb = model.get_submodule(aspec.embed)
                        _set_param(emb, "weight", head_recs[aspec.embed].dequantize(torch.float32).to(device))
                    _move_buffers(model, plan.layers_prefix, device)
                    inputs = LayerInputs(hidden=ActivationStore(act_dtype, budget), storage=torch.device("cpu"))
                    capture_first_layer_inputs(model, calib_ids, job.batch_size, device, offload=True, into=inputs)
                    for n in outer:
                        _set_param(model, n, torch.empty_like(model.get_parameter(n), device="meta"))
                return inputs

            def walk(inputs: LayerInputs, step: Any, log: LayerLog, done: Any) -> None:
                """Every decoder layer in turn: read, ``step``, run it for the next layer's inputs, ``done``
                (write its tensors, or nothing), back to meta."""
                for i in range(plan.n_layers):
                    path, layer = f"{aspec.layers}.{i}", layers[i]
                    log.layer(i, "read")
                    with stage("io"):
                        materialize(layer, path + ".", store, device)
                    try:
                        step(i, path, layer, inputs)
                        if i + 1 < plan.n_layers:
                            with stage("forward"):
                                inputs.hidden = _forward(layer, inputs, device, act_dtype, budget)
                    finally:
                        end_reuse(layer)
                    with stage("io"):
                        done(path, layer)
                        release(layer)
                    log.stage = timer.take_layer()
                inputs.hidden.release()
                log.done()

            kept = None
            if job.finish is not None:
                from macq.quantizers.stream_grad import LayerFiles

                kept = LayerFiles(budget.new_file())

            def put_layer(records: dict[str, Any], floats: dict[str, torch.Tensor]) -> None:
                for name, rec in records.items():
                    w.add_record(name, rec)
                for key, t in floats.items():
                    w.add_float(key, _float_out(t, store.dtype(key) if key in store else t.dtype))

            def write_layer(path: str, layer: nn.Module) -> None:
                mine = {k: record_to(job.records.pop(k), "cpu") for k in [k for k in job.records if k.startswith(path + ".")]}
                skip = {f"{name[len(path) + 1:]}.weight" for name in mine}
                floats = {f"{path}.{k}": t.detach().cpu() for k, t in layer.state_dict().items() if k not in skip}
                if kept is not None:
                    kept.add(mine, floats)     # tuned as a whole after the last layer, then written
                else:
                    put_layer(mine, floats)

            if job.prepass is not None:
                # 1b. a method that decides before it quantizes (mixed: sensitivities, then the allocation) first
                # streams the float model once: each layer read, measured, run for the next one's inputs, dropped
                walk(capture(), job.prepass, LayerLog(plan.n_layers, f"{method} (streamed, first pass)",
                                                       enabled=progress), lambda _p, _l: None)
                if job.after_prepass is not None:
                    job.after_prepass()
            inputs = capture()
            if kept is None:
                with stage("io"):
                    for name, rec in head_recs.items():
                        w.add_record(name, rec)
            timer.take_layer()   # the per-layer split starts here (capture and heads are in the totals)
            # 2. one decoder layer at a time
            walk(inputs, job.fn, log, write_layer)
            if kept is not None:
                # 2b. the quantized model tuned as a whole (learned's logits stage), layer by layer, then written
                from macq.quantizers.stream_grad import LayerStream

                stream = LayerStream(plan, model, device, budget)
                stream.progress, stream.description = progress, f"{method} (streamed, logits stage)"
                head_recs = job.finish(stream, calib_ids, kept, head_recs)
                with stage("io"):
                    for name, rec in head_recs.items():
                        w.add_record(name, rec)
                    for i in range(len(kept.paths)):
                        put_layer(*kept.load(i))
                        kept.paths[i].unlink()
            # 3. the rest outside the layers, tensor by tensor
            with stage("io"):
                for kind, name, key, _tr in outside:
                    if kind == "float":
                        w.add_float(name, finite(key, store[key]))
            mdict = {**cfg.to_dict(), "streamed": True}
            if job.stats_in_manifest:
                mdict["stats"] = job.stats
            if job.method_info is not None:
                mdict.update(job.method_info())
            if calibration:
                mdict["calibration"] = calibration
            w.close(mdict, tied=plan.tied, act_quant=job.act_quant)
    finally:
        budget.cleanup()
    timings = {TIMING_KEYS.get(k, f"{k}_s"): round(v, 3) for k, v in timer.total.items()}
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    return {**w.summary, "streamed": True, "device": str(device), "timings": timings, "gemm": timer.rates(),
            "activations": {"dtype": cfg.act_dtype, **budget.summary()}}


@torch.inference_mode()
def _forward(layer: nn.Module, inputs: LayerInputs, device: torch.device, dtype: torch.dtype,
             budget: Budget) -> ActivationStore:
    """The quantized layer's outputs for every batch, into a new store (the same calls as
    :func:`~macq.quantizers.calibration.run_layer`), then the inputs' store is released."""
    nxt = ActivationStore(dtype, budget)
    for hs, kw in batch_calls(layer, inputs, device):
        o = layer(hs, **kw)
        nxt.append(o[0] if isinstance(o, (tuple, list)) else o)
    inputs.hidden.release()
    return nxt
