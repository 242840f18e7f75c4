"""What to expect of an export at decode time: bytes read per decoded token and the speed bound per chip.

Read from the saved program, not from what the exporter meant: the decode function's weights at their
stored size (every constexpr input: indices, LUT, scales, offsets; float constants at their dtype), except
that a table read by ``gather`` (the embedding) costs one row per gather, and the KV state at its allocated
size. A fixed-shape (ANE) cache is read whole at every step, whatever the position, so the KV term is the
export's context, not the tokens decoded so far. This is a lower bound on the traffic (the one-hot cache
update also rewrites the state; activations are ignored), hence an upper bound on tokens/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters.chips import ANE_SOURCE, decode_bounds
from converters.inspect import decode_traffic  # noqa: F401  (re-exported: the traffic a token reads)


def expectation(traffic: list[dict]) -> dict:
    """Totals over the packages of an export (run one after another per token) and the per-chip bounds."""
    w = sum(t["weights"] for t in traffic)
    kv = sum(t["kv"] for t in traffic)
    return {"weights_bytes_per_token": w, "kv_bytes_per_token": kv, "bytes_per_token": w + kv,
            "bounds": decode_bounds(w + kv)}


def expectation_md(e: dict) -> str:
    """The user-facing lines: bytes per token, then one row per chip."""
    from macq.markdown import md_table

    rows = [{"chip": b["chip"], "GPU GB/s": f"{b['soc_gbps']:g}", "GPU tok/s <=": f"{b['gpu_tok_s']:.0f}",
             "ANE GB/s": "-" if b["ane_gbps"] is None else f"{b['ane_gbps']:g}",
             "ANE tok/s <=": "-" if b["ane_tok_s"] is None else f"{b['ane_tok_s']:.0f}"} for b in e["bounds"]]
    head = (f"decode reads {e['bytes_per_token'] / 1e6:.1f} MB per token: weights {e['weights_bytes_per_token'] / 1e6:.1f} MB"
            f" + KV cache {e['kv_bytes_per_token'] / 1e6:.1f} MB (fixed shapes: the whole allocated cache every step). "
            "Upper bounds on decode speed = bandwidth / bytes per token (GPU: Apple's unified-memory bandwidth; "
            f"ANE: {ANE_SOURCE}):")
    return "\n".join([head, "", md_table(rows, list(rows[0]))])


def compute_plan(path: str | Path, compute_units: str = "CPU_AND_NE") -> dict[str, dict[str, int]]:
    """macOS only: Core ML's compute plan of a package, ``{function: {device: op count}}`` (device =
    ``NeuralEngine`` / ``GPU`` / ``CPU`` as Core ML's ``MLComputePlan`` prefers for each operation; ``const``
    ops are not counted). Elsewhere a ``MacqError``: only Core ML decides where an op runs."""
    from macq.errors import MacqError

    if sys.platform != "darwin":
        raise MacqError("compute plan: needs macOS (Core ML's MLComputePlan); on Linux see the static ANE gate")
    import coremltools as ct  # pragma: no cover - macOS only
    from coremltools.models.compute_plan import MLComputePlan  # pragma: no cover

    compiled = ct.models.utils.compile_model(str(path))  # pragma: no cover
    plan = MLComputePlan.load_from_path(path=compiled, compute_units=getattr(ct.ComputeUnit, compute_units))
    out: dict[str, dict[str, int]] = {}  # pragma: no cover
    for name, function in plan.model_structure.program.functions.items():  # pragma: no cover
        counts: dict[str, int] = {}
        for op in function.block.operations:
            if op.operator_name == "const":
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            dev = "unknown" if usage is None else type(usage.preferred_compute_device).__name__
            dev = dev.removeprefix("ML").removesuffix("ComputeDevice")
            counts[dev] = counts.get(dev, 0) + 1
        out[name] = counts
    return out


def what_to_expect(infos: list[dict], paths: list[Path]) -> tuple[dict, str]:
    """For ``macq inspect``: the expectation over the packages' :func:`converters.inspect.inspect_mlpackage`
    reports (run order), and on macOS the compute plan of each package. ``(data, markdown)``."""
    e = expectation([i["decode_traffic"] for i in infos])
    md = [expectation_md(e)]
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        e["compute_plan"] = {}
        for p in paths:
            plan = compute_plan(p)
            e["compute_plan"][str(p)] = plan
            md += [f"compute plan {Path(p).name} (CPU_AND_NE): " + "; ".join(
                f"{fn}: " + ", ".join(f"{d} {n}" for d, n in sorted(c.items())) for fn, c in plan.items())]
    return e, "\n".join(md)
