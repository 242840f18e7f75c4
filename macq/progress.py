"""Progress: bars on a terminal; one plain line per step in logs, pipes and CI.

A job that runs for an hour must say where it is even when its output goes to a file (a bar drawn with
carriage returns is invisible there): off a terminal, every step prints ``description: i/N stage,
elapsed, ETA, peak RSS`` to stderr.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
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


class _Acc:
    """One stage's sums: wall and CPU seconds, matmul operations (those done in float64 also on their own)."""

    __slots__ = ("seconds", "cpu", "flops", "flops64")

    def __init__(self) -> None:
        self.seconds = self.cpu = self.flops = self.flops64 = 0.0

    def add(self, seconds: float, cpu: float, flops: float, flops64: float) -> None:
        self.seconds += seconds
        self.cpu += cpu
        self.flops += flops
        self.flops64 += flops64


class StageTimes:
    """Seconds and matmul operations per named stage (``hessian``, ``cholesky``, ``columns``, ``forward``,
    ``io`` ...), accumulated over a run and per layer. Methods mark their stages with :func:`stage` and charge
    the products they compute with :func:`add_flops`; module forwards (linears, attention) inside a stage are
    counted from their shapes by a forward hook that exists only while a timer is active. Nothing is timed,
    counted or synchronised unless a :class:`StageTimes` is active, so the in-memory path pays nothing.

    With ``probe`` the device's float32 GEMM rate (:func:`macq.perf.gemm_probe`) is measured on entry, and its
    float64 one (where the device has float64) the first time a stage with float64 products is rated; each
    stage's achieved rate is reported against them (:meth:`rates`, and the per-layer text)."""

    def __init__(self, device: str | None = None, probe: bool = False):
        self.device = device
        self.probe = probe
        self.probe32: tuple[float, float | None] | None = None   # (wall GFLOP/s, per CPU-second)
        self.probe64: tuple[float, float | None] | None = None
        self.run: dict[str, _Acc] = {}
        self.this_layer: dict[str, _Acc] = {}
        self._hook = None

    @property
    def total(self) -> dict[str, float]:
        """Seconds per stage over the run."""
        return {k: a.seconds for k, a in self.run.items()}

    @property
    def flops(self) -> dict[str, float]:
        """Counted operations per stage over the run (stages with none left out)."""
        return {k: a.flops for k, a in self.run.items() if a.flops}

    def add(self, name: str, seconds: float, flops: float = 0.0, cpu_seconds: float = 0.0,
            flops64: float = 0.0) -> None:
        for d in (self.run, self.this_layer):
            d.setdefault(name, _Acc()).add(seconds, cpu_seconds, flops, flops64)

    def _ideal(self, a: _Acc, cpu: bool) -> float | None:
        """Seconds the stage's products take at the probe's rates (float64 ones at the float64 rate)."""
        i = 1 if cpu else 0
        if a.flops64:
            self._measure64()
        p32 = self.probe32[i] if self.probe32 else None
        p64 = self.probe64[i] if self.probe64 else None
        if not p32 or (a.flops64 and not p64):
            return None
        return (a.flops - a.flops64) / (p32 * 1e9) + (a.flops64 / (p64 * 1e9) if a.flops64 else 0.0)

    def _rate_text(self, a: _Acc) -> str:
        if not a.flops or a.seconds <= 0:
            return ""
        text = f" {a.flops / a.seconds / 1e9:.1f} GFLOP/s"
        if self.probe32:
            text += f" {100 * a.flops / a.seconds / 1e9 / self.probe32[0]:.0f}% of probe"
        ideal = self._ideal(a, cpu=True)
        if ideal is not None and a.cpu > 0:
            import torch

            text += f" ({100 * ideal / (a.cpu / torch.get_num_threads()):.0f}% per CPU-s"
            text += ", float64 probe for its float64 part)" if a.flops64 else ")"
        return text

    def take_layer(self) -> str:
        """This layer's split as text (for the progress line: seconds, and where matmuls were counted the
        achieved GFLOP/s and its share of the probe's rate), then start the next layer's."""
        text = ", ".join(f"{k} {a.seconds:.1f}s{self._rate_text(a)}" for k, a in self.this_layer.items())
        self.this_layer = {}
        return text

    def rates(self) -> dict[str, object]:
        """The run's GEMM accounting. Per stage with counted products: GFLOP (``gflop_f64`` of them in
        float64), achieved GFLOP/s and its ratio to the float32 probe (``of_probe``), and ``of_machine``: the
        time those products take at the probe's rates (float64 ones at the float64 probe's) over the time the
        stage took, i.e. the share of the machine the stage used. On the CPU also per CPU-second
        (``cpu_gflop_s`` = GFLOP / (process CPU seconds / threads), ``of_probe_cpu``, ``of_machine_cpu``
        against the probes measured the same way): on a shared machine another process's load lowers the
        wall-clock rates, not these."""
        import torch

        threads = torch.get_num_threads()
        on_cpu = (self.device or "cpu") == "cpu"

        def r(x: float | None) -> float | None:   # 4 significant digits (tiny runs stay > 0)
            return None if x is None else float(f"{x:.4g}")

        stages: dict[str, dict[str, float | None]] = {}
        unrated: dict[str, dict[str, float]] = {}     # stages with no products to rate: their seconds only
        for k, a in self.run.items():
            if not a.flops:
                unrated[k] = {"seconds": round(a.seconds, 3), "cpu_seconds": round(a.cpu, 3)}
                continue
            rate = a.flops / a.seconds / 1e9 if a.seconds > 0 else 0.0
            ideal = self._ideal(a, cpu=False)
            row: dict[str, float | None] = {
                "gflop": r(a.flops / 1e9), "gflop_f64": r(a.flops64 / 1e9),
                "seconds": round(a.seconds, 3), "gflop_s": r(rate),
                "of_probe": r(rate / self.probe32[0]) if self.probe32 else None,
                "of_machine": r(ideal / a.seconds) if ideal is not None and a.seconds > 0 else None}
            if on_cpu and a.cpu > 0:
                busy = a.cpu / threads
                crate = a.flops / busy / 1e9
                ideal_cpu = self._ideal(a, cpu=True)
                row.update(cpu_seconds=round(a.cpu, 3), cpu_gflop_s=r(crate),
                           of_probe_cpu=r(crate / self.probe32[1]) if self.probe32 and self.probe32[1] else None,
                           of_machine_cpu=r(ideal_cpu / busy) if ideal_cpu is not None else None)
            stages[k] = row
        p32, p64 = self.probe32 or (None, None), self.probe64 or (None, None)
        return {"probe_gflop_s": r(p32[0]), "probe_cpu_gflop_s": r(p32[1]),
                "probe_f64_gflop_s": r(p64[0]), "probe_f64_cpu_gflop_s": r(p64[1]),
                "threads": threads, "device": self.device, "stages": stages, "unrated": unrated}

    def _measure64(self) -> None:
        """The float64 probe, measured the first time a stage with float64 products is rated (a run without
        any does not pay for it); MPS has no float64."""
        dev = self.device or "cpu"
        if self.probe and self.probe64 is None and not dev.startswith("mps"):
            import torch

            from macq.perf import gemm_probe

            self.probe64 = gemm_probe(dev, torch.float64)

    def __enter__(self) -> "StageTimes":
        import torch.nn as nn

        if self.probe and self.probe32 is None:
            from macq.perf import gemm_probe

            self.probe32 = gemm_probe(self.device or "cpu")
        if self._hook is None:
            self._hook = nn.modules.module.register_module_forward_hook(_count_forward)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _count_forward(module: object, args: tuple, output: object) -> None:
    """Global forward hook while a :class:`StageTimes` is active: each linear's / attention's matmuls go to
    the running stage."""
    if stage._stack and not getattr(module, "_macq_reused", False):   # a stored output costs nothing
        from macq.perf import module_flops

        n = module_flops(module, args, output)  # type: ignore[arg-type]
        if n:
            stage._stack[-1].flops += n


def add_flops(n: float, float64: bool = False) -> None:
    """Charge ``n`` floating-point operations (computed from the operands' shapes, e.g.
    :func:`macq.perf.matmul_flops`) to the innermost running :class:`stage`; ``float64`` marks products done
    in double precision (measured against the float64 probe too). Free when nothing is timed."""
    if _ACTIVE and stage._stack:
        st = stage._stack[-1]
        st.flops += n
        if float64:
            st.flops64 += n


@contextmanager
def with_backward() -> Iterator[None]:
    """Around a recomputed forward and its autograd backward: the backward's products are charged too.

    The forward hook counts the forward's products; autograd runs two for each (``Y = X·Wᵀ`` gives
    ``dX = dY·W`` and ``dW = dYᵀ·X``; attention's ``QKᵀ`` and ``PV`` give ``dQ, dK`` and ``dP, dV``), so twice
    the products counted inside the block are added when it ends. Exact when every linear's weight is
    differentiated, as in the Fisher and logits passes; a linear whose weight needs no gradient is
    over-counted by its ``dW``."""
    st = stage._stack[-1] if _ACTIVE and stage._stack else None
    before = st.flops if st is not None else 0.0
    yield
    if st is not None and stage._stack and stage._stack[-1] is st:
        add_flops(2 * (st.flops - before))


_ACTIVE: list[StageTimes] = []


class stage:  # noqa: N801 - used as a context manager, like contextlib's
    """``with stage("hessian"): ...`` adds the block's wall time to every active :class:`StageTimes` (the
    device is synchronised first, so asynchronous GPU kernels are charged to the stage that queued them).
    Nested stages are charged to the innermost one only (self time), so the stages add up to the wall time;
    operations counted inside (:func:`add_flops`, the forward hook) go to the innermost one too."""

    __slots__ = ("name", "t0", "c0", "inner", "inner_cpu", "flops", "flops64")
    _stack: list["stage"] = []

    def __init__(self, name: str):
        self.name = name
        self.t0 = self.c0 = 0.0
        self.inner = self.inner_cpu = 0.0
        self.flops = self.flops64 = 0.0

    def __enter__(self) -> None:
        if _ACTIVE:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            self.inner = self.inner_cpu = 0.0
            self.flops = self.flops64 = 0.0
            stage._stack.append(self)

    def __exit__(self, *exc: object) -> None:
        if not _ACTIVE or not stage._stack or stage._stack[-1] is not self:
            return
        dev = _ACTIVE[-1].device
        if dev and dev != "cpu":
            from macq.device import synchronize

            synchronize(dev)
        stage._stack.pop()
        dt, dc = time.perf_counter() - self.t0, time.process_time() - self.c0
        if stage._stack:
            stage._stack[-1].inner += dt
            stage._stack[-1].inner_cpu += dc
        for t in _ACTIVE:
            t.add(self.name, dt - self.inner, self.flops, dc - self.inner_cpu, self.flops64)
