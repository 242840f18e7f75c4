"""The MIL pass that puts each record into the program as a constexpr op, built from the record itself.

Matching, two ways. The ANE graph (:func:`place_slots`) is traced from placeholder weights that carry a marker,
so each placeholder const is found by its marker and never compared by value. The transformers-traced graph
(``--graph hf``, :func:`apply_records_to_program`) carries the real weights: after fp16 conversion a quantized
linear's weight is a ``const`` whose value is exactly ``record.dequantize().half()`` (fp32→fp16 is
round-to-nearest-even in both numpy and torch), so consts are matched to records by a hash of their fp16
bytes, in both orientations (GPT-2's Conv1D / a folded transpose). Either way every record must be placed at
least once (a tied embedding may be used twice); anything else raises.

Layouts (iOS18 opset, ``coremltools/converters/mil/mil/ops/defs/iOS18/compression.py``):

* LUT record → ``constexpr_lut_to_dense(indices uint{b}, lut fp16 [groups, 1, 2^b, 1])``: bit-exact,
  since ``dequantize().half()`` is ``fp16(lut)[indices]``.
* LUT record with per-block scales (NF4/FP4) → a per-block LUT ``[out, in/block, 2^b, 1]`` of
  ``fp16(lut·scale)``: exact, but 2^b fp16 entries per block (8 bits/weight for NF4 with blocks of 64).
  Why not the 4.25-bit chain ``lut_to_dense → blockwise_shift_scale(scale [out, in/block])``: for
  targets below iOS26 coremltools' ``canonicalize_quantized_lut_pattern`` pass rewrites that chain into
  ``shift_scale(tiled LUT) → lut_to_dense`` (the reverse order "was fixed in iOS26"), which tiles the
  LUT per block anyway (8.25 bits/weight) — measured here, so the plain per-block LUT is the honest
  smallest exact iOS18 form.
* LUT record with outliers (SqueezeLLM's dense-and-sparse, :mod:`macq.quantizers.outliers`) → the LUT form above
  ``add`` ``constexpr_sparse_to_dense(nonzero_data fp16 [n], mask uint1 [out, in])`` of the residuals
  ``r = fp16(v − lut[idx])`` (:meth:`~macq.record.LUTRecord.outlier_residuals`; the quantizer picks ``idx`` so that
  ``fp16(lut[idx] + r) == v``, so the fp16 ``add`` is bit-exact; a record where it is not is refused). Core ML has
  no overwrite-by-mask constexpr and no constexpr that adds two constexprs, so the sum is a runtime ``add`` whose
  result is no longer a compile-time constant: ``linear`` requires a const weight, so its consumers become
  ``matmul(x, W, transpose_y=True)`` (+ bias); ``conv`` (the ANE graph), ``matmul`` and ``gather`` take it as is.
  Storage: the 1-bit mask over every weight + 16 bits per outlier. Rejected: coremltools' joint forms
  (``constexpr_lut_to_sparse`` → ``sparse_to_dense``) palettize the *non-zeros of a pruned* weight — zeros
  elsewhere, not a dense LUT plus a few fp16 values; two of them (dense-minus-outliers and outliers) would cost two
  masks.
* Float-mode record (mxfp4 / nvfp4 / mxfp8, :class:`~macq.record.FPRecord`) → refused, before any work
  (:func:`fp_refusal`): the compact exact form would be ``lut_to_dense`` of the 16 E2M1 values chained with
  ``blockwise_shift_scale`` by the block scale, and that chain is the one coremltools rewrites into a per-block
  LUT below iOS26 (above): 4 + 16·16/32 = 12 bits/weight for mxfp4, 20 for nvfp4, more than fp16's 16 for nvfp4.
* Affine record → ``constexpr_blockwise_shift_scale(data, scale fp16 [out, in/g], offset)``: zero-point
  records use unsigned data + unsigned integer offset; symmetric ones signed data (``q − 2^(b−1)``) and no
  offset. Data types exist only for 4 and 8 bits: 1–3 bit codes go in a 4-bit container, 5–7 in 8 bits
  (reported by :func:`converters.inspect.inspect_mlpackage` at the stored width). ``s·(q−z)`` with ``s``
  fp16 and a small integer is exact in fp32, so the fp16 result equals the record's.
"""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import torch

from macq.errors import MacqError
from macq.record import AffineRecord, FPRecord, LUTRecord
from macq.targets import COREML_HOLDS


def _hash(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def _fp16_exact(t: torch.Tensor | np.ndarray) -> bool:
    a = np.asarray(t.detach().float().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float32)
    return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _sub_byte(a: np.ndarray, name: str) -> np.ndarray:
    from coremltools.converters.mil.mil import types

    return a.astype(types.nptype_from_builtin(types.string_to_builtin(name)))


# ------------------------------------------------------------------------------------------- layouts
# Each builder returns a list of ("lut" | "shift_scale", kwargs) steps in [out, in] orientation; the
# second step, if any, takes the first one's output as ``data``.

LUT_BITS = COREML_HOLDS.lut_bits  # index widths Core ML has a type for (uint1/2/3/4/6/8): the target table's row


def lut_layout(rec: LUTRecord, name: str, notes: list[str]) -> list[tuple[str, dict]]:
    out, inp = rec.shape
    b, k = rec.bits, 2 ** rec.bits
    if b not in LUT_BITS:
        raise MacqError(f"{name}: LUT indices of {b} bits have no Core ML type (uint1/2/3/4/6/8)")
    idx = _sub_byte(_np(rec.indices).astype(np.uint8), f"uint{b}")
    lut = _np(rec.lut.float())
    scales = rec.block_scales()
    if scales is None:
        return [("lut", dict(indices=idx, lut=lut.astype(np.float16).reshape(rec.n_lut_groups, 1, k, 1)))] \
            + outlier_steps(rec, name)
    # per-block LUT: entry [o, j, c] = fp16(lut[group(o), c] * scale[o, j]), computed in fp32 like dequantize
    rows = rec.lut.float().repeat_interleave(out // rec.n_lut_groups, dim=0)           # [out, K]
    table = (rows.unsqueeze(1) * scales.unsqueeze(-1)).half()                           # [out, in/blk, K]
    notes.append(f"{name}: LUT × per-block scale stored as an exact per-block LUT ({k} fp16 entries per "
                 f"{rec.block_size} weights, {b + 16 * k / rec.block_size:.2f} bits/weight); iOS18 has no "
                 "compact exact form")
    return [("lut", dict(indices=idx, lut=_np(table).reshape(out, inp // rec.block_size, k, 1)))] + outlier_steps(rec, name)


def outlier_steps(rec: LUTRecord, name: str) -> list[tuple[str, dict]]:
    """The sparse step of a record with outliers: the fp16 residuals as a dense ``[out, in]`` array (zero elsewhere;
    the non-zeros are taken in mask order once the array is in its final orientation) and the uint1 mask."""
    if not rec.n_outliers:
        return []
    r, exact = rec.outlier_residuals()
    if not bool(exact.all()):
        raise MacqError(f"{name}: {int((~exact).sum())} of {rec.n_outliers} outliers cannot be written exactly as "
                        "LUT + fp16 residual (no LUT entry of their group admits an exact fp16 sum)")
    values = np.zeros(rec.shape, dtype=np.float16)
    mask = np.zeros(rec.shape, dtype=np.uint8)
    pos = _np(rec.outlier_pos.long())
    values.reshape(-1)[pos] = _np(r)
    mask.reshape(-1)[pos] = 1
    return [("sparse", dict(values=values, mask=_sub_byte(mask, "uint1")))]


def affine_layout(rec: AffineRecord, allow_fallback: bool, name: str, notes: list[str]) -> list[tuple[str, dict]]:
    b = rec.bits
    width = 4 if b <= 4 else 8
    scale = rec.scales.float()
    if not _fp16_exact(scale):
        if not allow_fallback:
            raise MacqError(f"{name}: affine scales are not fp16 values (Core ML stores fp16 scales); "
                            "pass allow_fallback=True to round them")
        notes.append(f"{name}: scales rounded to fp16 (not exact)")
    codes = _np(rec.codes).astype(np.int16)
    s16 = _np(scale).astype(np.float16)
    if rec.symmetric:
        data = _sub_byte(codes - 2 ** (b - 1), f"int{width}")
        return [("shift_scale", dict(data=data, scale=s16))]
    if rec.zeros is not None:
        z = _np(rec.zeros.double())
        if not np.array_equal(z, np.round(z)):
            raise MacqError(f"{name}: zero-points must be integers in code space (found fractional values)")
    else:  # bias form w = s·q + b: exact iff −b/s is an integer
        z64 = -_np(rec.biases.double()) / _np(scale.double())
        z = np.round(z64)
        exact = np.array_equal(-z * _np(scale.double()), _np(rec.biases.double()))
        if not exact:
            if not allow_fallback:
                bad = int((np.abs(z64 - z) > 0).sum())
                raise MacqError(f"{name}: bias-form affine record (w = s·q + b) with −b/s not an integer in "
                                f"{bad} of {z.size} groups; Core ML stores integer offsets. Pass "
                                "allow_fallback=True to store a rounded fp16 offset")
            z = z64.astype(np.float16)
            approx = (scale.unsqueeze(-1) * (rec.codes.float().view(*z.shape, -1) - torch.from_numpy(z.astype(np.float32)).unsqueeze(-1)))
            err = (approx.view(rec.shape).half().float() - rec.dequantize().half().float()).abs().max()
            notes.append(f"{name}: bias form stored as fp16 offset −b/s (max |Δw| {float(err):.3g})")
            return [("shift_scale", dict(data=_sub_byte(codes, f"uint{width}"), scale=s16, offset=z))]
    if z.min() >= 0 and z.max() < 2 ** width:
        offset = _sub_byte(z.astype(np.int16), f"uint{width}")
    elif np.abs(z).max() <= 2048:  # integer zero outside the code range (all-positive group): exact in fp16
        offset = z.astype(np.float16)
    else:
        raise MacqError(f"{name}: integer zero-point {np.abs(z).max():.0f} beyond fp16's exact integers (2048)")
    return [("shift_scale", dict(data=_sub_byte(codes, f"uint{width}"), scale=s16, offset=offset))]


def fp_refusal(mode: str, name: str | None = None) -> MacqError:
    """The one-line refusal of a float-mode record for Core ML (why: see the module doc)."""
    where = f"layer {name} holds" if name else "--mode"
    return MacqError(f"Core ML export: {where} {mode} (E2M1/E4M3 codes x 8-bit block scale); iOS18 Core ML has no "
                     "compact exact form (coremltools rewrites lut_to_dense + blockwise_shift_scale into a per-block "
                     "LUT of 12-20 bits/weight); export it to MLX (--target mlx), or use --method fp4 / nf4 / rtn "
                     "for Core ML")


def record_layout(rec, name: str, allow_fallback: bool, notes: list[str]):
    if isinstance(rec, LUTRecord):
        return lut_layout(rec, name, notes)
    if isinstance(rec, AffineRecord):  # per-tensor scale [1, 1] is one block over the whole tensor: valid
        return affine_layout(rec, allow_fallback, name, notes)
    if isinstance(rec, FPRecord):
        raise fp_refusal(rec.mode, name)
    raise MacqError(f"{name}: unknown record type {type(rec).__name__}")


def _transpose_step(kw: dict) -> dict:
    """Same layout for a const stored ``[in, out]``: swap the first two axes of every array."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.ndarray) and v.ndim >= 2:
            v = np.swapaxes(v, 0, 1).copy() if v.dtype.metadata is None else \
                np.swapaxes(v, 0, 1).copy().astype(v.dtype)
        out[k] = v
    return out


def _conv_step(kind: str, kw: dict) -> dict:
    """Same layout for a 1×1 conv weight ``[out, in, 1, 1]``: two unit axes after the weight axes (the LUT's
    own trailing ``[K, 1]`` axes stay last, as iOS18 ``constexpr_lut_to_dense`` wants rank(lut) = rank + 2)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, np.ndarray) and v.ndim >= 2:
            shape = v.shape[:2] + (1, 1) + v.shape[2:] if (kind == "lut" and k == "lut") else v.shape + (1, 1)
            v = v.reshape(shape).view(v.dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------- the pass

def dynamic_weight_consumers(var) -> None:
    """Rewrite every ``linear`` that takes ``var`` (a runtime value: LUT + outliers) as its weight into
    ``matmul(x, var, transpose_y=True)`` (+ bias): MIL's ``linear`` only accepts a compile-time weight."""
    from coremltools.converters.mil import Builder as mb

    if var.op is None or var.op.op_type == "const" or var.op.op_type.startswith("constexpr_"):
        return   # a compile-time weight: linear takes it as is
    for op in list(var.child_ops):
        if op.op_type != "linear" or op.weight is not var:
            continue
        block = op.enclosing_block
        y = mb.matmul(x=op.x, y=var, transpose_y=True, before_op=op, name=f"{op.name}_mm")
        if op.bias is not None and not (op.bias.val is not None and not np.any(op.bias.val)):
            y = mb.add(x=y, y=op.bias, before_op=op, name=f"{op.name}_bias")
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=y)
        block.remove_ops([op])


def _build(steps, before_op, name: str, transposed: bool, conv: bool = False):
    from coremltools.converters.mil import Builder as mb

    var = None
    for i, (kind, kw) in enumerate(steps):
        kw = _transpose_step(kw) if transposed else dict(kw)
        kw = _conv_step(kind, kw) if conv else kw
        if kind == "lut":
            var = mb.constexpr_lut_to_dense(**kw, before_op=before_op, name=f"{name}_lut")
        elif kind == "sparse":
            nz = kw["values"][kw["mask"].view(np.uint8) != 0]          # row-major order of the final mask
            sp = mb.constexpr_sparse_to_dense(nonzero_data=nz, mask=kw["mask"], before_op=before_op,
                                              name=f"{name}_outliers")
            var = mb.add(x=var, y=sp, before_op=before_op, name=f"{name}_dense_sparse")
        else:
            if var is not None:
                kw["data"] = var
            var = mb.constexpr_blockwise_shift_scale(**kw, before_op=before_op, name=f"{name}_{'scale' if i else 'q'}")
    return var


def plan_layouts(records: dict, allow_fallback: bool = False) -> tuple[dict[str, list], list[str]]:
    """Every record's constexpr layout, computed before conversion so bad input fails in a second."""
    notes: list[str] = []
    return {name: record_layout(rec, name, allow_fallback, notes) for name, rec in records.items()}, notes


def check_layouts(records, allow_fallback: bool = False) -> list[str]:
    """:func:`plan_layouts`' checks and notes for a whole model, one record at a time, keeping nothing (a
    lazy model's records are read one by one: the check costs one record's memory, not the model's)."""
    notes: list[str] = []
    for name in records:
        record_layout(records[name], name, allow_fallback, notes)
    return notes


def apply_records_to_program(prog, records: dict, layouts: dict[str, list]) -> dict[str, list[str]]:
    """Replace matched weight consts in ``prog`` (in place). Returns ``{record: [replaced const names]}``."""
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    index: dict[tuple, list[tuple[str, bool]]] = {}
    for name, rec in records.items():
        w = _np(rec.dequantize(torch.float32).half())
        index.setdefault((w.shape, _hash(w)), []).append((name, False))
        if w.shape != w.T.shape or not np.array_equal(w, w.T):
            index.setdefault((w.T.shape, _hash(w.T)), []).append((name, True))
    placed: dict[str, list[str]] = {n: [] for n in records}

    @block_context_manager
    def _visit(block):
        for op in list(block.operations):
            for b in op.blocks:
                _visit(b)
            if op.op_type != "const" or op.outputs[0].val is None:
                continue
            val = op.outputs[0].val
            if not isinstance(val, np.ndarray) or val.dtype != np.float16:
                continue
            conv = val.ndim == 4 and val.shape[2:] == (1, 1)   # 1x1 conv weight [out, in, 1, 1]
            if val.ndim != 2 and not conv:
                continue
            hit = index.get((val.shape[:2], _hash(val)))
            if hit is None or (conv and hit[0][1]):
                continue
            name, transposed = hit[0]  # records with identical weights are interchangeable
            new = _build(layouts[name], op, op.name, transposed, conv)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                               no_check_var_types=True)
            block.remove_ops([op])
            dynamic_weight_consumers(new)
            for other, _ in hit:
                placed[other].append(op.name)

    for func in prog.functions.values():
        _visit(func)
    missing = [n for n, v in placed.items() if not v]
    if missing:
        raise MacqError(f"records not found in the converted program (weights changed during conversion?): "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return placed


GC_BYTES = 64 << 20   # collect garbage after replacing this many bytes of placeholders (a full gc costs ~0.3 s)


def place_slots(prog, slots: dict[int, tuple], layouts: dict[str, list], float_rows) -> dict[int, list[str]]:
    """Replace the placeholder consts of an ANE chunk's program (in place): see
    :class:`converters.ane_model.Weights`. A const is a placeholder iff it is a 2-D (or 1×1-conv 4-D) fp16 const
    whose first two values are ``m, -m`` for a marker ``m`` in ``slots``; a replacement of another shape raises.
    Records become their constexpr ops; float tensors
    their fp16 values (``float_rows(name, a, b)``). Every slot must be found at least once."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    placed: dict[int, list[str]] = {m: [] for m in slots}

    def _marker(op) -> int | None:
        val = op.outputs[0].val if op.op_type == "const" else None
        if not isinstance(val, np.ndarray) or val.dtype != np.float16 or val.ndim not in (2, 4) or val.shape[1] < 2:
            return None
        if val.ndim == 4 and val.shape[2:] != (1, 1):   # only 1x1 conv weights [out, in, 1, 1]
            return None
        m = float(val.flat[0])
        return int(m) if m in placed and float(val.flat[1]) == -m else None

    def _place(block, op, m: int) -> None:
        slot, shape = slots[m], op.outputs[0].shape
        conv = len(shape) == 4
        scopes = [ScopeInfo(source=k, data=v) for k, v in op.scopes.items() if k != ScopeSource.COREMLTOOLS_GRAPH_PASS]
        with mb.scope(*scopes):  # the frontend's scopes, which the program requires of every op
            if slot[0] == "record":
                new = _build(layouts[slot[1]], op, op.name, False, conv)
            else:
                new = mb.const(val=float_rows(*slot[1:]).reshape(shape), before_op=op, name=f"{op.name}_fp16")
        if tuple(new.shape) != tuple(shape):
            raise MacqError(f"{slot[1]}: shape {tuple(new.shape)} in place of a const of shape {tuple(shape)}")
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True)
        block.remove_ops([op])
        with mb.scope(*scopes):
            dynamic_weight_consumers(new)
        placed[m].append(op.name)

    @block_context_manager
    def _visit(block):
        for op in block.operations:
            for b in op.blocks:
                _visit(b)
        found = [(op, m) for op in block.operations if (m := _marker(op)) is not None]
        pending = 0
        while found:
            op, m = found.pop()
            pending += op.outputs[0].val.nbytes
            _place(block, op, m)
            del op
            if pending >= GC_BYTES:   # removed consts (fp16 zeros) sit in op <-> var cycles: free them in batches
                gc.collect()
                pending = 0

    for func in prog.functions.values():
        _visit(func)
    missing = [slots[m][1] for m, v in placed.items() if not v]
    if missing:
        raise MacqError(f"weights not found in the converted program (changed during conversion?): "
                        f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return placed


def slice_rows(rec, start: int, stop: int):
    """The record of output rows ``[start, stop)`` (vocabulary parts of an embedding / LM head); its
    ``dequantize()`` equals those rows of the whole record's, so the slice stays record-exact."""
    from dataclasses import replace

    out, _ = rec.shape
    if isinstance(rec, LUTRecord):
        per = out // rec.n_lut_groups
        if rec.n_lut_groups > 1 and (start % per or stop % per):
            raise MacqError(f"rows [{start}, {stop}) split a LUT group of {per} rows")
        lut = rec.lut if rec.n_lut_groups == 1 else rec.lut[start // per:stop // per]
        scales = rec.block_scales()
        pos, vals = rec.outlier_pos, rec.outlier_values
        if pos is not None:   # flat positions: keep those inside the rows, shifted to the slice's origin
            inp = rec.shape[1]
            keep = (pos >= start * inp) & (pos < stop * inp)
            pos, vals = (pos[keep] - start * inp, vals[keep]) if bool(keep.any()) else (None, None)
        return replace(rec, indices=rec.indices[start:stop], lut=lut,
                       scales=None if scales is None else scales[start:stop], double_quant=None,
                       outlier_pos=pos, outlier_values=vals)
    if isinstance(rec, AffineRecord):
        if rec.per_tensor:
            return replace(rec, codes=rec.codes[start:stop])
        cut = {k: getattr(rec, k)[start:stop] for k in ("scales", "zeros", "biases") if getattr(rec, k) is not None}
        return replace(rec, codes=rec.codes[start:stop], **cut)
    raise MacqError(f"unknown record type {type(rec).__name__}")


def apply_records(mlmodel, records: dict, allow_fallback: bool = False, layouts: dict | None = None):
    """MLModel → ``(MLModel with every record placed, notes)`` via coremltools' graph-pass round trip."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    notes: list[str] = []
    if layouts is None:
        layouts, notes = plan_layouts(records, allow_fallback)

    class _RecordPass(AbstractGraphPass):
        def apply(self, prog):
            apply_records_to_program(prog, records, layouts)

    spec_version = mlmodel.get_spec().specificationVersion
    new = _apply_graph_pass(mlmodel, _RecordPass(), spec_version=spec_version, skip_model_load=True)
    return new, notes
