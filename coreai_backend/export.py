"""``export_coreai``: a :class:`~macq.qmodel.QuantizedModel` as a Core AI ``.aimodel`` asset (or a directory of
chunk assets + manifest), from its records, never re-quantizing.

Per chunk (:func:`converters.chunks.plan_chunks`, the Core ML target's plan), the ANE-shaped decoder with Core AI
weight sources (:mod:`coreai_backend.model`) is exported twice with ``torch.export`` (``prefill``: a fixed block
of ``prefill_len`` tokens; ``decode``: one token), decomposed with ``coreai_torch.get_decomp_table()`` and staged
as two entry points of one ``TorchConverter`` program. Both read the same module buffers, so the asset stores
each weight once; both declare the same ``key_cache`` / ``value_cache`` states (mutable buffers → Core AI
handles), so a runtime feeds one state to either. Shapes are fixed (context, block).

The manifest (:class:`converters.chunks.Manifest`, ``format="macq-coreai"``) is stored in every asset's custom
metadata (``macq.coreai``) and, for a chunked export, as ``coreai_manifest.json`` beside the chunk assets; it is
also the mark by which ``force`` recognises an output macq wrote.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from converters.chunks import ChunkPlan, Manifest, plan_chunks
from coreai_backend.options import CoreAIOptions, check_model, check_records
from macq.atomic import atomic_dir
from macq.errors import MacqError

FORMAT = "macq-coreai"
MANIFEST = "coreai_manifest.json"
META_KEY = "macq.coreai"
FUNCTIONS = ("prefill", "decode")
STATES = ("key_cache", "value_cache")


@dataclass
class CoreAIResult:
    path: Path
    bytes_on_disk: int
    bits_per_weight: float                         # records at their storage rate (Core AI widths: see notes)
    chunks: list[dict] = field(default_factory=list)   # one row per asset: path, bytes, layers, embed, head
    notes: list[str] = field(default_factory=list)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_manifest(path: str | Path) -> tuple[Manifest, Path]:
    """``(manifest, directory its chunk paths are relative to)`` of a chunked export dir or a single asset."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        text, root = (path / MANIFEST).read_text(), path
    elif path.suffix == ".aimodel" and (path / "metadata.json").is_file():
        custom = json.loads((path / "metadata.json").read_text()).get("creatorDefinedMetadata", {})
        text = custom.get(META_KEY) if isinstance(custom, dict) else None
        if not isinstance(text, str):
            raise MacqError(f"{path}: not a macq Core AI export (no {META_KEY} metadata)")
        root = path.parent
    else:
        raise MacqError(f"{path}: neither a .aimodel asset nor a directory with {MANIFEST}")
    d = json.loads(text)
    if d.get("format") != FORMAT:
        raise MacqError(f"{path}: not a macq Core AI manifest (format {d.get('format')!r})")
    d["chunks"] = [ChunkPlan(**c) for c in d["chunks"]]
    m = Manifest(**d)
    if root is path.parent:   # a single asset names itself
        m.chunks = [replace(c, path=path.name) for c in m.chunks]
    return m, root


def is_coreai_export(path: str | Path) -> bool:
    """True for an output this module wrote (a single asset or a chunked directory)."""
    try:
        read_manifest(path)
    except (MacqError, OSError, ValueError, TypeError, KeyError):
        return False
    return True


def _check_output(out: Path, options: CoreAIOptions) -> None:
    if out.is_symlink():
        raise MacqError(f"--output {out}: is a symbolic link; give a plain path")
    if options.chunked and out.suffix == ".aimodel":
        raise MacqError(f"--output {out}: a chunked export is a directory of assets (drop .aimodel)")
    if not options.chunked and out.suffix != ".aimodel":
        raise MacqError(f"--output {out}: a Core AI export must end in .aimodel (a chunked one is a directory)")
    if out.exists():
        if not options.force:
            raise MacqError(f"--output {out} exists (pass --force to replace a macq output)")
        if not is_coreai_export(out):
            raise MacqError(f"--output {out} exists and is not a macq Core AI export; --force only replaces macq outputs")


def export_chunk(qm, plan: ChunkPlan, options: CoreAIOptions, s, target: Path, manifest: Manifest) -> dict:
    """Build, export (prefill + decode), convert and save one chunk asset; returns its row."""
    import coreai_torch
    import torch
    from coreai.runtime import AIModelAssetMetadata

    from converters.convert import provenance
    from converters.multifunction import chunk_records
    from coreai_backend.model import coreai_chunk, example_inputs, rewrite_unit_matmuls

    records = chunk_records(qm, plan, s.vocab_parts)
    chunk = coreai_chunk(qm, plan, options.context, records)
    conv = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
    table = coreai_torch.get_decomp_table()
    for fn, n in zip(FUNCTIONS, (options.block, 1)):
        with torch.no_grad():
            ep = rewrite_unit_matmuls(torch.export.export(chunk, example_inputs(chunk, n)).run_decompositions(table))
        conv.add_exported_program(ep, input_names=chunk.input_names(), output_names=chunk.output_names(),
                                  state_names=list(STATES) if chunk.layers else None, entrypoint_name=fn)
        del ep
    n_weights = sum(r.shape[0] * r.shape[1] for r in records.values())
    bits = sum(r.storage_bits() for r in records.values())
    with contextlib.redirect_stdout(sys.stderr):   # its progress bar is progress, not the command's result
        prog = conv.to_coreai()
    # The program now holds its own copy of every constant: drop the module and the records (the same buffers)
    # before saving, which serializes that copy once more; otherwise three copies of the chunk coexist.
    del conv, chunk, records
    gc.collect()
    md = AIModelAssetMetadata()
    md.model_description = f"macq Core AI export ({qm.method.get('method', '?')}) of {qm.source or 'a causal LM'}"
    for k, v in provenance(qm).items():
        md.set_custom(k, v)
    md.set_custom(META_KEY, manifest.to_json())
    md.set_custom("macq.chunk", json.dumps({"start": plan.start, "stop": plan.stop, "embed": plan.embed,
                                             "head": plan.head}))
    md.set_custom("macq.hardware", options.hardware)
    prog.save_asset(target, metadata=md)
    return {"n_weights": n_weights, "record_bits": bits}


def export_coreai(qm, out_path: str | os.PathLike, options: CoreAIOptions | None = None) -> CoreAIResult:
    """Export ``qm`` as one two-function ``.aimodel`` (default) or, with ``chunks`` / ``max_chunk_mb``, a
    directory of chunk assets + ``coreai_manifest.json``. Everything is checked before the first record is read;
    the output appears only when complete (:func:`macq.atomic.atomic_dir`)."""
    from converters.ane_model import aligned, ane_shape
    from converters.mil_io import release_memory

    options = options or CoreAIOptions()
    out = Path(out_path)
    check_model(qm.config, options)
    _check_output(out, options)
    check_records(qm, options)
    plans = plan_chunks(qm, options.chunks, options.max_chunk_mb)
    chunked = options.chunked
    if chunked:
        plans = [replace(p, path=p.path.replace(".mlpackage", ".aimodel")) for p in plans]
    else:
        plans = [replace(plans[0], path=out.name)]
    s = ane_shape(qm)
    manifest = Manifest(kv_len=aligned(options.context), context=options.context, prefill_len=options.block,
                        hidden=s.hidden,
                        vocab_parts=[list(p) for p in s.vocab_parts], functions=list(FUNCTIONS), chunks=plans,
                        source=str(qm.source or ""), model_type=qm.config.model_type, format=FORMAT,
                        extra={"hardware": options.hardware, "states": list(STATES)})
    rows = []
    with atomic_dir(out, owned_only=False) as tmp:   # replacing is allowed only for our own export: _check_output
        for plan in plans:
            if chunked:
                target = tmp / plan.path
            else:
                shutil.rmtree(tmp)
                target = tmp
            rows.append(export_chunk(qm, plan, options, s, target, manifest))
            release_memory()
        if chunked:
            (tmp / MANIFEST).write_text(manifest.to_json())
    paths = [out / p.path for p in plans] if chunked else [out]
    n = sum(r["n_weights"] for r in rows)
    bpw = sum(r["record_bits"] for r in rows) / n if n else 16.0
    chunk_rows = [{"path": str(p), "bytes": _dir_bytes(p), "layers": [pl.start, pl.stop], "embed": pl.embed,
                   "head": pl.head} for p, pl in zip(paths, plans)]
    return CoreAIResult(path=out, bytes_on_disk=_dir_bytes(out), bits_per_weight=bpw, chunks=chunk_rows)


# ------------------------------------------------------------------ the target table's row (macq/targets.py)

def options_from(target_options: dict, config=None, force: bool = False) -> CoreAIOptions:
    """:class:`CoreAIOptions` from the table's option dict (``context`` None: 512, or the model's maximum if
    smaller)."""
    context = target_options.get("context")
    if context is None:
        max_pos = getattr(config, "max_position_embeddings", None) if config is not None else None
        context = min(512, max_pos) if max_pos else 512
    return CoreAIOptions(context=context, prefill_len=target_options.get("prefill_len"),
                         chunks=target_options.get("chunks"), max_chunk_mb=target_options.get("max_chunk_mb"),
                         hardware=target_options.get("hardware") or "any", force=force)


def precheck(plan) -> None:
    """The ``coreai`` row's pre-check, on the options and ``config.json`` alone (``plan``: the planner's object
    with ``target_options``, ``request.output``, ``config``, ``method``, ``cfg``)."""
    from coreai_backend.options import check_coreai
    from macq.quantizers import method_spec

    opts = options_from(plan.target_options, plan.config)
    out = Path(plan.request.output)
    if opts.chunked and out.suffix == ".aimodel":
        raise MacqError(f"--output {out}: a chunked export is a directory of assets (drop .aimodel)")
    if not opts.chunked and out.suffix != ".aimodel":
        raise MacqError(f"--output {out}: a Core AI export must end in .aimodel (a chunked one is a directory)")
    spec = method_spec(plan.method) if plan.cfg is not None else None
    check_coreai(plan.config, spec.records if spec else None, opts, plan.cfg,
                 activations=bool(spec and spec.activations))


def write_records(records, out: Path, options: dict, force: bool = False) -> dict:
    """The ``coreai`` row's writer: ``records.qmodel()`` (read lazily, chunk by chunk) written with the row's options."""
    from dataclasses import asdict

    qm = records.qmodel() if hasattr(records, "qmodel") else records
    res = export_coreai(qm, out, options_from(options, qm.config, force))
    data = asdict(res)
    data["path"] = str(res.path)
    data.update({"method": qm.method.get("method"), "record_bits_per_weight": qm.bits_per_weight()})
    return data
