"""Safetensors read and written one tensor at a time, so that memory never holds more than one tensor.

Why not ``safetensors.safe_open`` / ``save_file``:

* ``safe_open`` memory-maps the whole file; every page a tensor read touches stays mapped, and Linux counts
  mapped file pages in the process RSS until the file is closed. Reading a 5 GB shard tensor by tensor
  therefore grows RSS to the shard size. :class:`SafetensorsFile` reads each tensor with one ``readinto``
  into a fresh torch buffer instead: RSS holds that tensor only (the kernel's page cache is not ours).
* ``save_file`` needs every tensor of the file in memory at once. :class:`ShardWriter` reserves room for
  the JSON header, streams each tensor's bytes to disk as it arrives, and writes the header (padded with
  spaces, which the format allows) when the shard is closed.

Both follow the format exactly (8-byte little-endian header length, JSON header with ``dtype``, ``shape``,
``data_offsets`` relative to the data start, optional ``__metadata__`` of strings), so the files open in
``safetensors``, transformers, ``mlx.core.load`` and ``mlx_lm.load``; the tests check that.
Sharded sets follow Hugging Face's convention: ``{stem}-00001-of-00003.safetensors`` plus
``{stem}.safetensors.index.json`` with ``metadata.total_size`` and a ``weight_map``.

Integrity: :class:`ShardWriter` records each shard's size and SHA-256 in the index
(``metadata.checksums = {file: {"size": n, "sha256": hex}}``; transformers and mlx_lm read only the
``weight_map`` and ignore it), and :meth:`TensorStore.open` verifies them before any tensor is read, so
a shard whose bytes changed after macq wrote it (bit rot, a partial copy, an edit) is a one-line error
naming the file instead of silently different weights. Hashes are streamed in blocks: memory holds one
block, never the shard. An index without ``checksums`` (an older macq, a Hugging Face checkpoint) is
read as before, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HEADER_RESERVE = 1 << 18        # bytes reserved for a streamed shard's JSON header (~1500 tensors; more start a new shard)
HASH_BLOCK = 1 << 20            # bytes per read while hashing a shard
CHECKSUMS = "checksums"         # key in the index's ``metadata``: {file: {"size": int, "sha256": hex}}


def file_sha256(path: str | Path, block: int = HASH_BLOCK) -> str:
    """SHA-256 of a file, read in ``block``-byte pieces into one reused buffer (memory: one block)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def verify_checksums(directory: Path, index_name: str, files: list[str], checksums: Any) -> None:
    """Every shard of ``files`` has the size and SHA-256 its index records: size first (free), then the hash.
    A malformed ``checksums`` entry, or a shard it does not cover, is refused too: the index is macq's."""
    if not isinstance(checksums, dict):
        raise MacqError(f"{directory / index_name}: metadata.{CHECKSUMS} is not a map of file -> size/sha256")
    for name in files:
        want = checksums.get(name)
        path = directory / name
        if not isinstance(want, dict) or not isinstance(want.get("size"), int) or not isinstance(want.get("sha256"), str):
            raise MacqError(f"{path}: no size/sha256 recorded for it in {index_name}")
        try:
            size = path.stat().st_size
            if size != want["size"]:
                raise MacqError(f"{path}: {size} bytes, {index_name} records {want['size']} (truncated, extended or "
                                "replaced after macq wrote it)")
            got = file_sha256(path)
        except OSError as e:
            raise MacqError(f"{path}: cannot read ({e.strerror or e})") from None
        if got != want["sha256"]:
            raise MacqError(f"{path}: SHA-256 {got[:16]}... differs from the {want['sha256'][:16]}... recorded in "
                            f"{index_name} (the file changed after macq wrote it)")


def _raw_bytes(t: torch.Tensor):
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


class SafetensorsFile:
    """One ``.safetensors`` file, read tensor by tensor without a memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:  # checked up front: a lazy read must not find the truncation mid-export
                raise ValueError(f"tensor data ends at byte {8 + n + end}, the file has {size}")
        except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MacqError(f"{self.path}: corrupt or truncated safetensors file ({e!s:.160})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + n
        self._fh: Any = None                  # opened on the first read, kept: see _handle
        self._lock = threading.Lock()

    def _handle(self):
        """One unbuffered handle for all reads of this file. The kernel's readahead state lives in the open file:
        reading tensor after tensor (or row block after row block) through the same handle lets it detect the
        sequential pattern and read ahead asynchronously, while a fresh ``open`` per read starts cold every time
        (measured on an 8B checkpoint not in the page cache: most of the wall time spent waiting on the disk)."""
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
            if hasattr(os, "posix_fadvise"):          # Linux: a larger readahead window for sequential reads
                os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fh

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        a, b = self.entries[key]["data_offsets"]
        return b - a

    def get(self, key: str) -> torch.Tensor:
        """The tensor, in its stored dtype, in a buffer of its own (nothing stays mapped)."""
        shape = self.entries[key]["shape"]
        return self.get_rows(key, 0, shape[0]) if shape else self._read(key, 0, ())

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (dim 0): a big tensor can be processed without ever being whole."""
        shape = list(self.entries[key]["shape"])
        stop = min(stop, shape[0])
        row_elems = 1
        for d in shape[1:]:
            row_elems *= d
        return self._read(key, start * row_elems, (stop - start, *shape[1:]))

    def _read(self, key: str, first_elem: int, shape: tuple[int, ...]) -> torch.Tensor:
        e = self.entries[key]
        a, b = e["data_offsets"]
        out = torch.empty(shape, dtype=DTYPES[e["dtype"]])
        n = out.numel() * out.element_size()
        if n:
            start = a + first_elem * out.element_size()
            if start + n > b:
                raise MacqError(f"{self.path}: read past the end of tensor {key}")
            buf = out.reshape(-1).view(torch.uint8).numpy()
            with self._lock:                  # seek + read as one step (a prefetch thread may share the file)
                f = self._handle()
                f.seek(self._data_start + start)
                got, view = 0, memoryview(buf)
                while got < n:                # one read returns at most ~2 GiB on Linux
                    k = f.readinto(view[got:])
                    if not k:
                        break
                    got += k
            if got != n:
                raise MacqError(f"{self.path}: tensor {key} truncated ({got} of {n} bytes)")
        return out


class TensorStore(Mapping):
    """A lazy ``{name: tensor}`` over a single file or a sharded set with an index: values are read on access."""

    def __init__(self, files: dict[str, SafetensorsFile]):
        self._files = files

    @classmethod
    def open(cls, directory: str | Path, stem: str = "model", verify: bool = True) -> "TensorStore":
        """``{stem}.safetensors.index.json`` if present, else ``{stem}.safetensors``. ``verify``: check the
        shards against the sizes and SHA-256 the index records (when it records them) before reading any."""
        d = Path(directory)
        index = d / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                doc = json.loads(index.read_text())
                weight_map = doc["weight_map"]
                files = sorted(set(weight_map.values()))
                meta = doc.get("metadata") or {}
                checksums = meta.get(CHECKSUMS) if isinstance(meta, dict) else None
            except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise MacqError(f"{index}: not a safetensors index ({e!s:.120})") from None
            if not all(isinstance(f, str) and f and Path(f).name == f for f in files):
                raise MacqError(f"{index}: weight_map names a file outside {d} (expected plain file names)")
            if verify and checksums is not None:
                verify_checksums(d, index.name, files, checksums)
            by_file = {f: SafetensorsFile(d / f) for f in files}
            for k, f in weight_map.items():  # a tensor the index promises but the file lacks: refused now
                if k not in by_file[f].entries:
                    raise MacqError(f"{d / f}: lacks {stem} tensor {k} (listed in {index.name})")
            return cls({k: by_file[f] for k, f in weight_map.items()})
        single = d / f"{stem}.safetensors"
        if not single.is_file():
            raise MacqError(f"{d}: neither {index.name} nor {single.name}")
        sf = SafetensorsFile(single)
        return cls({k: sf for k in sf.keys()})

    @classmethod
    def exists(cls, directory: str | Path, stem: str = "model") -> bool:
        d = Path(directory)
        return (d / f"{stem}.safetensors.index.json").is_file() or (d / f"{stem}.safetensors").is_file()

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._files[key].get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._files[key].get_rows(key, start, stop)

    def path_of(self, key: str) -> Path:
        """The file that holds ``key`` (for error messages that name it)."""
        return self._files[key].path

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._files[key].dtype(key)

    def nbytes(self, key: str) -> int:
        return self._files[key].nbytes(key)

    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self)


class _OpenShard:
    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + reserve))
        self.header: dict[str, Any] = {}
        self.offset = 0

    def header_bytes(self, metadata: dict[str, str] | None) -> bytes:
        h = dict(self.header)
        if metadata:
            h = {"__metadata__": metadata, **h}
        return json.dumps(h, separators=(",", ":")).encode()

    def add(self, key: str, t: torch.Tensor) -> None:
        if t.dtype not in DTYPE_NAMES:
            raise MacqError(f"tensor {key}: dtype {t.dtype} cannot be stored in safetensors")
        raw = _raw_bytes(t)
        n = len(raw) if isinstance(raw, bytes) else raw.nbytes
        self.f.write(raw)
        self.header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [self.offset, self.offset + n]}
        self.offset += n

    def close(self, metadata: dict[str, str] | None) -> None:
        hb = self.header_bytes(metadata)
        if len(hb) > self.reserve:  # guarded by ShardWriter; kept as a hard check of the invariant
            raise MacqError(f"{self.path}: header of {len(hb)} bytes exceeds the reserved {self.reserve}")
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.reserve) + hb + b" " * (self.reserve - len(hb)))
        self.f.close()


class ShardWriter:
    """Stream tensors into ``{stem}-0000i-of-0000N.safetensors`` shards of at most ``shard_bytes`` (a tensor
    larger than that gets a shard of its own, as in mlx_lm / transformers) and an index.

    Shard files are written under provisional names and renamed when :meth:`close` knows N. One shard is
    named ``{stem}.safetensors``; the index is written either way. Use inside :func:`macq.atomic.atomic_dir`:
    an exception leaves only the temp dir, which atomic_dir removes.
    """

    def __init__(self, directory: str | Path, stem: str = "model", shard_bytes: int = 5 << 30,
                 metadata: dict[str, str] | None = None, header_reserve: int = HEADER_RESERVE):
        if shard_bytes <= 0:
            raise MacqError(f"shard_bytes={shard_bytes}: expected a positive size")
        self.dir = Path(directory)
        self.stem = stem
        self.shard_bytes = shard_bytes
        self.metadata = metadata
        self.reserve = header_reserve - 8 - (header_reserve % 8)  # data starts 8-byte aligned
        self._done: list[_OpenShard] = []
        self._cur: _OpenShard | None = None
        self.weight_map: dict[str, int] = {}
        self.total_size = 0
        self.checksums: dict[str, dict[str, Any]] = {}   # filled by close(): {file: {"size", "sha256"}}

    def _new_shard(self) -> _OpenShard:
        if self._cur is not None:
            self._cur.close(self.metadata)
            self._done.append(self._cur)
        self._cur = _OpenShard(self.dir / f".{self.stem}.part{len(self._done) + 1:05d}", self.reserve)
        return self._cur

    def add(self, key: str, t: torch.Tensor) -> None:
        if key in self.weight_map:
            raise MacqError(f"tensor {key} written twice")
        n = t.numel() * t.element_size()
        cur = self._cur
        # header growth: this entry's JSON is < 200 bytes + the key
        room = cur is not None and len(cur.header_bytes(self.metadata)) + len(key) + 200 < cur.reserve
        if cur is None or not room or (cur.offset > 0 and n > 0 and cur.offset + n > self.shard_bytes):
            cur = self._new_shard()
        cur.add(key, t)
        self.weight_map[key] = len(self._done)
        self.total_size += n

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def close(self, index_metadata: dict[str, Any] | None = None) -> list[Path]:
        """Finish the last shard, rename all shards to their final names, write the index with each shard's
        size and SHA-256 (read back in blocks right after writing, so from the page cache as a rule)."""
        if self._cur is None:
            self._new_shard()
        assert self._cur is not None
        self._cur.close(self.metadata)
        self._done.append(self._cur)
        self._cur = None
        n = len(self._done)
        names = [f"{self.stem}.safetensors"] if n == 1 else \
            [f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, name in zip(self._done, names):
            os.replace(shard.path, self.dir / name)
            self.checksums[name] = {"size": (self.dir / name).stat().st_size, "sha256": file_sha256(self.dir / name)}
        index = {"metadata": {"total_size": self.total_size, **(index_metadata or {}), CHECKSUMS: self.checksums},
                 "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
        (self.dir / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return [self.dir / name for name in names]
