"""Orchestration shared by the CLI and the benchmark scripts: load → (calibrate) → quantize → save.

Kept apart from the CLI so scripts produce their tables through exactly the code users run.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError
from macq.qmodel import QuantizedModel, is_quantized_dir
from macq.quantizers import make_config, method_spec, quantize_model


def config_for(method: str, options: dict[str, Any]):
    """Build the method's config from the options the user actually set; reject ones that don't apply."""
    cls, _ = method_spec(method).load()
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    stray = sorted(k for k in given if k not in names)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise MacqError(f"{flags} does not apply to --method {method}")
    return make_config(method, **given)


def calibration_ids(tokenizer, dataset: str = "c4", n_calib: int = 128, seq_len: int = 512, seed: int = 0):
    from macq.data import calibration_samples

    return calibration_samples(tokenizer, dataset, n_calib, seq_len, seed)


def quantize(model, tokenizer, method: str, options: dict[str, Any] | Any, calib_dataset: str = "c4", n_calib: int = 128,
             seq_len: int = 512, seed: int = 0, progress: bool = False, source: str = "",
             copy_model: bool = True) -> QuantizedModel:
    """Quantize ``model`` (a deep copy unless ``copy_model=False``) with one method.

    ``options`` is a dict of CLI-style options (completed exactly as the CLI completes them: the automatic group
    size, the calibration settings, every check of :func:`macq.preflight.resolve_config`) or a built config."""
    if isinstance(options, dict):
        from macq.preflight import resolve_config

        cli = {"n_calib": n_calib, "seq_len": seq_len, "seed": seed, "dataset": calib_dataset}
        cfg, _ = resolve_config(method, {k: v for k, v in options.items() if v is not None}, model.config, None, cli)
    else:
        cfg = options
    spec = method_spec(method)
    calib = calibration_ids(tokenizer, calib_dataset, n_calib, seq_len, seed) if spec.needs_calibration else None
    target = copy.deepcopy(model) if copy_model else model
    qm = quantize_model(target, method, cfg, calib=calib, progress=progress, source=source)
    if spec.needs_calibration:
        qm.method.setdefault("calibration", {"dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len,
                                             "seed": seed})
    return qm


def stream_calibrated(src: Path, output: Path, method: str, cfg: Any, calib_dataset: str, n_calib: int, seq_len: int,
                      seed: int, *, source: str = "", force: bool = False, progress: bool = False,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """A calibrated method on the streaming path (:mod:`macq.quantizers.stream_calib`): the calibration ids come
    from the checkpoint's tokenizer exactly as :func:`quantize` draws them."""
    from transformers import AutoTokenizer

    from macq.quantizers.stream_calib import stream_calibrate

    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    calib = calibration_ids(tok, calib_dataset, n_calib, seq_len, seed)
    return stream_calibrate(src, output, method, cfg, calib, source=source, force=force, progress=progress,
                            trust_remote_code=trust_remote_code,
                            calibration={"dataset": calib_dataset, "n_calib": n_calib, "seq_len": seq_len, "seed": seed})


def load_quantized_or_model(path: str | None, trust_remote_code: bool = False):
    """``(QuantizedModel | None, model, tokenizer)``: a macq quantization dir, or a float model."""
    from macq.models import load_model

    if path is not None and is_quantized_dir(path):
        from transformers import AutoTokenizer

        qm = QuantizedModel.load(path)
        return qm, qm.to_torch(), AutoTokenizer.from_pretrained(path)
    model, tok = load_model(path, trust_remote_code=trust_remote_code)
    return None, model, tok


def reference_model_for(qm: QuantizedModel, override: str | None = None):
    """The unquantized model a quantization came from (for KL / top-1), or None if unknown."""
    from macq.models import load_model

    src = override or qm.source
    if not src:
        return None
    if not (Path(src).exists() or src in ("default",)):
        return None
    model, _ = load_model(src if src != "default" else None, with_tokenizer=False)
    return model


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise MacqError(f"--dtype {name!r}: expected float32, float16 or bfloat16") from None
