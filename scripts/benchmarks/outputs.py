"""A benchmark's outputs: checked before any work, written by rename, marked as this project's.

``--json``: a path that holds a file these scripts did not write is refused, even with ``--force``. So is one
they wrote, unless ``--force`` is given (or the script merges into its own file). The file names its schema
(``macq.bench/<script>``), which is how a later run knows it wrote the file; a script's rows are stored under
``"rows"``. A scratch directory whose rows' files a script deletes (``--out``) must be new or one a benchmark
made (its marker file says so). Bad input ends in one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_force(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--force", action="store_true", help="replace a --json file a benchmark wrote")


def check_json(path: str | Path | None, force: bool, inputs: tuple = (), merge: bool = False) -> None:
    """Refuse ``path`` before any work unless it is new, or a benchmark's own file and ``force`` (or ``merge``)."""
    if path is None:
        return
    from macq.atomic import guard_output, macq_file
    from macq.errors import MacqError

    try:
        if not (merge and macq_file(path)):
            guard_output(path, force or merge, inputs=inputs, flag="--json", kind="file")
    except MacqError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_scratch(path: str | Path, kind: str, inputs: tuple = (), flag: str = "--out") -> None:
    """Refuse, before any work, a scratch directory a benchmark of this ``kind`` did not make; then make it (or
    keep it) and mark it as that benchmark's."""
    from macq.atomic import guard_output, macq_artifact, write_marker
    from macq.errors import MacqError

    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink() and macq_artifact(p) != kind:
            raise MacqError(f"{flag} {p} exists and is not a scratch directory this benchmark made; "
                            "choose another path")
        guard_output(p, True, inputs=inputs, flag=flag, resume=kind)   # links, files, inputs, permissions
    except MacqError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    p.mkdir(parents=True, exist_ok=True)
    write_marker(p, kind)


def write_json(path: str | Path, script: str, data: dict[str, Any] | list, indent: int = 1) -> None:
    """``data`` (a list becomes ``{"rows": data}``) with its schema, by rename: a reader never sees half a file."""
    from macq.atomic import atomic_file

    body = {"rows": data} if isinstance(data, list) else dict(data)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"schema": f"macq.bench/{script}", **body}, indent=indent, default=str))
