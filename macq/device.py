"""Picking a torch device by name, and waiting for it before reading a clock.

``auto`` prefers MPS (the product targets Apple silicon, where the GPU is the fast path), then CUDA
(the lent benchmark machines), then CPU. Asking for a device that is not there is a user error, not a
silent fallback: a benchmark that quietly ran on CPU would report numbers for the wrong machine.
"""

from __future__ import annotations

import sys

import torch

from macq.errors import MacqError

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` | ``"cpu"`` | ``"cuda"`` (or ``"cuda:N"``) | ``"mps"`` -> an available ``torch.device``.

    ``None`` means ``"auto"``. A requested but unavailable device raises :class:`MacqError`.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        if sys.platform == "darwin" and _mps_available():
            return torch.device("mps")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise MacqError(f"device: {device!r} requested but CUDA is not available (use cpu or auto)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MacqError(f"device: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    if kind == "mps":
        if not _mps_available():
            raise MacqError(f"device: {device!r} requested but MPS is not available (needs Apple silicon macOS)")
        return torch.device("mps")
    raise MacqError(f"device: {device!r} is not one of {', '.join(DEVICE_NAMES)}")


NO_FLOAT64 = ("mps",)   # device types without float64 tensors


def has_float64(device: torch.device) -> bool:
    """Whether ``device`` holds float64 tensors (MPS does not: code that reproduces another library's float64
    arithmetic bit for bit runs on the CPU there)."""
    return device.type not in NO_FLOAT64


def wide_float(device: torch.device) -> torch.dtype:
    """The dtype of running sums and solves that want more than float32: float64, except on a device without it
    (MPS), where float32 it is, as GPTQ's default precision has it anyway."""
    return torch.float64 if has_float64(device) else torch.float32


def synchronize(device: str | torch.device) -> None:
    """Block until queued work on ``device`` has finished (kernels are asynchronous on CUDA and MPS);
    a no-op on CPU, where every op has already run when it returns."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
