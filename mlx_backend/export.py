"""The one MLX writer: records and float tensors in, a directory ``mlx_lm.load`` opens out, atomically.

Every route feeds the same :class:`MLXWriter` (a saved quantization read lazily, a checkpoint quantized tensor by
tensor, or an in-memory model): each record is laid out (:mod:`mlx_backend.layout`) and appended to mlx_lm's sharded
safetensors format as it arrives, so memory holds one tensor. Before the temp dir is renamed into place, the full
tensor key/shape set is checked against the parameters of the very mlx_lm model class that will load it (what
``load_weights(strict=True)`` would reject later), on the tensors' shapes alone; sliding windows mlx_lm cannot
reproduce are refused; a tied model with its own lm_head record is refused. Any failure leaves nothing behind.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from macq.atomic import atomic_dir
from macq.errors import MacqError
from macq.qmodel import QuantizedModel
from macq.record import LUTRecord
from macq.shards import ShardWriter
from mlx_backend.layout import MLXArch, float_weight, layer_layout, lut_error, mlx_arch, mlx_name, torch_dtype

_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
SHARD_BYTES = 5 << 30


@dataclass
class ExportResult:
    path: Path
    bytes_on_disk: int
    bits_per_weight: float          # over quantized layers: (packed codes + scales + biases) bits / weights
    model_bits_per_weight: float    # mlx_lm's compute_bits_per_weight: every stored byte / every parameter
    notes: list[str] = field(default_factory=list)
    record_bits_per_weight: float = 16.0   # the records' own rate (all metadata charged), before layout


@dataclass
class _Plan:
    tensors: dict[str, torch.Tensor]
    qparams: dict[str, dict]        # mlx module path -> {"group_size", "bits", "mode"}
    n_params: int
    notes: list[str]

    def quantized_bits_per_weight(self) -> float:
        """Stored bits of the quantized layers (as written, in the export dtype) per quantized weight."""
        bits = n = 0
        for path, p in self.qparams.items():
            t = [self.tensors[k] for f in ("weight", "scales", "biases") if (k := f"{path}.{f}") in self.tensors]
            bits += sum(x.numel() * x.element_size() * 8 for x in t)
            n += t[0].shape[0] * t[0].shape[1] * 32 // p["bits"]
        return bits / n if n else float("nan")


def _quantization(qparams: dict[str, dict]) -> dict[str, Any] | None:
    """Global = the most common (bits, group, mode); every other quantized module gets an override by path."""
    if not qparams:
        return None
    (bits, group, mode), _ = Counter((p["bits"], p["group_size"], p["mode"]) for p in qparams.values()).most_common(1)[0]
    q: dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for path, p in sorted(qparams.items()):
        if (p["bits"], p["group_size"], p["mode"]) != (bits, group, mode):
            q[path] = dict(p)
    return q


def _config(qm: QuantizedModel, plan: _Plan, dtype: str) -> dict[str, Any]:
    """HF config + what mlx_lm reads: ``quantization`` (and its ``quantization_config`` copy), and
    ``rope_theta``/``rope_scaling`` at top level (transformers 5 nests them in ``rope_parameters``, which
    mlx_lm's llama/qwen2 ignore: they would silently fall back to their default theta)."""
    cfg = json.loads(qm.config.to_json_string(use_diff=False))
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "gguf_file"):
        cfg.pop(k, None)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if isinstance(rope, dict) and "full_attention" in rope:   # per-attention-kind rope (Gemma3)
        cfg.setdefault("rope_theta", rope["full_attention"].get("rope_theta"))
        if "sliding_attention" in rope:
            cfg.setdefault("rope_local_base_freq", rope["sliding_attention"].get("rope_theta"))
    pattern = _window_pattern(cfg.get("layer_types"))
    if pattern is not None:
        cfg.setdefault("sliding_window_pattern", pattern)
    if "n_positions" in cfg:                                   # mlx_lm's gpt2 reads n_ctx
        cfg.setdefault("n_ctx", cfg["n_positions"])
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    q = _quantization(plan.qparams)
    if q is not None:
        cfg["quantization"] = q
        cfg["quantization_config"] = json.loads(json.dumps(q))
    cfg["macq"] = {"method": qm.method, "source": qm.source, "dtype": dtype, "notes": plan.notes}
    return dict(sorted(cfg.items()))


def _window_pattern(layer_types: list[str] | None) -> int | None:
    """mlx_lm (gemma3_text) describes windows as "every ``p``-th layer is full": the period of
    ``layer_types`` when it has that form, else ``None``."""
    if not layer_types or "full_attention" not in layer_types:
        return None
    p = layer_types.index("full_attention") + 1
    want = ["full_attention" if i % p == p - 1 else "sliding_attention" for i in range(len(layer_types))]
    return p if list(layer_types) == want else None


def _check_windows(qm: QuantizedModel, arch: MLXArch, cfg: dict[str, Any]) -> list[str]:
    """Sliding windows mlx_lm cannot reproduce: refused when mlx_lm would window other layers than HF,
    a note when mlx_lm's model ignores windows (identical up to the window length, different past it)."""
    windows = arch.spec.layer_windows(qm.config) if arch.spec is not None else []
    if not any(windows):
        return []
    w = min(x for x in windows if x)
    if not arch.windows:
        return [f"mlx_lm's {arch.model_type} model ignores sliding windows: outputs match HF up to {w} tokens of "
                "context and differ past it"]
    if "layer_types" in cfg and _window_pattern(cfg["layer_types"]) is None:
        raise MacqError(f"MLX export: layer_types {cfg['layer_types']} are not 'every p-th layer full', the only "
                        f"window layout mlx_lm's {arch.model_type} model expresses")
    return []


def _check_against_mlx(cfg: dict[str, Any], plan: _Plan) -> None:
    """Build mlx_lm's model for this config (lazily: no weights are materialised) and compare the exact
    key set and shapes ``load_weights(strict=True)`` will demand."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_cls, args_cls = _get_classes(cfg)
        model = model_cls(args_cls.from_dict(cfg))
    except (ValueError, TypeError) as e:
        raise MacqError(f"MLX export: mlx_lm cannot build model_type {cfg.get('model_type')!r}: {e}") from None
    have = {k: tuple(v.shape) for k, v in plan.tensors.items()}
    if hasattr(model, "sanitize"):   # what mlx_lm.load does first (e.g. Gemma3 drops lm_head when tied)
        import mlx.core as mx

        lazy = {k: mx.zeros(shape, dtype=mx.uint32 if plan.tensors[k].dtype == torch.uint32 else mx.float32)
                for k, shape in have.items()}                     # lazy: nothing is allocated
        have = {k: tuple(v.shape) for k, v in model.sanitize(lazy).items()}
    want = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for path, p in plan.qparams.items():
        shape = want.pop(f"{path}.weight", None)
        if shape is None:
            continue
        out, inp = shape
        want[f"{path}.weight"] = (out, inp * p["bits"] // 32)
        want[f"{path}.scales"] = (out, inp // p["group_size"])
        if p["mode"] == "affine":
            want[f"{path}.biases"] = (out, inp // p["group_size"])
    problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k}: shape {have[k]} != mlx {want[k]}" for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise MacqError(f"MLX export: tensors do not match mlx_lm's {cfg['model_type']} model: "
                        f"{'; '.join(problems[:4])}{more}")


# ------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_source(tokenizer, qm: QuantizedModel):
    """The tokenizer object or directory to write; ``None`` falls back to ``qm.source`` if it is a local
    directory holding tokenizer files. A missing tokenizer is an error: mlx_lm.load needs one."""
    if tokenizer is None and qm.source and Path(qm.source).is_dir():
        tokenizer = qm.source
    if tokenizer is None:
        raise MacqError("MLX export: no tokenizer (pass the HF tokenizer or a directory holding tokenizer.json); "
                        "mlx_lm.load needs one")
    if isinstance(tokenizer, (str, Path)):
        d = Path(tokenizer)
        if not d.is_dir() or not any((d / f).is_file() for f in _TOKENIZER_CORE):
            raise MacqError(f"MLX export: tokenizer directory {d} has none of {', '.join(_TOKENIZER_CORE)}")
    elif not hasattr(tokenizer, "save_pretrained"):
        raise MacqError(f"MLX export: tokenizer must be an HF tokenizer or a directory, not {type(tokenizer).__name__}")
    return tokenizer


def _write_tokenizer(tokenizer, config: Any, tmp: Path) -> None:
    from macq.models import write_tokenizer

    write_tokenizer(tokenizer, tmp)
    if not (tmp / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(tmp)


# ------------------------------------------------------------------------------------------ writing
class MLXWriter:
    """Lay out and append each record / float tensor as it comes; :meth:`close` checks and finishes the directory.
    Use :meth:`create` (a context manager over :func:`macq.atomic.atomic_dir`)."""

    def __init__(self, tmp: Path, config: Any, dtype: str, requant: tuple[int, int] | None, shard_bytes: int):
        self.tmp, self.config, self.dtype_name, self.requant = tmp, config, dtype, requant
        self.dtype = torch_dtype(dtype)
        self.arch = mlx_arch(config.model_type)
        self.tied = self.arch.always_tied or bool(getattr(config, "tie_word_embeddings", False))
        if self.arch.always_tied and not getattr(config, "tie_word_embeddings", False):
            raise MacqError(f"MLX export: mlx_lm's {self.arch.model_type} model always uses the embedding as lm_head, "
                            "but this checkpoint has a separate lm_head (tie_word_embeddings=false)")
        self.writer = ShardWriter(tmp, "model", shard_bytes, metadata={"format": "mlx"})
        self.shapes: dict[str, torch.Tensor] = {}
        self.qparams: dict[str, dict] = {}
        self.notes: list[str] = []
        self.n_params = self.rec_bits = self.rec_weights = 0
        self.result: ExportResult | None = None

    @classmethod
    @contextmanager
    def create(cls, out: str | Path, config: Any, *, dtype: str = "float16", requantize_lut: bool = False,
               requantize_bits: int = 4, requantize_group_size: int = 64,
               shard_bytes: int = SHARD_BYTES) -> Iterator["MLXWriter"]:
        if shard_bytes <= 0:
            raise MacqError(f"shard_bytes={shard_bytes}: expected a positive size")
        requant = (requantize_bits, requantize_group_size) if requantize_lut else None
        with atomic_dir(out) as tmp:
            w = cls(tmp, config, dtype, requant, shard_bytes)
            yield w
            if w.result is None:
                raise RuntimeError("MLXWriter: the block ended without close()")
        w.result.path = Path(out)
        w.result.bytes_on_disk = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())

    def _add(self, key: str, t: torch.Tensor) -> None:
        self.writer.add(key, t)
        self.shapes[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")

    def add_record(self, name: str, rec: Any) -> None:
        if self.tied and name == "lm_head":
            raise MacqError("MLX export: lm_head has its own record but the embeddings are tied; mlx_lm uses "
                            "embed_tokens as the output projection, so quantize the embedding instead")
        if isinstance(rec, LUTRecord) and self.requant is None:
            raise lut_error([name])
        out = layer_layout(name, rec, self.dtype, self.requant)
        mname = mlx_name(name, self.arch)
        for k, v in out.tensors.items():
            self._add(f"{mname}.{k}", v)
        if out.qparams is not None:
            self.qparams[mname] = out.qparams
        if out.note:
            self.notes.append(out.note)
        self.n_params += rec.shape[0] * rec.shape[1]
        self.rec_bits += rec.storage_bits()
        self.rec_weights += rec.shape[0] * rec.shape[1]

    def add_float(self, key: str, t: torch.Tensor) -> None:
        if any(key.endswith("." + d) for d in self.arch.drop) or (self.tied and key == "lm_head.weight"):
            return
        self._add(mlx_name(key, self.arch), float_weight(key, t, self.arch, self.dtype))
        self.n_params += t.numel()

    def close(self, method: dict[str, Any], source: str, tokenizer: Any, act_quant: dict[str, Any] | None = None
              ) -> ExportResult:
        if act_quant:
            self.notes.insert(0, f"activation quantization on {len(act_quant)} module(s) is not representable in "
                              "MLX; exported weight-only (activations run in the model dtype)")
        plan = _Plan(self.shapes, self.qparams, self.n_params, self.notes)
        meta = SimpleNamespace(config=self.config, method=method, source=source)
        cfg = _config(meta, plan, self.dtype_name)  # type: ignore[arg-type]
        self.notes += _check_windows(meta, self.arch, cfg)  # type: ignore[arg-type]
        cfg["macq"]["notes"] = self.notes
        _check_against_mlx(cfg, plan)
        self.writer.close({"total_parameters": self.n_params})
        (self.tmp / "config.json").write_text(json.dumps(cfg, indent=4, default=str))
        _write_tokenizer(tokenizer, self.config, self.tmp)
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.shapes.values())
        self.result = ExportResult(self.tmp, 0, plan.quantized_bits_per_weight(),
                                   tensor_bytes * 8 / max(self.n_params, 1), self.notes,
                                   self.rec_bits / self.rec_weights if self.rec_weights else 16.0)
        return self.result


def precheck(plan: Any) -> None:
    """The ``mlx`` row's pre-check (:data:`macq.targets.TARGETS`), on options and ``config.json`` alone."""
    from macq.targets import TARGETS, check_records

    mlx_arch(plan.config.model_type)
    check_records(TARGETS["mlx"], plan.method, plan.cfg, plan.target_options)


def write_records(records: Any, out: str | Path, options: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """The ``mlx`` row's writer (:data:`macq.targets.TARGETS`): ``records`` (:class:`macq.qmodel.Records`) into
    ``out`` with the target's options (``dtype``, ``requantize_lut``)."""
    tok = _tokenizer_source(records.tokenizer, records)
    with MLXWriter.create(out, records.config, dtype=options.get("dtype", "float16"),
                          requantize_lut=bool(options.get("requantize_lut"))) as w:
        for kind, name, obj in records.items():
            (w.add_record if kind == "record" else w.add_float)(name, obj)
        w.close(records.method, records.source, tok, records.act_quant)
    res = asdict(w.result)
    res.update({"method": records.method.get("method"), "record_bits_per_weight": res.pop("record_bits_per_weight")})
    return res


def export_mlx(qm: QuantizedModel, out_dir: str | Path, tokenizer=None, dtype: str = "float16", force: bool = False,
               requantize_lut: bool = False, requantize_bits: int = 4, requantize_group_size: int = 64,
               shard_bytes: int = SHARD_BYTES) -> ExportResult:
    """Export ``qm`` for ``mlx_lm.load``: affine records copied bit-exactly (no re-quantization), float
    tensors in ``dtype``. LUT records are refused unless ``requantize_lut`` (then re-quantized with
    ``mx.quantize`` at ``requantize_bits``/``requantize_group_size``, noted in the result and in
    ``config.json["macq"]["notes"]``). Nothing is left behind on error."""
    out_dir = Path(out_dir)
    torch_dtype(dtype)
    mlx_arch(qm.config.model_type)
    tok = _tokenizer_source(tokenizer, qm)
    if out_dir.exists() and not force:
        raise MacqError(f"output: {out_dir} exists (pass force=True / --force to overwrite)")
    luts = [n for n, r in qm.records.items() if isinstance(r, LUTRecord)]
    if luts and not requantize_lut:
        raise lut_error(luts)
    with MLXWriter.create(out_dir, qm.config, dtype=dtype, requantize_lut=requantize_lut,
                          requantize_bits=requantize_bits, requantize_group_size=requantize_group_size,
                          shard_bytes=shard_bytes) as w:
        for k in qm.records:
            w.add_record(k, qm.records[k])
        for k in qm.float_tensors:
            w.add_float(k, qm.float_tensors[k])
        w.close(qm.method, qm.source, tok, qm.act_quant)
    return w.result
