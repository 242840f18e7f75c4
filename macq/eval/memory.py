"""Process memory (peak RSS, CUDA peak) and the size of a quantized model against its fp16 original.

Peak of a block, :func:`measure_peak`: on Linux the kernel keeps the high-water mark of the resident
set (``VmHWM`` in ``/proc/self/status``) and resets it to the current RSS when ``"5"`` is written to
``/proc/self/clear_refs``. Reset, run the block, read ``VmHWM``: that is the true peak during the block,
with no sampling thread to miss a short spike and no dependency. Where the reset is refused (old
kernels, some sandboxes) or on macOS (no ``/proc``), the fallback is ``getrusage`` ``ru_maxrss``, which
cannot be reset: if the block raised the lifetime peak, that is the block's peak (exact); if not, the
block peaked somewhere below it and the reported value is an upper bound (``exact=False``).
``ru_maxrss`` is KiB on Linux and bytes on macOS.

The Linux reset also lowers what ``ru_maxrss`` reports (the kernel reads the same high-water mark), so
before each reset the lifetime peak so far is remembered and :func:`peak_rss_bytes` stays a lifetime
peak. Kernel RSS counters are per-CPU and lag by up to a few hundred KiB: treat every number here as
accurate to about 1 MiB.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


_lifetime_floor = 0  # lifetime peak seen before the last high-water-mark reset


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def peak_rss_bytes() -> int:
    """Lifetime peak resident set of this process, bytes (survives :func:`measure_peak`'s resets)."""
    return max(_ru_maxrss_bytes(), _lifetime_floor)


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    """Current resident set (Linux ``VmRSS``); ``None`` where ``/proc`` is absent."""
    return _proc_status_bytes("VmRSS")


def _reset_hwm() -> bool:
    global _lifetime_floor
    _lifetime_floor = peak_rss_bytes()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def cuda_peak_bytes(device: int | str | torch.device | None = None) -> int | None:
    """``torch.cuda.max_memory_allocated`` (tensor memory, not the caching allocator's reserve); ``None``
    without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


@dataclass
class PeakMemory:
    peak_bytes: int               # peak RSS of the process during the block (absolute)
    start_bytes: int | None       # RSS when the block started (None where unknown)
    method: str                   # "vmhwm" (exact, reset) or "ru_maxrss"
    exact: bool                   # False: peak_bytes is an upper bound (ru_maxrss not raised by the block)
    cuda_peak_bytes: int | None = None

    @property
    def delta_bytes(self) -> int | None:
        """Extra resident memory the block needed at its peak, over what was resident at its start."""
        return None if self.start_bytes is None else max(0, self.peak_bytes - self.start_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "delta_bytes": self.delta_bytes}


def measure_peak_detail(fn: Callable[[], Any]) -> tuple[Any, PeakMemory]:
    """Run ``fn()``; return its result and the memory peak during it (see module doc for the method)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = current_rss_bytes()
    use_hwm = start is not None and _reset_hwm()
    before = peak_rss_bytes()
    result = fn()
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize()
        cuda_peak = cuda_peak_bytes()
    if use_hwm:
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None:
            return result, PeakMemory(hwm, start, "vmhwm", True, cuda_peak)
    after = peak_rss_bytes()
    return result, PeakMemory(after, start, "ru_maxrss", after > before, cuda_peak)


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), peak RSS bytes during the call)``; :func:`measure_peak_detail` says how exact it is."""
    result, peak = measure_peak_detail(fn)
    return result, peak.peak_bytes


def process_memory() -> dict[str, Any]:
    """What every ``--json`` result reports: this process's lifetime peak RSS, and the peak device memory
    where a device exists (CUDA: tensor bytes; MPS: the driver's current allocation, MPS keeps no peak)."""
    out: dict[str, Any] = {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3)}
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = cuda_peak_bytes()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out["mps_driver_bytes"] = int(torch.mps.driver_allocated_memory())
    return out


def _unique_float_params(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Float elements of the model's state (tied tensors once) and a key -> storage id map."""
    seen: set[int] = set()
    ident: dict[str, int] = {}
    total = 0
    for k, t in model.state_dict(keep_vars=False).items():
        if not t.is_floating_point():
            continue
        sid = t.untyped_storage().data_ptr()
        ident[k] = sid
        if sid not in seen:
            seen.add(sid)
            total += t.numel()
    return total, ident


def model_size_report(qm, fp_model: nn.Module) -> dict[str, Any]:
    """Deployed size of ``qm`` (records at their storage rate, all metadata charged, + every other float
    tensor at fp16) against the fp16 size of ``fp_model``. Tied weights count once on both sides."""
    n_fp, ident = _unique_float_params(fp_model)
    fp16_bytes = 2 * n_fp
    records_bytes = sum((r.storage_bits() + 7) // 8 for r in qm.records.values())
    quantized_keys = {f"{name}.weight" for name in qm.records} | {f"{k}.weight" for k in qm.tied}
    quantized_ids = {ident[k] for k in quantized_keys if k in ident}
    counted: set[int] = set()
    float_elems = 0
    for k, t in qm.float_tensors.items():
        if not t.is_floating_point():
            continue
        sid = ident.get(k)
        if sid is not None:
            if sid in quantized_ids or sid in counted:
                continue  # alias of a quantized weight, or a tied copy already counted
            counted.add(sid)
        float_elems += t.numel()
    float_bytes = 2 * float_elems
    total = records_bytes + float_bytes
    n_q = qm.n_quantized_weights()
    return {
        "quantized_bytes": total,
        "records_bytes": records_bytes,
        "float_bytes": float_bytes,
        "fp16_bytes": fp16_bytes,
        "compression": fp16_bytes / total if total else float("nan"),
        "bits_per_weight": qm.bits_per_weight(),           # over quantized layers, metadata charged
        "n_quantized_weights": n_q,
        "n_params": n_fp,
        "quantized_fraction": n_q / n_fp if n_fp else 0.0,
        "bits_per_param": 8 * total / n_fp if n_fp else float("nan"),  # whole model, floats at 16
    }
