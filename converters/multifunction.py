"""Convert one :class:`~converters.ane_model.AneChunk` into a two-function ML Program package.

Each function (``prefill``: a fixed block of ``prefill_len`` tokens; ``decode``: one token) is traced and
converted with fixed shapes, its records placed as constexpr ops (:mod:`converters.weights`), saved to a
scratch package, and ``ct.utils.save_multifunction`` merges the two; it stores each weight blob once, as
both functions hold the same constexpr data, and both functions declare the same ``key_cache`` /
``value_cache`` state, so a runtime can feed one state object to either.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
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
        for a, b in vocab_parts:
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
                   ct.TensorType("causal_mask", shape=(1, 1, n, chunk.context), dtype=np.float16)]
        shape = tuple(chunk.key_cache.shape)
        states = [ct.StateType(ct.TensorType(shape=shape, dtype=np.float16), name=nm) for nm in ("key_cache", "value_cache")]
    outputs = [ct.TensorType(nm, dtype=np.float16) for nm in chunk.output_names()]
    return inputs, states, outputs


def convert_function(chunk, n: int, records: dict, layouts: dict):
    """Trace ``chunk`` for ``n`` tokens, convert (fp16, iOS18, fixed shapes), place the records."""
    from converters.mil_io import quiet_ct as _quiet_ct
    from converters.weights import apply_records

    ct = _quiet_ct()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(chunk, chunk.example(n), check_trace=False)
        inputs, states, outputs = _types(chunk, n)
        ml = ct.convert(traced, inputs=inputs, states=states or None, outputs=outputs,
                        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                        convert_to="mlprogram", skip_model_load=True)
    del traced
    if records:
        ml, _ = apply_records(ml, records, layouts=layouts)
    return ml


def export_chunk(qm, plan, context: int, prefill_len: int, vocab_parts, out_path: Path, metadata: dict[str, str],
                 allow_fallback: bool = False) -> None:
    """Write ``out_path`` (a two-function package); ``out_path`` must not exist (callers write into a temp dir)."""
    from converters.ane_model import AneChunk
    from converters.mil_io import quiet_ct as _quiet_ct

    ct = _quiet_ct()
    chunk = AneChunk(qm, plan.start, plan.stop, plan.embed, plan.head, context).eval()
    records = chunk_records(qm, plan, vocab_parts)
    from converters.weights import plan_layouts

    layouts, _ = plan_layouts(records, allow_fallback)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".mf-") as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for fn, n in zip(FUNCTIONS, (prefill_len, 1)):
            p = str(Path(tmp) / f"{fn}.mlpackage")
            ml = convert_function(chunk, n, records, layouts)
            ml.save(p)
            del ml
            gc.collect()
            desc.add_function(p, src_function_name="main", target_function_name=fn)
        desc.default_function_name = "decode"
        del chunk
        gc.collect()
        ct.utils.save_multifunction(desc, str(out_path))
    set_metadata(out_path, metadata)


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
