"""Record -> MLX tensors: the exact per-layer layout mlx_lm's ``QuantizedLinear`` / ``QuantizedEmbedding`` load.

MLX stores ``P.weight`` (uint32, each row one little-endian bit stream of codes, which is what
:func:`macq.packing.pack_bits` writes), ``P.scales`` and ``P.biases`` (``[out, in // group]`` in the model
dtype) and dequantizes ``w = scales * q + biases``. An :class:`AffineRecord` maps onto that without
re-quantization: codes are copied, scales are cast, and the zero-point becomes the bias ``-s·z``. The
only loss is the storage rounding of that bias (none for symmetric records: ``s·2^(b-1)`` is exact).
An :class:`FPRecord` (mxfp4 / nvfp4 / mxfp8) holds MLX's own bytes: ``P.weight`` packed codes, ``P.scales`` the
uint8 scale bytes, no ``P.biases``; what each mode stores is one table, :data:`MLX_MODES`.

Architecture differences (names, Conv1D orientation, tying, the mlx_lm model) are data in the registry
(:mod:`macq.arch`, each row's ``mlx``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from macq.arch import ARCHITECTURES, ArchSpec
from macq.errors import MacqError
from macq.microscale import FP_FORMATS
from macq.packing import pack_bits, unpack_bits
from macq.record import AffineRecord, FPRecord, LUTRecord, Record
from macq.targets import MLX_HOLDS

MLX_BITS = MLX_HOLDS.affine_bits            # the target table's row is the one place these are written
MLX_GROUPS = MLX_HOLDS.affine_groups or ()


@dataclass(frozen=True)
class MLXMode:
    """What one ``mx.quantize`` mode stores per quantized layer: code widths, groups along the input dim, the
    scale's storage (``"model"``: the model dtype; else uint8 bytes in that encoding) and whether a bias
    tensor exists. ``record``: the macq record kind that maps onto it without re-quantization."""

    bits: tuple[int, ...]
    groups: tuple[int, ...]
    scale: str
    biases: bool
    record: str


MLX_MODES: dict[str, MLXMode] = {
    "affine": MLXMode(MLX_BITS, MLX_GROUPS, "model", True, "affine"),
    **{name: MLXMode((f.bits,), (f.group_size,), f.scale, False, "fp") for name, f in FP_FORMATS.items()
       if name in MLX_HOLDS.fp_modes},
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
REPRESENTABLE_METHODS = "rtn, gptq, awq, awq-gptq (and mixed precision built from them)"


@dataclass(frozen=True)
class MLXArch:
    """The registry's facts about one family that the MLX writer needs (a view of :class:`macq.arch.ArchSpec`).

    ``rename``: prefix rewrites (HF -> mlx). ``conv1d``: module-name suffixes whose HF *float* weight is
    stored ``[in, out]`` (records are already ``[out, in]``). ``always_tied``: mlx_lm's model has no
    ``lm_head`` at all. ``drop``: key suffixes mlx_lm has no parameter for. ``windows``: mlx_lm's model
    implements sliding windows. ``spec``: the full registry row.
    """

    model_type: str
    rename: tuple[tuple[str, str], ...] = ()
    conv1d: tuple[str, ...] = ()
    always_tied: bool = False
    drop: tuple[str, ...] = ("rotary_emb.inv_freq",)
    windows: bool = False
    spec: ArchSpec | None = None


def mlx_arch(model_type: str) -> MLXArch:
    """Read from the architecture registry; a family without an ``mlx`` entry is refused in one line."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None or spec.mlx is None:
        known = sorted(mt for mt, row in ARCHITECTURES.items() if row.mlx is not None)
        raise MacqError(f"MLX export: model_type {model_type!r} is not supported; mlx_lm layouts known to macq: "
                        f"{', '.join(known)}")
    m = spec.mlx
    return MLXArch(m.model_type, m.rename, spec.conv1d, m.always_tied, m.drop, m.windows, spec)


def mlx_name(hf_name: str, arch: MLXArch) -> str:
    for old, new in arch.rename:
        if hf_name.startswith(old):
            return new + hf_name[len(old):]
    return hf_name


def torch_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise MacqError(f"dtype {dtype!r}: MLX export supports {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------------------------------ checks
def check_affine(name: str, rec: AffineRecord) -> None:
    """Refuse, naming the layer, any affine record MLX's affine mode cannot hold losslessly."""
    supported = (f"MLX holds affine bits {{{','.join(map(str, MLX_BITS))}}} with groups "
                 f"{{{','.join(map(str, MLX_GROUPS))}}} along the input dim")
    if rec.per_tensor:
        raise MacqError(f"MLX export: layer {name} is quantized per-tensor; {supported} (re-quantize per-group)")
    if rec.bits not in MLX_BITS:
        raise MacqError(f"MLX export: layer {name} has {rec.bits}-bit codes; {supported}")
    if rec.group_size not in MLX_GROUPS:
        what = (f"per-channel (input dim {rec.shape[1]})" if rec.granularity == "per_channel"
                else f"group_size={rec.group_size}")
        raise MacqError(f"MLX export: layer {name} is {what}; {supported}")


def lut_error(names: list[str]) -> MacqError:
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return MacqError(f"MLX export: {len(names)} layer(s) hold look-up-table codes (k-means / NF4 / FP4 / uniform "
                     f"palettization), which MLX cannot represent: {shown}. MLX holds affine records from "
                     f"{REPRESENTABLE_METHODS}; pass requantize_lut=True (--requantize-lut) to re-quantize them "
                     "with MLX's affine algorithm (lossy)")


# ------------------------------------------------------------------------------------------ tensors
def affine_tensors(rec: AffineRecord, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``{"weight", "scales", "biases"}`` for one record: packed codes, cast scales, ``b = -s·z`` cast."""
    scales = rec.scales.to(dtype)
    biases = rec.effective_biases().to(dtype)
    return {"weight": pack_bits(rec.codes, rec.bits), "scales": scales.contiguous(), "biases": biases.contiguous()}


def cast_report(name: str, rec: AffineRecord, t: dict[str, torch.Tensor]) -> str | None:
    """A note when the cast changed the *scales* (the biases' rounding is the documented, bounded loss);
    an error when a constant overflows the storage dtype."""
    for key in ("scales", "biases"):
        if not torch.isfinite(t[key]).all():
            raise MacqError(f"MLX export: layer {name}: {key} overflow {t[key].dtype}; export with "
                            "dtype='float32' or 'bfloat16'")
    s32 = rec.scales.float()
    if torch.equal(t["scales"].float(), s32):
        return None
    rel = ((t["scales"].float() - s32).abs() / s32.abs().clamp_min(1e-30)).max().item()
    return f"{name}: scales rounded to {t['scales'].dtype} (max rel. change {rel:.2e})"


def mlx_quantize_record(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype = torch.float16
                        ) -> AffineRecord:
    """MLX's own affine quantizer (``mx.quantize``) as a bias-form record: the reference for
    ``--requantize-lut`` and for tests (its codes come from mlx, not from macq)."""
    import mlx.core as mx

    if bits not in MLX_BITS or group_size not in MLX_GROUPS:
        raise MacqError(f"re-quantization for MLX: bits {bits} / group {group_size} not in {MLX_BITS} / {MLX_GROUPS}")
    arr = mx.array(w.detach().float().cpu().numpy()).astype(_mx_dtype(dtype))
    wq, s, b = mx.quantize(arr, group_size, bits, mode="affine")
    codes = unpack_bits(torch.from_numpy(np.array(wq)), bits, w.shape[1])
    f32 = lambda a: torch.from_numpy(np.array(a.astype(mx.float32))).to(dtype)  # noqa: E731
    return AffineRecord(codes=codes, scales=f32(s), biases=f32(b), bits=bits, group_size=group_size)


def _mx_dtype(dtype: torch.dtype):
    import mlx.core as mx

    return {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16, torch.float32: mx.float32}[dtype]


@dataclass
class LayerOut:
    """What one quantized-or-not layer contributes: tensors keyed by field, the quantization params mlx
    needs for it (``None`` = stays float) and an optional note for the export result."""

    tensors: dict[str, torch.Tensor]
    qparams: dict | None
    note: str | None = None


def fp_tensors(rec: FPRecord) -> dict[str, torch.Tensor]:
    """``{"weight", "scales"}`` of a float-mode record: its packed codes and scale bytes, unchanged."""
    return {"weight": pack_bits(rec.codes, rec.bits), "scales": rec.scales.contiguous()}


def qparams_of(rec: AffineRecord | FPRecord) -> dict:
    """The ``quantization`` entry mlx_lm rebuilds this layer from."""
    mode = rec.mode if isinstance(rec, FPRecord) else "affine"
    return {"group_size": rec.group_size, "bits": rec.bits, "mode": mode}


def layer_layout(name: str, rec: Record, dtype: torch.dtype, requant: tuple[int, int] | None = None) -> LayerOut:
    """Map one record. LUT records need ``requant=(bits, group)`` and are re-quantized by mx.quantize;
    if the group does not divide the input dim the layer stays float (as mlx_lm does)."""
    if isinstance(rec, FPRecord):
        return LayerOut(fp_tensors(rec), qparams_of(rec))
    if isinstance(rec, LUTRecord):
        if requant is None:
            raise lut_error([name])
        bits, group = requant
        w = rec.dequantize(torch.float32)
        if w.shape[1] % group:
            return LayerOut({"weight": w.to(dtype)}, None,
                            f"{name}: LUT record kept float (input dim {w.shape[1]} % group {group} != 0)")
        rec = mlx_quantize_record(w, bits, group, dtype)
        out = layer_layout(name, rec, dtype)
        out.note = f"{name}: LUT record re-quantized with MLX affine {bits}-bit g{group} (lossy)"
        return out
    check_affine(name, rec)
    t = affine_tensors(rec, dtype)
    note = cast_report(name, rec, t)
    return LayerOut(t, qparams_of(rec), note)


def float_weight(hf_key: str, t: torch.Tensor, arch: MLXArch, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor in mlx orientation and dtype (GPT-2 Conv1D weights flipped to ``[out, in]``)."""
    module, _, field = hf_key.rpartition(".")
    if field == "weight" and any(module.endswith(s) for s in arch.conv1d):
        t = t.t()
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()
