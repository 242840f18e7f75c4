"""llm-compressor worker: run as a *script* by the reference venv's Python, never imported by macq.

llm-compressor 0.14.0.1 pins transformers<=5.17 and numpy 2.4.6, which clash with macq's environment, so
it lives in its own venv (``scripts/setup_reference_venv.sh``) and this file imports nothing from macq.
The protocol is files only, in one work directory:

* in:  ``request.json`` {"method": "gptq"|"awq", "model_dir", "bits", "group_size", "symmetric",
  "damp", "device", "threads"} and ``calib.safetensors`` (``input_ids`` int64 [n, seq_len], drawn by macq
  so both libraries see the same tokens);
* out: ``weights.safetensors`` (every float tensor under ``model.layers.`` as llm-compressor leaves it:
  quantize-dequantized linear weights, AWQ-rescaled norms; plus each quantized linear's ``.weight_scale`` /
  ``.weight_zero_point``), ``result.json`` {"seconds",
  "versions", "layers"}; on failure ``error.txt`` with one line and exit code 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _clean_model_view(model_dir: Path, work: Path) -> Path:
    """A view of the model dir without a stale ``quantization_config`` (oneshot refuses "gguf" ones);
    weight files are symlinked, not copied."""
    src = work / "model_view"
    src.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (src / f.name).exists():
            (src / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    return src


def run(work: Path) -> None:
    import torch

    req = json.loads((work / "request.json").read_text())
    torch.set_num_threads(int(req.get("threads", 2)))
    if req["device"] == "cpu":
        # AWQ's intermediates cache pins host memory, which CPU-only torch refuses ("Cannot access
        # accelerator device"); pinning is only a transfer optimisation, so make it a no-op.
        torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(work / "calib.safetensors"))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(_clean_model_view(Path(req["model_dir"]), work)),
                                                 dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=req["bits"], type="int", symmetric=req["symmetric"], strategy="group",
                               group_size=req["group_size"])
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if req["method"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=req["damp"], block_size=128)
    elif req["method"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups=groups, ignore=["lm_head"])
    else:
        raise ValueError(f"unknown method {req['method']!r}")
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=1, shuffle_calibration_samples=False, pipeline="sequential")
    secs = time.perf_counter() - t0
    # GPTQ writes quantize-dequantized weights back; AWQ (like QuantizationModifier) leaves the smoothed
    # float weight and quantizes at forward time. Fake-quantize every scheme-carrying linear with
    # compressed-tensors' own function so both hand back the weights the library computes with
    # (idempotent on GPTQ's weights, which already sit on their grid).
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        for mod in model.modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if isinstance(mod, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
                mod.weight.copy_(fake_quantize(mod.weight, mod.weight_scale, getattr(mod, "weight_zero_point", None),
                                               scheme.weights))
    # Every decoder tensor, not only the linears: AWQ folds its scales into the preceding norms and
    # v_proj, so the quantized model is the whole changed decoder.
    out = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
           if k.startswith("model.layers.") and v.is_floating_point()}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            for p in ("weight_scale", "weight_zero_point"):
                t = getattr(mod, p, None)
                if t is not None:
                    out[f"{name}.{p}"] = t.detach().cpu().contiguous()
    save_file(out, str(work / "weights.safetensors"))
    from importlib.metadata import version

    versions = {n: version(n) for n in ("llmcompressor", "compressed-tensors", "torch", "transformers")}
    (work / "result.json").write_text(json.dumps({"seconds": secs, "versions": versions,
                                                  "layers": sum(k.endswith(".weight_scale") for k in out)}))


def main() -> int:
    work = Path(sys.argv[1])
    try:
        run(work)
    except Exception as e:  # the driver reports this one line; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        (work / "error.txt").write_text(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
