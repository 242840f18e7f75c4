"""All-or-nothing output directories: build in a temp dir beside the target, rename at the end.

Every writer in macq (quantization dirs, MLX exports, Core ML packages, the cached default model) goes
through :func:`atomic_dir`, so a failure at any point leaves neither a half-written output nor a temp dir.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp dir; on success it becomes ``target`` (replacing an existing one if ``replace``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix: some writers insist on it (coremltools: ".mlpackage")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise FileExistsError(target)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
