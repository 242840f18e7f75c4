"""Write a :class:`~macq.qmodel.QuantizedModel` as a directory ``mlx_lm.load`` opens, atomically.

Everything that can fail is checked before the first byte is written: dtype, architecture, tokenizer,
every record (MLX-representable or not), and the full tensor key/shape set against the parameters of the
very mlx_lm model class that will load it (what ``load_weights(strict=True)`` would reject later).
The directory is then built in a temp dir beside ``out_dir`` and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from macq.atomic import atomic_dir
from macq.errors import MacqError
from macq.qmodel import QuantizedModel
from macq.record import LUTRecord
from mlx_backend.layout import MLXArch, float_weight, layer_layout, lut_error, mlx_arch, mlx_name, torch_dtype

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json")
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
SHARD_BYTES = 5 << 30


@dataclass
class ExportResult:
    path: Path
    bytes_on_disk: int
    bits_per_weight: float          # over quantized layers: (packed codes + scales + biases) bits / weights
    model_bits_per_weight: float    # mlx_lm's compute_bits_per_weight: every stored byte / every parameter
    notes: list[str] = field(default_factory=list)


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


# ------------------------------------------------------------------------------------------ planning
def _plan(qm: QuantizedModel, arch: MLXArch, dtype: torch.dtype, requant: tuple[int, int] | None) -> _Plan:
    config_tied = bool(getattr(qm.config, "tie_word_embeddings", False))
    if arch.always_tied and not config_tied:
        raise MacqError(f"MLX export: mlx_lm's {arch.model_type} model always uses the embedding as lm_head, but this "
                        "checkpoint has a separate lm_head (tie_word_embeddings=false)")
    tied = arch.always_tied or config_tied
    luts = [n for n, r in qm.records.items() if isinstance(r, LUTRecord)]
    if luts and requant is None:
        raise lut_error(luts)
    tensors: dict[str, torch.Tensor] = {}
    qparams: dict[str, dict] = {}
    notes: list[str] = []
    if qm.act_quant:
        notes.append(f"activation quantization on {len(qm.act_quant)} module(s) is not representable in MLX; "
                     "exported weight-only (activations run in the model dtype)")
    n_params = 0
    for name, rec in qm.records.items():
        if tied and name == "lm_head":
            raise MacqError("MLX export: lm_head has its own record but the embeddings are tied; mlx_lm uses "
                            "embed_tokens as the output projection, so quantize the embedding instead")
        out = layer_layout(name, rec, dtype, requant)
        mname = mlx_name(name, arch)
        tensors.update({f"{mname}.{k}": v for k, v in out.tensors.items()})
        if out.qparams is not None:
            qparams[mname] = out.qparams
        if out.note:
            notes.append(out.note)
        n_params += rec.shape[0] * rec.shape[1]
    for key, t in qm.float_tensors.items():
        if any(key.endswith("." + d) for d in arch.drop) or (tied and key == "lm_head.weight"):
            continue
        tensors[mlx_name(key, arch)] = float_weight(key, t, arch, dtype)
        n_params += t.numel()
    return _Plan(tensors, qparams, n_params, notes)


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


def _write_tokenizer(tokenizer, qm: QuantizedModel, tmp: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        for f in TOKENIZER_FILES:
            if (Path(tokenizer) / f).is_file():
                shutil.copy2(Path(tokenizer) / f, tmp / f)
    else:
        tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(qm.config).save_pretrained(tmp)


# ------------------------------------------------------------------------------------------ writing
def _shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in key order, like mlx_lm.make_shards: a tensor larger than the limit gets its own shard."""
    shards: list[dict[str, torch.Tensor]] = []
    size = 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if not shards or size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    return shards


def _write_weights(plan: _Plan, tmp: Path, shard_bytes: int) -> None:
    shards = _shards(plan.tensors, shard_bytes)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = fmt.format(i + 1, len(shards))
        save_file(shard, tmp / fname, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in plan.tensors.values())
    index = {"metadata": {"total_size": total, "total_parameters": plan.n_params},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def export_mlx(qm: QuantizedModel, out_dir: str | Path, tokenizer=None, dtype: str = "float16", force: bool = False,
               requantize_lut: bool = False, requantize_bits: int = 4, requantize_group_size: int = 64,
               shard_bytes: int = SHARD_BYTES) -> ExportResult:
    """Export ``qm`` for ``mlx_lm.load``: affine records copied bit-exactly (no re-quantization), float
    tensors in ``dtype``. LUT records are refused unless ``requantize_lut`` (then re-quantized with
    ``mx.quantize`` at ``requantize_bits``/``requantize_group_size``, noted in the result and in
    ``config.json["macq"]["notes"]``). Nothing is left behind on error."""
    out_dir = Path(out_dir)
    tdtype = torch_dtype(dtype)
    arch = mlx_arch(qm.config.model_type)
    tok = _tokenizer_source(tokenizer, qm)
    if out_dir.exists() and not force:
        raise MacqError(f"output: {out_dir} exists (pass force=True / --force to overwrite)")
    if shard_bytes <= 0:
        raise MacqError(f"shard_bytes={shard_bytes}: expected a positive size")
    plan = _plan(qm, arch, tdtype, (requantize_bits, requantize_group_size) if requantize_lut else None)
    cfg = _config(qm, plan, dtype)
    plan.notes += _check_windows(qm, arch, cfg)
    cfg["macq"]["notes"] = plan.notes
    _check_against_mlx(cfg, plan)

    with atomic_dir(out_dir) as tmp:
        _write_weights(plan, tmp, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=4, default=str))
        _write_tokenizer(tok, qm, tmp)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    tensor_bytes = sum(t.numel() * t.element_size() for t in plan.tensors.values())
    return ExportResult(out_dir, size, plan.quantized_bits_per_weight(), tensor_bytes * 8 / max(plan.n_params, 1),
                        plan.notes)
