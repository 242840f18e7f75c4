"""The Core AI graph: the Core ML target's ANE-shaped decoder (:mod:`converters.ane_model`) with every weight
produced by Core AI's compression ops from the record itself.

The chunk is built exactly as the Core ML target builds it, from placeholder weights that carry a marker
(:class:`converters.ane_model.Weights`, export mode: no dense copy of a quantized weight is ever made). Each
placeholder is then swapped for a small module whose ``forward()`` returns the weight:

* :class:`LutWeight`: ``coreai::lut_to_dense(indices uint8 -> uint{b}, lut fp16 [groups, 1, 2^b, 1])``, then for
  NF4/FP4-style records ``coreai::constexpr_blockwise_shift_scale(dense, scale fp16 [out, in/block])``
  (coreai-opt's own palettization-with-scale form);
* :class:`AffineWeight`: ``coreai::constexpr_blockwise_shift_scale(data int{w}, scale fp16 [out, in/g],
  zero_point int{w} | minval fp16, input_dtype)``, the form coreai-opt's int4 block-32 ``Quantizer`` emits;
* :class:`FloatWeight`: the fp16 values of a float tensor (norms stay parameters).

``coreai_torch.TorchConverter`` narrows the uint8/int8 buffers to their sub-byte types when it stages the
program (``inject_subbyte_tensors``: LUT indices are found by the word ``indices`` in their name). The swapped
modules reuse ``Conv1x1`` / ``Embed`` / ``Head``'s own ``forward`` with the weight as a computed property, so
the decoder's arithmetic is the Core ML target's, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from converters.ane_model import AneChunk, Conv1x1, Embed, Head
from coreai_backend.options import affine_width, lut_width
from macq.errors import MacqError
from macq.record import AffineRecord, LUTRecord

_INT_DTYPES = {2: "int2", 4: "int4", 8: "int8"}


def _ops():
    import coreai_torch._compression.custom_layers  # noqa: F401  (registers torch.ops.coreai.*)

    return torch.ops.coreai


def fp16_exact(t: torch.Tensor) -> bool:
    f = t.detach().float()
    return bool(torch.equal(f.half().float(), f))


def _fp16(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    """``t`` as fp16, refused when that would change a value (an export never re-quantizes)."""
    if not fp16_exact(t):
        raise MacqError(f"record {name}: {what} are not fp16 values; Core AI stores them in fp16 and the export "
                        "does not round a record (quantize with fp16 scales)")
    return t.detach().half()


def _unit(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``[out, in]`` → ``[out, in, 1, 1]`` for a 1×1 convolution's weight (``rank=4``)."""
    return t.reshape(*t.shape, *([1] * (rank - t.dim()))) if rank > t.dim() else t


class LutWeight(nn.Module):
    """A LUT record as ``lut_to_dense`` (× per-block scale). ``rank`` 2: ``[out, in]``; 4: ``[out, in, 1, 1]``."""

    def __init__(self, rec: LUTRecord, name: str, rank: int = 2):
        super().__init__()
        if rec.double_quant is not None or rec.n_outliers:
            raise MacqError(f"record {name}: double quant / outliers have no exact Core AI form")
        width = lut_width(rec.bits)
        lut = rec.lut.detach().float()
        if width > rec.bits:  # 5 → 6, 7 → 8 bits: pad with the last entry, which no index points at
            lut = torch.cat([lut, lut[:, -1:].expand(-1, 2 ** width - 2 ** rec.bits)], dim=1)
        scales = rec.block_scales()
        # a plain LUT is rounded to fp16 as the fp16 graph rounds every weight (the dense weight is exactly
        # record.dequantize().half()); with a block scale the fp16 product is exact only if both factors are fp16
        lut16 = _fp16(lut, "LUT entries", name) if scales is not None else lut.half()
        k = lut16.shape[1]
        self.bits, self.width, self.rank = rec.bits, width, rank
        self.register_buffer("indices", _unit(rec.indices.detach().to(torch.uint8), rank).contiguous())
        self.register_buffer("lut", lut16.reshape(lut16.shape[0], *([1] * (rank - 1)), k, 1).contiguous())
        if scales is not None:
            self.register_buffer("scale", _unit(_fp16(scales, "block scales", name), rank).contiguous())
        else:
            self.register_buffer("scale", None)

    def forward(self) -> torch.Tensor:
        ops = _ops()
        w = ops.lut_to_dense(self.indices, self.lut, 0)
        if self.scale is not None:
            w = ops.constexpr_blockwise_shift_scale(w, self.scale)
        return w


class AffineWeight(nn.Module):
    """An affine record as ``constexpr_blockwise_shift_scale`` on signed ``int{w}`` data.

    Symmetric: data ``q − 2^(b−1)``, no offset. Integer zero-point: data ``q − 2^(w−1)``, zero_point
    ``z − 2^(w−1)`` (so ``data − zp = q − z``). Bias form ``w = s·q + b``: data ``q − 2^(w−1)``, ``minval = b``
    (the op computes ``s·(data − qmin) + minval`` with ``qmin = −2^(w−1)``)."""

    def __init__(self, rec: AffineRecord, name: str, rank: int = 2):
        super().__init__()
        b = rec.bits
        w = affine_width(b)
        self.bits, self.width, self.rank = b, w, rank
        self.input_dtype = getattr(torch, _INT_DTYPES[w])
        off = 2 ** (b - 1) if rec.symmetric else 2 ** (w - 1)
        codes = rec.codes.detach().to(torch.int16) - off
        self.register_buffer("data", _unit(codes.to(torch.int8), rank).contiguous())
        self.register_buffer("scale", _unit(_fp16(rec.scales, "scales", name), rank).contiguous())
        self.register_buffer("zero_point", None)
        self.register_buffer("minval", None)
        if rec.zeros is not None:
            z = rec.zeros.detach().double()
            lo, hi = -(2 ** (w - 1)), 2 ** (w - 1) - 1
            zs = z - off
            if float(zs.min()) < lo or float(zs.max()) > hi:
                raise MacqError(f"record {name}: zero-points in [{float(z.min()):.0f}, {float(z.max()):.0f}] "
                                f"outside Core AI's {w}-bit offset type")
            self.register_buffer("zero_point", _unit(zs.to(torch.int8), rank).contiguous())
        elif rec.biases is not None:
            self.register_buffer("minval", _unit(_fp16(rec.biases, "biases", name), rank).contiguous())

    def forward(self) -> torch.Tensor:
        return _ops().constexpr_blockwise_shift_scale(self.data, self.scale, self.zero_point, self.minval,
                                                      self.input_dtype)


class FloatWeight(nn.Module):
    """A float tensor's fp16 values (what the fp16 graph holds)."""

    def __init__(self, values: np.ndarray, rank: int = 2):
        super().__init__()
        self.register_buffer("value", _unit(torch.from_numpy(np.ascontiguousarray(values)), rank).contiguous())

    def forward(self) -> torch.Tensor:
        return self.value


def weight_source(rec, name: str, rank: int) -> nn.Module:
    if isinstance(rec, LUTRecord):
        return LutWeight(rec, name, rank)
    if isinstance(rec, AffineRecord):
        return AffineWeight(rec, name, rank)
    raise MacqError(f"record {name}: unknown record type {type(rec).__name__}")


# --------------------------------------------------------------------- the chunk's modules with computed weights

class CConv(nn.Module):
    """``Conv1x1`` whose weight is computed by its source (its own ``forward``, unchanged)."""

    forward = Conv1x1.forward

    def __init__(self, source: nn.Module, bias: torch.Tensor | None):
        super().__init__()
        self.source = source
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.source()


class CEmbed(nn.Module):
    """``Embed`` (vocabulary parts) whose tables are computed by their sources."""

    forward = Embed.forward

    def __init__(self, embed: Embed, sources: list[nn.Module]):
        super().__init__()
        self.parts, self.whole, self.sources = embed.parts, embed.whole, nn.ModuleList(sources)

    @property
    def tables(self) -> list[torch.Tensor]:
        return [s() for s in self.sources]


class CHead(nn.Module):
    """``Head`` (final norm + LM head by vocabulary part) whose parts are computed by their sources."""

    forward = Head.forward

    def __init__(self, head: Head, sources: list[nn.Module]):
        super().__init__()
        self.norm, self.index, self.sources = head.norm, head.index, nn.ModuleList(sources)

    @property
    def heads(self) -> list[torch.Tensor]:
        return [s() for s in self.sources]


def _source(chunk: AneChunk, placeholder: torch.Tensor, rank: int, made: dict) -> nn.Module:
    """The weight source for a placeholder; one module per slot and rank, so a tied embedding / LM head reads
    the very same buffers (stored once)."""
    w = chunk.weights
    slot = w.slots[int(placeholder.reshape(-1)[0])]
    key = (slot, rank)
    if key not in made:
        if slot[0] == "record":
            made[key] = weight_source(w.records[slot[1]], slot[1], rank)
        else:
            _, tname, a, b = slot
            made[key] = FloatWeight(w.float_rows(tname, a, b), rank)
    return made[key]


def coreai_chunk(qm, plan, context: int, records: dict) -> AneChunk:
    """The chunk ``plan`` of ``qm`` in fp16 with Core AI weight sources; ``records`` as
    :func:`converters.multifunction.chunk_records` keys them."""
    chunk = AneChunk(qm, plan.start, plan.stop, plan.embed, plan.head, context, records=records,
                     parts=getattr(plan, "parts", None))
    made: dict = {}
    for layer in chunk.layers:
        for name, mod in list(layer.named_children()):
            if isinstance(mod, Conv1x1):
                setattr(layer, name, CConv(_source(chunk, mod.weight, 4, made), mod.bias))
    if chunk.embed is not None:
        chunk.embed = CEmbed(chunk.embed, [_source(chunk, t, 2, made) for t in chunk.embed.tables])
    if chunk.head is not None:
        chunk.head = CHead(chunk.head, [_source(chunk, t, 2, made) for t in chunk.head.heads])
    return chunk.half().eval()


def example_inputs(chunk: AneChunk, n: int) -> tuple[torch.Tensor, ...]:
    """The chunk's example inputs for ``n`` tokens with float inputs in fp16 (the graph's dtype)."""
    return tuple(t.half() if t.is_floating_point() else t for t in chunk.example(n))


def rewrite_unit_matmuls(ep):
    """Replace every ``aten.bmm(a [B, M, 1], b [B, 1, N])`` (a contraction over one element: an outer product)
    by the broadcasting ``aten.mul(a, b)``, which is the same product element by element (no sum, so bit-equal).

    Why: the decode function's cache write ``onehotᵀ [ctx, 1] @ v [kv, 1, D]`` is such a product, and coreai-core
    1.0.0b3's pre-compilation rewrite gets it wrong when ``v`` comes out of a view/transpose (measured on Linux in
    the Core AI runtime: decode logits off by up to 2.8 on a tiny Llama while the exported program is right in
    torch; with a plain input the rewrite even fails to verify ``broadcast_in_dims``). Prefill (``[ctx, S] @ [kv,
    S, D]``, S > 1) is not affected. Returns ``ep``, changed in place."""
    g = ep.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.bmm.default:
            continue
        a, b = node.args
        if a.meta["val"].shape[-1] != 1:
            continue
        with g.inserting_before(node):
            new = g.call_function(torch.ops.aten.mul.Tensor, (a, b))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.lint()
    ep.graph_module.recompile()
    return ep
