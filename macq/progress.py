"""Progress: bars on a terminal; one plain line per step in logs, pipes and CI.

A job that runs for an hour must say where it is even when its output goes to a file (a bar drawn with
carriage returns is invisible there): off a terminal, every step prints ``description: i/N stage,
elapsed, ETA, peak RSS`` to stderr.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _peak_rss_gib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 2**30 if sys.platform == "darwin" else r / 2**20


def _device_peak() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f", peak cuda {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    except ImportError:  # pragma: no cover
        pass
    return ""


def log_line(description: str, done: int, total: int | None, stage: str, start: float) -> None:
    elapsed = time.monotonic() - start
    eta = f", ETA {elapsed / done * (total - done):.0f}s" if total and done else ""
    of = f"/{total}" if total else ""
    print(f"{description}: {done}{of} {stage}, elapsed {elapsed:.0f}s{eta}, peak RSS {_peak_rss_gib():.2f} GiB"
          f"{_device_peak()}", file=sys.stderr, flush=True)


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    if not sys.stderr.isatty():  # logs, pipes and CI: one line per finished step
        items = list(items) if total is None else items
        total = total if total is not None else len(items)  # type: ignore[arg-type]
        start = time.monotonic()
        for i, item in enumerate(items):
            yield item
            log_line(description, i + 1, total, "done", start)
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


class LayerLog:
    """Per-decoder-layer progress for loops that are not a simple iteration (streaming): call
    :meth:`layer` whenever work on a layer starts; a line is printed when a layer is finished."""

    def __init__(self, n_layers: int, description: str, enabled: bool = True):
        self.n = n_layers
        self.description = description
        self.enabled = enabled
        self.start = time.monotonic()
        self.current: int | None = None
        self.stage = ""

    def layer(self, index: int, stage: str) -> None:
        if index != self.current and self.current is not None:
            self._finish()
        self.current, self.stage = index, stage

    def _finish(self) -> None:
        if self.enabled and self.current is not None:
            log_line(f"{self.description} layer", self.current + 1, self.n, self.stage, self.start)

    def done(self) -> None:
        self._finish()
        self.current = None


class StageTimes:
    """Seconds per named stage (``hessian``, ``cholesky``, ``columns``, ``forward``, ``io`` ...), accumulated
    over a run and per layer. Methods mark their stages with :func:`stage`; nothing is timed (and nothing
    synchronised) unless a :class:`StageTimes` is active, so the in-memory path pays nothing."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.total: dict[str, float] = {}
        self.layer: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.total[name] = self.total.get(name, 0.0) + seconds
        self.layer[name] = self.layer.get(name, 0.0) + seconds

    def take_layer(self) -> str:
        """This layer's split as text (for the progress line), then start the next layer's."""
        text = " ".join(f"{k} {v:.1f}s" for k, v in self.layer.items())
        self.layer = {}
        return text

    def __enter__(self) -> "StageTimes":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)


_ACTIVE: list[StageTimes] = []


class stage:  # noqa: N801 - used as a context manager, like contextlib's
    """``with stage("hessian"): ...`` adds the block's wall time to every active :class:`StageTimes` (the
    device is synchronised first, so asynchronous GPU kernels are charged to the stage that queued them).
    Nested stages are charged to the innermost one only (self time), so the stages add up to the wall time."""

    __slots__ = ("name", "t0", "inner")
    _stack: list["stage"] = []

    def __init__(self, name: str):
        self.name = name
        self.t0 = 0.0
        self.inner = 0.0

    def __enter__(self) -> None:
        if _ACTIVE:
            self.t0 = time.perf_counter()
            self.inner = 0.0
            stage._stack.append(self)

    def __exit__(self, *exc: object) -> None:
        if not _ACTIVE or not stage._stack or stage._stack[-1] is not self:
            return
        dev = _ACTIVE[-1].device
        if dev and dev != "cpu":
            from macq.device import synchronize

            synchronize(dev)
        stage._stack.pop()
        dt = time.perf_counter() - self.t0
        if stage._stack:
            stage._stack[-1].inner += dt
        for t in _ACTIVE:
            t.add(self.name, dt - self.inner)
