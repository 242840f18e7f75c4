"""The quantized-weight record: the one seam between quantizers and exporters.

Every quantizer returns one record per weight; every exporter reads records and never re-quantizes.
Three kinds cover the whole product:

* :class:`AffineRecord`: integer codes on a uniform grid, ``w = s * (q - z)`` (zero-point form,
  GPTQ / Core ML ``constexpr_blockwise_shift_scale``) or ``w = s * q + b`` (bias form, exactly what
  MLX stores). Symmetric records carry neither: their zero is the implicit ``2**(bits-1)``.
* :class:`FPRecord`: microscaled float codes (mxfp4 / nvfp4 / mxfp8: E2M1 or E4M3 elements times one 8-bit
  E8M0 or E4M3 scale per block), stored byte for byte as MLX's ``mx.quantize`` modes store them.
* :class:`LUTRecord`: indices into a look-up table shared by a group of output channels
  (k-means / uniform palettization, Core ML ``constexpr_lut_to_dense``), optionally times a scale per
  block of the input dim (NF4 / FP4 absmax), whose scales may themselves be quantized (double quant),
  optionally with a sparse part of fp16 outliers that *overwrite* the dense value at their positions
  (SqueezeLLM's dense-and-sparse decomposition; Core ML: ``constexpr_sparse_to_dense`` added to the LUT).

Weights are always held in ``nn.Linear`` orientation ``[out, in]``; ``transposed`` remembers that the
source module (GPT-2's ``Conv1D``) stores ``[in, out]``. Groups and blocks run along the input dim.
``bits_per_weight`` charges every stored constant at the dtype it is stored in, so rates compare
honestly across methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

import torch

from macq.errors import MacqError
from macq.microscale import FP_FORMATS, FPFormat, check_fp_record_bytes, decode_elements, decode_scales, fp_format

FLOAT_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}


def _dtype_bits(t: torch.Tensor) -> int:
    return FLOAT_BITS.get(t.dtype, t.element_size() * 8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name)


def _check_codes(name: str, codes: torch.Tensor, bits: int) -> None:
    """Integer codes in ``[0, 2**bits)``: a code that does not fit would be silently truncated by packing."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise MacqError(f"record {name}: dtype {_dtype_name(codes.dtype)}, expected an integer dtype")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise MacqError(f"record {name}: values in [{int(codes.min())}, {int(codes.max())}] do not fit {bits} bits "
                        f"(expected 0..{2 ** bits - 1})")


def _check_zeros(zeros: torch.Tensor, bits: int) -> None:
    """Zero-points are integers in code space (stored in an integer or an integer-valued float dtype)."""
    if zeros.is_floating_point():
        if not bool(torch.isfinite(zeros).all()) or not bool((zeros == zeros.round()).all()):
            raise MacqError("record zeros: expected integer values in code space (got NaN/inf or fractions)")
    _check_codes("zeros", zeros if not zeros.is_floating_point() else zeros.to(torch.int64), bits)


def _check_float(name: str, t: torch.Tensor | None) -> None:
    """Scales, biases and LUTs are floating point and finite (a NaN scale silently poisons a whole group)."""
    if t is None:
        return
    if not t.is_floating_point():
        raise MacqError(f"record {name}: dtype {_dtype_name(t.dtype)}, expected a float dtype")
    if not bool(torch.isfinite(t).all()):
        raise MacqError(f"record {name}: holds NaN or inf values")


@dataclass
class AffineRecord:
    """Uniform integer grid. ``codes`` are unsigned in ``[0, 2**bits)``.

    ``scales`` / ``zeros`` / ``biases`` have shape ``[out, in // group_size]`` (``[1, 1]`` when
    ``per_tensor``). ``zeros`` hold integer values in code space.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    zeros: torch.Tensor | None = None
    biases: torch.Tensor | None = None
    per_tensor: bool = False
    transposed: bool = False
    kind: str = field(default="affine", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise MacqError(f"bits={self.bits}: affine records hold 1..8 bits")
        if self.codes.dim() != 2:
            raise MacqError("codes must be 2-D [out, in]")
        out, inp = self.codes.shape
        if inp % self.group_size:
            raise MacqError(f"group_size={self.group_size} does not divide the input dim {inp}")
        want = (1, 1) if self.per_tensor else (out, inp // self.group_size)
        for name in ("scales", "zeros", "biases"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise MacqError(f"{name} has shape {tuple(t.shape)}, expected {want}")
        if self.zeros is not None and self.biases is not None:
            raise MacqError("an affine record holds zeros or biases, not both")
        _check_codes("codes", self.codes, self.bits)
        if self.zeros is not None:
            _check_zeros(self.zeros, self.bits)
        _check_float("scales", self.scales)
        _check_float("biases", self.biases)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None and self.biases is None

    @property
    def granularity(self) -> str:
        if self.per_tensor:
            return "per_tensor"
        return "per_channel" if self.group_size == self.codes.shape[1] else "per_group"

    def effective_zeros(self) -> torch.Tensor:
        """Zero-points in code space, as float32 (derived from biases for the bias form)."""
        if self.zeros is not None:
            return self.zeros.float()
        if self.biases is not None:
            return -self.biases.float() / self.scales.float()
        return torch.full(self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device)

    def effective_biases(self) -> torch.Tensor:
        """``b`` in ``w = s*q + b`` as float32 (MLX's form)."""
        if self.biases is not None:
            return self.biases.float()
        return -self.scales.float() * self.effective_zeros()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = inp if self.per_tensor else self.group_size
        q = self.codes.to(torch.float32).view(out, inp // g, g)
        s = self.scales.float().unsqueeze(-1)
        if self.biases is not None:
            w = s * q + self.biases.float().unsqueeze(-1)
        else:
            w = s * (q - self.effective_zeros().unsqueeze(-1))
        return w.reshape(out, inp).to(dtype)

    def storage_bits(self) -> int:
        bits = self.codes.numel() * self.bits + self.scales.numel() * _dtype_bits(self.scales)
        if self.zeros is not None:
            bits += self.zeros.numel() * self.bits  # integer zero-points pack at the code width
        if self.biases is not None:
            bits += self.biases.numel() * _dtype_bits(self.biases)
        return bits

    def to_tensors(self) -> dict[str, torch.Tensor]:
        from macq.packing import pack_bits

        out = {"codes": pack_bits(self.codes, self.bits), "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.biases is not None:
            out["biases"] = self.biases
        return out

    def meta(self) -> dict[str, Any]:
        return {"kind": "affine", "bits": self.bits, "group_size": self.group_size, "shape": list(self.shape),
                "per_tensor": self.per_tensor, "transposed": self.transposed}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> "AffineRecord":
        from macq.packing import unpack_bits

        out, inp = meta["shape"]
        return cls(codes=unpack_bits(t["codes"], meta["bits"], inp), scales=t["scales"], bits=meta["bits"],
                   group_size=meta["group_size"], zeros=t.get("zeros"), biases=t.get("biases"),
                   per_tensor=meta["per_tensor"], transposed=meta["transposed"])


@dataclass
class DoubleQuant:
    """Second-level quantization of per-block scales (bitsandbytes' ``compress_statistics``).

    ``scale = code_lut[codes] * absmax[i // block_size] + offset`` over the flattened scales.
    """

    codes: torch.Tensor       # uint8 [n_scales]
    code_lut: torch.Tensor    # float32 [256]
    absmax: torch.Tensor      # float32 [ceil(n_scales / block_size)]
    offset: float
    block_size: int = 256

    def dequantize(self) -> torch.Tensor:
        n = self.codes.numel()
        vals = self.code_lut.float()[self.codes.long()]
        blk = torch.arange(n, device=self.codes.device) // self.block_size
        return vals * self.absmax.float()[blk] + self.offset

    def storage_bits(self) -> int:
        return (self.codes.numel() * 8 + self.absmax.numel() * _dtype_bits(self.absmax)
                + self.code_lut.numel() * _dtype_bits(self.code_lut) + 32)


def _fp16_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` of two fp16 tensors rounded once to fp16, as Core ML's fp16 ``add`` computes it (the fp32 sum of
    two fp16 values is within one rounding of exact, and fp32 has > 2·11+2 bits, so fp32-then-fp16 is exact IEEE)."""
    return (a.half().float() + b.half().float()).half()


@dataclass
class LUTRecord:
    """Indices into per-output-group look-up tables, optionally scaled per input block, optionally with outliers.

    ``lut`` is ``[n_lut_groups, 2**bits]``; output channel ``i`` uses row ``i // (out // n_lut_groups)``.
    ``scales`` (if any) is ``[out, in // block_size]``; with ``double_quant`` it is derived from it.

    Outliers (SqueezeLLM's sparse part): ``outlier_pos`` holds strictly increasing flat positions into the
    ``[out, in]`` weight (int64), ``outlier_values`` their fp16 values, which **overwrite** the dense LUT value
    there. Overwrite, not add, so an outlier's value is independent of the LUT (a LUT refit cannot move it) and
    ``dequantize()`` at those positions is exactly the stored fp16 value. Core ML has no overwrite constexpr; the
    exporter writes ``lut_dense + sparse_to_dense(mask, r)`` with ``r = fp16(v - lut[idx])``
    (:meth:`outlier_residuals`), which is exact when ``fp16(lut[idx] + r) == v``; quantizers pick the dense index
    at outlier positions so that it is (:func:`macq.quantizers.outliers.attach_outliers`).
    """

    indices: torch.Tensor
    lut: torch.Tensor
    bits: int
    scales: torch.Tensor | None = None
    block_size: int | None = None
    double_quant: DoubleQuant | None = None
    transposed: bool = False
    outlier_pos: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    kind: str = field(default="lut", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise MacqError(f"bits={self.bits}: LUT records hold 1..8 bits")
        out, inp = self.indices.shape
        if self.lut.dim() != 2 or self.lut.shape[1] != 2 ** self.bits or out % self.lut.shape[0]:
            raise MacqError(f"lut has shape {tuple(self.lut.shape)}, expected [groups dividing {out}, {2 ** self.bits}]")
        has_scale = self.scales is not None or self.double_quant is not None
        if has_scale and (self.block_size is None or inp % self.block_size):
            raise MacqError(f"block_size={self.block_size} does not divide the input dim {inp}")
        if self.scales is not None and tuple(self.scales.shape) != (out, inp // self.block_size):
            raise MacqError(f"scales has shape {tuple(self.scales.shape)}, expected {(out, inp // self.block_size)}")
        _check_codes("indices", self.indices, self.bits)
        _check_float("lut", self.lut)
        _check_float("scales", self.scales)
        if self.double_quant is not None:
            _check_codes("dq_codes", self.double_quant.codes, 8)
            _check_float("dq_code_lut", self.double_quant.code_lut)
            _check_float("dq_absmax", self.double_quant.absmax)
        self._check_outliers()

    def _check_outliers(self) -> None:
        pos, val = self.outlier_pos, self.outlier_values
        if pos is None and val is None:
            return
        if pos is None or val is None:
            raise MacqError("record outliers: outlier_pos and outlier_values come together")
        if pos.dim() != 1 or val.dim() != 1 or pos.numel() != val.numel():
            raise MacqError(f"record outliers: outlier_pos {tuple(pos.shape)} and outlier_values {tuple(val.shape)} "
                            "must be 1-D of equal length")
        if pos.is_floating_point() or pos.dtype == torch.bool:
            raise MacqError(f"record outlier_pos: dtype {_dtype_name(pos.dtype)}, expected an integer dtype")
        if val.dtype != torch.float16:
            raise MacqError(f"record outlier_values: dtype {_dtype_name(val.dtype)}, expected float16 (what Core ML stores)")
        _check_float("outlier_values", val)
        n = self.indices.numel()
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise MacqError(f"record outlier_pos: positions in [{int(pos.min())}, {int(pos.max())}] outside the "
                            f"{n} weights")
        if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
            raise MacqError("record outlier_pos: positions must be strictly increasing (sorted, no duplicates)")

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_pos is None else self.outlier_pos.numel()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The LUT (× block scale) part alone, outliers not applied."""
        out, inp = self.shape
        rows_per_group = out // self.n_lut_groups
        lut_rows = self.lut.float().repeat_interleave(rows_per_group, dim=0)  # [out, K]
        w = torch.gather(lut_rows, 1, self.indices.long())
        s = self.block_scales()
        if s is not None:
            w = (w.view(out, -1, self.block_size) * s.unsqueeze(-1)).view(out, inp)
        return w.to(dtype)

    def outlier_residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, exact)``: the fp16 addends ``r = fp16(v - fp16(dense))`` that Core ML's ``add`` of the dense LUT
        and ``sparse_to_dense(mask, r)`` needs, and per outlier whether ``fp16(fp16(dense) + r) == v``."""
        d = self.dense().reshape(-1)[self.outlier_pos.long()].half()
        v = self.outlier_values
        r = (v.float() - d.float()).half()
        return r, _fp16_add(d, r) == v

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.indices.shape)  # type: ignore[return-value]

    @property
    def n_lut_groups(self) -> int:
        return self.lut.shape[0]

    def block_scales(self) -> torch.Tensor | None:
        """Per-block scales ``[out, in // block_size]`` as float32, double quant undone."""
        if self.double_quant is not None:
            out, inp = self.shape
            return self.double_quant.dequantize().view(out, inp // self.block_size)
        return None if self.scales is None else self.scales.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dense()
        if self.outlier_pos is not None:
            w.view(-1)[self.outlier_pos.long()] = self.outlier_values.float()
        return w.to(dtype)

    def storage_bits(self) -> int:
        """What the Core ML file holds. Outliers: ``constexpr_sparse_to_dense`` (iOS18) stores a 1-bit mask over
        *every* weight plus one fp16 value per outlier, so any outliers cost 1 bit/weight + 16 bits each."""
        bits = self.indices.numel() * self.bits + self.lut.numel() * _dtype_bits(self.lut)
        if self.outlier_pos is not None:
            bits += self.indices.numel() + 16 * self.n_outliers
        if self.double_quant is not None:
            bits += self.double_quant.storage_bits()
        elif self.scales is not None:
            bits += self.scales.numel() * _dtype_bits(self.scales)
        return bits

    def to_tensors(self) -> dict[str, torch.Tensor]:
        from macq.packing import pack_bits

        out = {"indices": pack_bits(self.indices, self.bits), "lut": self.lut}
        if self.scales is not None:
            out["scales"] = self.scales
        if self.double_quant is not None:
            dq = self.double_quant
            out.update({"dq_codes": dq.codes, "dq_code_lut": dq.code_lut, "dq_absmax": dq.absmax})
        if self.outlier_pos is not None:
            out.update({"outlier_pos": self.outlier_pos.to(torch.int64), "outlier_values": self.outlier_values})
        return out

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {"kind": "lut", "bits": self.bits, "shape": list(self.shape),
                             "block_size": self.block_size, "transposed": self.transposed}
        if self.double_quant is not None:
            m["dq_offset"] = self.double_quant.offset
            m["dq_block_size"] = self.double_quant.block_size
        return m

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> "LUTRecord":
        from macq.packing import unpack_bits

        out, inp = meta["shape"]
        dq = None
        if "dq_codes" in t:
            dq = DoubleQuant(codes=t["dq_codes"], code_lut=t["dq_code_lut"], absmax=t["dq_absmax"],
                             offset=meta["dq_offset"], block_size=meta["dq_block_size"])
        return cls(indices=unpack_bits(t["indices"], meta["bits"], inp), lut=t["lut"], bits=meta["bits"],
                   scales=t.get("scales"), block_size=meta["block_size"], double_quant=dq,
                   transposed=meta["transposed"], outlier_pos=t.get("outlier_pos"), outlier_values=t.get("outlier_values"))


@dataclass
class FPRecord:
    """Microscaled floats: ``w = element(codes) * scale(scales)`` per block of ``group_size`` input elements.

    ``mode`` names the format (:data:`macq.microscale.FP_FORMATS`), which fixes the code width, the block and
    both encodings, so a record cannot hold a combination no runtime executes. ``codes`` are element bit
    patterns (uint8, ``[out, in]``), ``scales`` the scale bytes (uint8, ``[out, in // group_size]``): exactly
    the bytes MLX stores, so export copies them and :meth:`dequantize` is the format's exact value.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mode: str
    transposed: bool = False
    kind: str = field(default="fp", init=False)

    def __post_init__(self) -> None:
        if self.mode not in FP_FORMATS:
            raise MacqError(f"record mode {self.mode!r}: expected one of {', '.join(FP_FORMATS)}")
        if self.codes.dim() != 2:
            raise MacqError("codes must be 2-D [out, in]")
        out, inp = self.codes.shape
        g = self.format.group_size
        if inp % g:
            raise MacqError(f"{self.mode}: its block of {g} does not divide the input dim {inp}")
        if tuple(self.scales.shape) != (out, inp // g):
            raise MacqError(f"scales has shape {tuple(self.scales.shape)}, expected {(out, inp // g)}")
        if self.scales.dtype != torch.uint8:
            raise MacqError(f"record scales: dtype {_dtype_name(self.scales.dtype)}, expected uint8 "
                            f"({self.format.scale.upper()} bytes)")
        _check_codes("codes", self.codes, self.bits)
        check_fp_record_bytes(self.codes, self.scales, self.format)

    @property
    def format(self) -> FPFormat:
        return fp_format(self.mode)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> int:
        return self.format.group_size

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def element_values(self) -> torch.Tensor:
        """The elements before scaling, float32 ``[out, in]`` (exact)."""
        return decode_elements(self.codes, self.format.element)

    def block_scales(self) -> torch.Tensor:
        """Decoded scales ``[out, in // group_size]`` as float32 (exact)."""
        return decode_scales(self.scales, self.format.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.shape
        g = self.group_size
        w = self.element_values().view(out, inp // g, g) * self.block_scales().unsqueeze(-1)
        return w.reshape(out, inp).to(dtype)

    def storage_bits(self) -> int:
        return self.codes.numel() * self.bits + self.scales.numel() * 8

    def to_tensors(self) -> dict[str, torch.Tensor]:
        from macq.packing import pack_bits

        return {"codes": pack_bits(self.codes, self.bits), "scales": self.scales}

    def meta(self) -> dict[str, Any]:
        return {"kind": "fp", "mode": self.mode, "shape": list(self.shape), "transposed": self.transposed}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> "FPRecord":
        from macq.packing import unpack_bits

        out, inp = meta["shape"]
        return cls(codes=unpack_bits(t["codes"], fp_format(meta["mode"]).bits, inp), scales=t["scales"],
                   mode=meta["mode"], transposed=meta["transposed"])


Record = Union[AffineRecord, LUTRecord, FPRecord]


def bits_per_weight(record: Record) -> float:
    """Stored bits per weight, every scale, zero, LUT entry and second-level constant charged."""
    return record.storage_bits() / record.indices.numel() if isinstance(record, LUTRecord) \
        else record.storage_bits() / record.codes.numel()


def record_to(record: Any, device: torch.device | str) -> Any:
    """The record (or :class:`DoubleQuant`) with every tensor on ``device``; the same object when they are there.
    A quantizer that computes on an accelerator hands its records back to the CPU with this, one layer at a time."""
    moved = {f.name: getattr(record, f.name) for f in fields(record) if f.init}
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else record_to(v, device) if isinstance(v, DoubleQuant)
                 else v) for k, v in moved.items()}
    same = all(moved[k] is getattr(record, k) for k in moved)
    return record if same else replace(record, **moved)


def nbytes(record: Record) -> int:
    return (record.storage_bits() + 7) // 8


# ---------------------------------------------------------------------------------------------
# Stored records: the manifest's meta checked against the tensors before a record is built.
# A manifest whose ``bits`` disagree with the stored codes would otherwise unpack into other, valid-looking
# codes (eval prints garbage, an export writes it). Every fact the meta states is checked against what the
# file holds: field set, dtypes, shapes (which fix bits and groups), and the packing's zero padding.

AFFINE_FIELDS = {"codes": True, "scales": True, "zeros": False, "biases": False}           # name -> required
LUT_FIELDS = {"indices": True, "lut": True, "scales": False, "dq_codes": False, "dq_code_lut": False,
              "dq_absmax": False, "outlier_pos": False, "outlier_values": False}
PACKED_DTYPES = (torch.uint32, torch.int32)


def _meta_int(meta: dict[str, Any], key: str, lo: int, hi: int | None = None, optional: bool = False) -> int | None:
    v = meta.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise MacqError(f"manifest {key}={v!r}, expected an int {rng}")
    return v


def _meta_bool(meta: dict[str, Any], key: str) -> bool:
    v = meta.get(key, False)
    if not isinstance(v, bool):
        raise MacqError(f"manifest {key}={v!r}, expected true or false")
    return v


def _meta_shape(meta: dict[str, Any]) -> tuple[int, int]:
    v = meta.get("shape")
    if not (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        raise MacqError(f"manifest shape={v!r}, expected [out, in] of positive ints")
    return int(v[0]), int(v[1])


def _stored_bits(words: int, n: int) -> str:
    """What a packed width says the codes were written at (for the error message)."""
    cands = [b for b in range(1, 9) if (n * b + 31) // 32 == words]
    return f"{'/'.join(map(str, cands))} bits" if cands else "no bit width of 1..8"


def check_stored(meta: dict[str, Any], stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """``meta`` (one manifest entry) against the stored tensors' shapes and dtypes (a safetensors header holds
    both, so this runs before any tensor data is read). Raises a MacqError naming the field and the lie.

    ``bits`` is pinned by the packed width, ``ceil(in·bits/32)`` words per row, which is one-to-one whenever
    ``in`` is a multiple of 32 (every real model); widths that share a word count (``in·bits < 32``) are
    told apart by the zero padding after the last code when the record is built (:func:`_check_padding`)."""
    from macq.packing import packed_words

    if not isinstance(meta, dict):
        raise MacqError(f"manifest entry is {type(meta).__name__}, expected an object")
    kind = meta.get("kind")
    if kind == "fp":
        return _check_stored_fp(meta, stored)
    if kind not in ("affine", "lut"):
        raise MacqError(f"unknown record kind {kind!r}")
    allowed = AFFINE_FIELDS if kind == "affine" else LUT_FIELDS
    bits = _meta_int(meta, "bits", 1, 8)
    out, inp = _meta_shape(meta)
    _meta_bool(meta, "transposed")
    stray = sorted(set(stored) - set(allowed))
    if stray:
        raise MacqError(f"stored tensor {stray[0]} does not belong to a {kind} record (manifest kind={kind!r})")
    missing = [f for f, req in allowed.items() if req and f not in stored]
    if missing:
        raise MacqError(f"no stored tensor {missing[0]} (a {kind} record needs it)")

    def expect(name: str, want: tuple[int, ...], why: str) -> None:
        if name in stored and tuple(stored[name][0]) != want:
            raise MacqError(f"stored {name} has shape {list(stored[name][0])}, the manifest ({why}) implies {list(want)}")

    packed = "codes" if kind == "affine" else "indices"
    pshape, pdtype = stored[packed]
    if pdtype not in PACKED_DTYPES:
        raise MacqError(f"stored {packed} have dtype {_dtype_name(pdtype)}, expected uint32 words")
    words = packed_words(inp, bits)
    if len(pshape) == 2 and pshape[0] == out and pshape[1] != words:
        raise MacqError(f"manifest bits={bits}, shape [{out}, {inp}] disagree with the stored {packed}: {pshape[1]} "
                        f"words per row of {inp} codes is {_stored_bits(pshape[1], inp)}, {bits} bits needs {words}")
    expect(packed, (out, words), f"shape [{out}, {inp}], bits={bits}")
    if kind == "affine":
        per_tensor = _meta_bool(meta, "per_tensor")
        g = _meta_int(meta, "group_size", 1)
        if inp % g:
            raise MacqError(f"manifest group_size={g} does not divide the input dim {inp}")
        want = (1, 1) if per_tensor else (out, inp // g)
        why = "per_tensor" if per_tensor else f"group_size={g} over {inp} inputs"
        if "zeros" in stored and "biases" in stored:
            raise MacqError("stored zeros and biases both: an affine record holds one of them")
        for f in ("scales", "zeros", "biases"):
            expect(f, want, why)
        return
    lut_shape = stored["lut"][0]
    if len(lut_shape) != 2 or lut_shape[1] != 2 ** bits or lut_shape[0] < 1 or out % lut_shape[0]:
        raise MacqError(f"manifest bits={bits} disagrees with the stored lut {list(lut_shape)} "
                        f"(expected [groups dividing {out}, {2 ** bits}])")
    block = _meta_int(meta, "block_size", 1, optional=True)
    dq = [f for f in ("dq_codes", "dq_code_lut", "dq_absmax") if f in stored]
    if (("scales" in stored) or dq) and block is None:
        raise MacqError("manifest block_size=None, but scales are stored")
    if block is not None and inp % block:
        raise MacqError(f"manifest block_size={block} does not divide the input dim {inp}")
    if block is not None:
        expect("scales", (out, inp // block), f"block_size={block} over {inp} inputs")
    if dq:
        if len(dq) != 3:
            raise MacqError(f"stored {', '.join(dq)} without the rest of dq_codes/dq_code_lut/dq_absmax")
        if "scales" in stored:
            raise MacqError("stored scales and double-quantized scales both")
        dq_block = _meta_int(meta, "dq_block_size", 1)
        if not isinstance(meta.get("dq_offset"), (int, float)) or isinstance(meta.get("dq_offset"), bool):
            raise MacqError(f"manifest dq_offset={meta.get('dq_offset')!r}, expected a number")
        n_scales = out * (inp // block)  # type: ignore[operator]
        expect("dq_codes", (n_scales,), f"{n_scales} block scales")
        expect("dq_absmax", (-(-n_scales // dq_block),), f"dq_block_size={dq_block}")
        expect("dq_code_lut", (256,), "an 8-bit code table")
    if ("outlier_pos" in stored) != ("outlier_values" in stored):
        raise MacqError("stored outlier_pos and outlier_values come together")


def _check_stored_fp(meta: dict[str, Any], stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """A microscaled-float record's manifest entry against its stored ``codes`` (packed) and ``scales`` (bytes)."""
    from macq.microscale import FP_FORMATS
    from macq.packing import packed_words

    mode = meta.get("mode")
    if mode not in FP_FORMATS:
        raise MacqError(f"manifest mode={mode!r}, expected one of {', '.join(FP_FORMATS)}")
    f = FP_FORMATS[mode]
    out, inp = _meta_shape(meta)
    _meta_bool(meta, "transposed")
    if set(stored) != {"codes", "scales"}:
        raise MacqError(f"stored {sorted(stored)}: a {mode} record holds exactly codes and scales")
    if inp % f.group_size:
        raise MacqError(f"manifest shape [{out}, {inp}]: {mode} blocks of {f.group_size} do not divide the input dim")
    words = packed_words(inp, f.bits)
    for name, want, dtypes in (("codes", (out, words), PACKED_DTYPES), ("scales", (out, inp // f.group_size),
                                                                         (torch.uint8,))):
        shape, dtype = stored[name]
        if tuple(shape) != want or dtype not in dtypes:
            raise MacqError(f"manifest mode={mode}, shape [{out}, {inp}] disagree with the stored {name} "
                            f"{list(shape)} {_dtype_name(dtype)} (expected {list(want)})")


def _check_padding(name: str, packed: torch.Tensor, bits: int, n: int) -> None:
    """Bits past the last code of each row are zero as written; nonzero ones mean codes written at another width
    (a ``bits`` lie that happens to need the same number of words)."""
    used = n * bits - (packed.shape[1] - 1) * 32       # bits used in each row's last word, 1..32
    if 0 < used < 32 and packed.numel():
        last = packed[:, -1].to(torch.int64) & 0xFFFFFFFF
        if bool((last >> used).any()):
            raise MacqError(f"stored {name}: nonzero bits after the last of {n} codes per row: they were not "
                            f"written at the manifest's bits={bits}")


def record_from_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Record:
    """Build a record from its manifest entry and stored tensors, every stated fact checked first
    (:func:`check_stored`, then the padding and the record's own value checks)."""
    check_stored(meta, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()})
    packed = "indices" if meta["kind"] == "lut" else "codes"
    bits = fp_format(meta["mode"]).bits if meta["kind"] == "fp" else meta["bits"]
    _check_padding(packed, tensors[packed], bits, meta["shape"][1])
    if meta["kind"] == "affine":
        return AffineRecord.from_tensors(meta, tensors)
    if meta["kind"] == "fp":
        return FPRecord.from_tensors(meta, tensors)
    return LUTRecord.from_tensors(meta, tensors)
