"""What ``macq export | generate | inspect`` run: get a QuantizedModel (from a macq dir, or by
quantizing a model), hand it to the target's exporter, and report. Exporters never re-quantize."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from macq.errors import MacqError
from macq.evaluate import artifact_kind, md_table


def _quantized(model: str | None, method: str, opts: dict[str, Any], progress: bool, trust_remote_code: bool,
               coreml_output: Path | None = None, **calib: Any):
    """``(QuantizedModel, tokenizer)`` from a macq quantization dir, or by quantizing ``model``
    (``coreml_output``: for a Core ML export, weight methods on a local checkpoint quantize streamed)."""
    from macq.pipeline import load_quantized_or_model, quantize

    if model is not None and artifact_kind(model) == "macq":
        from transformers import AutoTokenizer

        from macq.qmodel import QuantizedModel

        return QuantizedModel.load(model), AutoTokenizer.from_pretrained(model)
    if coreml_output is not None:
        from converters.staging import staged_quantization, streamable

        src = streamable(model, method)
        if src is not None:
            return staged_quantization(src, coreml_output, method, opts, model or "default", progress,
                                       trust_remote_code), None
    _, fp, tok = load_quantized_or_model(model, trust_remote_code)
    qm = quantize(fp, tok, method, opts, progress=progress, source=model or "default", copy_model=False, **calib)
    return qm, tok


def export_any(model: str | None, target: str, output: Path, method: str, opts: dict[str, Any] | Any, *,
               calib_dataset: str = "c4", n_calib: int = 128, seq_len: int = 512, seed: int = 0,
               dtype: str = "float16", context: int = 512, stateful: bool = True, fixed_shapes: bool = False,
               requantize_lut: bool = False, allow_fallback: bool = False, force: bool = False,
               trust_remote_code: bool = False, progress: bool = False, graph: str = "ane",
               prefill_len: int | None = None, chunks: int | None = None, max_chunk_mb: float | None = None):
    qm, tok = _quantized(model, method, opts, progress, trust_remote_code,
                         coreml_output=output if target == "coreml" else None, calib_dataset=calib_dataset,
                         n_calib=n_calib, seq_len=seq_len, seed=seed)
    if target == "mlx":
        from mlx_backend import export_mlx

        res = export_mlx(qm, output, tokenizer=tok, dtype=dtype, force=force, requantize_lut=requantize_lut)
    else:
        chunked = chunks is not None or max_chunk_mb is not None
        if not chunked and output.suffix != ".mlpackage":
            raise MacqError(f"--output {output}: a Core ML export must end in .mlpackage (a chunked one: a directory)")
        from converters import export_coreml

        res = export_coreml(qm, output, context=context, stateful=stateful, fixed_shapes=fixed_shapes,
                            force=force, allow_fallback=allow_fallback, graph=graph, prefill_len=prefill_len,
                            chunks=chunks, max_chunk_mb=max_chunk_mb)
    data = asdict(res) if is_dataclass(res) else dict(res)
    data.update({"target": target, "method": qm.method.get("method"), "record_bits_per_weight": qm.bits_per_weight()})
    md = [f"exported {data.get('path')} ({target}): {data.get('bytes_on_disk', 0) / 2**20:.1f} MiB on disk, "
          f"{data.get('bits_per_weight', qm.bits_per_weight()):.3f} bits/weight over quantized layers"]
    md += [f"note: {n}" for n in data.get("notes", []) or []]
    md += [f"chunk: {c['path']} ({c['bytes'] / 2**20:.1f} MiB, layers {c['layers'][0]}..{c['layers'][1] - 1})"
           for c in data.get("chunks", []) or [] if len(data.get("chunks")) > 1]
    md += [f"ANE: {line}" for line in data.get("ane_report", []) or []]
    return data, "\n".join(md)


def _prompt_ids(tok, prompt: str, chat: bool):
    if chat and getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
    return tok(prompt, return_tensors="pt")["input_ids"]


def generate_coreml(path: str, prompt: str, max_tokens: int, chat: bool, compute_units: str = "ALL") -> str:
    """Greedy generation through an ANE Core ML export: Core ML on macOS; elsewhere MIL value inference,
    a graph check (said on stderr), with the per-token prefill / decode time of whichever ran."""
    import sys

    from transformers import AutoTokenizer

    from converters.ane_runner import generate_ane
    from converters.chunks import is_ane_export, read_manifest
    from macq.models import resolve_model_path

    if not is_ane_export(path):
        raise MacqError(f"generate: {path} is not an ANE-graph Core ML export (re-export with --graph ane)")
    src = read_manifest(path)[0].source
    if not src:
        raise MacqError(f"generate: {path} does not record its source model (tokenizer)")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None if src == "default" else src))
    ids = _prompt_ids(tok, prompt, chat)[0].numpy()
    out, t = generate_ane(path, ids, max_tokens, eos=tok.eos_token_id, compute_units=compute_units)
    backend = "Core ML " + compute_units if sys.platform == "darwin" else "MIL value inference (graph check, not a device)"
    print(f"[{backend}: prefill {1e3 * t.prefill_s / max(t.prefill_tokens, 1):.1f} ms/token over {t.prefill_tokens}, "
          f"decode {1e3 * t.decode_s / max(t.decode_tokens, 1):.1f} ms/token over {t.decode_tokens}]", file=sys.stderr)
    return tok.decode(out, skip_special_tokens=True)


def generate_any(path: str, prompt: str, max_tokens: int = 64, chat: bool = True, compute_units: str = "ALL") -> str:
    if artifact_kind(path) == "mlx":
        from mlx_backend.runner import generate_mlx

        return generate_mlx(path, prompt, max_tokens=max_tokens, chat=chat)
    if artifact_kind(path) == "mlpackage":
        return generate_coreml(path, prompt, max_tokens, chat, compute_units)
    import torch

    from macq.pipeline import load_quantized_or_model

    _, model, tok = load_quantized_or_model(path)
    ids = _prompt_ids(tok, prompt, chat)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def inspect_coreml(path: Path, expect: bool = True):
    from converters.chunks import MANIFEST, read_manifest
    from converters.expect import what_to_expect
    from converters.inspect import inspect_mlpackage

    if path.is_dir() and (path / MANIFEST).is_file():  # chunked ANE export: one report per package
        manifest, root = read_manifest(path)
        datas, mds = [], []
        for c in manifest.chunks:
            d, md = inspect_coreml(root / c.path, expect=False)
            datas.append(dict(d, path=str(root / c.path)))
            mds.append(md)
        e, emd = what_to_expect(datas, [root / c.path for c in manifest.chunks])
        return ({"chunks": datas, "ane_findings": [f for d in datas for f in d["ane_findings"]], "expect": e},
                "\n\n".join(mds + [emd]))
    if path.suffix != ".mlpackage" or not path.exists():
        raise MacqError(f"inspect: {path} is not an existing .mlpackage or chunked Core ML export")
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
    if expect:
        data["expect"], emd = what_to_expect([data], [path])
        md += ["", emd]
    return data, "\n".join(md)
