"""All-or-nothing output directories: build in a temp dir beside the target, rename at the end.

Every writer in macq (quantization dirs, MLX exports, Core ML packages, the cached default model) goes
through :func:`atomic_dir`, so a failure (or SIGINT / SIGTERM, which the CLI turns into an exception) at
any point leaves neither a half-written output nor a temp dir.

Replacing an existing output (``--force``) is allowed only for something macq itself wrote, recognised by
the marker every writer leaves (:func:`macq_artifact`): ``--force`` must never delete a user's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from macq.errors import MacqError

# The Core ML spec (protobuf) stores user metadata keys as plain UTF-8 strings, so this key written by
# converters.convert._stamp_metadata is found by a byte search, with no coremltools import.
COREML_MARKER = b"macq.source"
COREML_SPEC = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def macq_artifact(path: str | Path) -> str | None:
    """``"macq"`` (quantization dir), ``"mlx"`` (MLX export), ``"mlpackage"`` (Core ML export) when ``path`` is
    an output macq wrote, else ``None``. Each writer leaves its marker: ``manifest.json`` with
    ``"format": "macq"``; a ``"macq"`` entry in the MLX ``config.json``; ``macq.source`` in the package metadata."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return None
    try:
        if (p / "manifest.json").is_file() and json.loads((p / "manifest.json").read_text()).get("format") == "macq":
            return "macq"
        if (p / "config.json").is_file() and isinstance(json.loads((p / "config.json").read_text()).get("macq"), dict):
            return "mlx"
        chunked = p / "coreml_manifest.json"  # a chunked Core ML export (converters.chunks writes it)
        if chunked.is_file() and json.loads(chunked.read_text()).get("format") == "macq-coreml-ane":
            return "mlpackage"
        spec = p / COREML_SPEC
        if p.suffix == ".mlpackage" and spec.is_file() and COREML_MARKER in spec.read_bytes():
            return "mlpackage"
    except (OSError, ValueError, AttributeError):
        return None
    return None


def check_output(path: str | Path, force: bool, flag: str = "--output") -> None:
    """Refuse, before any work, an output that cannot be written or must not be replaced."""
    p = Path(path)
    if p.is_symlink():
        raise MacqError(f"{flag} {p}: is a symbolic link; give a plain path")
    if p.exists() and not p.is_dir():
        raise MacqError(f"{flag} {p}: is an existing file; expected a directory path")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise MacqError(f"{flag} {p}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MacqError(f"{flag} {p}: {anc} is not writable")
    if p.exists():
        if not force:
            raise MacqError(f"{flag} {p} exists (pass --force to replace a macq output)")
        if macq_artifact(p) is None:
            raise MacqError(f"{flag} {p} exists and was not written by macq (no macq manifest/marker); "
                            "--force only replaces macq outputs")


@contextmanager
def atomic_dir(target: str | Path, replace: bool = True, owned_only: bool = True) -> Iterator[Path]:
    """Yield an empty temp dir; on success it becomes ``target``.

    An existing ``target`` is replaced only if ``replace`` and (unless ``owned_only=False``, for macq's own
    cache paths) it is a macq output; the check runs before the caller writes anything, and again before
    the swap. The old directory is renamed aside first, so ``target`` is never a half-deleted tree."""
    target = Path(target)

    def guard() -> None:
        if target.exists() or target.is_symlink():
            if not replace:
                raise FileExistsError(target)
            if owned_only:
                check_output(target, force=True, flag="output")

    guard()
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix: some writers insist on it (coremltools: ".mlpackage")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets the permissions of a plain mkdir
    old: Path | None = None
    try:
        yield tmp
        guard()
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.stem}.old-", dir=target.parent))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "x", target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
