"""What ``macq generate | inspect`` run on an export (``macq export`` itself is the planner's: :mod:`macq.plan`)."""

from __future__ import annotations

from pathlib import Path

from macq.errors import MacqError
from macq.evaluate import artifact_kind, md_table


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

    try:
        ane = is_ane_export(path)
        src = read_manifest(path)[0].source if ane else ""
    except MacqError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged package is the user's input: one line naming it
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MacqError(f"generate: {path} is not a readable Core ML package ({first})") from None
    if not ane:
        raise MacqError(f"generate: {path} is not an ANE-graph Core ML export (re-export with --graph ane)")
    if not src:
        raise MacqError(f"generate: {path} does not record its source model (tokenizer)")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None if src == "default" else src))
    ids = _prompt_ids(tok, prompt, chat)[0].numpy()
    out, t = generate_ane(path, ids, max_tokens, eos=tok.eos_token_id, compute_units=compute_units)
    backend = "Core ML " + compute_units if sys.platform == "darwin" else "MIL value inference (graph check, not a device)"
    print(f"[{backend}: prefill {1e3 * t.prefill_s / max(t.prefill_tokens, 1):.1f} ms/token over {t.prefill_tokens}, "
          f"decode {1e3 * t.decode_s / max(t.decode_tokens, 1):.1f} ms/token over {t.decode_tokens}]", file=sys.stderr)
    return tok.decode(out, skip_special_tokens=True)


def generate_coreai_text(path: str, prompt: str, max_tokens: int, chat: bool) -> str:
    """Greedy generation through a Core AI export, in the Core AI runtime (macOS: the OS runtime with the export's
    hardware preference; Linux: the asset compiled for the CPU), with the per-token times on stderr."""
    import sys

    from transformers import AutoTokenizer

    from coreai_backend.export import read_manifest
    from coreai_backend.runner import generate_coreai
    from macq.models import resolve_model_path

    src = read_manifest(path)[0].source
    if not src:
        raise MacqError(f"generate: {path} does not record its source model (tokenizer)")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None if src == "default" else src))
    ids = _prompt_ids(tok, prompt, chat)[0].numpy()
    out, t = generate_coreai(path, ids, max_tokens, eos=tok.eos_token_id)
    print(f"[Core AI runtime: prefill {1e3 * t.prefill_s / max(t.prefill_tokens, 1):.1f} ms/token over "
          f"{t.prefill_tokens}, decode {1e3 * t.decode_s / max(t.decode_tokens, 1):.1f} ms/token over "
          f"{t.decode_tokens}]", file=sys.stderr)
    return tok.decode(out, skip_special_tokens=True)


def generate_any(path: str, prompt: str, max_tokens: int = 64, chat: bool = True, compute_units: str = "ALL") -> str:
    if artifact_kind(path) == "mlx":
        from mlx_backend.runner import generate_mlx

        return generate_mlx(path, prompt, max_tokens=max_tokens, chat=chat)
    if artifact_kind(path) == "mlpackage":
        return generate_coreml(path, prompt, max_tokens, chat, compute_units)
    if artifact_kind(path) == "coreai":
        return generate_coreai_text(path, prompt, max_tokens, chat)
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
    from converters.mil_io import release_memory

    if path.is_dir() and (path / MANIFEST).is_file():  # chunked ANE export: one report per package
        manifest, root = read_manifest(path)
        datas, mds = [], []
        for c in manifest.chunks:       # one package's program in memory at a time
            d, md = inspect_coreml(root / c.path, expect=False)
            datas.append(dict(d, path=str(root / c.path)))
            mds.append(md)
            release_memory()
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
