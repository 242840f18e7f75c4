"""MLX export that streams: each record / float tensor is laid out and appended to mlx_lm's sharded format
as soon as it exists, so the whole model is never in memory.

Sources: the streamed quantizer's items straight from an HF checkpoint (:func:`export_checkpoint_mlx`: no
intermediate quantization directory), or a saved macq quantization directory read lazily
(:func:`export_dir_mlx`). The per-layer layout, the config and the structural check are exactly those of
:mod:`mlx_backend.export` (same functions); only the order changes: tensors are written first, and the key /
shape check against mlx_lm's model runs on their shapes (meta tensors) *before* the temp dir is renamed, so a
mismatch still leaves nothing behind. A record MLX cannot hold (LUT, per-tensor, odd bits) fails on the first
such record, within seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch

from macq.atomic import atomic_dir
from macq.errors import MacqError
from macq.shards import ShardWriter
from mlx_backend.export import SHARD_BYTES, ExportResult, _check_against_mlx, _config, _Plan, _write_tokenizer
from mlx_backend.layout import float_weight, layer_layout, mlx_arch, mlx_name, torch_dtype


def _stream(items: Iterable[tuple[str, str, Any]], config: Any, writer: ShardWriter, dtype: torch.dtype,
            requant: tuple[int, int] | None, notes: list[str]) -> tuple[_Plan, float]:
    """Write every item; return the plan with *meta* tensors (shapes and dtypes only) for the checks, and the
    records' own bits per weight (all metadata charged, before layout)."""
    arch = mlx_arch(config.model_type)
    tied = arch.always_tied or bool(getattr(config, "tie_word_embeddings", False))
    shapes: dict[str, torch.Tensor] = {}
    qparams: dict[str, dict] = {}
    n_params = rec_bits = rec_weights = 0

    def add(key: str, t: torch.Tensor) -> None:
        writer.add(key, t)
        shapes[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")

    for kind, name, obj in items:
        if kind == "record":
            if tied and name == "lm_head":
                raise MacqError("MLX export: lm_head has its own record but the embeddings are tied; mlx_lm uses "
                                "embed_tokens as the output projection, so quantize the embedding instead")
            out = layer_layout(name, obj, dtype, requant)
            mname = mlx_name(name, arch)
            for k, v in out.tensors.items():
                add(f"{mname}.{k}", v)
            if out.qparams is not None:
                qparams[mname] = out.qparams
            if out.note:
                notes.append(out.note)
            n_params += obj.shape[0] * obj.shape[1]
            rec_bits += obj.storage_bits()
            rec_weights += obj.shape[0] * obj.shape[1]
        else:
            if any(name.endswith("." + d) for d in arch.drop) or (tied and name == "lm_head.weight"):
                continue
            add(mlx_name(name, arch), float_weight(name, obj, arch, dtype))
            n_params += obj.numel()
    return _Plan(shapes, qparams, n_params, notes), (rec_bits / rec_weights if rec_weights else 16.0)


def _export(items: Iterable[tuple[str, str, Any]], config: Any, method: dict[str, Any], source: str,
            out_dir: str | Path, tokenizer: Any, dtype: str, force: bool, requantize_lut: bool,
            requantize_bits: int, requantize_group_size: int, shard_bytes: int,
            notes: list[str] | None = None) -> tuple[ExportResult, float]:
    out_dir = Path(out_dir)
    tdtype = torch_dtype(dtype)
    mlx_arch(config.model_type)
    if out_dir.exists() and not force:
        raise MacqError(f"output: {out_dir} exists (pass force=True / --force to overwrite)")
    meta_qm = SimpleNamespace(config=config, method=method, source=source)
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, "model", shard_bytes, metadata={"format": "mlx"})
        requant = (requantize_bits, requantize_group_size) if requantize_lut else None
        plan, rec_bpw = _stream(items, config, writer, tdtype, requant, list(notes or []))
        cfg = _config(meta_qm, plan, dtype)  # type: ignore[arg-type]
        _check_against_mlx(cfg, plan)
        writer.close({"total_parameters": plan.n_params})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=4, default=str))
        _write_tokenizer(tokenizer, meta_qm, tmp)  # type: ignore[arg-type]
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    tensor_bytes = sum(t.numel() * t.element_size() for t in plan.tensors.values())
    return ExportResult(out_dir, size, plan.quantized_bits_per_weight(), tensor_bytes * 8 / max(plan.n_params, 1),
                        plan.notes), rec_bpw


def _tokenizer_dir(d: Path) -> Path:
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MacqError(f"MLX export: {d} has no tokenizer (tokenizer.json / tokenizer.model / vocab.json); "
                        "mlx_lm.load needs one")
    return d


def export_checkpoint_mlx(src: str | Path, out_dir: str | Path, method: str, cfg: Any, *, source: str = "",
                          dtype: str = "float16", force: bool = False, requantize_lut: bool = False,
                          requantize_bits: int = 4, requantize_group_size: int = 64, progress: bool = False,
                          shard_bytes: int = SHARD_BYTES, trust_remote_code: bool = False
                          ) -> tuple[ExportResult, float]:
    """Quantize the HF checkpoint ``src`` with a weight method and write the MLX model, streaming.
    Returns the export result and the records' bits per weight."""
    from macq.streaming import iter_quantized, plan_stream

    torch_dtype(dtype)
    if Path(out_dir).exists() and not force:
        raise MacqError(f"output: {out_dir} exists (pass force=True / --force to overwrite)")
    plan = plan_stream(src, cfg, trust_remote_code)
    tok = _tokenizer_dir(plan.src)
    method_d = {**cfg.to_dict(), "streamed": True}
    return _export(iter_quantized(plan, method, cfg, progress), plan.config, method_d, source or str(src), out_dir,
                   tok, dtype, force, requantize_lut, requantize_bits, requantize_group_size, shard_bytes)


def export_dir_mlx(qdir: str | Path, out_dir: str | Path, *, dtype: str = "float16", force: bool = False,
                   requantize_lut: bool = False, requantize_bits: int = 4, requantize_group_size: int = 64,
                   shard_bytes: int = SHARD_BYTES) -> tuple[ExportResult, float]:
    """Export a saved macq quantization directory, reading one record / tensor at a time."""
    from macq.qmodel import QuantizedModel

    qm = QuantizedModel.load(qdir)
    notes = [f"activation quantization on {len(qm.act_quant)} module(s) is not representable in MLX; "
             "exported weight-only (activations run in the model dtype)"] if qm.act_quant else []

    def items():
        for k in qm.records:
            yield "record", k, qm.records[k]
        for k in qm.float_tensors:
            yield "float", k, qm.float_tensors[k]

    return _export(items(), qm.config, qm.method, qm.source, out_dir, _tokenizer_dir(Path(qdir)), dtype, force,
                   requantize_lut, requantize_bits, requantize_group_size, shard_bytes, notes)


def export_streamed(model: str | None, output: Path, method: str, cfg: Any, flag: bool | None, *,
                    dtype: str = "float16", force: bool = False, requantize_lut: bool = False,
                    progress: bool = False, trust_remote_code: bool = False) -> tuple[dict[str, Any], str] | None:
    """What ``macq export --target mlx`` runs when streaming applies (a macq quantization dir, or a weight
    method on a local safetensors checkpoint); ``None`` when it does not (the in-memory path runs)."""
    from dataclasses import asdict

    from macq.qmodel import is_quantized_dir
    from macq.streaming import use_streaming

    if model is not None and is_quantized_dir(model):
        res, rec_bpw = export_dir_mlx(model, output, dtype=dtype, force=force, requantize_lut=requantize_lut)
        method_name = None
    else:
        src = use_streaming(model, method, flag, calibrated=False)
        if src is None:
            return None
        res, rec_bpw = export_checkpoint_mlx(src, output, method, cfg, source=model or "default", dtype=dtype,
                                             force=force, requantize_lut=requantize_lut, progress=progress,
                                             trust_remote_code=trust_remote_code)
        method_name = method
    data = asdict(res)
    data.update({"target": "mlx", "method": method_name, "record_bits_per_weight": rec_bpw, "streamed": True})
    md = [f"exported {res.path} (mlx, streamed): {res.bytes_on_disk / 2**20:.1f} MiB on disk, "
          f"{res.bits_per_weight:.3f} bits/weight over quantized layers"]
    md += [f"note: {n}" for n in res.notes]
    return data, "\n".join(md)
