"""How an ANE export is cut: which consecutive layers go in which package, and the manifest that chains them.

A single package (embedding + all layers + head) is the default; ``chunks=N`` or ``max_chunk_mb=M`` gives an
embedding package, N layer-range packages, and a head package, converted one after another so conversion
holds one chunk's weights at a time. Every weight file stays under ``max_chunk_mb`` (default
:data:`MAX_FILE_MB`, 1 GiB): an embedding or head over it is split into packages of whole vocabulary parts.
The manifest (``coreml_manifest.json`` in the output directory; the same JSON in a single package's
``macq.ane`` metadata) lists them in run order with their inputs/outputs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from macq.errors import MacqError

MANIFEST = "coreml_manifest.json"
FORMAT = "macq-coreml-ane"
MAX_FILE_MB = 1024        # default weight-file limit per package (iOS maps weight files up to 1 GiB; see ane_report)
BLOB_OVERHEAD = 128       # bytes per stored tensor in a weight file (64-byte metadata + alignment)


@dataclass
class ChunkPlan:
    path: str                     # package file name, relative to the manifest
    start: int                    # first decoder layer
    stop: int                     # one past the last layer
    embed: bool
    head: bool
    est_bytes: int = 0            # stored size estimate (records at their storage rate, floats fp16)
    parts: list[int] | None = None  # embedding / head package: the vocabulary parts it holds (None: all)


@dataclass
class Manifest:
    context: int
    prefill_len: int
    hidden: int
    vocab_parts: list[list[int]]
    functions: list[str]
    chunks: list[ChunkPlan]
    source: str = ""
    model_type: str = ""
    format: str = FORMAT
    version: int = 1
    extra: dict = field(default_factory=dict)
    kv_len: int = 0               # KV slots = causal mask width (context rounded up to 32); 0: = context

    @property
    def mask_len(self) -> int:
        return self.kv_len or self.context

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise MacqError(f"not a macq ANE Core ML manifest (format {d.get('format')!r})")
        d["chunks"] = [ChunkPlan(**c) for c in d["chunks"]]
        return cls(**d)


def _bytes_by_prefix(qm, prefixes: list[str]) -> list[int]:
    """Stored bytes under each prefix: records at their storage rate, float tensors in fp16. One pass, and
    float sizes from shapes where the store knows them, so a lazily loaded quantization is read once."""
    out = [0] * len(prefixes)

    def add(name: str, nbytes: int) -> None:
        for i, p in enumerate(prefixes):
            if name.startswith(p) or name == p[:-1]:   # "model.embed_tokens." also owns the record of that module
                out[i] += nbytes

    for n in qm.records:
        add(n, (qm.records[n].storage_bits() + 7) // 8 + 3 * BLOB_OVERHEAD)   # codes, scales, offsets / LUT
    ft = qm.float_tensors
    for n in ft:
        if hasattr(ft, "shape") and hasattr(ft, "dtype"):   # a lazy TensorStore: metadata only
            if ft.dtype(n).is_floating_point:
                add(n, math.prod(ft.shape(n)) * 2 + BLOB_OVERHEAD)
        elif ft[n].is_floating_point():
            add(n, ft[n].numel() * 2 + BLOB_OVERHEAD)
    return out


def _check_sizes(plans: list[ChunkPlan], limit_mb: float, given: bool) -> None:
    """Every package's estimated weight file under the limit, checked before anything is converted. The
    embedding and the head are split by vocabulary part (:func:`_vocab_packages`); one layer, or one
    vocabulary part, over the limit is refused."""
    for p in plans:
        if p.est_bytes <= limit_mb * 2**20:
            continue
        mb = f"{p.est_bytes / 2**20:.0f} MB"
        if p.stop > p.start and not given:
            raise MacqError(f"--chunks: package {p.path} would hold {mb} of weights, over the {limit_mb:g} MB "
                            "weight-file limit: use more chunks or --max-chunk-mb")
        what = (f"layers {p.start}..{p.stop - 1}" if p.stop > p.start else
                ("the embedding" if p.embed else "the head") + (f" vocabulary part {p.parts[0]}" if p.parts else ""))
        flag = f"--max-chunk-mb {limit_mb:g}" if given else f"the {limit_mb:g} MB weight-file limit"
        raise MacqError(f"{flag}: {what} alone would hold {mb} of weights in one package (not split further)"
                        + ("; use a larger limit" if given else ""))


def _vocab_packages(qm, kind: str, nbytes: int, limit: float, first: int, n: int) -> list[ChunkPlan]:
    """The embedding (``kind="embed"``) or head package, or, when its table is over ``limit``, several, each
    holding consecutive vocabulary parts (sizes in proportion to their rows) under the limit. The runner adds
    the embedding packages' outputs (each token's row comes from exactly one of them, the others give zeros:
    exact) and concatenates the head packages' logits."""
    embed = kind == "embed"
    start = 0 if embed else n
    if nbytes <= limit:
        return [ChunkPlan(f"{first:02d}_{kind}.mlpackage", start, start, embed, not embed, nbytes)]
    from converters.ane_model import ane_shape

    parts = ane_shape(qm).vocab_parts
    vocab = parts[-1][1]
    per = [nbytes * (b - a) / vocab for a, b in parts]
    groups: list[list[int]] = [[]]
    for i, b in enumerate(per):
        if groups[-1] and sum(per[j] for j in groups[-1]) + b > limit:
            groups.append([])
        groups[-1].append(i)
    return [ChunkPlan(f"{first + k:02d}_{kind}_{g[0]}-{g[-1]}.mlpackage", start, start, embed, not embed,
                      int(sum(per[j] for j in g)), parts=g) for k, g in enumerate(groups)]


def plan_chunks(qm, chunks: int | None, max_chunk_mb: float | None) -> list[ChunkPlan]:
    """Layer ranges: one package (default), ``chunks`` near-equal ranges, or greedy ranges under ``max_chunk_mb``."""
    from macq.arch import arch_spec

    spec = arch_spec(qm.config.model_type)
    n = qm.config.num_hidden_layers
    if chunks is not None and max_chunk_mb is not None:
        raise MacqError("--chunks and --max-chunk-mb: give one of them")
    if chunks is not None and not (isinstance(chunks, int) and 1 <= chunks <= n):
        raise MacqError(f"--chunks {chunks}: expected an int in [1, {n}] (the model has {n} layers)")
    if max_chunk_mb is not None and not max_chunk_mb > 0:
        raise MacqError(f"--max-chunk-mb {max_chunk_mb}: expected a positive size")
    *sizes, emb, head, norm = _bytes_by_prefix(qm, [f"{spec.layers}.{i}." for i in range(n)]
                                               + [spec.embed + ".", spec.lm_head + ".", spec.final_norm + "."])
    head = (head or emb) + norm   # a tied head (no weight of its own) holds the embedding's table
    if chunks is None and max_chunk_mb is None:
        total = emb + sum(sizes) + head
        if total > MAX_FILE_MB * 2**20:
            raise MacqError(f"the model's weights ({total / 2**30:.2f} GiB) exceed the {MAX_FILE_MB} MB weight-file "
                            "limit of one package: export in chunks (--chunks N or --max-chunk-mb M, a directory)")
        return [ChunkPlan("model.mlpackage", 0, n, True, True, total)]
    if chunks is not None:
        bounds = [round(i * n / chunks) for i in range(chunks + 1)]
    else:
        limit, bounds, acc = max_chunk_mb * 2**20, [0], 0
        for i, b in enumerate(sizes):
            if acc and acc + b > limit:
                bounds.append(i)
                acc = 0
            acc += b
        bounds.append(n)
    limit = MAX_FILE_MB * 2**20 if max_chunk_mb is None else max_chunk_mb * 2**20
    plans = _vocab_packages(qm, "embed", emb, limit, 0, n)
    for a, b in zip(bounds, bounds[1:]):
        plans.append(ChunkPlan(f"{len(plans):02d}_layers_{a}-{b - 1}.mlpackage", a, b, False, False, sum(sizes[a:b])))
    plans += _vocab_packages(qm, "head", head, limit, len(plans), n)
    _check_sizes(plans, MAX_FILE_MB if max_chunk_mb is None else max_chunk_mb, max_chunk_mb is not None)
    return plans


def check_written(path: Path, limit_mb: float) -> None:
    """A written package's weight file against the limit (the estimate is checked before conversion; this is
    the file itself, so the limit holds exactly)."""
    for f in (Path(path) / "Data" / "com.apple.CoreML" / "weights").glob("*"):
        if f.is_file() and f.stat().st_size > limit_mb * 2**20:
            raise MacqError(f"{Path(path).name}: weight file {f.stat().st_size / 2**20:.1f} MB over the "
                            f"{limit_mb:g} MB limit (estimated lower); nothing was written: lower --max-chunk-mb")


def read_manifest(path: str | Path) -> tuple[Manifest, Path]:
    """``(manifest, directory its chunk paths are relative to)`` of a chunked dir or a single ANE package."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return Manifest.from_json((path / MANIFEST).read_text()), path
    if path.suffix == ".mlpackage" and path.exists():
        from converters.mil_io import quiet_ct as _quiet_ct

        ct = _quiet_ct()
        meta = ct.utils.load_spec(str(path)).description.metadata.userDefined
        if "macq.ane" not in meta:
            raise MacqError(f"{path}: not an ANE-graph export (no macq.ane metadata)")
        m = Manifest.from_json(meta["macq.ane"])
        m.chunks = [ChunkPlan(path.name, c.start, c.stop, c.embed, c.head, c.est_bytes) for c in m.chunks]
        return m, path.parent
    raise MacqError(f"{path}: neither a .mlpackage nor a directory with {MANIFEST}")


def is_ane_export(path: str | Path) -> bool:
    try:
        read_manifest(path)
    except MacqError:
        return False
    return True
