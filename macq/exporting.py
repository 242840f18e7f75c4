"""What ``macq export | generate | inspect`` run: get a QuantizedModel (from a macq dir, or by
quantizing a model), hand it to the target's exporter, and report. Exporters never re-quantize."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from macq.errors import MacqError
from macq.evaluate import artifact_kind, md_table


def _quantized(model: str | None, method: str, opts: dict[str, Any], progress: bool, trust_remote_code: bool,
               **calib: Any):
    """``(QuantizedModel, tokenizer)`` from a macq quantization dir, or by quantizing ``model``."""
    from macq.pipeline import load_quantized_or_model, quantize

    if model is not None and artifact_kind(model) == "macq":
        from transformers import AutoTokenizer

        from macq.qmodel import QuantizedModel

        return QuantizedModel.load(model), AutoTokenizer.from_pretrained(model)
    _, fp, tok = load_quantized_or_model(model, trust_remote_code)
    qm = quantize(fp, tok, method, opts, progress=progress, source=model or "default", copy_model=False, **calib)
    return qm, tok


def export_any(model: str | None, target: str, output: Path, method: str, opts: dict[str, Any] | Any, *,
               calib_dataset: str = "c4", n_calib: int = 128, seq_len: int = 512, seed: int = 0,
               dtype: str = "float16", context: int = 512, stateful: bool = True, fixed_shapes: bool = False,
               requantize_lut: bool = False, allow_fallback: bool = False, force: bool = False,
               trust_remote_code: bool = False, progress: bool = False):
    qm, tok = _quantized(model, method, opts, progress, trust_remote_code, calib_dataset=calib_dataset,
                         n_calib=n_calib, seq_len=seq_len, seed=seed)
    if target == "mlx":
        from mlx_backend import export_mlx

        res = export_mlx(qm, output, tokenizer=tok, dtype=dtype, force=force, requantize_lut=requantize_lut)
    else:
        if output.suffix != ".mlpackage":
            raise MacqError(f"--output {output}: a Core ML export must end in .mlpackage")
        from converters import export_coreml

        res = export_coreml(qm, output, context=context, stateful=stateful, fixed_shapes=fixed_shapes,
                            force=force, allow_fallback=allow_fallback)
    data = asdict(res) if is_dataclass(res) else dict(res)
    data.update({"target": target, "method": qm.method.get("method"), "record_bits_per_weight": qm.bits_per_weight()})
    md = [f"exported {data.get('path')} ({target}): {data.get('bytes_on_disk', 0) / 2**20:.1f} MiB on disk, "
          f"{data.get('bits_per_weight', qm.bits_per_weight()):.3f} bits/weight over quantized layers"]
    md += [f"note: {n}" for n in data.get("notes", []) or []]
    md += [f"ANE: {line}" for line in data.get("ane_report", []) or []]
    return data, "\n".join(md)


def generate_any(path: str, prompt: str, max_tokens: int = 64, chat: bool = True) -> str:
    if artifact_kind(path) == "mlx":
        from mlx_backend.runner import generate_mlx

        return generate_mlx(path, prompt, max_tokens=max_tokens, chat=chat)
    if artifact_kind(path) == "mlpackage":
        raise MacqError("generate: .mlpackage generation needs macOS Core ML; use `macq eval` for a graph check")
    import torch

    from macq.pipeline import load_quantized_or_model

    _, model, tok = load_quantized_or_model(path)
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def inspect_coreml(path: Path):
    if path.suffix != ".mlpackage" or not path.exists():
        raise MacqError(f"inspect: {path} is not an existing .mlpackage")
    from converters.inspect import inspect_mlpackage

    try:
        data = inspect_mlpackage(path)
    except MacqError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged package is the user's input: one line, not a traceback
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MacqError(f"inspect: {path} is not a readable Core ML package ({first})") from None
    rows = [{"op": k, "count": v} for k, v in sorted(data.get("ops", {}).items(), key=lambda kv: -kv[1])]
    md = [f"{path}: {data.get('bytes_on_disk', 0) / 2**20:.1f} MiB, "
          f"{data.get('bits_per_weight', float('nan')):.3f} bits/weight over compressed weights", "",
          md_table(rows, ["op", "count"])]
    md += [f"ANE: {line}" for line in data.get("ane_report", []) or []]
    return data, "\n".join(md)
