"""A quantized model: records per module + the float tensors of everything else + the HF config.

This is what ``macq quantize -o DIR`` writes and what both exporters read. It is self-contained:
transforms that change float weights (AWQ / SmoothQuant scale folding into norms) are captured in the
float tensors, so an exporter needs nothing but this object.

On disk (``DIR``): ``config.json`` + tokenizer files (HF), ``manifest.json`` (method, per-record meta,
activation quantization, tied weights), ``records.safetensors`` (``{module}.{field}``), and
``float.safetensors`` (all other parameters and persistent buffers). Either may be a sharded set
(``records-00001-of-00004.safetensors`` ... plus ``records.safetensors.index.json``, as written by the
streaming quantizer, :mod:`macq.streaming`). :meth:`QuantizedModel.load` is lazy: records and float tensors
are read from disk when first accessed, so an exporter can walk an 8B quantization one tensor at a time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from macq.atomic import atomic_dir
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, set_weight, tied_embeddings
from macq.record import Record, bits_per_weight, check_stored, record_from_tensors
from macq.shards import ShardWriter, TensorStore

FORMAT_VERSION = 1
RECORD_FIELDS = ("codes", "scales", "zeros", "biases", "indices", "lut", "dq_codes", "dq_code_lut", "dq_absmax",
                 "outlier_pos", "outlier_values")
SHARD_BYTES = 2 << 30


class LazyRecords(Mapping):
    """``{module: record}`` read from a (sharded) records store on access; nothing is cached, so walking
    it holds one record at a time."""

    def __init__(self, metas: dict[str, dict[str, Any]], store: TensorStore, where: str | Path = "records"):
        self.metas = metas
        self.store = store
        self.where = where

    def check_headers(self) -> None:
        """Every manifest entry against its stored tensors' shapes and dtypes (safetensors headers only, no
        tensor data): a lie in ``bits``, ``group_size``, ``shape`` or the layout is refused at load, naming
        the record, before any work."""
        if not isinstance(self.metas, dict):
            raise MacqError(f"{self.where}/manifest.json: records is {type(self.metas).__name__}, expected an object")
        for name, meta in self.metas.items():
            keys = [f"{name}.{f}" for f in RECORD_FIELDS if f"{name}.{f}" in self.store]
            try:
                check_stored(meta, {k[len(name) + 1:]: (self.store.shape(k), self.store.dtype(k)) for k in keys})
            except MacqError as e:
                raise MacqError(f"{Path(self.where) / 'manifest.json'}: record {name}: {e}") from None

    def __getitem__(self, name: str) -> Record:
        meta = self.metas[name]
        keys = [f"{name}.{f}" for f in RECORD_FIELDS if f"{name}.{f}" in self.store]
        where = self.store.path_of(keys[0]) if keys else self.where
        try:  # records validate themselves (range, dtype, finiteness) as they are built, i.e. as read
            return record_from_tensors(meta, {k[len(name) + 1:]: self.store[k] for k in keys})
        except MacqError as e:
            raise MacqError(f"{where}: record {name}: {e}") from None
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, ArithmeticError, AttributeError) as e:
            raise MacqError(f"{where}: record {name} is incomplete or malformed ({e!s:.120})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.metas)

    def __len__(self) -> int:
        return len(self.metas)

    def __contains__(self, name: object) -> bool:
        return name in self.metas


def write_records(writer: ShardWriter, name: str, rec: Record) -> None:
    """One record's tensors as ``{module}.{field}`` (codes/indices bit-packed)."""
    for f, t in rec.to_tensors().items():
        writer.add(f"{name}.{f}", t)


@dataclass
class QuantizedModel:
    records: Mapping[str, Record]                 # dict, or LazyRecords when loaded from disk
    float_tensors: Mapping[str, torch.Tensor]     # dict, or a lazy TensorStore when loaded from disk
    config: Any                                   # transformers PretrainedConfig
    method: dict[str, Any] = field(default_factory=dict)
    act_quant: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> {"bits":8,"mode":"per_token"}
    tied: dict[str, str] = field(default_factory=dict)                  # lm_head -> embed (shares the record)
    source: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, records: dict[str, Record], method: dict[str, Any] | None = None,
                   act_quant: dict[str, dict[str, Any]] | None = None, source: str = "") -> "QuantizedModel":
        """Capture ``model``'s current float state (after any folding) minus the quantized weights."""
        from macq.arch import arch_spec

        spec = arch_spec(model)
        tied: dict[str, str] = {}
        if tied_embeddings(model) and spec.embed in records:
            tied[spec.lm_head] = spec.embed
        skip = {f"{name}.weight" for name in records} | {f"{k}.weight" for k in tied}
        floats = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in skip}
        for name, rec in records.items():
            mod = model.get_submodule(name)
            if rec.transposed != is_conv1d(mod):
                raise MacqError(f"record {name}: transposed={rec.transposed} but module is "
                                f"{'Conv1D' if is_conv1d(mod) else type(mod).__name__}")
        return cls(records=dict(records), float_tensors=floats, config=model.config, method=dict(method or {}),
                   act_quant=dict(act_quant or {}), tied=tied, source=source)

    # ------------------------------------------------------------------ metrics
    def n_quantized_weights(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.records.values())

    def bits_per_weight(self) -> float:
        """Average over quantized weights, all metadata charged."""
        n = self.n_quantized_weights()
        return sum(r.storage_bits() for r in self.records.values()) / n if n else 16.0

    def layer_bits(self) -> dict[str, float]:
        return {k: bits_per_weight(r) for k, r in self.records.items()}

    def nbytes(self, float_bytes: int = 2) -> int:
        """Deployed size: records at their storage rate + every float tensor at ``float_bytes`` each."""
        rec = sum((r.storage_bits() + 7) // 8 for r in self.records.values())
        flt = sum(t.numel() * float_bytes for t in self.float_tensors.values() if t.is_floating_point())
        return rec + flt

    # ------------------------------------------------------------------ back to torch
    def to_torch(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
        """An HF model carrying the dequantized weights (and activation fake-quant hooks, if any)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(dict(self.float_tensors), strict=False)
        if unexpected:
            raise MacqError(f"float tensors not in the model: {unexpected[:3]}")
        held = {f"{k}.weight" for k in self.records} | {f"{k}.weight" for k in self.tied}
        lost = [k for k in missing if k not in held and not (tied_embeddings(model) and k.endswith("lm_head.weight"))]
        lost = [k for k in lost if not k.endswith("rotary_emb.inv_freq")]
        if lost:
            raise MacqError(f"quantized model lacks float tensor {lost[0]} (+{len(lost) - 1} more); "
                            "it would be left at random init")
        self.apply_to(model)
        if tied_embeddings(model):
            model.tie_weights()
        model.to(dtype=dtype, device=device).eval()
        if self.act_quant:
            from macq.act_runtime import install_act_quant
            install_act_quant(model, self.act_quant)
        return model

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Write every record's dequantized weight into ``model`` (in place)."""
        for name, rec in self.records.items():
            set_weight(model.get_submodule(name), rec.dequantize(torch.float32))
        return model

    # ------------------------------------------------------------------ disk
    def manifest(self) -> dict[str, Any]:
        return {"format": "macq", "version": FORMAT_VERSION, "source": self.source, "method": self.method,
                "bits_per_weight": self.bits_per_weight(), "tied": self.tied, "act_quant": self.act_quant,
                "records": {k: r.meta() for k, r in self.records.items()}}

    def save(self, path: str | Path, tokenizer=None, force: bool = False) -> Path:
        """Write atomically through :class:`QuantDirWriter` (a temp dir beside ``path``, renamed at the end)."""
        path = Path(path)
        if path.exists() and not force:
            raise MacqError(f"output: {path} exists (pass --force to overwrite)")
        with QuantDirWriter.create(path, self.config, source=self.source, tokenizer=tokenizer) as w:
            for k, r in self.records.items():
                w.add_record(k, r)
            for k, t in self.float_tensors.items():
                w.add_float(k, t)
            w.close(self.method, tied=self.tied, act_quant=self.act_quant)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantizedModel":
        """Read a quantization dir; a corrupt or incomplete one is a one-line MacqError, never a traceback,
        and every record is re-validated (range, dtype, finiteness) by its constructor."""
        from transformers import AutoConfig

        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise MacqError(f"{path} is not a macq quantization directory (no manifest.json)")
        try:
            manifest = json.loads(mf.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise MacqError(f"{mf}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "macq" or manifest.get("version") != FORMAT_VERSION:
            got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            ver = manifest.get("version") if isinstance(manifest, dict) else "?"
            raise MacqError(f"{path}/manifest.json: unsupported format {got} v{ver}")
        records = LazyRecords(manifest.get("records", {}), TensorStore.open(path, "records"), path)
        records.check_headers()
        floats = TensorStore.open(path, "float")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any config problem is the user's file: one line
            raise MacqError(f"{path}/config.json: cannot read ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        return cls(records=records, float_tensors=floats, config=config, method=manifest.get("method", {}),
                   act_quant=manifest.get("act_quant", {}), tied=manifest.get("tied", {}),
                   source=manifest.get("source", ""))


class QuantDirWriter:
    """The one writer of a macq quantization directory. In-memory saves, the streamed weight methods and the
    layer-streamed calibrated methods all add their records and float tensors here, as they come, so the
    directory format (sharded ``records`` / ``float`` safetensors, ``manifest.json``, config, tokenizer) has one
    definition. Use :meth:`create` (a context manager over :func:`macq.atomic.atomic_dir`) and call
    :meth:`close` last inside it; leaving the block without ``close`` (an error) leaves nothing."""

    def __init__(self, tmp: Path, config: Any, source: str, tokenizer: Any, shard_bytes: int):
        self.tmp, self.config, self.source, self.tokenizer = tmp, config, source, tokenizer
        self.records_w = ShardWriter(tmp, "records", shard_bytes)
        self.floats_w = ShardWriter(tmp, "float", shard_bytes)
        self.metas: dict[str, dict[str, Any]] = {}
        self.bits = self.weights = self.bytes = 0
        self.summary: dict[str, Any] | None = None

    @classmethod
    @contextmanager
    def create(cls, out: str | Path, config: Any, *, source: str, tokenizer: Any = None,
               shard_bytes: int = SHARD_BYTES) -> Iterator["QuantDirWriter"]:
        with atomic_dir(out) as tmp:
            w = cls(tmp, config, source, tokenizer, shard_bytes)
            yield w
            if w.summary is None:
                raise RuntimeError("QuantDirWriter: the block ended without close()")
            w.summary["output"] = str(out)

    def add_record(self, name: str, rec: Record) -> None:
        write_records(self.records_w, name, rec)
        self.metas[name] = rec.meta()
        sb = rec.storage_bits()
        self.bits += sb
        self.bytes += (sb + 7) // 8
        self.weights += rec.shape[0] * rec.shape[1]

    def add_float(self, key: str, t: torch.Tensor) -> None:
        self.floats_w.add(key, t)
        if t.is_floating_point():
            self.bytes += t.numel() * 2

    def close(self, method: dict[str, Any], *, tied: dict[str, str], act_quant: dict[str, Any]) -> dict[str, Any]:
        """Finish the shards and write config, tokenizer and manifest; returns the summary commands print."""
        from macq.models import write_tokenizer

        self.records_w.close()
        self.floats_w.close()
        bpw = self.bits / self.weights if self.weights else 16.0
        manifest = {"format": "macq", "version": FORMAT_VERSION, "source": self.source, "method": method,
                    "bits_per_weight": bpw, "tied": tied, "act_quant": act_quant, "records": self.metas}
        self.config.save_pretrained(self.tmp)
        write_tokenizer(self.tokenizer, self.tmp)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        self.summary = {"method": method, "layers": len(self.metas), "bits_per_weight": round(bpw, 4),
                        "bytes": self.bytes}
        return self.summary


@dataclass
class Records:
    """What a route hands to a target's writer: the records and float tensors (``items()``, one pass in model
    order, one at a time where the route streams), or the whole :class:`~macq.qmodel.QuantizedModel` for a writer
    that traces the whole graph, and the facts every format needs."""

    config: Any
    source: str
    method: dict[str, Any]
    tied: dict[str, str]
    act_quant: dict[str, Any]
    tokenizer: Any                  # an HF tokenizer object, or a directory holding its files
    items: Callable[[], Iterator[tuple[str, str, Any]]]
    qmodel: Callable[[], Any] | None = None
    streamed: bool = False

    @classmethod
    def of(cls, qm: Any, tokenizer: Any, streamed: bool = False) -> "Records":
        def items() -> Iterator[tuple[str, str, Any]]:
            for k in qm.records:
                yield "record", k, qm.records[k]
            for k in qm.float_tensors:
                yield "float", k, qm.float_tensors[k]

        return cls(qm.config, qm.source, qm.method, qm.tied, qm.act_quant, tokenizer, items, lambda: qm, streamed)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Records":
        """A saved quantization, read lazily (one record / tensor at a time)."""
        return cls.of(QuantizedModel.load(path), Path(path), streamed=True)


def write_items(writer: Any, items: Iterator[tuple[str, str, Any]]) -> None:
    """Feed ``("record", module, Record)`` / ``("float", key, tensor)`` items to any target's writer."""
    for kind, name, obj in items:
        (writer.add_record if kind == "record" else writer.add_float)(name, obj)


def write_quant_dir(records: Records, out: str | Path, options: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """The ``macq`` row's writer (:data:`macq.targets.TARGETS`): ``records`` as a quantization directory."""
    with QuantDirWriter.create(out, records.config, source=records.source, tokenizer=records.tokenizer) as w:
        write_items(w, records.items())
        w.close(records.method, tied=records.tied, act_quant=records.act_quant)
    return dict(w.summary)


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def record_kinds(qm: QuantizedModel) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in qm.records.values():
        k = getattr(r, "kind", "?")
        out[k] = out.get(k, 0) + 1
    return out


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return get_weight(model.get_submodule(name)).detach()
