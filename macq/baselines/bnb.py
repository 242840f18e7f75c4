"""bitsandbytes baselines: quantize through transformers' ``BitsAndBytesConfig`` and run in bnb's own
kernels (``Linear4bit`` / ``Linear8bitLt``), on CUDA or, with bitsandbytes >= 0.45, on CPU.

transformers quantizes every ``nn.Linear`` except the lm_head (tied embeddings stay float), which is
exactly the set macq quantizes by default, so sizes and per-layer comparisons line up layer by layer.
4-bit uses bnb's blocksize 64 (transformers does not expose another) with double quantization on, as
QLoRA; int8 is LLM.int8() (row-wise absmax int8 weights, outlier threshold 6.0).

Sizes charge what bnb keeps per layer: packed codes, absmaxes (8-bit codes + second-level fp32 absmaxes
and the 256-entry code table under double quantization, the 16-entry 4-bit table), the int8 row scales.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from macq.errors import MacqError

BNB_PIN = "bitsandbytes==0.50.2"


@dataclass(frozen=True)
class BnbSpec:
    runner: str
    quant_type: str | None     # nf4 | fp4 | None (int8)
    bits: int


BNB_RUNNERS = {"bnb-nf4": BnbSpec("bnb-nf4", "nf4", 4), "bnb-fp4": BnbSpec("bnb-fp4", "fp4", 4),
               "bnb-int8": BnbSpec("bnb-int8", None, 8)}
BLOCKSIZE = 64


def require_bnb(runner: str) -> Any:
    """Import bitsandbytes and accelerate (transformers' bnb loader needs both) or fail in one line."""
    missing = []
    try:
        import bitsandbytes
    except ImportError:
        missing.append(BNB_PIN)
    try:
        import accelerate  # noqa: F401
    except ImportError:
        missing.append("accelerate")
    if missing:
        raise MacqError(f"--runner {runner} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    return bitsandbytes


def bnb_config(spec: BnbSpec, device: torch.device):
    from transformers import BitsAndBytesConfig

    if spec.quant_type is None:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def method_config(spec: BnbSpec, device: torch.device) -> dict[str, Any]:
    if spec.quant_type is None:
        return {"library": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0, "weights": "int8 row-wise absmax"}
    return {"library": "bitsandbytes", "quant_type": spec.quant_type, "blocksize": BLOCKSIZE, "double_quant": True,
            "compute_dtype": "float16" if device.type == "cuda" else "float32"}


def load_bnb(model_dir: str, spec: BnbSpec, device: torch.device) -> nn.Module:
    """The model quantized by bitsandbytes as transformers loads it, placed on ``device``."""
    from transformers import AutoModelForCausalLM

    require_bnb(spec.runner)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(spec, device),
                                                     device_map={"": str(device)}, dtype=dtype)
    # LLM.int8 logs one warning per matmul that fp32 inputs are cast to fp16 (bnb's int8 CPU/CUDA path
    # computes in fp16 whatever the input): true, said once in the run notes instead.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return model.eval()


def _nbits(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size() * 8


def quant_state_bits(qs) -> int:
    """Bits bnb keeps beside one 4-bit weight: absmax (+ nested absmax, nested code, offset) and code."""
    bits = _nbits(qs.absmax) + _nbits(qs.code)
    if getattr(qs, "nested", False) and qs.state2 is not None:
        bits += _nbits(qs.state2.absmax) + _nbits(qs.state2.code) + 32  # + the fp32 offset
    return bits


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def layer_bits(mod: nn.Module) -> tuple[int, int]:
    """``(stored bits, weight count)`` of one bnb layer."""
    import bitsandbytes as bnb

    w = mod.weight
    if isinstance(mod, bnb.nn.Linear4bit):
        n = mod.in_features * mod.out_features
        return _nbits(w.data) + quant_state_bits(w.quant_state), n
    scb = getattr(w, "SCB", None)
    return _nbits(w.data) + _nbits(scb), w.numel()


def size_accounting(model: nn.Module) -> tuple[int, int, int]:
    """``(quantized layers' bits, their weight count, other float tensors' bytes at fp16, tied once)``."""
    layers = quantized_layers(model)
    qbits = nq = 0
    skip: set[int] = set()
    for mod in layers.values():
        b, n = layer_bits(mod)
        qbits, nq = qbits + b, nq + n
        skip.add(id(mod.weight))
    seen: set[int] = set()
    other = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in skip or not p.is_floating_point():
            continue
        ptr = p.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        other += 2 * p.numel()
    return qbits, nq, other


def dequantized_weight(mod: nn.Module) -> torch.Tensor:
    """The float weight bnb's kernels compute with, ``[out, in]`` float32, by bnb's own dequantizer."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = mod.weight
    if isinstance(mod, bnb.nn.Linear4bit):
        if cpu_repacked(mod):
            raise MacqError("bnb: this layer's weights were repacked for bnb's bf16 CPU kernel by a forward pass; "
                            "dequantize before running the model")
        return F.dequantize_4bit(w.data, w.quant_state).float().reshape(mod.out_features, mod.in_features).cpu()
    scb = getattr(w, "SCB", None)
    if scb is None:
        raise MacqError("bnb-int8: the layer holds no SCB row scales (was it quantized?)")
    return (w.data.float() * (scb.float().unsqueeze(1) / 127.0)).cpu()


def cpu_repacked(mod: nn.Module) -> bool:
    """bnb >= 0.49 on a CPU with AVX512-BF16 repacks a Linear4bit at its first inference forward for a
    bf16 kernel (quant_state dtype becomes bfloat16): the layer then computes in bf16 whatever
    ``compute_dtype`` says, and ``weight.data`` is no longer the 4-bit code layout."""
    qs = getattr(mod.weight, "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def macq_record_for(spec: BnbSpec, w: torch.Tensor):
    """macq's record of the same configuration: NF4/FP4 at bnb's blocksize with double quant; for int8
    the closest macq format, 8-bit symmetric per-channel RTN with fp32 scales (not bit-equal by design:
    bnb rounds w * 127/absmax, macq's grid may differ by its scale rule)."""
    if spec.quant_type is not None:
        from macq.quantizers.normalfloat import FP4Config, NF4Config, quantize_weight

        cfg = (NF4Config if spec.quant_type == "nf4" else FP4Config)(block_size=BLOCKSIZE, double_quant=True)
        return quantize_weight(w, cfg)
    from macq.quantizers.rtn import RTNConfig
    from macq.quantizers.rtn import quantize_weight as rtn_weight

    return rtn_weight(w, RTNConfig(bits=8, group_size=0, symmetric=True, scale_dtype="float32"))
