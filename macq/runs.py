"""Turning what ``macq eval`` / ``macq bench`` computed into one :class:`macq.results.RunResult`.

The numbers are the commands' own (nothing is measured again); this module only adds identity: which
source float model (hash), which text (the same eval tokens re-tokenized and hashed), which runtime,
device, OS and library versions, and puts every value in a :class:`~macq.results.Metric` with its unit.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from macq.errors import MacqError
from macq.evaluate import artifact_kind
from macq.results import Metric, RunResult, device_name, library_versions, model_hash, os_name, text_identity


def _source_of(path: str | None, kind: str) -> str | None:
    """The float model a path was made from, as recorded by macq (or the path itself for a float model)."""
    if kind == "model":
        from macq.models import resolve_model_path

        return resolve_model_path(path)
    if kind == "macq":
        src = json.loads((Path(path) / "manifest.json").read_text()).get("source")
    elif kind == "mlx":
        src = (json.loads((Path(path) / "config.json").read_text()).get("macq") or {}).get("source")
    else:
        from converters.chunks import is_ane_export, read_manifest

        if is_ane_export(path):  # one ANE package or a chunk directory: the manifest records the source
            src = read_manifest(path)[0].source
        else:
            import coremltools as ct

            src = ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata.get("macq.source")
    if src in (None, ""):
        return None
    if src == "default":
        from macq.models import default_model_dir

        return str(default_model_dir())
    return src


def coreml_facts(path: str | Path) -> tuple[str, dict[str, Any], float, int]:
    """``(method, its config, bits per compressed weight, bytes on disk)`` of a Core ML export (one package or
    an ANE chunk directory), read from the saved programs and the provenance metadata macq writes."""
    from converters.chunks import is_ane_export, read_manifest
    from converters.inspect import inspect_mlpackage, load_program
    from converters.mil_io import dir_bytes

    paths = [Path(path)]
    if is_ane_export(path) and Path(path).suffix != ".mlpackage":
        manifest, root = read_manifest(path)
        paths = [root / c.path for c in manifest.chunks]
    bits = n = 0
    meta: dict[str, str] = {}
    for p in paths:
        prog, spec = load_program(p)
        info = inspect_mlpackage(p, (prog, spec))
        bits += info["bits_per_weight"] * info["n_weights"]
        n += info["n_weights"]
        meta = meta or dict(spec.description.metadata.userDefined)
    cfg = json.loads(meta.get("macq.method", "{}") or "{}")
    return cfg.get("method", "coreml"), cfg, (bits / n if n else 16.0), dir_bytes(Path(path))


def _tokenizer_for(path: str | None, kind: str, source: str | None, tokenizer: str | None):
    from transformers import AutoTokenizer

    where = tokenizer or (source if kind in ("model", "mlpackage") else path)
    if where is None:
        raise MacqError(f"--out: cannot find the tokenizer of {path} to identify the evaluation text; pass --tokenizer")
    return AutoTokenizer.from_pretrained(where)


def mlx_size(path: str | Path) -> tuple[float | None, int]:
    """``(bits per weight over quantized layers, bytes of the safetensors files)`` of an MLX export, from
    tensor shapes and dtypes only (packed ``uint32`` weight + scales + biases per quantized module)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    qcfg = json.loads((Path(path) / "config.json").read_text()).get("quantization", {})
    qbits = nweights = 0
    for f in files:
        with safe_open(str(f), framework="np") as st:
            keys = set(st.keys())
            for k in keys:
                if not k.endswith(".scales"):
                    continue
                base = k[: -len(".scales")]
                meta = {}
                for part in ("weight", "scales", "biases"):
                    if f"{base}.{part}" in keys:
                        sl = st.get_slice(f"{base}.{part}")
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        meta[part] = (n, _DTYPE_BITS.get(sl.get_dtype(), 16))
                wn, _ = meta["weight"]
                bits_total = sum(n * b for n, b in meta.values())
                qbits += bits_total
                b = (qcfg.get(base) or {}).get("bits", qcfg.get("bits"))
                nweights += wn * 32 // b if b else 0
    return (qbits / nweights if nweights else None), sum(f.stat().st_size for f in files)


def macq_dir_bytes(path: str | Path) -> int:
    """Deployed size of a macq quantization dir: records at their storage rate + float tensors at fp16,
    a tied lm_head counted once (the dir stores the float copy twice; a deployment stores it once)."""
    from safetensors import safe_open

    from macq.arch import arch_spec
    from macq.qmodel import QuantizedModel

    p = Path(path)
    qm = QuantizedModel.load(p)
    spec = arch_spec(qm.config.model_type)
    tied = bool(getattr(qm.config, "tie_word_embeddings", False))
    rec = sum((r.storage_bits() + 7) // 8 for r in qm.records.values())
    flt = 0
    with safe_open(str(p / "float.safetensors"), framework="pt") as st:
        for k in st.keys():
            if tied and k == f"{spec.lm_head}.weight" and f"{spec.embed}.weight" in st.keys():
                continue
            if st.get_slice(k).get_dtype() in ("F32", "F16", "BF16"):
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                flt += 2 * n
    return rec + flt


_DTYPE_BITS = {"U32": 32, "F16": 16, "BF16": 16, "F32": 32, "U8": 8, "I8": 8}


def _metrics_from(res: dict[str, Any], prompt_len: int | None = None) -> dict[str, Metric]:
    m: dict[str, Metric] = {}
    if res.get("ppl") is not None:
        m["ppl"] = Metric(res["ppl"], "perplexity", res.get("ppl_stderr"))
    if res.get("n_tokens") is not None:
        m["n_tokens"] = Metric(res["n_tokens"], "tokens")
    for k, unit in (("kl", "nats/token"), ("top1", "fraction"), ("bits_per_weight",
                                                                  "bits/weight (quantized layers, metadata charged)")):
        if res.get(k) is not None:
            m[k] = Metric(res[k], unit)
    if res.get("bytes") is not None:
        m["size"] = Metric(res["bytes"] / 2**20, "MiB (quantized layers + other tensors at fp16, tied once)")
    if res.get("prefill_ms_per_token") is not None:
        m["prefill_ms_per_token"] = Metric(res["prefill_ms_per_token"], "ms/token")
    elif res.get("prefill_ms") is not None and prompt_len:
        m["prefill_ms_per_token"] = Metric(res["prefill_ms"] / prompt_len, f"ms/token (prompt {prompt_len})")
    if res.get("decode_ms_per_token") is not None:
        m["decode_ms_per_token"] = Metric(res["decode_ms_per_token"], "ms/token")
    if res.get("tokens_per_s") is not None:
        m["decode_tokens_per_s"] = Metric(res["tokens_per_s"], "tokens/s")
    if res.get("prefill_tokens_per_s") is not None:
        m["prefill_tokens_per_s"] = Metric(res["prefill_tokens_per_s"], "tokens/s")
    elif "prefill_ms_per_token" in m and m["prefill_ms_per_token"].value:
        m["prefill_tokens_per_s"] = Metric(1e3 / m["prefill_ms_per_token"].value, "tokens/s")
    if "decode_tokens_per_s" not in m and m.get("decode_ms_per_token") and m["decode_ms_per_token"].value:
        m["decode_tokens_per_s"] = Metric(1e3 / m["decode_ms_per_token"].value, "tokens/s")
    if res.get("peak_rss_mib") is not None:
        m["peak_memory"] = Metric(res["peak_rss_mib"], "MiB (process lifetime peak RSS)")
    return m


def _runtime_device(kind: str, res: dict[str, Any]) -> tuple[str, str, str]:
    """``(runtime, device kind, device name)`` for what actually ran."""
    if kind == "mlx":
        import mlx.core as mx

        dev = "gpu" if mx.default_device() == mx.gpu else "cpu"
        return "mlx", dev, device_name("mlx" if dev == "gpu" else "cpu")
    if kind == "mlpackage":
        if res.get("backend") == "coreml":
            return "coreml", res.get("compute_units", "ALL"), device_name("ane")
        return "mil-graph-check", "cpu", device_name("cpu")
    dev = str(res.get("device", "cpu")).split(":")[0]
    return "torch" + (" (dequantized macq records)" if kind == "macq" else ""), dev, device_name(dev)


def run_from_eval(res: dict[str, Any], path: str | None, dataset: str, context: int, stride: int | None,
                  max_tokens: int | None, tokenizer: str | None = None, label: str = "") -> RunResult:
    from macq.data import eval_tokens

    kind = artifact_kind(path)
    source = _source_of(path, kind)
    tok = _tokenizer_for(path, kind, source, tokenizer)
    ids = eval_tokens(tok, dataset, max_tokens)
    text_id, text_hash = text_identity(ids, dataset, context, stride)
    metrics = _metrics_from(res, prompt_len=res.get("prompt_len"))
    method, cfg = "float", {}
    if kind == "macq":
        man = json.loads((Path(path) / "manifest.json").read_text())
        cfg = man.get("method", {})
        method = cfg.get("method", "?")
        metrics["size"] = Metric(macq_dir_bytes(path) / 2**20, "MiB (quantized layers + other tensors at fp16, tied once)")
    elif kind == "mlx":
        mcfg = json.loads((Path(path) / "config.json").read_text())
        cfg = (mcfg.get("macq") or {}).get("method", {}) or {}
        method = cfg.get("method", "mlx")
        bpw, nbytes = mlx_size(path)
        metrics["bits_per_weight"] = Metric(bpw, "bits/weight (quantized layers, scales+biases charged)")
        metrics["size"] = Metric(nbytes / 2**20, "MiB (safetensors on disk)")
    elif kind == "mlpackage":
        method, cfg, bpw, nbytes = coreml_facts(path)
        metrics["bits_per_weight"] = Metric(bpw, "bits/weight (compressed weights as stored, metadata charged)")
        metrics["size"] = Metric(nbytes / 2**20, "MiB (package files on disk)")
    runtime, dev_kind, dev_name = _runtime_device(kind, res)
    if runtime == "mil-graph-check":  # numpy stepping through the graph: not a latency of anything deployed
        for k in ("prefill_ms_per_token", "decode_ms_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"):
            metrics.pop(k, None)
    notes = list(res.get("notes", []) or [])
    if kind == "mlx" and res.get("compute_dtype") not in (None, "stored"):
        notes.append(f"mlx compute dtype {res['compute_dtype']} (stored values unchanged; {platform.system()} CPU build)")
    return RunResult(model_id=path or "default", model_hash=model_hash(source), method=method, method_config=cfg,
                     runtime=runtime, device_kind=dev_kind, device_name=dev_name, eval_text_id=text_id,
                     eval_text_hash=text_hash, os=os_name(), libraries=library_versions(), metrics=metrics,
                     notes=notes, label=label)


def run_from_bench(res: dict[str, Any], path: str | None, label: str = "") -> RunResult:
    """A latency-only run: no evaluation text (so ``macq report`` puts it beside any text's runs)."""
    kind = artifact_kind(path)
    source = _source_of(path, kind)
    metrics = _metrics_from(res, prompt_len=res.get("prompt_len"))
    runtime, dev_kind, dev_name = _runtime_device(kind, res)
    method = "float"
    if kind == "macq":
        method = json.loads((Path(path) / "manifest.json").read_text()).get("method", {}).get("method", "?")
    return RunResult(model_id=path or "default", model_hash=model_hash(source), method=method,
                     method_config={"dtype": res.get("dtype"), "prompt_len": res.get("prompt_len"),
                                    "new_tokens": res.get("new_tokens")},
                     runtime=runtime, device_kind=dev_kind, device_name=dev_name, os=os_name(),
                     libraries=library_versions(), metrics=metrics, label=label)
