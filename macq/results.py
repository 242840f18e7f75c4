"""One versioned result schema for every measured run, on every machine and runtime.

A run (``macq eval --out``, ``macq bench --out``, ``macq baseline --out``) is one JSON file that says
exactly what was measured where, so runs made on a Linux CPU, a lent CUDA machine and a Mac can be merged
by ``macq report`` without guessing:

* ``model``: id (what the user passed) and ``hash``, the sha256 of the *source float model's* weight
  files. Quantized variants of one model share the hash, so they may sit in one table; two different
  checkpoints that happen to share a name do not.
* ``method``: name and config (the quantizer's or reference library's own settings).
* ``runtime`` (torch, mlx, coreml, mil-graph-check, bnb, llm-compressor+torch, ...), ``device``
  (kind and human name, e.g. the CPU model or ``NVIDIA H200``), ``os``, ``libraries`` (versions).
* ``eval_text``: id (dataset, token count, window) and ``hash``, the sha256 of the token ids scored, so
  perplexities computed on different text (or with a different tokenizer) are never compared.
* ``metrics``: name -> ``{value, unit, stderr}``; ``layers``: optional per-layer weight comparison rows.

The file is written atomically (temp file + rename); :func:`load_run` rejects unknown schema versions
and malformed files with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from macq.errors import MacqError

SCHEMA = "macq.run"
SCHEMA_VERSION = 1
_LIBRARIES = ("macq", "torch", "transformers", "bitsandbytes", "mlx", "mlx-lm", "coremltools", "llmcompressor",
              "compressed-tensors", "gptqmodel", "numpy")


@dataclass
class Metric:
    """A measured value with its unit and, where the estimator has one, its standard error."""

    value: float | None
    unit: str
    stderr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": _num(self.value), "unit": self.unit, "stderr": _num(self.stderr)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metric":
        if not isinstance(d, dict) or "unit" not in d or "value" not in d:
            raise MacqError(f"run file: metric {d!r} needs 'value' and 'unit'")
        return cls(value=d["value"], unit=str(d["unit"]), stderr=d.get("stderr"))


def _num(x: float | None) -> float | None:
    """JSON has no NaN/inf: store them as null (unknown), never as a number that could be plotted."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class RunResult:
    model_id: str
    model_hash: str | None
    method: str
    runtime: str
    device_kind: str                       # cpu | cuda | mps | ane | gpu ...
    device_name: str
    eval_text_id: str | None = None
    eval_text_hash: str | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    os: str = ""
    libraries: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    label: str = ""                        # short row label for tables (default: method @ runtime)

    def metric(self, name: str) -> float | None:
        m = self.metrics.get(name)
        return None if m is None else m.value

    def row_label(self) -> str:
        return self.label or f"{self.method} ({self.runtime})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": SCHEMA_VERSION, "created": self.created, "label": self.label,
            "model": {"id": self.model_id, "hash": self.model_hash},
            "method": {"name": self.method, "config": self.method_config},
            "runtime": self.runtime,
            "device": {"kind": self.device_kind, "name": self.device_name},
            "os": self.os, "libraries": dict(self.libraries),
            "eval_text": {"id": self.eval_text_id, "hash": self.eval_text_hash},
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "layers": [_plain(r) for r in self.layers],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise MacqError(f"run file: not a {SCHEMA} result (schema={d.get('schema') if isinstance(d, dict) else None!r})")
        if d.get("version") != SCHEMA_VERSION:
            raise MacqError(f"run file: schema version {d.get('version')!r} is not supported (this macq reads {SCHEMA_VERSION})")
        try:
            return cls(model_id=d["model"]["id"], model_hash=d["model"]["hash"], method=d["method"]["name"],
                       method_config=dict(d["method"].get("config") or {}), runtime=d["runtime"],
                       device_kind=d["device"]["kind"], device_name=d["device"]["name"],
                       eval_text_id=d["eval_text"]["id"], eval_text_hash=d["eval_text"]["hash"],
                       os=d.get("os", ""), libraries=dict(d.get("libraries") or {}),
                       metrics={k: Metric.from_dict(v) for k, v in (d.get("metrics") or {}).items()},
                       layers=list(d.get("layers") or []), notes=list(d.get("notes") or []),
                       created=d.get("created", ""), label=d.get("label", ""))
        except (KeyError, TypeError) as e:
            raise MacqError(f"run file: missing or malformed field {e}") from None


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return _num(x)
    if hasattr(x, "item") and callable(x.item):
        return _plain(x.item())
    return x


def save_run(run: RunResult, path: str | Path) -> Path:
    """Write ``run`` as JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not run.created:
        run.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(run.to_dict(), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_run(path: str | Path) -> RunResult:
    p = Path(path)
    if not p.is_file():
        raise MacqError(f"run file: {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MacqError(f"run file: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise MacqError(f"run file: {path} is not UTF-8 text (expected a macq.run JSON file)") from None
    except OSError as e:
        raise MacqError(f"run file: {path}: cannot read ({e.strerror or e})") from None
    return RunResult.from_dict(data)


# ------------------------------------------------------------------------------------------ identities
def hash_files(paths: list[Path]) -> str:
    """sha256 over (name, bytes) of each file in name order, streamed (a 538 MB checkpoint takes ~2 s)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def model_hash(model_dir: str | Path | None) -> str | None:
    """Hash of a float HF model directory's weight files (``*.safetensors``, else ``*.bin``); None if the
    directory is not local (a hub id that was never downloaded cannot be identified)."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    if d.is_file() and d.suffix == ".gguf":
        return hash_files([d])
    if not d.is_dir():
        return None
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    return hash_files(files) if files else None


def text_identity(ids, dataset: str, context: int, stride: int | None = None) -> tuple[str, str]:
    """``(id, hash)`` of an evaluation text: which text, how many tokens, which windows; the hash covers
    the token ids themselves (int64 little-endian), so it changes with the tokenizer too."""
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(ids, dtype="<i8").reshape(-1))
    stride_s = f",stride={stride}" if stride not in (None, context) else ""
    text_id = f"{dataset}:first {arr.size} tokens (eval split), context={context}{stride_s}"
    return text_id, "sha256:" + hashlib.sha256(arr.tobytes() + f"|{context}|{stride or context}".encode()).hexdigest()


def library_versions(names: tuple[str, ...] = _LIBRARIES) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            continue
    return out


def os_name() -> str:
    if platform.system() == "Darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(kind: str) -> str:
    """Human name of the device a measurement ran on: the CPU model, the CUDA card, or Apple's chip."""
    kind = kind.split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    if kind == "mps" or (kind in ("mlx", "gpu", "ane") and platform.system() == "Darwin"):
        return f"Apple {platform.machine()} ({platform.mac_ver()[0]})"
    return cpu_name()


def check_comparable(runs: list[RunResult]) -> None:
    """Refuse to put side by side runs of different source models or different evaluation text.
    Latency-only runs (no evaluation text) are exempt from the text check, not from the model check."""
    if not runs:
        raise MacqError("report: no runs given")
    base = runs[0]
    for r in runs if len(runs) > 1 else []:
        if r.model_hash is None:
            raise MacqError(f"report: {r.row_label()} records no model hash (its source was not a local model), "
                            "so it cannot be checked against the other runs")
    for r in runs[1:]:
        if r.model_hash != base.model_hash:
            raise MacqError(f"report: model hash differs: {base.row_label()} has {base.model_hash} "
                            f"({base.model_id}), {r.row_label()} has {r.model_hash} ({r.model_id})")
    texts = [r for r in runs if r.eval_text_hash is not None]
    for r in texts[1:]:
        if r.eval_text_hash != texts[0].eval_text_hash:
            raise MacqError(f"report: evaluation text differs: {texts[0].row_label()} used {texts[0].eval_text_id!r}, "
                            f"{r.row_label()} used {r.eval_text_id!r} ({texts[0].eval_text_hash} vs {r.eval_text_hash})")
