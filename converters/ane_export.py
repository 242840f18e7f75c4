"""``export_coreml_ane``: the default Core ML export: macq's ANE-shaped graph (:mod:`converters.ane_model`),
fixed shapes, ``prefill`` + ``decode`` functions sharing weights and KV state, optionally in chunks.

Conversion goes chunk by chunk (:mod:`converters.chunks`), each chunk's torch module built from the
QuantizedModel's records for that chunk only and freed before the next, so peak memory follows the largest
chunk, not the model. Every record is placed exactly (:mod:`converters.weights`); the static ANE report
(:mod:`converters.ane_report`) is then read from each saved package and is expected to be empty.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from converters.chunks import MANIFEST, MAX_FILE_MB, Manifest, check_written, plan_chunks
from converters.convert import ExportResult, _check_args
from converters.mil_io import dir_bytes, release_memory
from macq.atomic import atomic_dir
from macq.errors import MacqError


def _check(qm, out_path: Path, context: int, prefill_len: int, chunked: bool, force: bool) -> None:
    from converters.ane_model import ane_shape

    if chunked and out_path.suffix == ".mlpackage":
        raise MacqError(f"output: {out_path}: a chunked export is a directory of packages (drop .mlpackage)")
    _check_args(qm, out_path.with_suffix(".mlpackage") if chunked else out_path, context, "ALL", force)
    if out_path.exists() and not force:
        raise MacqError(f"output: {out_path} exists (pass force=True to overwrite)")
    if not isinstance(prefill_len, int) or not 1 <= prefill_len <= context:
        raise MacqError(f"prefill_len={prefill_len}: expected an int in [1, context={context}]")
    ane_shape(qm)
    window = getattr(qm.config, "sliding_window", None) if getattr(qm.config, "use_sliding_window", True) else None
    if window and context > window:
        raise MacqError(f"context={context}: beyond the model's sliding window {window}, which the ANE graph "
                        "does not implement (full causal attention); use a context <= the window")


def export_coreml_ane(qm, out_path: str | os.PathLike, context: int = 512, prefill_len: int = 64,
                      chunks: int | None = None, max_chunk_mb: float | None = None, force: bool = False,
                      allow_fallback: bool = False) -> ExportResult:
    """Export ``qm`` as one two-function ``.mlpackage`` (default) or a directory of chunk packages + manifest."""
    from converters.ane_model import aligned, ane_shape
    from converters.convert import provenance
    from converters.multifunction import FUNCTIONS, export_chunk
    from converters.weights import check_layouts

    out_path = Path(out_path)
    plans = plan_chunks(qm, chunks, max_chunk_mb)   # validates chunks / max_chunk_mb first
    chunked = len(plans) > 1
    _check(qm, out_path, context, prefill_len, chunked, force)
    notes = check_layouts(qm.records, allow_fallback)  # every record expressible: fail before converting
    release_memory()
    s = ane_shape(qm)
    manifest = Manifest(context=context, prefill_len=prefill_len, hidden=s.hidden,
                        vocab_parts=[list(p) for p in s.vocab_parts], functions=list(FUNCTIONS), chunks=plans,
                        source=str(qm.source or ""), model_type=qm.config.model_type,
                        kv_len=aligned(context))

    metadata = dict(provenance(qm), **{"macq.ane": manifest.to_json()})
    infos = []
    with atomic_dir(out_path) as tmp:
        for plan in plans:
            target = tmp / plan.path if chunked else tmp
            if not chunked:
                shutil.rmtree(tmp)
            m = dict(metadata, **{"macq.chunk": json.dumps({"start": plan.start, "stop": plan.stop,
                                                              "embed": plan.embed, "head": plan.head})})
            infos.append(export_chunk(qm, plan, context, prefill_len, s.vocab_parts, target, m, allow_fallback))
            check_written(target, MAX_FILE_MB if max_chunk_mb is None else max_chunk_mb)
            release_memory()
        if chunked:
            (tmp / MANIFEST).write_text(manifest.to_json())
    paths = [out_path / p.path for p in plans] if chunked else [out_path]
    for i, p in zip(infos, paths):
        i["bytes_on_disk"] = dir_bytes(p)   # measured where the package now lies
    n = sum(i["n_weights"] for i in infos)
    bpw = sum(i["bits_per_weight"] * i["n_weights"] for i in infos) / n if n else 16.0
    ops: dict[str, int] = {}
    for i in infos:
        for k, v in i["ops"].items():
            ops[k] = ops.get(k, 0) + v
    report = [f"{p.name}: {line}" for p, i in zip(paths, infos) for line in i["ane_findings"]]
    report.append("ANE gate: " + ("no findings" if not report else f"{len(report)} finding(s)"))
    chunk_rows = [{"path": str(p), "bytes": i["bytes_on_disk"], "layers": [pl.start, pl.stop], "embed": pl.embed,
                   "head": pl.head, "ane_findings": i["ane_findings"]} for p, pl, i in zip(paths, plans, infos)]
    return ExportResult(path=out_path, bytes_on_disk=dir_bytes(out_path), bits_per_weight=bpw, ops=ops,
                        ane_report=report, notes=notes, chunks=chunk_rows)
