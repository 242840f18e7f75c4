"""The one output guard, and all-or-nothing writes: build in a temp path beside the target, rename at the end.

Every command that writes (quantize, export, bench, analyze, report, ``--out`` run files, ``--plot`` PNGs,
prepare-model) checks its output with :func:`guard_output` before any slow work, and writes through
:func:`atomic_dir` / :func:`atomic_file`, so a failure (or SIGINT / SIGTERM, which the CLI turns into an
exception) at any point leaves neither a half-written output nor a temp file.

The rules, one place for all of them:

* an existing output is refused unless ``--force``;
* ``--force`` replaces only something macq wrote, recognised by the mark every writer leaves
  (:func:`macq_artifact` for directories, :func:`macq_file` for single files): never a user's file;
* an output that equals, contains or lies inside any input is refused, ``--force`` or not: replacing it
  would delete the input, and writing into it would change it;
* symbolic links are refused as outputs (what they point to is not the path the user named).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from macq.errors import MacqError

# The Core ML spec (protobuf) stores user metadata keys as plain UTF-8 strings, so this key written by
# converters.convert._stamp_metadata is found by a byte search, with no coremltools import.
COREML_MARKER = b"macq.source"
COREML_SPEC = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
# Directories of macq's own that have no format of their own (bench matrix, analysis, report) carry this file.
MARKER = ".macq-output"
# PNGs macq writes carry this tEXt chunk (matplotlib's ``metadata={"Software": ...}``).
PNG_SOFTWARE = "macq"


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def macq_artifact(path: str | Path) -> str | None:
    """What kind of macq output the directory ``path`` is (``"macq"``, ``"mlx"``, ``"mlpackage"``, ``"coreai"``,
    or the kind named in its :data:`MARKER` file), else ``None``. Each writer leaves its mark: ``manifest.json``
    with ``"format": "macq"``; a ``"macq"`` entry in the MLX ``config.json``; ``macq.source`` in a Core ML
    package's metadata; a chunked export's manifest; a ``.macq-output`` file."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return None
    try:
        if (p / MARKER).is_file():
            kind = _json(p / MARKER)
            return str(kind.get("kind", "output")) if isinstance(kind, dict) else None
        if (p / "manifest.json").is_file() and _json(p / "manifest.json").get("format") == "macq":
            return "macq"
        if (p / "config.json").is_file() and isinstance(_json(p / "config.json").get("macq"), dict):
            return "mlx"
        chunked = p / "coreml_manifest.json"  # a chunked Core ML export (converters.chunks writes it)
        if chunked.is_file() and _json(chunked).get("format") == "macq-coreml-ane":
            return "mlpackage"
        spec = p / COREML_SPEC
        if p.suffix == ".mlpackage" and spec.is_file() and COREML_MARKER in spec.read_bytes():
            return "mlpackage"
        chunked_ai = p / "coreai_manifest.json"   # a chunked Core AI export (coreai_backend writes it)
        if chunked_ai.is_file() and _json(chunked_ai).get("format") == "macq-coreai":
            return "coreai"
        meta = p / "metadata.json"   # a Core AI asset: macq stamps "macq.coreai" in its creator metadata
        if p.suffix == ".aimodel" and meta.is_file() and \
                "macq.coreai" in (_json(meta).get("creatorDefinedMetadata") or {}):
            return "coreai"
    except (OSError, ValueError, AttributeError):
        return None
    return None


def macq_file(path: str | Path) -> bool:
    """True when the single file ``path`` is one macq writes: a run / bench / analysis JSON (a ``schema`` or
    ``format`` naming macq) or a PNG whose ``Software`` text chunk says macq."""
    p = Path(path)
    if not p.is_file() or p.is_symlink():
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
        if head.startswith(b"\x89PNG"):
            return b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head
        if p.suffix == ".json":
            d = _json(p)
            return isinstance(d, dict) and str(d.get("schema", d.get("format", ""))).startswith("macq")
    except (OSError, ValueError):
        return False
    return False


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (after resolving links and ``..``)."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def guard_output(path: str | Path, force: bool, *, inputs: Iterable[str | Path | None] = (), flag: str = "--output",
                 kind: str = "dir", resume: str | None = None) -> None:
    """Refuse, before any work, an output that cannot be written or must not be replaced.

    ``kind``: ``"dir"`` or ``"file"``. ``inputs``: every path the command reads (``None`` entries and names
    that are not local paths, e.g. hub ids, are skipped). ``resume``: a directory kind (its marker) that may be
    written into without ``--force`` (a resumable bench)."""
    p = Path(path)
    if str(path) == "":
        raise MacqError(f"{flag}: empty path")
    if p.is_symlink():
        raise MacqError(f"{flag} {p}: is a symbolic link; give a plain path")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise MacqError(f"{flag} {p}: is an existing file; expected a directory path")
    if kind == "file" and p.is_dir():
        raise MacqError(f"{flag} {p}: is a directory; expected a file path")
    out = p.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        s = Path(src).resolve()
        if _inside(out, s) or _inside(s, out):
            rel = "is" if out == s else "contains" if _inside(s, out) else "lies inside"
            raise MacqError(f"{flag} {p}: {rel} the input {src}; write the output elsewhere")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise MacqError(f"{flag} {p}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise MacqError(f"{flag} {p}: {anc} is not writable")
    if not p.exists():
        return
    if kind == "file":
        if not macq_file(p):
            raise MacqError(f"{flag} {p} exists and is not a file macq wrote; choose another path"
                            + ("" if force else " (--force only replaces macq's own files)"))
        if not force:
            raise MacqError(f"{flag} {p} exists (pass --force to replace it)")
        return
    if not os.access(p, os.W_OK | os.X_OK):
        raise MacqError(f"{flag} {p}: is not writable")
    owner = macq_artifact(p)
    if resume is not None and owner == resume and not force:
        return
    if owner is None:
        raise MacqError(f"{flag} {p} exists and was not written by macq (no macq manifest/marker); "
                        "--force only replaces macq outputs")
    if not force:
        raise MacqError(f"{flag} {p} exists (pass --force to replace a macq output)")


def check_output(path: str | Path, force: bool, flag: str = "--output") -> None:
    """:func:`guard_output` for a directory output with no inputs to protect."""
    guard_output(path, force, flag=flag)


def write_marker(directory: Path, kind: str) -> None:
    """Mark a directory macq wrote that has no format of its own, so ``--force`` may replace it later."""
    (directory / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


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
                guard_output(target, force=True, flag="output")

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


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temp file path beside ``target`` (same suffix); on success it replaces ``target`` in one rename.
    The caller has guarded ``target`` (:func:`guard_output` with ``kind="file"``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
