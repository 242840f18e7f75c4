"""Quantize a local checkpoint for a Core ML export without holding the model: streamed records on disk,
read back lazily, one chunk at a time.

The in-memory path loads the float model (4 bytes per weight in fp32: 4.6 GiB for a 1.2B-parameter model,
before any conversion) only to hand its records to an exporter that converts one chunk at a time. For a
weight method (RTN, NF4, FP4, palettization) the records do not depend on the rest of the model, so
:func:`macq.streaming.stream_quantize` writes them one tensor at a time (bit-identical to the in-memory
path's records) into a private directory beside the output, and :meth:`macq.qmodel.QuantizedModel.load`
reads them back on access: the export's peak then follows its largest chunk, whatever the model's size.
The directory is removed with the QuantizedModel that reads it (``weakref.finalize``: when it is garbage
collected, or at interpreter exit if an error kept it alive).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any


def streamable(model: str | None, method: str) -> Path | None:
    """The checkpoint directory when a Core ML export of ``model`` with ``method`` can quantize streamed
    (a weight method on a local safetensors checkpoint), else ``None`` (the caller quantizes in memory)."""
    from macq.quantizers import method_spec
    from macq.streaming import use_streaming

    if method_spec(method).kind != "weight":
        return None
    return use_streaming(model, method, None, calibrated=False)


def staged_quantization(src: Path, output: Path, method: str, cfg: Any, source: str, progress: bool = False,
                        trust_remote_code: bool = False):
    """A lazily loaded :class:`~macq.qmodel.QuantizedModel` of ``src`` quantized streamed into a temporary
    directory beside ``output`` (same file system; nothing at ``output`` is touched). The directory lives as
    long as the returned object."""
    from macq.pipeline import config_for
    from macq.qmodel import QuantizedModel
    from macq.streaming import stream_quantize

    if cfg is None or isinstance(cfg, dict):
        cfg = config_for(method, cfg or {})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.records-", dir=output.parent))
    try:
        stream_quantize(src, tmp / "q", method, cfg, source=source, progress=progress,
                        trust_remote_code=trust_remote_code)
        qm = QuantizedModel.load(tmp / "q")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(qm, shutil.rmtree, tmp, True)
    return qm
