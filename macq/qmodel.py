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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from macq.atomic import atomic_dir
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, set_weight, tied_embeddings
from macq.record import Record, bits_per_weight, record_from_tensors
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

    def __getitem__(self, name: str) -> Record:
        meta = self.metas[name]
        keys = [f"{name}.{f}" for f in RECORD_FIELDS if f"{name}.{f}" in self.store]
        where = self.store.path_of(keys[0]) if keys else self.where
        try:  # records validate themselves (range, dtype, finiteness) as they are built, i.e. as read
            return record_from_tensors(meta, {k[len(name) + 1:]: self.store[k] for k in keys})
        except MacqError as e:
            raise MacqError(f"{where}: record {name}: {e}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
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
        """Write atomically: everything goes into a temp dir beside ``path``, renamed at the end."""
        path = Path(path)
        if path.exists() and not force:
            raise MacqError(f"output: {path} exists (pass --force to overwrite)")
        with atomic_dir(path) as tmp:
            self.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            rw = ShardWriter(tmp, "records", SHARD_BYTES)
            for k, r in self.records.items():
                write_records(rw, k, r)
            rw.close()
            fw = ShardWriter(tmp, "float", SHARD_BYTES)
            fw.add_all(self.float_tensors)
            fw.close()
            (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=1))
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
        floats = TensorStore.open(path, "float")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any config problem is the user's file: one line
            raise MacqError(f"{path}/config.json: cannot read ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        return cls(records=records, float_tensors=floats, config=config, method=manifest.get("method", {}),
                   act_quant=manifest.get("act_quant", {}), tied=manifest.get("tied", {}),
                   source=manifest.get("source", ""))


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
