"""``macq baseline``: quantize a model with a reference library and measure it with macq's evaluator.

Runners: ``bnb-nf4`` / ``bnb-fp4`` / ``bnb-int8`` (bitsandbytes' kernels, CUDA or CPU), ``gptq`` / ``awq``
(llm-compressor in its own venv; weights evaluated dense in torch), ``fp16`` (the float model in fp16).
Every check that can fail (runner name, device present, library installed, options) runs before the
model is loaded. The float model scores the text once (log-probs kept) and every row's KL / top-1 is
against it; all rows use the same eval tokens, whose hash goes into the result.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from macq.baselines import bnb, reference
from macq.baselines.weights import compare_layer, summary
from macq.device import resolve_device
from macq.errors import MacqError
from macq.results import RunResult, device_name, library_versions, model_hash, os_name, text_identity

RUNNERS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "gptq", "awq", "fp16")


@dataclass
class BaselineConfig:
    """What to run and how to measure it; validates itself (one-line errors naming the option)."""

    runner: str
    device: str = "cpu"
    dataset: str = "wiki"
    max_tokens: int = 2048
    context: int = 512
    bits: int = 4                       # gptq / awq
    group_size: int = 128
    symmetric: bool | None = None       # gptq default True (llm-compressor W4A16), awq default False (W4A16_ASYM)
    damp: float = 0.01
    calib_dataset: str = "c4"
    n_calib: int = 16
    seq_len: int = 256
    seed: int = 0
    latency: bool = True
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    threads: int | None = None
    compare: str | None = None          # a macq quantization dir of the same config, compared per layer
    work_dir: str | None = None         # llm-compressor exchange directory

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise MacqError(f"--runner {self.runner!r}: expected one of {', '.join(RUNNERS)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise MacqError(f"--device {self.device!r}: expected cpu or cuda")
        if self.max_tokens < 2 or self.context < 2:
            raise MacqError(f"--max-tokens {self.max_tokens} / --context {self.context}: expected >= 2")
        if self.runner in ("gptq", "awq"):
            if self.bits not in (2, 3, 4, 8):
                raise MacqError(f"--bits {self.bits}: llm-compressor int weights take 2, 3, 4 or 8")
            if self.group_size < 1:
                raise MacqError(f"--group-size {self.group_size}: expected a positive group size")
            if self.n_calib < 1 or self.seq_len < 2:
                raise MacqError(f"--n-calib {self.n_calib} / --seq-len {self.seq_len}: expected >= 1 / >= 2")
        if self.symmetric is None:
            self.symmetric = self.runner != "awq"
        if self.repeats < 1 or self.prompt_len < 1 or self.new_tokens < 1:
            raise MacqError(f"--repeats {self.repeats} / --prompt-len / --new-tokens: expected >= 1")
        if self.compare is not None and not (Path(self.compare) / "manifest.json").is_file():
            raise MacqError(f"--compare {self.compare}: not a macq quantization directory")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_runner(cfg: BaselineConfig) -> torch.device:
    """Fail fast: the device exists and the runner's library is installed."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise MacqError(f"--device {cfg.device}: no CUDA device here (torch {torch.__version__} sees none); "
                        f"run --runner {cfg.runner} on an NVIDIA machine with CUDA torch, or pass --device cpu")
    dev = resolve_device(cfg.device)
    if cfg.runner.startswith("bnb-"):
        bnb.require_bnb(cfg.runner)
    elif cfg.runner in ("gptq", "awq"):
        reference.require_venv(cfg.runner)
    return dev


def _fp_layers(fp: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from macq.models import quantizable_modules

    return quantizable_modules(fp)


def run_baseline(model: str | None, cfg: BaselineConfig, progress: bool = False) -> RunResult:
    from macq.data import calibration_samples, eval_tokens
    from macq.eval import reference_logprobs
    from macq.eval.measure import latency_metrics, quality_with_peak, size_metrics
    from macq.models import load_model, resolve_model_path

    dev = check_runner(cfg)
    model_dir = resolve_model_path(model)
    if not Path(model_dir).is_dir():
        raise MacqError(f"model: {model_dir} must be a local Hugging Face directory for a baseline run")
    macq_qm = None
    if cfg.compare is not None:
        from macq.qmodel import QuantizedModel

        macq_qm = QuantizedModel.load(cfg.compare)
    fp, tok = load_model(model_dir)
    ids = eval_tokens(tok, cfg.dataset, cfg.max_tokens)
    text_id, text_hash = text_identity(ids, cfg.dataset, cfg.context)
    ref_lp = reference_logprobs(fp, ids, cfg.context, device=dev, progress=progress)
    fp.to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    notes: list[str] = []
    layers: list[dict[str, Any]] = []
    method_cfg: dict[str, Any] = {}
    extra_libs: dict[str, str] = {}
    timed = True
    fp_mods = _fp_layers(fp)
    if cfg.runner == "fp16":
        n = sum(m.weight.numel() for m in fp_mods.values())
        qbits, nq, other = 16 * n, n, 2 * sum(p.numel() for p in fp.parameters()) - 2 * n
        if dev.type == "cuda":
            q = copy.deepcopy(fp).to(device=dev, dtype=torch.float16)
            runtime, method_cfg = "torch", {"dtype": "float16"}
        else:
            # CPU torch has no fast fp16 GEMM (it runs many times slower than fp32): keep the fp16 values,
            # compute in fp32, as a CPU deployment of an fp16 checkpoint would.
            from macq.benchmark import fp16_copy

            q = fp16_copy(fp)
            runtime, method_cfg = "torch (fp16 weights, fp32 compute)", {"dtype": "float16 weights, float32 compute"}
    elif cfg.runner.startswith("bnb-"):
        spec = bnb.BNB_RUNNERS[cfg.runner]
        q = bnb.load_bnb(model_dir, spec, dev)
        qbits, nq, other = bnb.size_accounting(q)
        kernel = "Linear4bit" if spec.quant_type else "Linear8bitLt"
        runtime, method_cfg = f"bitsandbytes {kernel}", bnb.method_config(spec, dev)
        for name, mod in bnb.quantized_layers(q).items():
            w_fp = fp.get_submodule(name).weight.detach()
            rec = bnb.macq_record_for(spec, w_fp.float())
            layers.append(compare_layer(name, w_fp, bnb.dequantized_weight(mod), bnb.layer_bits(mod)[0], rec))
        if spec.quant_type is None:
            notes.append("macq column for bnb-int8: macq RTN 8-bit symmetric per-channel, fp32 scales "
                         "(closest macq format; bnb int8 is LLM.int8 with outlier decomposition at run time)")
    else:
        calib = calibration_samples(tok, cfg.calib_dataset, cfg.n_calib, cfg.seq_len, cfg.seed)
        # A fresh exchange directory per run unless one is given (two runs never share files); it is kept,
        # with the worker's log, so a failure can be read.
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix=f"macq-{cfg.runner}-"))
        request = {"method": cfg.runner, "model_dir": str(Path(model_dir).resolve()), "bits": cfg.bits,
                   "group_size": cfg.group_size, "symmetric": cfg.symmetric, "damp": cfg.damp,
                   "device": dev.type, "threads": cfg.threads or torch.get_num_threads()}
        tensors, res = reference.run_worker(cfg.runner, request, calib, work)
        if cfg.work_dir is None:  # loaded: drop the big file, keep request, result and log
            (work / "weights.safetensors").unlink(missing_ok=True)
        extra_libs = {f"reference-venv {k}": v for k, v in res.get("versions", {}).items()}
        q = copy.deepcopy(fp)
        decoder = {k: v for k, v in tensors.items() if not k.endswith(("weight_scale", "weight_zero_point"))}
        missing = set(decoder) - set(q.state_dict())
        if missing:
            raise MacqError(f"--runner {cfg.runner}: llm-compressor returned tensors this model lacks: {sorted(missing)[:3]}")
        q.load_state_dict(decoder, strict=False)
        qbits = nq = 0
        for name in reference.layer_names(tensors):
            b, n = reference.layer_bits(tensors, name, cfg.bits, bool(cfg.symmetric))
            qbits, nq = qbits + b, nq + n
            if cfg.runner == "gptq":  # AWQ rescales weights (folded into the norms): not comparable to W
                rec = macq_qm.records.get(name) if macq_qm is not None else None
                layers.append(compare_layer(name, fp.get_submodule(name).weight, tensors[name + ".weight"], b, rec))
        other = 2 * sum(p.numel() for p in fp.parameters()) - 2 * nq
        q = q.to(device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
        runtime = "torch (dense llm-compressor weights)"
        method_cfg = {"library": "llm-compressor", "modifier": "GPTQModifier" if cfg.runner == "gptq" else "AWQModifier",
                      "bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                      "damp": cfg.damp if cfg.runner == "gptq" else None,
                      "calibration": {"dataset": cfg.calib_dataset, "n": cfg.n_calib, "seq_len": cfg.seq_len,
                                      "seed": cfg.seed}, "quantize_seconds": res.get("seconds")}
        notes.append("llm-compressor has no inference kernels of its own: its quantize-dequantized weights "
                     "run dense in torch, so no latency is reported for this row")
        timed = False
    q.eval()
    metrics = quality_with_peak(q, ids, ref_lp, cfg.context, dev)
    metrics.update(size_metrics(qbits, nq, other))
    if cfg.latency and timed:
        metrics.update(latency_metrics(q, dev, cfg.prompt_len, cfg.new_tokens, cfg.repeats, threads=cfg.threads))
    if cfg.runner.startswith("bnb-") and any(bnb.cpu_repacked(m) for m in bnb.quantized_layers(q).values()):
        notes.append("bitsandbytes repacked its 4-bit weights for its AVX512-BF16 CPU kernel at the first forward: "
                     "this row computed in bf16 (compute_dtype float32 notwithstanding)")
    if layers:
        s = summary(layers)
        notes.append(f"weights: {s.get('layers_equal', '-')} of {s['layers']} layers bit-equal to macq's record "
                     f"of the same config" if "layers_equal" in s else f"weights: {s['layers']} layers compared")
    return RunResult(model_id=model or "default", model_hash=model_hash(model_dir), method=cfg.runner,
                     method_config={**method_cfg, "eval": {"dataset": cfg.dataset, "max_tokens": cfg.max_tokens,
                                                           "context": cfg.context}},
                     runtime=runtime, device_kind=dev.type, device_name=device_name(dev.type),
                     eval_text_id=text_id, eval_text_hash=text_hash, os=os_name(),
                     libraries={**library_versions(), **extra_libs}, metrics=metrics, layers=layers, notes=notes,
                     label=f"{cfg.runner} (reference)")
