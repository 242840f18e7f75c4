"""Run a Core AI export (one asset, or chunks chained by their manifest) token by token in the Core AI runtime.

``coreai.authoring.asset.AIModelAsset.executable()`` is the one loading path on both platforms:

* Linux: the runtime cannot load an ``.aimodel`` directly (``AIModel.load`` looks for ``main-unspecialized.odix``
  or ``program.odix`` and fails with "No such file or directory"), and compute-unit specialization is macOS-only.
  ``executable()`` lowers the asset's program to ODIX (``compile_to_binary``) in a temporary ``.aimodelx`` and
  loads that: the runtime's own CPU path, fed the asset's stored weights. This is a real execution of the saved
  program (not a re-implementation); its timings are Linux CPU timings, not Apple-device latency.
* macOS 27 (``sys.platform == "darwin"``): the OS runtime loads the asset itself, specialised with
  ``SpecializationOptions.from_preferred_compute_unit_kind`` for the export's ``hardware`` (``neural_engine``,
  ``gpu``; ``any`` = the runtime's default), so ``eval`` / ``generate`` / latency measure the device.

Each layer chunk holds one KV state (``key_cache`` / ``value_cache`` NDArrays) that its ``prefill`` and ``decode``
functions read and write in place. Token feeding, padding of a short prefill block, perplexity windows and greedy
generation are the Core ML ANE runner's (:class:`converters.ane_runner.AneSession`), shared by subclassing.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np

from converters.ane_runner import AneSession, Timing, generate_ane, predict_ane
from coreai_backend.export import STATES, read_manifest
from coreai_backend.options import HARDWARE
from macq.errors import MacqError


def specialization(hardware: str):
    """macOS: the runtime's specialization options for ``hardware``; elsewhere ``None`` (not available)."""
    if sys.platform != "darwin":
        return None
    from coreai.runtime import ComputeUnitKind, SpecializationOptions  # pragma: no cover - macOS only

    if hardware == "neural_engine":  # pragma: no cover - macOS only
        return SpecializationOptions.from_preferred_compute_unit_kind(ComputeUnitKind.neural_engine())
    if hardware == "gpu":  # pragma: no cover - macOS only
        return SpecializationOptions.from_preferred_compute_unit_kind(ComputeUnitKind.gpu())
    return SpecializationOptions.default()  # pragma: no cover - macOS only


class CoreAISession(AneSession):
    """:class:`~converters.ane_runner.AneSession`'s interface over Core AI assets (``backend="coreai"``)."""

    def __init__(self, path: str | Path, hardware: str | None = None):
        from coreai.authoring.asset import AIModelAsset

        self.manifest, root = read_manifest(path)
        hardware = hardware or self.manifest.extra.get("hardware", "any")
        if hardware not in HARDWARE:
            raise MacqError(f"--hardware {hardware!r}: expected one of {', '.join(HARDWARE)}")
        self.backend, self.compute_units = "coreai", hardware
        self.paths = [root / c.path for c in self.manifest.chunks]
        self.context, self.block = self.manifest.context, self.manifest.prefill_len
        self.notes = [] if sys.platform == "darwin" else [
            "Core AI runtime on Linux (asset lowered to ODIX, CPU): numbers check the saved program; "
            "latency is not Apple-device latency"]
        self._loop = asyncio.new_event_loop()
        self._stack = AsyncExitStack()
        opts = specialization(hardware)
        self.functions = []
        try:
            for p in self.paths:
                model = self._await(self._stack.enter_async_context(AIModelAsset.load(p).executable(opts)))
                self.functions.append({fn: model.load_function(fn) for fn in self.manifest.functions})
        except BaseException:
            self.close()
            raise
        self.timing = Timing()
        self.reset()

    def _await(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        """Release the loaded models (and, on Linux, their temporary ODIX folders)."""
        if not self._loop.is_closed():
            self._await(self._stack.aclose())
            self._loop.close()

    def __enter__(self) -> "CoreAISession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        from coreai.runtime import NDArray

        self.pos = 0
        self.states = []
        for fns, c in zip(self.functions, self.manifest.chunks):
            if c.stop == c.start:
                self.states.append(None)
                continue
            d = fns["decode"].desc
            self.states.append({n: NDArray(np.zeros(d.state_descriptor(n).shape, dtype=np.float16))
                                for n in d.state_names})

    def _call(self, i: int, fn: str, feed: dict) -> dict:
        from coreai.runtime import NDArray

        f = self.functions[i][fn]
        inputs = {k: NDArray(np.ascontiguousarray(v)) for k, v in feed.items()}
        out = self._await(f(inputs, self.states[i] or {}))
        return {k: v.numpy() for k, v in out.items()}


def predict_coreai(path: str | Path, token_ids: np.ndarray, hardware: str | None = None, **kw):
    """Perplexity (and KL / top-1 with ``reference``) of a Core AI export over macq's evaluation windows: the
    arguments of :func:`converters.ane_runner.predict_ane` (``prefill``, ``decode``, ``context``, ``stride``,
    ``reference``)."""
    with CoreAISession(path, hardware) as s:
        return predict_ane(path, token_ids, session=s, **kw)


def generate_coreai(path: str | Path, prompt_ids: np.ndarray, max_tokens: int, eos: int | None = None,
                    hardware: str | None = None) -> tuple[list[int], Timing]:
    """Greedy continuation through the Core AI runtime (prompt via ``prefill``, new tokens via ``decode``)."""
    with CoreAISession(path, hardware) as s:
        return generate_ane(path, prompt_ids, max_tokens, eos, session=s)


__all__ = ["STATES", "CoreAISession", "generate_coreai", "predict_coreai", "specialization"]
