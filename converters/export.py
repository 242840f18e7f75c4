"""``export_coreml``: the one entry point of the Core ML backend, choosing the graph.

Kept apart from :mod:`converters.convert` (the traced ``hf`` graph) and :mod:`converters.ane_export` (macq's
ANE-shaped graph) because it imports both, and each of them imports shared pieces of ``convert``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from converters.ane_export import export_coreml_ane
from converters.convert import COMPUTE_UNITS, GRAPHS, ExportResult, export_coreml_hf
from macq.errors import MacqError


def export_coreml(qm, out_path: str | os.PathLike, context: int = 512, stateful: bool = True,
                  fixed_shapes: bool = False, compute_units: str = "ALL", force: bool = False,
                  allow_fallback: bool = False, graph: str = "ane", prefill_len: int | None = None,
                  chunks: int | None = None, max_chunk_mb: float | None = None) -> ExportResult:
    """Export a :class:`~macq.qmodel.QuantizedModel` to Core ML with record-exact weights.

    ``graph="ane"`` (default): macq's ANE-shaped graph, fixed shapes, ``prefill`` (``prefill_len`` tokens,
    default ``min(64, context)``) + ``decode`` functions sharing weights and KV state; one package, or with
    ``chunks`` / ``max_chunk_mb`` a directory of chunk packages + manifest. ``graph="hf"``: transformers'
    model traced (:func:`converters.convert.export_coreml_hf`).
    """
    if graph not in GRAPHS:
        raise MacqError(f"graph={graph!r}: expected one of {', '.join(GRAPHS)}")
    if compute_units not in COMPUTE_UNITS:
        raise MacqError(f"compute_units={compute_units!r}: expected one of {', '.join(COMPUTE_UNITS)}")
    if graph == "ane":
        if not stateful or fixed_shapes:
            raise MacqError("stateful=False / fixed_shapes apply to graph='hf' (the ANE graph is always stateful "
                            "and fixed-shape)")
        return export_coreml_ane(qm, out_path, context=context, prefill_len=prefill_len or min(64, context),
                                 chunks=chunks, max_chunk_mb=max_chunk_mb, force=force, allow_fallback=allow_fallback)
    if prefill_len is not None or chunks is not None or max_chunk_mb is not None:
        raise MacqError("prefill_len / chunks / max_chunk_mb apply to graph='ane' only")
    return export_coreml_hf(qm, out_path, context=context, stateful=stateful, fixed_shapes=fixed_shapes,
                            compute_units=compute_units, force=force, allow_fallback=allow_fallback)


def precheck(plan: Any) -> None:
    """The ``coreml`` row's pre-check (:data:`macq.targets.TARGETS`), on options and ``config.json`` alone."""
    from converters.weights import fp_refusal
    from macq.arch import arch_spec
    from macq.targets import TARGETS, check_records

    if getattr(plan.cfg, "mode", "affine") != "affine":   # float modes: no compact exact Core ML form (why: weights.py)
        raise fp_refusal(plan.cfg.mode)
    o = plan.target_options
    out = Path(plan.request.output)
    chunked = o["graph"] == "ane" and (o["chunks"] is not None or o["max_chunk_mb"] is not None)
    if o["graph"] == "hf" and (o["prefill_len"], o["chunks"], o["max_chunk_mb"]) != (None, None, None):
        raise MacqError("--prefill-len / --chunks / --max-chunk-mb: need --graph ane")
    if o["graph"] == "ane" and (o["fixed_shapes"] or not o["stateful"]):
        raise MacqError("--fixed-shapes / --kv-io: need --graph hf (the ane graph is fixed-shape and stateful)")
    if out.suffix != ".mlpackage" and not chunked:
        raise MacqError(f"--output {out}: a Core ML export must end in .mlpackage (a chunked one is a directory)")
    arch_spec(plan.config.model_type).coreml_support(plan.config)  # one line naming the family Core ML cannot hold
    max_pos = getattr(plan.config, "max_position_embeddings", None) or getattr(plan.config, "n_positions", None)
    if max_pos and o["context"] > max_pos:
        raise MacqError(f"--context {o['context']}: expected an int in [2, {max_pos}]")
    check_records(TARGETS["coreml"], plan.method, plan.cfg, o)


def write_records(records: Any, out: Path, options: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """The ``coreml`` row's writer (:data:`macq.targets.TARGETS`): the whole quantized model (read lazily from a
    saved quantization where the route made one) traced and converted with the target's options."""
    qm = records.qmodel()
    o = options
    res = export_coreml(qm, out, context=o["context"], stateful=o["stateful"], fixed_shapes=o["fixed_shapes"],
                        force=force, allow_fallback=o["allow_fallback"], graph=o["graph"], prefill_len=o["prefill_len"],
                        chunks=o["chunks"], max_chunk_mb=o["max_chunk_mb"])
    data = asdict(res)
    data.update({"method": qm.method.get("method"), "record_bits_per_weight": qm.bits_per_weight()})
    return data
