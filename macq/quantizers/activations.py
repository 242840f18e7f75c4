"""Calibration activations between decoder layers, for the streaming calibrated engine: stored in a chosen
dtype (fp16 by default), held in memory up to a byte budget (``--max-memory``), spilled to disk beyond it.

Why a store and not a list: a 7B model's hidden states over 32x512 calibration tokens are 256 MiB in float32
per copy, and the engine holds two (the current layer's inputs and the outputs it is producing); at 128x2048
that is 8 GiB. In fp16 they take half; above the budget, batches go to raw files in a spill directory beside
the output and are read back one batch at a time, so memory holds one batch of them.

Exactness: the engine computes in float32. Storing in float32 (``--act-dtype float32``) keeps every value,
so the streamed records equal the in-memory path's bit for bit. float16 rounds each stored hidden state to
11 significant bits (relative error <= 2^-11), once per layer boundary: the next layer's statistics and
inputs differ by that rounding, which can move a weight to the neighbouring grid point where GPTQ / AWQ sit
near a tie. A batch holding a value beyond fp16's range (|x| > 65504, the "massive activations" of some
models) is kept in float32 rather than turned into inf (counted in ``overflow_batches``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError

ACT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """``"4GiB"`` / ``"512MiB"`` / ``"1.5G"`` / ``"2GB"`` / ``"1000000"`` -> bytes (K/M/G/T and KiB.. binary,
    KB/MB/GB decimal)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise MacqError(f"{flag} {text!r}: expected a size such as 4GiB, 512MiB, 2GB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class StreamOptions:
    """Options of the streaming calibrated engine, as config fields so they are generated flags of exactly the
    methods that stream (:mod:`macq.options`) and are recorded in the manifest."""

    max_memory: str = field(default="", metadata={
        "help": "streamed calibration: most bytes of calibration activations held in memory, e.g. 4GiB or "
                "512MiB (beyond it they spill to a temp dir beside the output); default: no limit"})
    # float32 by default: the streamed records are then the in-memory path's bit for bit, so every quality table
    # holds for the streamed path. Activations are small next to one decoder layer (32x512 tokens at hidden 4096:
    # 256 MiB in float32), and --max-memory spills them anyway; float16 halves them but moves GPTQ's codes (on
    # SmolLM2 GPTQ 4-bit g64: wiki ppl 26.56 vs 25.45, within a calibration seed's spread, 27.72).
    act_dtype: str = field(default="float32", metadata={
        "help": "streamed calibration: dtype of the activations stored between layers, float32|float16|bfloat16 "
                "(float32, the default, gives the in-memory path's records bit for bit; float16 halves them)"})

    device: str = field(default="cpu", metadata={
        "help": "cpu|cuda|cuda:N|mps|auto: where each decoder layer is calibrated and quantized (its forwards, "
                "statistics and the method's solves); activations between layers stay in CPU memory"})

    def check_stream_options(self) -> None:
        if str(self.device).split(":")[0] not in ("cpu", "cuda", "mps", "auto"):
            raise MacqError(f"--device {self.device}: expected cpu, cuda, cuda:N, mps or auto")
        if self.act_dtype not in ACT_DTYPES:
            raise MacqError(f"--act-dtype {self.act_dtype}: expected one of {', '.join(ACT_DTYPES)}")
        if self.max_memory:
            parse_size(self.max_memory)

    def stream_refusal(self) -> str:
        """Why this configuration cannot run on the streamed path ('' = it can). A method whose option needs the
        whole model at once (gradients through every layer, a logits stage) overrides this; the CLI then keeps it
        in memory by default and refuses an explicit ``--stream`` with this text, before any weight is read."""
        return ""

    @property
    def max_memory_bytes(self) -> int | None:
        return parse_size(self.max_memory) if self.max_memory else None


@dataclass
class Budget:
    """Bytes of activations held in memory, shared by the stores alive at once; counts what spilled."""

    limit: int | None
    spill_parent: Path
    spill_prefix: str = ".macq-acts-"
    used: int = 0
    peak: int = 0
    spilled_batches: int = 0
    spilled_bytes: int = 0
    overflow_batches: int = 0
    spill_dir: Path | None = None
    _n: int = field(default=0, repr=False)

    def take(self, n: int) -> bool:
        if self.limit is not None and self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def new_file(self) -> Path:
        if self.spill_dir is None:
            self.spill_parent.mkdir(parents=True, exist_ok=True)
            self.spill_dir = Path(tempfile.mkdtemp(prefix=self.spill_prefix, dir=self.spill_parent))
        self._n += 1
        return self.spill_dir / f"{self._n:06d}.bin"

    def cleanup(self) -> None:
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def summary(self) -> dict[str, Any]:
        return {"limit_bytes": self.limit, "peak_in_memory_bytes": self.peak, "spilled_batches": self.spilled_batches,
                "spilled_bytes": self.spilled_bytes, "overflow_batches": self.overflow_batches}


@dataclass
class _OnDisk:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class ActivationStore(Sequence):
    """Hidden states of every calibration batch (one entry per batch), read back as float32 CPU tensors:
    it stands in for the ``hidden`` list of :class:`~macq.quantizers.calibration.LayerInputs`."""

    def __init__(self, dtype: torch.dtype, budget: Budget):
        self.dtype = dtype
        self.budget = budget
        self._items: list[torch.Tensor | _OnDisk] = []
        self._held = 0

    def append(self, t: torch.Tensor) -> None:
        s = t.detach().to("cpu", self.dtype)
        if self.dtype != torch.float32 and bool(torch.isinf(s).any()) and bool(torch.isfinite(t).all()):
            s = t.detach().to("cpu", torch.float32)   # beyond the dtype's range: keep it exact, not inf
            self.budget.overflow_batches += 1
        n = s.numel() * s.element_size()
        if self.budget.take(n):
            self._held += n
            self._items.append(s)
            return
        path = self.budget.new_file()
        with open(path, "wb") as f:
            f.write(s.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.budget.spilled_batches += 1
        self.budget.spilled_bytes += n
        self._items.append(_OnDisk(path, tuple(s.shape), s.dtype))

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        item = self._items[i]
        if isinstance(item, _OnDisk):
            out = torch.empty(item.shape, dtype=item.dtype)
            buf = out.reshape(-1).view(torch.uint8).numpy()
            with open(item.path, "rb", buffering=0) as f:
                if f.readinto(buf) != buf.nbytes:
                    raise MacqError(f"{item.path}: spilled activations truncated")
            item = out
        return item.float()

    def __len__(self) -> int:
        return len(self._items)

    def release(self) -> None:
        """Forget every batch: memory back to the budget, spill files deleted."""
        for item in self._items:
            if isinstance(item, _OnDisk):
                item.path.unlink(missing_ok=True)
        self.budget.give(self._held)
        self._held = 0
        self._items = []
