"""Per-architecture knowledge as data: where the decoder layers live, which norm or linear feeds which
linears (for AWQ / SmoothQuant scale folding), and the order in which a layer's linears see their inputs
(for sequential GPTQ). Adding an architecture is adding a table row, never an ``if arch ==`` branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from macq.errors import MacqError


@dataclass(frozen=True)
class ScaleMapping:
    """``prev`` produces the input of every module in ``linears``; a per-input-channel scale can be
    divided out of ``prev``'s output and multiplied into those linears' weights with no new op.
    ``inspect`` is the module whose output measures the error of a candidate scale (AWQ)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class ArchSpec:
    layers: str                      # dotted path of the ModuleList of decoder layers
    embed: str                       # token embedding
    final_norm: str
    lm_head: str
    mappings: tuple[ScaleMapping, ...] = ()
    # Linears of one decoder layer grouped by the input they share, in forward order (GPTQ sequence).
    sequence: tuple[tuple[str, ...], ...] = ()
    extra_embeds: tuple[str, ...] = field(default=())  # e.g. GPT-2's position embedding
    export_model: str = ""           # Core ML ANE graph that implements this family (converters.ane_model), "" = none


_LLAMA_LIKE = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    mappings=(
        ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    sequence=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    export_model="llama",
)

_GPT2 = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    mappings=(
        ScaleMapping("ln_1", ("attn.c_attn",), "attn"),
        ScaleMapping("ln_2", ("mlp.c_fc",), "mlp"),
    ),
    sequence=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    extra_embeds=("transformer.wpe",),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": _GPT2,
}


def arch_spec(model_or_type: nn.Module | str) -> ArchSpec:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise MacqError(f"model_type {model_type!r} is not supported; known: {', '.join(sorted(ARCHITECTURES))}") from None


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_spec(model).layers)  # type: ignore[return-value]
