"""Read a Core AI export back on Linux: the asset summary, and every compressed weight it stores, decoded from the
asset's own program and compared with the records bit for bit.

``AIModelAsset.load(path).summary()`` gives functions, storage types and the op distribution. The weights come
from ``AIModelAsset.program`` printed as MLIR: each ``coreai.lut_to_dense`` / ``coreai.blockwise_shift_scale`` op
names its operands, each operand is a ``coreai.constant`` (``dense<...>`` splat or ``dense_resource<...>``), and
the resource blobs (``dialect_resources``: a 4-byte alignment word, then the data; sub-byte integers packed as
one little-endian bit stream, element ``j`` at bits ``[j·b, (j+1)·b)``) are decoded with numpy. Nothing here
uses macq's writer, so the comparison with the records is an independent check of what the file holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from macq.errors import MacqError
from macq.record import AffineRecord, LUTRecord

_CONST = re.compile(r"^\s*%(\w+) = coreai\.constant (dense_resource<(\w+)>|dense<([^>]*)>) : tensor<([^>]*)>", re.M)
_OP = re.compile(r"^\s*%(\w+) = coreai\.(lut_to_dense|blockwise_shift_scale) ([^:]*) : \(([^)]*)\) -> tensor<([^>]*)>",
                 re.M)
_RES = re.compile(r"(\w+): \"0x([0-9A-Fa-f]*)\"")
_FLOATS = {"f16": np.float16, "f32": np.float32}


def _type(spec: str) -> tuple[tuple[int, ...], str]:
    """``"512x64xui4"`` → ``((512, 64), "ui4")``; ``"si16"`` → ``((), "si16")``."""
    parts = spec.split("x")
    return tuple(int(p) for p in parts[:-1]), parts[-1]


def _decode(raw: bytes, shape: tuple[int, ...], elem: str) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    if elem in _FLOATS:
        return np.frombuffer(raw, dtype=_FLOATS[elem], count=n).reshape(shape)
    m = re.fullmatch(r"(ui|si|i)(\d+)", elem)
    if m is None:
        raise MacqError(f"asset constant of element type {elem}: not decoded")
    bits, signed = int(m.group(2)), m.group(1) == "si"
    if bits % 8 == 0:
        dt = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
        return np.frombuffer(raw, dtype=dt, count=n).astype(np.int64).reshape(shape)
    stream = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    vals = stream.astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    if signed:
        vals = np.where(vals >= 1 << (bits - 1), vals - (1 << bits), vals)
    return vals.reshape(shape)


def _splat(text: str, shape: tuple[int, ...], elem: str) -> np.ndarray:
    """An inline ``dense<...>``: a splat value, a list, or raw hex data (``"0x..."``, no alignment word)."""
    if text.startswith('"0x'):
        return _decode(bytes.fromhex(text[3:-1]), shape, elem)
    if text.startswith("["):
        # MLIR prints each value with enough digits to round-trip its element type
        vals = np.array([float(v) for v in re.findall(r"[-+0-9.e]+", text)], dtype=_FLOATS.get(elem, np.float64))
        if elem not in _FLOATS:
            vals = vals.astype(np.int64)
        return vals.reshape(shape) if shape else vals
    dt = _FLOATS.get(elem, np.int64)
    return np.full(shape, float(text) if dt is not np.int64 else int(text), dtype=dt)


@dataclass
class StoredWeight:
    """One compressed weight as the asset stores it, reduced to ``[out, in]`` form (unit axes dropped)."""

    kind: str                                  # "lut" (lut_to_dense, maybe × block scale) | "affine"
    shape: tuple[int, int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    elem: dict[str, str] = field(default_factory=dict)   # stored element type of each array


@dataclass
class AssetProgram:
    functions: dict[str, list[StoredWeight]]
    fp16_constants: list[np.ndarray]           # every dense fp16 constant of rank >= 2 (float weights, tables)


def asset_text(path: str | Path) -> str:
    from coreai.authoring.asset import AIModelAsset

    return AIModelAsset.load(Path(path)).program._module.as_string()


def _two_d(a: np.ndarray, out: int | None = None, inp: int | None = None) -> np.ndarray:
    """``[out, in]`` for a weight-shaped array; a scale / offset keeps its own first axis (``[1, 1]`` per tensor)."""
    if inp is not None:
        return a.reshape(out, inp)
    return a.reshape(a.shape[0] if a.ndim else 1, -1)


def parse_program(text: str) -> AssetProgram:
    """Every compressed weight of every function, and the dense fp16 constants."""
    res_at = text.rfind("dialect_resources")
    resources = {m.group(1): m.group(2) for m in _RES.finditer(text, res_at)} if res_at >= 0 else {}
    blobs: dict[str, bytes] = {}

    def blob(name: str) -> bytes:
        if name not in blobs:
            blobs[name] = bytes.fromhex(resources[name])[4:]   # 4-byte alignment word first
        return blobs[name]

    functions: dict[str, list[StoredWeight]] = {}
    fp16: dict[str, np.ndarray] = {}
    bodies = re.split(r"^\s*coreai\.graph @", text[:res_at] if res_at >= 0 else text, flags=re.M)[1:]
    for body in bodies:
        fname = body[: body.index("(")]
        consts: dict[str, tuple[np.ndarray, str]] = {}
        for m in _CONST.finditer(body):
            shape, elem = _type(m.group(5))
            if m.group(3):
                arr = _decode(blob(m.group(3)), shape, elem)
                if elem == "f16" and len(shape) >= 2:
                    fp16[m.group(3)] = arr
            else:
                arr = _splat(m.group(4), shape, elem)
                if elem == "f16" and len(shape) >= 2 and arr.size > 1:
                    fp16[f"{fname}:{m.group(1)}"] = arr
            consts[m.group(1)] = (arr, elem)
        lut_out: dict[str, StoredWeight] = {}
        weights: list[StoredWeight] = []
        for m in _OP.finditer(body):
            name, op = m.group(1), m.group(2)
            args = [a.strip().lstrip("%") for a in m.group(3).split(",")]
            out_shape, _ = _type(m.group(5))
            o, i = out_shape[0], out_shape[1]
            if op == "lut_to_dense":
                (idx, ie), (lut, le) = consts[args[0]], consts[args[1]]
                w = StoredWeight("lut", (o, i), {"indices": _two_d(idx, o, i), "lut": lut.reshape(lut.shape[0], -1)},
                                 {"indices": ie, "lut": le})
                lut_out[name] = w
                weights.append(w)
            elif args[0] in lut_out:      # LUT × per-block scale
                scale, se = consts[args[1]]
                lut_out[args[0]].arrays["scale"] = _two_d(scale)
                lut_out[args[0]].elem["scale"] = se
            else:
                names = ("data", "scale", "offset1", "offset2")
                arrs = {k: consts[a] for k, a in zip(names, args)}
                weights.append(StoredWeight("affine", (o, i), {k: (_two_d(v[0], o, i) if k == "data" else _two_d(v[0]))
                                                               for k, v in arrs.items()},
                                            {k: v[1] for k, v in arrs.items()}))
        functions[fname] = weights
    return AssetProgram(functions=functions, fp16_constants=list(fp16.values()))


def expected(rec) -> StoredWeight:
    """What the asset must hold for ``rec``, stated from the record alone (the layout of
    :mod:`coreai_backend.options`' docstring): LUT indices and fp16 LUT (padded to the stored width by repeating
    the last entry), fp16 block scales; affine data/offsets as signed integers, fp16 scales and biases."""
    from coreai_backend.options import affine_width, lut_width

    if isinstance(rec, LUTRecord):
        k = 2 ** lut_width(rec.bits)
        lut = rec.lut.float().numpy()
        lut = np.concatenate([lut, np.repeat(lut[:, -1:], k - lut.shape[1], axis=1)], axis=1)
        arrays = {"indices": rec.indices.numpy().astype(np.int64), "lut": lut.astype(np.float16)}
        if rec.block_scales() is not None:
            arrays["scale"] = rec.block_scales().numpy().astype(np.float16)
        return StoredWeight("lut", rec.shape, arrays)
    if isinstance(rec, AffineRecord):
        b, w = rec.bits, affine_width(rec.bits)
        q = rec.codes.numpy().astype(np.int64)
        scale = rec.scales.float().numpy().astype(np.float16)
        zeros = np.zeros(scale.shape, dtype=np.int64)
        if rec.symmetric:
            return StoredWeight("affine", rec.shape, {"data": q - 2 ** (b - 1), "scale": scale, "offset1": zeros,
                                                      "offset2": zeros.astype(np.float16)})
        if rec.zeros is not None:
            z = rec.zeros.double().numpy().astype(np.int64)
            return StoredWeight("affine", rec.shape, {"data": q - 2 ** (w - 1), "scale": scale, "offset1": z - 2 ** (w - 1),
                                                      "offset2": zeros.astype(np.float16)})
        return StoredWeight("affine", rec.shape, {"data": q - 2 ** (w - 1), "scale": scale,
                                                  "offset1": np.full(scale.shape, -(2 ** (w - 1))),
                                                  "offset2": rec.biases.float().numpy().astype(np.float16)})
    raise MacqError(f"unknown record type {type(rec).__name__}")


def _same(a: StoredWeight, b: StoredWeight) -> bool:
    if a.kind != b.kind or tuple(a.shape) != tuple(b.shape) or set(a.arrays) != set(b.arrays):
        return False
    return all(x.shape == b.arrays[k].shape and np.array_equal(x, b.arrays[k]) for k, x in a.arrays.items())


def expected_records(qm, plans, vocab_parts) -> dict[str, object]:
    """The records the assets of ``plans`` hold (vocabulary parts of the embedding / head sliced, as exported;
    a tied head shares the embedding's record)."""
    from converters.multifunction import chunk_records

    out: dict[str, object] = {}
    for plan in plans:
        out.update(chunk_records(qm, plan, vocab_parts))
    return out


@dataclass
class ReadBack:
    n_records: int
    n_stored: int
    functions: list[str]
    storage_types: dict[str, int]
    op_distribution: dict[str, int]
    bytes_on_disk: int
    dense_copies: list[str]


def read_back(path: str | Path, qm) -> ReadBack:
    """Check an export against ``qm``: every record stored exactly once per function (bit-equal codes / indices,
    LUTs, scales, offsets), nothing else compressed, and no dense fp16 constant equal to a quantized weight.
    Raises :class:`MacqError` on the first difference; returns the asset facts."""
    from coreai.authoring.asset import AIModelAsset

    from converters.ane_model import ane_shape
    from coreai_backend.export import read_manifest

    manifest, root = read_manifest(path)
    recs = expected_records(qm, manifest.chunks, [tuple(p) for p in manifest.vocab_parts])
    want = {k: expected(r) for k, r in recs.items()}
    dense = {k: r.dequantize().half().numpy() for k, r in recs.items()}
    storage: dict[str, int] = {}
    ops: dict[str, int] = {}
    copies: list[str] = []
    stored_total = 0
    functions: list[str] = []
    ane_shape(qm)
    for c in manifest.chunks:
        p = root / c.path
        s = AIModelAsset.load(p).summary()
        functions = list(s.function_names)
        for t, n in s.storage_types:
            storage[t] = storage.get(t, 0) + n
        for t, n in s.operation_distribution:
            ops[t] = ops.get(t, 0) + n
        prog = parse_program(asset_text(p))
        chunk_keys = list(expected_records(qm, [c], [tuple(v) for v in manifest.vocab_parts]))
        for fname, stored in prog.functions.items():
            left = list(stored)
            for key in dict.fromkeys(chunk_keys):
                hit = next((i for i, w in enumerate(left) if _same(w, want[key])), None)
                if hit is None:
                    raise MacqError(f"{p}: function {fname}: record {key} not found bit-exact in the asset")
                left.pop(hit)
            # a tied embedding / LM head runs a second decompression op on the same stored constants
            extra = [w for w in left if not any(_same(w, want[k]) for k in chunk_keys)]
            if extra:
                raise MacqError(f"{p}: function {fname}: {len(extra)} compressed weight(s) that no record explains")
            stored_total += len(stored)
        for arr in prog.fp16_constants:
            for k, d in dense.items():
                if arr.size == d.size and np.array_equal(arr.reshape(d.shape), d):
                    copies.append(f"{p.name}: {k}")
    return ReadBack(n_records=len(recs), n_stored=stored_total, functions=functions, storage_types=storage,
                    op_distribution=ops, bytes_on_disk=sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()),
                    dense_copies=copies)
