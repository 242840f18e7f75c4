"""The bottom of the Core ML backend: importing coremltools quietly, loading a saved package's MIL program,
sizes on disk. Everything else in :mod:`converters` imports from here, and this imports nothing of theirs,
so ``convert`` → ``inspect`` → ``ane_report`` → ``mil_io`` stays a chain, not a cycle.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def quiet_ct():
    """Import coremltools with its known-harmless version warnings silenced (see shared/PLATFORM.md)."""
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def load_program(path: str | Path):
    """The pymil Program of a saved ML Program package (no Core ML runtime needed), and its spec."""
    ct = quiet_ct()
    from coremltools.converters.mil.frontend.milproto.load import load

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, str(weights)), spec


def release_memory() -> None:
    """Collect garbage, then hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere). Between the chunks of an export, the previous chunk's many small allocations (MIL ops, proto
    messages) leave free but fragmented heap that glibc would otherwise keep: measured ~170 MiB of RSS
    carried into every later chunk of the Llama-3.2-1B-shaped export."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc (e.g. musl): nothing to trim
            pass


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main_function(prog, spec=None) -> str:
    """``main`` for a single-function program, else the default function of a multifunction one."""
    if "main" in prog.functions:
        return "main"
    name = spec.description.defaultFunctionName if spec is not None else ""
    return name if name in prog.functions else sorted(prog.functions)[0]


def function_description(spec, name: str | None = None):
    """The input/output/state description of function ``name`` (the model's own for single-function specs)."""
    d = spec.description
    if not len(d.functions):
        return d
    name = name or d.defaultFunctionName
    return next(f for f in d.functions if f.name == name)
