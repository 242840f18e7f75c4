"""Little-endian bit-stream packing of integer codes into uint32 words.

This is exactly MLX's layout (PLATFORM.md): each row's codes form one little-endian bit stream, code j
at bits ``[j*b, (j+1)*b)``, word k = bits ``[32k, 32k+32)``; 3/5/6-bit codes cross word boundaries.
macq stores its own records this way too, so one implementation serves storage and the MLX export.
"""

from __future__ import annotations

import numpy as np
import torch

from macq.errors import MacqError

_ROW_CHUNK = 2048  # bounds the temporary bit array to chunk * n * bits bytes


def packed_words(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


def _aligned(n: int, bits: int) -> bool:
    """Codes never straddle words and rows fill whole words: the shift-and-or fast path applies."""
    return bits in (1, 2, 4, 8) and (n * bits) % 32 == 0


def _pack_aligned(c: np.ndarray, bits: int) -> np.ndarray:
    rows, n = c.shape
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    out = np.empty((rows, n // per), dtype="<u4")
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = c[r0:r0 + _ROW_CHUNK].reshape(-1, n // per, per)
        acc = chunk[..., 0].astype(np.uint32)
        for k in range(1, per):  # bit fields do not overlap: or-ing the shifted codes is the packing
            acc |= chunk[..., k].astype(np.uint32) << shifts[k]
        out[r0:r0 + _ROW_CHUNK] = acc
    return out


def _unpack_aligned(p: np.ndarray, bits: int, n: int) -> np.ndarray:
    rows = p.shape[0]
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((rows, n), dtype=np.uint8)
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = p[r0:r0 + _ROW_CHUNK]
        dst = out[r0:r0 + _ROW_CHUNK].reshape(chunk.shape[0], n // per, per)
        for k in range(per):
            dst[..., k] = (chunk >> shifts[k]) & mask
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` unsigned codes < 2**bits -> ``[rows, ceil(n*bits/32)]`` uint32 (as torch.uint32).

    Codes outside ``[0, 2**bits)`` are refused: the bit stream has room for ``bits`` bits only, so the high
    bits would be dropped silently and the stored weight would differ from the record."""
    if not 1 <= bits <= 16:
        raise MacqError(f"pack_bits: bits={bits}, expected 1..16")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise MacqError(f"pack_bits: codes have dtype {codes.dtype}, expected an integer dtype")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise MacqError(f"pack_bits: codes in [{int(codes.min())}, {int(codes.max())}] do not fit {bits} bits")
    c = codes.detach().cpu().numpy().astype(np.uint8 if bits <= 8 else np.uint16, copy=False)
    rows, n = c.shape
    if _aligned(n, bits):  # 2/4/8-bit rows of whole words: same layout, one shift-or pass (big models)
        return torch.from_numpy(_pack_aligned(c, bits).view(np.uint32))
    words = packed_words(n, bits)
    out = np.empty((rows, words), dtype="<u4")
    shifts = np.arange(bits, dtype=c.dtype)
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = c[r0:r0 + _ROW_CHUNK]
        stream = ((chunk[..., None] >> shifts) & 1).astype(np.uint8).reshape(chunk.shape[0], n * bits)
        pad = words * 32 - n * bits
        if pad:
            stream = np.pad(stream, ((0, 0), (0, pad)))
        out[r0:r0 + _ROW_CHUNK] = np.packbits(stream, axis=-1, bitorder="little").view("<u4")
    return torch.from_numpy(out.view(np.uint32))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[rows, words]`` uint32 -> ``[rows, n]`` uint8 codes."""
    p = np.ascontiguousarray(packed.detach().cpu().numpy()).astype("<u4")
    if _aligned(n, bits) and p.shape[1] == n * bits // 32:
        return torch.from_numpy(_unpack_aligned(p, bits, n))
    rows = p.shape[0]
    out = np.empty((rows, n), dtype=np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    for r0 in range(0, rows, _ROW_CHUNK):
        chunk = p[r0:r0 + _ROW_CHUNK]
        stream = np.unpackbits(chunk.view(np.uint8), axis=-1, bitorder="little")[:, : n * bits]
        out[r0:r0 + _ROW_CHUNK] = (stream.reshape(chunk.shape[0], n, bits).astype(np.uint16) * weights).sum(-1)
    return torch.from_numpy(out)
