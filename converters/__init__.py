"""Core ML (ML Program) exporter: record-exact constexpr weights, stateful KV cache, Linux graph checks.

Default graph: macq's own ANE-shaped Llama-family model (``ane_model``), fixed shapes, ``prefill`` + ``decode``
functions per package (``multifunction``), optionally chunked with a manifest (``chunks``, ``ane_export``),
run by ``ane_runner`` (Core ML on macOS, MIL value inference elsewhere). ``graph="hf"``: transformers'
model traced (``wrapper``), flexible shapes, the earlier path.

Public API: :func:`export_coreml`, :func:`inspect_mlpackage`, :func:`run_mil`, :func:`ane_report`,
:func:`predict_coreml` (macOS). coremltools is imported lazily, inside the functions that need it.
"""

from converters.convert import ExportResult
from converters.export import export_coreml


def inspect_mlpackage(path, loaded=None):
    from converters.inspect import inspect_mlpackage as _f

    return _f(path, loaded)


def run_mil(path, inputs, state=None, program=None):
    from converters.mil_runner import run_mil as _f

    return _f(path, inputs, state, program)


def ane_report(path, loaded=None):
    from converters.ane_report import ane_report as _f

    return _f(path, loaded)


__all__ = ["ExportResult", "export_coreml", "inspect_mlpackage", "run_mil", "ane_report"]
