"""Convert one :class:`~converters.ane_model.AneChunk` into a two-function ML Program package.

Each function (``prefill``: a fixed block of ``prefill_len`` tokens; ``decode``: one token) is traced and
converted with fixed shapes from a module whose weights are placeholders, its records placed as constexpr ops
(:mod:`converters.weights`), and the two programs are saved as one multifunction package; it stores each
weight blob once, as both functions hold the same constexpr data, and both functions declare the same
``key_cache`` / ``value_cache`` state, so a runtime can feed one state object to either.
"""

from __future__ import annotations

import functools
import gc
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

FUNCTIONS = ("prefill", "decode")


def chunk_records(qm, plan, vocab_parts) -> dict:
    """The records one chunk holds: its layers' records, and the vocabulary parts of the embedding / head
    (a tied head uses the embedding's record), named ``module[a:b]``."""
    from converters.weights import slice_rows
    from macq.arch import arch_spec

    spec = arch_spec(qm.config.model_type)
    prefixes = tuple(f"{spec.layers}.{i}." for i in range(plan.start, plan.stop))
    out = {n: qm.records[n] for n in qm.records if n.startswith(prefixes)}   # names first: lazy records read once
    ends = ([spec.embed] if plan.embed else []) + ([spec.lm_head] if plan.head else [])
    for module in ends:
        name = qm.tied.get(module, module)
        rec = qm.records.get(name)
        if rec is None:
            continue
        for a, b in [vocab_parts[i] for i in plan.parts] if plan.parts is not None else vocab_parts:
            out[f"{name}[{a}:{b}]"] = rec if (a, b) == (0, rec.shape[0]) else slice_rows(rec, a, b)
    return out


def _types(chunk, n: int):
    from converters.mil_io import quiet_ct as _quiet_ct

    ct = _quiet_ct()
    s = chunk.s
    if chunk.embed is not None:
        inputs = [ct.TensorType("input_ids", shape=(1, n), dtype=np.int32)]
    else:
        inputs = [ct.TensorType("hidden", shape=(1, s.hidden, 1, n), dtype=np.float16)]
    states = []
    if chunk.layers:
        inputs += [ct.TensorType("position_ids", shape=(n,), dtype=np.int32),
                   ct.TensorType("causal_mask", shape=(1, 1, n, chunk.kv_len), dtype=np.float16)]
        shape = tuple(chunk.key_cache.shape)
        states = [ct.StateType(ct.TensorType(shape=shape, dtype=np.float16), name=nm) for nm in ("key_cache", "value_cache")]
    outputs = [ct.TensorType(nm, dtype=np.float16) for nm in chunk.output_names()]
    return inputs, states, outputs


def convert_function(chunk, n: int, layouts: dict, float_rows):
    """Trace ``chunk`` (built with placeholder weights) for ``n`` tokens, convert it (fp16, iOS18, fixed
    shapes) to a MIL program, put the records and float tensors in place of the placeholders, and run the
    passes that lowering to an ML Program runs. Conversion never sees the dense weights: its peak is about the
    chunk's fp16 size (the FLOAT16 pass still writes fp16 zeros for each placeholder before it is replaced),
    not the fp32 copies (:mod:`converters.fp16_pass`)."""
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline, PassPipelineManager

    from converters.fp16_pass import fp16_pipeline
    from converters.mil_io import quiet_ct as _quiet_ct
    from converters.weights import place_slots

    ct = _quiet_ct()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(chunk, chunk.example(n), check_trace=False)
        inputs, states, outputs = _types(chunk, n)
        prog = ct.convert(traced, inputs=inputs, states=states or None, outputs=outputs,
                          minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                          pass_pipeline=fp16_pipeline(), convert_to="milinternal")
        del traced
        gc.collect()
        place_slots(prog, chunk.weights.slots, layouts, float_rows)
        main = PassPipeline()   # what mil_convert runs on a milinternal program (the FLOAT16 pass already ran)
        main.remove_passes({"common::add_fp16_cast", "common::add_int16_cast"})
        PassPipelineManager.apply_pipeline(prog, main)
        PassPipelineManager.apply_pipeline(prog, PassPipeline.get_pipeline("backend_mlprogram"))
    gc.collect()   # the replaced placeholder consts sit in op <-> var cycles: free them before the next function
    return prog


def save_functions(progs: dict, out_path: Path, default: str) -> dict:
    """One multifunction package from lowered single-function programs (what ``ct.utils.save_multifunction``
    does, without writing each function to disk and reading it back): consts equal across functions get
    one ``weight_id``, so the file stores them once. Returns :func:`converters.inspect.inspect_mlpackage` of
    the program as saved, read before it is freed (reading the package back would load every weight again)."""
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program

    from converters.inspect import inspect_mlpackage
    from converters.mil_io import quiet_ct as _quiet_ct

    ct = _quiet_ct()
    mf = Program()
    for name, prog in progs.items():
        mf.add_function(name, prog.functions["main"])
    mf.default_function_name = default
    share_weights(mf)
    mf.skip_all_passes, mf.export_as_multifunction = True, True
    ml = mil_convert(mf, convert_to="mlprogram", convert_from="milinternal", specification_version=ct.target.iOS18,
                     compute_units=ct.ComputeUnit.ALL, skip_model_load=True)
    ml.save(str(out_path))
    return inspect_mlpackage(out_path, loaded=(mf, ml.get_spec()))


# bytes: consts up to this size are matched by content (a hash of their buffer), larger ones by the memory they
# lie in. Each function traces its own RoPE tables (context x head_dim fp16 each: 128 KiB for Llama-3's head_dim
# 128 at context 512, 4 MiB at 8192 x 256), so those must be matched by content; the records' layouts and the
# float tables (the large consts) are the same arrays in both functions.
SMALL = 1 << 23


def share_weights(prog) -> int:
    """Give consts with the same value one ``weight_id`` across and within functions, so the package stores
    each weight blob once. coremltools' ``const_deduplication`` compares every const by value (measured:
    ~6.6 bytes of peak memory per weight on a chunk of 15.7M 4-bit weights); here both functions' constexpr
    inputs are views of the very same layout arrays (and ``float_rows`` is cached), so a large const is
    keyed by its buffer address, shape, strides and dtype, and only small ones are hashed. Returns the number
    of consts that share a blob with another. A large const that is an equal copy at another address would
    be stored twice: the ANE gate's shared-blob rule reads the saved file and reports it."""
    import hashlib

    keys: dict[tuple, list] = {}
    for f in prog.functions.values():
        for op in f.operations:
            if op.op_type != "const":
                continue
            v = op.outputs[0].val
            if not isinstance(v, np.ndarray) or v.ndim == 0:
                continue
            meta = (v.shape, v.dtype.str, str(v.dtype.metadata))
            if v.nbytes <= SMALL:
                key = meta + (hashlib.blake2b(memoryview(np.ascontiguousarray(v)).cast("B"), digest_size=16).digest(),)
            else:
                key = meta + (v.__array_interface__["data"][0], v.strides)
            keys.setdefault(key, []).append(op)
    shared = 0
    for i, ops in enumerate(keys.values()):
        if len(ops) > 1:
            shared += len(ops)
            for op in ops:
                op.weight_id = str(i)
    return shared


def export_chunk(qm, plan, context: int, prefill_len: int, vocab_parts, out_path: Path, metadata: dict[str, str],
                 allow_fallback: bool = False) -> dict:
    """Write ``out_path`` (a two-function package; it must not exist: callers write into a temp dir) and
    return its :func:`converters.inspect.inspect_mlpackage` report.

    Both functions are held as MIL programs and saved once: their constexpr data are the same numpy arrays
    (one layout per record) and their float tensors too (``float_rows`` is cached), so the chunk's weights
    are in memory once, not once per function."""
    from converters.ane_model import AneChunk
    from converters.weights import plan_layouts

    records = chunk_records(qm, plan, vocab_parts)
    layouts, _ = plan_layouts(records, allow_fallback)
    chunk = AneChunk(qm, plan.start, plan.stop, plan.embed, plan.head, context, records=records,
                     parts=plan.parts).eval()
    del records   # the layouts hold what the package needs
    float_rows = functools.cache(chunk.weights.float_rows)
    progs = {fn: convert_function(chunk, n, layouts, float_rows) for fn, n in zip(FUNCTIONS, (prefill_len, 1))}
    del chunk, layouts, float_rows
    gc.collect()
    info = save_functions(progs, out_path, default="decode")
    del progs
    gc.collect()
    set_metadata(out_path, metadata)
    return info


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write user metadata into a saved package's spec in place (the weights file is left untouched)."""
    from converters.mil_io import quiet_ct as _quiet_ct

    ct = _quiet_ct()
    spec_file = next(Path(path).rglob("model.mlmodel"))
    spec = ct.utils.load_spec(str(path))
    for k, v in metadata.items():
        spec.description.metadata.userDefined[k] = v
    spec_file.write_bytes(spec.SerializeToString())


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
