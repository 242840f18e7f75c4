"""An ANE-shaped Llama-family decoder that macq owns, built from a QuantizedModel (records + float tensors +
HF config), never from transformers' modules. Traced once per function (prefill block / single-token decode)
with fixed shapes.

Why each choice (Apple, "Deploying Transformers on the Apple Neural Engine", 2022; ANEMLL):

* Channels-first activations ``[1, C, 1, S]`` and the decoder's linears as 1×1 ``conv2d``: the ANE's native
  layout; the last axis is the sequence, so no per-token reshapes between layers.
* RMSNorm scaled by the per-token max-abs before squaring: ``rms(x) = y / sqrt(mean(y²) + (√eps / m)²)`` with
  ``y = x / m``, ``m = max|x|``. Algebraically identical, but ``mean(y²) ≤ 1`` cannot overflow fp16 (a plain
  ``mean(x²)`` does once |x| > 256) and ``√eps / m`` keeps eps from underflowing.
* RoPE from precomputed ``cos``/``sin`` tables ``[context, head_dim]`` (transformers' own rotary module, so
  llama3 / yarn scaling come out as the reference has them), read by ``gather`` at the ``position_ids`` input:
  no ``range``/``shape`` op in the graph.
* KV cache as two state tensors ``[layers_in_chunk, kv_heads, kv_len, head_pad]`` written through a one-hot
  ``[S, context]`` matrix built from ``position_ids`` (``cache·(1 − hits) + onehotᵀ @ new``): exact in fp16
  (each slot is 1·value + 0s), and no dynamic slice: the ANE compiler rejects state writes at runtime offsets
  (``slice_update`` with a computed ``begin``; coremltools #2553 / #2600, coreai-torch #6), and a stateful
  decode it rejects runs on the CPU.
* State dimensions padded to multiples of :data:`STATE_ALIGN` (coremltools #2631: state dims not multiples
  of 32 fail or pad on the ANE): ``kv_len`` = context rounded up (the causal mask hides the extra slots, as
  it hides every future slot) and ``head_pad`` = head_dim rounded up (keys and queries carry zero columns,
  which add nothing to ``q·k``; values' zero columns are sliced off the attention output).
* Grouped-query attention by viewing the ``G`` query heads of one KV head as ``G·S`` query rows: KV is never
  repeated.
* Vocabulary-sized tensors split into parts of fewer than :data:`MAX_DIM` rows (embedding gather, LM head,
  logits outputs ``logits_0..``), the ANE's largest supported dimension (assumption, see ane_report).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from macq.errors import MacqError

MAX_DIM = 16384
STATE_ALIGN = 32
FP16_TINY = 2.0 ** -14   # smallest normal fp16: constants below it may be flushed to zero on the ANE


def aligned(n: int, m: int = STATE_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


@dataclass(frozen=True)
class AneShape:
    """Every size the graph fixes, read from the HF config (and the float tensors for optional parts)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    eps: float
    qkv_bias: bool
    qk_norm: bool

    @property
    def vocab_parts(self) -> list[tuple[int, int]]:
        """Row ranges of fewer than MAX_DIM rows (equal sizes, multiple of 16 so LUT row groups align)."""
        n = self.vocab // MAX_DIM + 1
        while True:
            step = -(-self.vocab // n)
            step = -(-step // 16) * 16 if n > 1 else step
            if step < MAX_DIM:
                break
            n += 1
        return [(a, min(a + step, self.vocab)) for a in range(0, self.vocab, step)]


def ane_shape(qm) -> AneShape:
    from macq.arch import arch_spec

    cfg = qm.config
    spec = arch_spec(cfg.model_type)
    if getattr(spec, "export_model", "") != "llama":
        raise MacqError(f"model_type {cfg.model_type!r}: the ANE Core ML graph supports the Llama family "
                        "(llama, mistral, qwen2, qwen3); use --graph hf")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise MacqError(f"hidden_act {act!r}: the ANE graph implements SiLU-gated MLPs only")
    heads = cfg.num_attention_heads
    lay0 = f"{spec.layers}.0.self_attn"
    return AneShape(hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                    intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers, vocab=cfg.vocab_size,
                    eps=float(cfg.rms_norm_eps), qkv_bias=f"{lay0}.q_proj.bias" in qm.float_tensors,
                    qk_norm=f"{lay0}.q_norm.weight" in qm.float_tensors)


def rope_tables(config, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [context, head_dim]`` from transformers' rotary module (all rope_types it knows)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(config=config)
    pos = torch.arange(context).unsqueeze(0)
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].float(), sin[0].float()


# ------------------------------------------------------------------------------------------- weights

class Weights:
    """The weights of a QuantizedModel, fetched by name on demand so a chunk materialises only its own layers.

    Two modes. Reference (``records=None``): the records' dequantized values rounded to fp16 and the float
    tensors, for running the graph in torch. Export (``records`` = the chunk's records, keyed as
    :func:`converters.multifunction.chunk_records` keys them): every matrix is a *placeholder* instead, a
    float32 array of zeros from ``np.zeros`` (calloc: pages that are never written cost no memory, and
    tracing only reads them) whose first two elements are ``m, -m`` for a marker ``m`` listed in
    :attr:`slots`. After conversion :func:`converters.weights.place_slots` finds each marked const and puts the
    record's constexpr ops (or the float tensor's fp16 values) in its place, so the conversion never holds the
    dense weights, and nothing is matched by value.
    """

    MAX_MARKER = 2048  # markers are small integers, exact in fp16

    def __init__(self, qm, records: dict | None = None):
        from macq.arch import arch_spec

        self.qm, self.spec, self.records = qm, arch_spec(qm.config.model_type), records
        self.slots: dict[int, tuple] = {}   # marker → ("record", key) | ("float", tensor name, row a, row b)
        self._markers: dict[tuple, int] = {}

    def _float_name(self, module: str, name: str) -> str:
        key = f"{name}.weight"
        if key not in self.qm.float_tensors and module == self.spec.lm_head:  # tied head, embedding left float
            key = f"{self.spec.embed}.weight"
        if key not in self.qm.float_tensors:
            raise MacqError(f"no weight for {module} in the quantized model")
        return key

    def weight(self, module: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Module ``module``'s weight ``[out, in]`` (output rows ``rows`` only, for vocabulary parts)."""
        name = self.qm.tied.get(module, module)
        if self.records is not None:
            return self._placeholder(module, name, rows)
        rec = self.qm.records.get(name)
        if rec is not None:
            t = rec.dequantize(torch.float32).half().float()
        else:
            t = self.qm.float_tensors[self._float_name(module, name)].float()
        return t if rows is None else t[rows[0]:rows[1]]

    def _placeholder(self, module: str, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        key = name if rows is None else f"{name}[{rows[0]}:{rows[1]}]"
        if key in self.records:
            slot, shape = ("record", key), tuple(self.records[key].shape)
        else:
            tname = self._float_name(module, name)
            ft = self.qm.float_tensors
            full = tuple(ft.shape(tname)) if hasattr(ft, "shape") else tuple(ft[tname].shape)
            a, b = rows or (0, full[0])
            slot, shape = ("float", tname, a, b), (b - a, *full[1:])
        m = self._markers.setdefault(slot, len(self._markers) + 1)
        if m >= self.MAX_MARKER:
            raise MacqError(f"more than {self.MAX_MARKER - 1} weights in one chunk: export in more chunks")
        self.slots[m] = slot
        t = torch.from_numpy(np.zeros(shape, dtype=np.float32))
        t.view(-1)[:2] = torch.tensor([m, -m], dtype=torch.float32)
        return t

    def tensor(self, name: str) -> torch.Tensor | None:
        t = self.qm.float_tensors.get(name)
        return None if t is None else t.float()

    def float_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """fp16 values of rows ``[a, b)`` of a float tensor: what the FLOAT16 pass makes of the fp32 const."""
        ft = self.qm.float_tensors
        t = ft.get_rows(name, a, b) if hasattr(ft, "get_rows") else ft[name][a:b]
        return t.to(torch.float32).numpy().astype(np.float16)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


class Conv1x1(nn.Module):
    """A linear ``[out, in]`` applied to ``[1, in, 1, S]`` as a 1×1 convolution."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.weight = _param(w[:, :, None, None])
        self.bias = None if b is None else _param(b)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    """fp16-safe RMSNorm along ``dim`` (see module doc): scale by max|x| before squaring."""
    m = x.abs().amax(dim=dim, keepdim=True).clamp_min(FP16_TINY)   # a normal fp16 floor (1e-6 is subnormal)
    y = x / m
    e = (eps ** 0.5) / m
    return y * torch.rsqrt((y * y).mean(dim=dim, keepdim=True) + e * e) * weight


class Norm(nn.Module):
    def __init__(self, w: torch.Tensor, eps: float, dim: int = 1, view: tuple[int, ...] = (1, -1, 1, 1)):
        super().__init__()
        self.weight, self.eps, self.dim = _param(w.view(view)), eps, dim

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Layer(nn.Module):
    """One decoder layer; ``forward(x [1,C,1,S], cos, sin [1,1,S,D], onehot [S,ctx], keep [ctx,1], mask, kc, vc)``."""

    def __init__(self, w: Weights, i: int, s: AneShape):
        super().__init__()
        p = f"{w.spec.layers}.{i}"
        self.s = s

        def lin(name: str, bias: bool = False) -> Conv1x1:
            return Conv1x1(w.weight(f"{p}.{name}"), w.tensor(f"{p}.{name}.bias") if bias else None)

        self.ln1 = Norm(w.tensor(f"{p}.input_layernorm.weight"), s.eps)
        self.ln2 = Norm(w.tensor(f"{p}.post_attention_layernorm.weight"), s.eps)
        self.q, self.k, self.v = (lin(f"self_attn.{n}_proj", s.qkv_bias) for n in "qkv")
        self.o = lin("self_attn.o_proj")
        self.gate, self.up, self.down = lin("mlp.gate_proj"), lin("mlp.up_proj"), lin("mlp.down_proj")
        if s.qk_norm:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
            view = (1, 1, -1, 1)
            self.qn = Norm(w.tensor(f"{p}.self_attn.q_norm.weight"), s.eps, dim=2, view=view)
            self.kn = Norm(w.tensor(f"{p}.self_attn.k_norm.weight"), s.eps, dim=2, view=view)

    def _heads(self, t: torch.Tensor, n: int, norm: Norm | None) -> torch.Tensor:
        """``[1, n·D, 1, S]`` → ``[1, n, S, D]`` (optionally head-normed on the way)."""
        t = t.view(1, n, self.s.head_dim, -1)
        if norm is not None:
            t = norm(t)
        return t.transpose(2, 3)

    def forward(self, x, cos, sin, onehot, keep, mask, kc, vc):
        s = self.s
        h = self.ln1(x)
        q = self._heads(self.q(h), s.heads, self.qn if s.qk_norm else None)
        k = self._heads(self.k(h), s.kv_heads, self.kn if s.qk_norm else None)
        v = self._heads(self.v(h), s.kv_heads, None)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        pad = aligned(s.head_dim) - s.head_dim
        if pad:   # zero columns: the state's last dim a multiple of 32, q·k unchanged
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        # cache write: slot p(i) of every KV head gets token i; other slots unchanged
        kc = kc * keep + torch.matmul(onehot.t(), k[0])            # [kv, ctx, D]
        vc = vc * keep + torch.matmul(onehot.t(), v[0])
        g = s.heads // s.kv_heads
        n = q.shape[2]
        qg = q.reshape(1, s.kv_heads, g * n, s.head_dim + pad)      # query heads of one KV head as rows
        att = torch.matmul(qg, kc.unsqueeze(0).transpose(2, 3)) * (s.head_dim ** -0.5) + mask
        att = torch.softmax(att, dim=-1)
        o = torch.matmul(att, vc.unsqueeze(0))                      # [1, kv, g·S, D (+ pad)]
        if pad:
            o = o[..., :s.head_dim]
        o = o.reshape(1, s.heads, n, s.head_dim).transpose(2, 3).reshape(1, s.heads * s.head_dim, 1, n)
        x = x + self.o(o)
        h = self.ln2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x, kc, vc


class Embed(nn.Module):
    """``input_ids [1, S]`` → ``[1, C, 1, S]``; tables over MAX_DIM rows are gathered part by part. With
    ``parts`` (a subset of the vocabulary parts, when the embedding is split over packages) tokens outside
    them give zero rows, so the packages' outputs add up to the embedding."""

    def __init__(self, w: Weights, s: AneShape, parts: list[int] | None = None):
        super().__init__()
        self.whole = parts is None or len(parts) == len(s.vocab_parts)
        self.parts = s.vocab_parts if parts is None else [s.vocab_parts[i] for i in parts]
        self.tables = nn.ParameterList([_param(w.weight(w.spec.embed, (a, b))) for a, b in self.parts])

    def forward(self, ids):
        ids = ids[0]
        if len(self.parts) == 1 and self.whole:
            e = self.tables[0][ids]
        else:
            e = 0
            for (a, b), t in zip(self.parts, self.tables):
                local = (ids - a).clamp(0, b - a - 1)
                hit = ((ids >= a) & (ids < b)).to(t.dtype).unsqueeze(-1)
                e = e + t[local] * hit
        return e.t().unsqueeze(0).unsqueeze(2)                      # [S, C] → [1, C, 1, S]


class Head(nn.Module):
    """Final norm + LM head by vocabulary part: outputs ``logits_i [1, S, part]``."""

    def __init__(self, w: Weights, s: AneShape, parts: list[int] | None = None):
        super().__init__()
        self.norm = Norm(w.tensor(f"{w.spec.final_norm}.weight"), s.eps)
        self.index = list(range(len(s.vocab_parts))) if parts is None else list(parts)   # logits_i names
        self.heads = nn.ParameterList([_param(w.weight(w.spec.lm_head, s.vocab_parts[i])) for i in self.index])

    def forward(self, x):
        h = self.norm(x)[0, :, 0, :].t()                            # [S, C]
        return tuple(F.linear(h, t).unsqueeze(0) for t in self.heads)


class AneChunk(nn.Module):
    """A consecutive piece of the model: optional embedding, layers ``[start, stop)``, optional head.

    Inputs: ``input_ids`` (with embedding) or ``hidden [1,C,1,S]``; with layers also ``position_ids [S]`` and
    ``causal_mask [1,1,S,kv_len]``. Outputs: ``hidden_out`` or ``logits_0..``. State: ``key_cache``/``value_cache``."""

    def __init__(self, qm, start: int, stop: int, embed: bool, head: bool, context: int, records: dict | None = None,
                 parts: list[int] | None = None):
        super().__init__()
        s = ane_shape(qm)
        w = Weights(qm, records)
        self.weights = w            # .slots / .float_rows: what converters.weights.place_slots needs
        self.s, self.start, self.stop, self.context = s, start, stop, context
        self.kv_len = aligned(context)   # cache slots (and causal mask width): context rounded up to 32
        self.embed = Embed(w, s, parts) if embed else None
        self.layers = nn.ModuleList([Layer(w, i, s) for i in range(start, stop)])
        self.head = Head(w, s, parts) if head else None
        if self.layers:
            cos, sin = rope_tables(qm.config, context)
            self.register_buffer("cos", cos)
            self.register_buffer("sin", sin)
            self.register_buffer("slots", torch.arange(self.kv_len, dtype=torch.int32))
            shape = (stop - start, s.kv_heads, self.kv_len, aligned(s.head_dim))
            self.register_buffer("key_cache", torch.zeros(shape))
            self.register_buffer("value_cache", torch.zeros(shape))

    def input_names(self) -> list[str]:
        first = ["input_ids"] if self.embed is not None else ["hidden"]
        return first + (["position_ids", "causal_mask"] if self.layers else [])

    def output_names(self) -> list[str]:
        return [f"logits_{i}" for i in self.head.index] if self.head is not None else ["hidden_out"]

    def example(self, n: int) -> tuple[torch.Tensor, ...]:
        first = torch.zeros(1, n, dtype=torch.int32) if self.embed is not None else torch.zeros(1, self.s.hidden, 1, n)
        if not self.layers:
            return (first,)
        return first, torch.arange(n, dtype=torch.int32), torch.zeros(1, 1, n, self.kv_len)

    def forward(self, x, position_ids=None, causal_mask=None):
        if self.embed is not None:
            x = self.embed(x)
        if self.layers:
            g = self.s.heads // self.s.kv_heads
            cos = self.cos[position_ids].unsqueeze(0).unsqueeze(0)           # [1, 1, S, D]
            sin = self.sin[position_ids].unsqueeze(0).unsqueeze(0)
            onehot = (self.slots.unsqueeze(0) == position_ids.unsqueeze(1)).to(x.dtype)   # [S, ctx]
            keep = 1.0 - onehot.sum(0).unsqueeze(1)                                         # [ctx, 1]
            mask = causal_mask.repeat(1, 1, g, 1) if g > 1 else causal_mask               # rows follow q's g·S
            for j, layer in enumerate(self.layers):
                x, kc, vc = layer(x, cos, sin, onehot, keep, mask, self.key_cache[j], self.value_cache[j])
                self.key_cache[j:j + 1] = kc.unsqueeze(0)
                self.value_cache[j:j + 1] = vc.unsqueeze(0)
        if self.head is not None:
            return self.head(x)
        return x
