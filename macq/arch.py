"""The architecture registry: one row (:class:`ArchSpec`) per model family, read by every quantizer, both
exporters, the evaluator and the tests.

A row says, as data: where the decoder layers, embeddings, final norm and head live; the norm formula
(``normalize(x) · (offset + w)``: Gemma stores ``w`` and multiplies by ``1 + w``) and the embedding
multiplier (Gemma scales embeddings by ``sqrt(hidden)``); which norm or linear feeds which linears (AWQ /
SmoothQuant scale folding) and the order in which a layer's linears see their inputs (sequential GPTQ);
fused projections and how their rows split (Phi-3's ``qkv_proj`` = ``[q; k; v]``, ``gate_up_proj`` =
``[gate; up]``); per-head q/k norms (Qwen3, Gemma3); the attention kind (grouped-query, sliding windows,
logit soft-capping); tying; the ``mlx_lm`` model and name mapping; the Core ML model definition.

Adding a family is adding a row to :data:`FAMILIES` (and a tiny config in :mod:`macq.tiny` for the tests);
no code anywhere branches on ``model_type``. Everything a row cannot describe is refused by the code that
reads it with a one-line :class:`~macq.errors.MacqError`, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from macq.errors import MacqError


@dataclass(frozen=True)
class Norm:
    """``y = normalize(x) · (offset + w) [+ b]``: ``kind`` ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).

    ``offset`` is why Gemma needs its own row: its norms store ``w`` and multiply by ``1 + w``, so folding a
    per-channel scale ``s`` into them is ``w' = (1 + w) / s − 1``, not ``w / s``."""

    kind: str = "rms"
    offset: float = 0.0


@dataclass(frozen=True)
class ScaleMapping:
    """``prev`` produces the input of every module in ``linears``; a per-input-channel scale can be
    divided out of ``prev``'s output and multiplied into those linears' weights with no new op.
    ``inspect`` is the module whose output measures the error of a candidate scale (AWQ).

    ``part``: ``prev`` is a fused linear and only these output rows feed ``linears`` (Phi-3's ``v`` rows of
    ``qkv_proj`` feed ``o_proj``; the ``up`` rows of ``gate_up_proj`` feed ``down_proj``). ``rows`` is that
    part resolved for one config by :meth:`ArchSpec.resolved`. ``norm_offset`` is stamped from the row's
    :class:`Norm` so that a mapping taken from a row folds correctly on its own."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    part: str | None = None
    rows: tuple[int, int] | None = None
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Fused:
    """A linear whose output rows concatenate several projections, in ``parts`` order. ``sizes`` gives
    each part's row count as a rule over the config: ``"q"`` = heads·head_dim, ``"kv"`` =
    kv_heads·head_dim, ``"ffn"`` = intermediate_size."""

    module: str
    parts: tuple[str, ...]
    sizes: tuple[str, ...]

    def slices(self, config: Any) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for part, rule in zip(self.parts, self.sizes):
            n = _SIZE_RULES[rule](config)
            out[part] = (start, start + n)
            start += n
        return out


def head_dim(config: Any) -> int:
    heads = config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


_SIZE_RULES = {
    "q": lambda c: c.num_attention_heads * head_dim(c),
    "kv": lambda c: kv_heads(c) * head_dim(c),
    "ffn": lambda c: c.intermediate_size,
}


@dataclass(frozen=True)
class Attention:
    """What kind of attention a family computes, beyond plain causal softmax attention.

    ``qk_norms``: per-head norms applied to q and k after projection (Qwen3, Gemma3). ``windows``: the
    config may make some layers sliding-window (``layer_types`` / ``sliding_window``). ``mask_by_layer_type``:
    the HF forward accepts ``{layer_type: 4-D mask}``, so one model can be given a full and a windowed mask
    (Qwen2/3, Gemma); without it a caller-supplied 4-D mask reaches every layer unchanged. ``softcap`` /
    ``final_softcap`` / ``query_scale``: config attributes of attention-logit soft-capping, final-logit
    soft-capping and the query pre-attention scalar (Gemma2)."""

    qk_norms: tuple[str, ...] = ()
    windows: bool = False
    mask_by_layer_type: bool = False
    softcap: str | None = None
    final_softcap: str | None = None
    query_scale: str | None = None


@dataclass(frozen=True)
class MLXSpec:
    """How the HF checkpoint maps onto ``mlx_lm``'s model for this family.

    ``model_type``: the ``mlx_lm.models`` module that loads it (after mlx_lm's own remapping). ``rename``:
    prefix rewrites (HF -> mlx). ``always_tied``: mlx_lm's model has no ``lm_head`` (untied checkpoints are
    refused). ``drop``: key suffixes mlx_lm has no parameter for. ``windows``: mlx_lm's model implements
    sliding windows (if not, an export of a windowed model says so in its notes)."""

    model_type: str
    rename: tuple[tuple[str, str], ...] = ()
    always_tied: bool = False
    drop: tuple[str, ...] = ("rotary_emb.inv_freq",)
    windows: bool = False


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
    family: str = ""
    model_types: tuple[str, ...] = ()                  # HF config.model_type values this row serves
    norm: Norm = Norm()
    norms: tuple[str, ...] = ()                        # every norm of one decoder layer (formula ``norm``)
    embed_scale: str | None = None                     # "sqrt_hidden": embeddings multiplied by sqrt(hidden)
    fused: tuple[Fused, ...] = ()
    attention: Attention = Attention()
    conv1d: tuple[str, ...] = ()                       # linears stored [in, out] (GPT-2's Conv1D)
    positions: str = "max_position_embeddings"         # config attribute: the longest context
    mlx: MLXSpec | None = None
    coreml: str | None = None                          # Core ML model definition (converters), None = refused
    coreml_refusal: str = ""                           # why, when refused
    export_model: str = ""     # macq's own ANE-shaped Core ML graph (converters.ane_model) for this family, "" = none

    def __post_init__(self) -> None:
        # A mapping out of a norm carries the norm's formula, so fold code needs nothing else.
        stamped = tuple(m if m.prev not in self.norms else replace(m, norm_offset=self.norm.offset)
                        for m in self.mappings)
        object.__setattr__(self, "mappings", stamped)

    # ------------------------------------------------------------------ derived, per config
    def resolved(self, config: Any) -> "ArchSpec":
        """This row with every fused-part mapping given its rows for ``config`` (Phi-3 ``v`` / ``up``)."""
        slices = self.fused_slices(config)
        maps = []
        for m in self.mappings:
            if m.part is not None:
                try:
                    m = replace(m, rows=slices[m.prev][m.part])
                except KeyError:
                    raise MacqError(f"arch registry: mapping part {m.prev}:{m.part} is not a fused part") from None
            maps.append(m)
        return replace(self, mappings=tuple(maps))

    def fused_slices(self, config: Any) -> dict[str, dict[str, tuple[int, int]]]:
        return {f.module: f.slices(config) for f in self.fused}

    def embedding_multiplier(self, config: Any) -> float:
        return math.sqrt(config.hidden_size) if self.embed_scale == "sqrt_hidden" else 1.0

    def max_positions(self, config: Any) -> int | None:
        return getattr(config, self.positions, None)

    def layer_windows(self, config: Any) -> list[int | None]:
        """Per decoder layer: the sliding-window length (a query sees keys ``q − k < W``) or ``None`` (full)."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None) if self.attention.windows else None
        if not window:
            return [None] * n
        types = getattr(config, "layer_types", None)
        if types is None:
            return [window] * n
        return [window if t == "sliding_attention" else None for t in types]

    def softcaps(self, config: Any) -> tuple[float | None, float | None]:
        """(attention-logit cap, final-logit cap) for ``config``; ``None`` = no soft-capping."""
        a = getattr(config, self.attention.softcap, None) if self.attention.softcap else None
        f = getattr(config, self.attention.final_softcap, None) if self.attention.final_softcap else None
        return a, f

    def coreml_support(self, config: Any) -> str:
        """The Core ML model definition for ``config``; a one-line MacqError when this family has none."""
        if self.coreml is None:
            raise MacqError(f"model_type {config.model_type!r}: the Core ML exporter does not support the {self.family} "
                            f"family ({self.coreml_refusal}); supported: {', '.join(coreml_families())}")
        return self.coreml


# ---------------------------------------------------------------------------------------------- rows
_ATTN_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_MAPPINGS = (
    ScaleMapping("input_layernorm", _ATTN_LINEARS, "self_attn"),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
_LLAMA_SEQUENCE = (_ATTN_LINEARS, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_BASE = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
                   mappings=_LLAMA_MAPPINGS, sequence=_LLAMA_SEQUENCE, norms=("input_layernorm", "post_attention_layernorm"),
                   coreml="hf_trace", export_model="llama")

LLAMA = ArchSpec(family="llama", model_types=("llama",), mlx=MLXSpec("llama"), **_LLAMA_BASE)
# Mistral: every layer windowed when config.sliding_window is set; the HF forward takes one 4-D mask.
MISTRAL = ArchSpec(family="mistral", model_types=("mistral",), attention=Attention(windows=True),
                   mlx=MLXSpec("llama"), **_LLAMA_BASE)
QWEN2 = ArchSpec(family="qwen2", model_types=("qwen2",), attention=Attention(windows=True, mask_by_layer_type=True),
                 mlx=MLXSpec("qwen2"), **_LLAMA_BASE)
QWEN3 = ArchSpec(family="qwen3", model_types=("qwen3",),
                 attention=Attention(qk_norms=("self_attn.q_norm", "self_attn.k_norm"), windows=True,
                                     mask_by_layer_type=True),
                 mlx=MLXSpec("qwen3"), **_LLAMA_BASE)

# Gemma 2/3: (1 + w) RMSNorms, sqrt(hidden)-scaled embeddings, four norms per layer. The norm *after*
# attention (post_attention_layernorm) normalises the attention output, it feeds no linear: the MLP reads
# pre_feedforward_layernorm. A Llama row here would fold into the wrong norm.
_GEMMA_MAPPINGS = (
    ScaleMapping("input_layernorm", _ATTN_LINEARS, "self_attn"),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
_GEMMA_BASE = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
                   mappings=_GEMMA_MAPPINGS, sequence=_LLAMA_SEQUENCE, norm=Norm("rms", 1.0), embed_scale="sqrt_hidden",
                   norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm"),
                   coreml_refusal="(1 + w) norms, scaled embeddings and per-layer window masks have no Core ML model "
                                  "definition yet")
GEMMA2 = ArchSpec(family="gemma2", model_types=("gemma2",),
                  attention=Attention(windows=True, mask_by_layer_type=True, softcap="attn_logit_softcapping",
                                      final_softcap="final_logit_softcapping", query_scale="query_pre_attn_scalar"),
                  mlx=MLXSpec("gemma2", always_tied=True), **_GEMMA_BASE)
GEMMA3 = ArchSpec(family="gemma3", model_types=("gemma3_text",),
                  attention=Attention(qk_norms=("self_attn.q_norm", "self_attn.k_norm"), windows=True,
                                      mask_by_layer_type=True, softcap="attn_logit_softcapping",
                                      final_softcap="final_logit_softcapping", query_scale="query_pre_attn_scalar"),
                  mlx=MLXSpec("gemma3_text", windows=True), **_GEMMA_BASE)

# Phi-3: q, k, v in one qkv_proj and gate, up in one gate_up_proj (rows concatenated in that order).
PHI3 = ArchSpec(
    family="phi3", model_types=("phi3",), layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", norms=("input_layernorm", "post_attention_layernorm"),
    mappings=(
        ScaleMapping("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleMapping("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", part="v"),
        ScaleMapping("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
        ScaleMapping("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", part="up"),
    ),
    sequence=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    fused=(Fused("self_attn.qkv_proj", ("q", "k", "v"), ("q", "kv", "kv")),
           Fused("mlp.gate_up_proj", ("gate", "up"), ("ffn", "ffn"))),
    attention=Attention(windows=True),
    mlx=MLXSpec("phi3"), coreml_refusal="fused qkv/gate_up projections have no Core ML model definition yet",
)

# GPT-2: LayerNorm with bias, Conv1D linears stored [in, out], learned positions, lm_head tied to wte.
# mlx_lm's gpt2.sanitize transposes un-prefixed ``h.N.*.weight`` keys and prefixes ``model.``; keys that
# already start with ``model.`` are left alone, so the export writes the post-sanitize layout (what
# mlx_lm.convert itself saves) and quantized uint32 weights are never transposed by the loader.
GPT2 = ArchSpec(
    family="gpt2", model_types=("gpt2",), layers="transformer.h", embed="transformer.wte",
    final_norm="transformer.ln_f", lm_head="lm_head", norm=Norm("layer"), norms=("ln_1", "ln_2"),
    mappings=(
        ScaleMapping("ln_1", ("attn.c_attn",), "attn"),
        ScaleMapping("ln_2", ("mlp.c_fc",), "mlp"),
    ),
    sequence=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    extra_embeds=("transformer.wpe",), conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    positions="n_positions",
    mlx=MLXSpec("gpt2", rename=(("transformer.", "model."),), always_tied=True,
                drop=("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")),
    coreml_refusal="learned positions and Conv1D layers have no Core ML model definition yet",
)

FAMILIES: tuple[ArchSpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, GPT2)
ARCHITECTURES: dict[str, ArchSpec] = {mt: row for row in FAMILIES for mt in row.model_types}


def coreml_families() -> list[str]:
    return [row.family for row in FAMILIES if row.coreml is not None]


def context_limit(config: Any) -> int | None:
    """The longest context ``config`` allows: its row's ``positions`` attribute, or for a model the registry does
    not know (the evaluator scores any HF causal LM) the usual HF attribute names."""
    row = ARCHITECTURES.get(getattr(config, "model_type", None))
    if row is not None:
        return row.max_positions(config)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


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
