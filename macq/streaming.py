"""Streaming quantization of a local HF safetensors checkpoint with a weight method, without a model object.

Weight methods (RTN, NF4, FP4, palettization) map each weight to its record independently, so they need
neither the model nor its other weights: read one tensor (in its stored dtype, float32 only inside the
quantizer), quantize, append its record to a sharded output, drop it. Peak memory is one tensor and its
intermediates, whatever the model's size; large row-separable tensors (RTN with groups: every group is
independent) are quantized in row blocks, so even a 128k x 4096 embedding stays small.

Which tensors become records, which stay float, the Conv1D orientation and embedding tying are decided
exactly as the in-memory path decides them, by the same functions applied to a *meta-device* skeleton of the
model (no storage): the streamed records equal the in-memory path's bit for bit (tests), and float tensors
keep the checkpoint's dtype (the in-memory path holds them as float32 copies of the same values).

The output is written inside :func:`macq.atomic.atomic_dir` (a temp dir renamed at the end): an interrupted
run leaves nothing at ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from macq.errors import MacqError
from macq.prefetch import prefetched
from macq.progress import LayerLog
from macq.qmodel import SHARD_BYTES, QuantDirWriter, write_items
from macq.record import AffineRecord, Record
from macq.shards import TensorStore

ROW_BLOCK_ELEMS = 1 << 22   # weights per row block of a row-separable quantizer (16 MiB of float32)
PREFETCH_BYTES = 32 << 20   # source bytes read ahead of the quantizer (or one piece, if larger)

# Methods whose record rows depend only on the same rows of the weight (so row blocks give the same record).
ROW_SEPARABLE: dict[str, Callable[[Any], bool]] = {
    "rtn": lambda cfg: cfg.group_size != -1,      # per-tensor RTN shares one scale over all rows
}


@dataclass
class StreamPlan:
    """What to read and what to write, decided before any tensor is read."""

    src: Path
    config: Any                                  # transformers PretrainedConfig
    store: TensorStore
    order: list[tuple[str, str, str, bool]]      # (kind "record"|"float", output name, source key, transposed)
    tied: dict[str, str]
    layers_prefix: str
    n_layers: int

    @property
    def n_records(self) -> int:
        return sum(1 for kind, *_ in self.order if kind == "record")


def _skeleton(config: Any, trust_remote_code: bool):
    """The model on the meta device: module types, names and shapes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def streamable_source(model: str | None) -> Path | None:
    """The local HF safetensors directory ``model`` names (``None``: the default model), else ``None``."""
    from macq.models import resolve_model_path
    from macq.qmodel import is_quantized_dir

    path = Path(resolve_model_path(model))
    if path.is_dir() and (path / "config.json").is_file() and TensorStore.exists(path) and not is_quantized_dir(path):
        return path
    return None


def stream_refusal(cfg: Any) -> str:
    """Why ``cfg`` (a calibrated method's config) cannot stream, or ''."""
    refusal = getattr(cfg, "stream_refusal", None)
    return refusal() if refusal is not None else ""


def plan_stream(src: str | Path, cfg: Any, trust_remote_code: bool = False) -> StreamPlan:
    """Decide records / floats / tying from a meta skeleton, and check the checkpoint has every tensor
    with the right shape (before any slow work)."""
    from transformers import AutoConfig

    from macq.arch import arch_spec
    from macq.models import is_conv1d, quantizable_modules, tied_embeddings

    src = Path(src)
    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    store = TensorStore.open(src, "model")
    model = _skeleton(config, trust_remote_code)
    spec = arch_spec(model)
    mods = quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head, tuple(cfg.skip))
    tied: dict[str, str] = {}
    if tied_embeddings(model) and spec.embed in mods:
        tied[spec.lm_head] = spec.embed
    rec_keys = {f"{name}.weight": name for name in mods}
    skip = set(rec_keys) | {f"{k}.weight" for k in tied}
    order: list[tuple[str, str, str, bool]] = []
    problems: list[str] = []
    for key, t in model.state_dict().items():
        if key in skip and key not in rec_keys:
            continue
        src_key = key
        if key not in store and key == f"{spec.lm_head}.weight" and tied_embeddings(model):
            src_key = f"{spec.embed}.weight"          # tied checkpoints store the embedding once
        if src_key not in store:
            problems.append(f"missing {key}")
            continue
        if store.shape(src_key) != tuple(t.shape):
            problems.append(f"{key}: shape {store.shape(src_key)} != {tuple(t.shape)}")
            continue
        name = rec_keys.get(key)
        if name is not None:
            order.append(("record", name, src_key, is_conv1d(model.get_submodule(name))))
        else:
            order.append(("float", key, src_key, False))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MacqError(f"model: {src} does not match its config.json: {'; '.join(problems[:3])}{more}")
    n_layers = len(model.get_submodule(spec.layers))
    return StreamPlan(src, config, store, order, tied, spec.layers + ".", n_layers)


def _fill_rows(parts: Iterator[AffineRecord], n_rows: int) -> AffineRecord:
    """Assemble row-block records into one, writing each block into preallocated tensors as it arrives
    (no list of blocks plus a concatenated copy: the peak is the final record plus one block)."""
    first = next(parts)
    full: dict[str, torch.Tensor] = {}
    for f in ("codes", "scales", "zeros", "biases"):
        t = getattr(first, f, None)
        if t is not None:
            full[f] = torch.empty((n_rows, *t.shape[1:]), dtype=t.dtype)
    row = 0
    for p in _chain(first, parts):
        n = p.codes.shape[0]
        for f, t in full.items():
            t[row:row + n] = getattr(p, f)
        row += n
    return replace(first, **full)   # AffineRecord or FPRecord: the same row-split tensors, the other fields shared


def _chain(first: AffineRecord, rest: Iterator[AffineRecord]) -> Iterator[AffineRecord]:
    yield first
    yield from rest


def quantize_tensor(w: torch.Tensor, method: str, cfg: Any, fn: Callable[..., Record]) -> Record:
    """``fn(w.float(), cfg)``, in row blocks when the method is row-separable (identical result)."""
    rows_per_block = max(1, ROW_BLOCK_ELEMS // max(1, w.shape[1]))
    if w.shape[0] <= rows_per_block or not ROW_SEPARABLE.get(method, lambda _c: False)(cfg):
        return fn(w.float(), cfg)
    blocks = (fn(w[r:r + rows_per_block].float(), cfg) for r in range(0, w.shape[0], rows_per_block))
    return _fill_rows(blocks, w.shape[0])


def finite(key: str, t: torch.Tensor) -> torch.Tensor:
    """The streamed twin of ``models.check_loaded``: NaN/inf weights would quantize into NaN scales."""
    if t.is_floating_point():   # in blocks: isfinite on a whole 113 MB embedding took 190 MB of temporaries
        flat = t.reshape(-1)
        for i in range(0, flat.numel(), ROW_BLOCK_ELEMS):
            # min and max propagate NaN and are ±inf iff an element is: one reduction pass, no boolean copy
            # (isfinite(...).all() on bf16 was 7x slower and a quarter of a streamed RTN export's time)
            lo, hi = torch.aminmax(flat[i:i + ROW_BLOCK_ELEMS])
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise MacqError(f"model: tensor {key} holds NaN or inf values")
    return t


def read_spans(store: TensorStore, key: str, transposed: bool, method: str, cfg: Any) -> list[tuple[int, int]] | None:
    """The row blocks ``[a, b)`` a row-separable method reads ``store[key]`` in, or None: read it whole."""
    shape = store.shape(key)
    rows_per_block = max(1, ROW_BLOCK_ELEMS // max(1, shape[1]))
    if transposed or shape[0] <= rows_per_block or not ROW_SEPARABLE.get(method, lambda _c: False)(cfg):
        return None
    return [(r, min(r + rows_per_block, shape[0])) for r in range(0, shape[0], rows_per_block)]


def piece_reads(store: TensorStore, key: str, spans: list[tuple[int, int]] | None
                ) -> list[tuple[int, Callable[[], torch.Tensor]]]:
    """``(nbytes, read)`` for each piece ``quantize_stored`` consumes (the whole tensor, or its row blocks);
    each read returns the piece checked finite. Sizes come first so a prefetcher can budget its reads."""
    if spans is None:
        return [(store.nbytes(key), lambda: finite(key, store[key]))]
    row_bytes = store.nbytes(key) // max(1, store.shape(key)[0])
    return [((b - a) * row_bytes, lambda a=a, b=b: finite(key, store.get_rows(key, a, b))) for a, b in spans]


def quantize_stored(store: TensorStore, key: str, transposed: bool, method: str, cfg: Any,
                    fn: Callable[..., Record], pieces: Iterator[torch.Tensor] | None = None) -> Record:
    """Quantize ``store[key]``; a row-separable method reads it in row blocks, so the source tensor is never whole
    in memory either (a 128k-row embedding: 1 GB of bf16 at 8B). ``pieces``: the results of :func:`piece_reads`
    as a prefetching thread delivers them; by default they are read here."""
    spans = read_spans(store, key, transposed, method, cfg)
    if pieces is None:
        pieces = (read() for _, read in piece_reads(store, key, spans))
    if spans is None:
        w = next(pieces)
        return quantize_tensor(w.t() if transposed else w, method, cfg, fn)
    return _fill_rows((fn(next(pieces).float(), cfg) for _ in spans), store.shape(key)[0])


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def iter_quantized(plan: StreamPlan, method: str, cfg: Any, progress: bool = False
                   ) -> Iterator[tuple[str, str, Any]]:
    """``("record", module, Record)`` / ``("float", key, tensor)`` in checkpoint-module order, one at a time.
    The source tensors are read by a prefetching thread (:mod:`macq.prefetch`), up to ``PREFETCH_BYTES``
    ahead, so disk reads overlap the quantization of the pieces before them."""
    from macq.quantizers import method_spec

    _, fn = method_spec(method).load()
    log = LayerLog(plan.n_layers, f"{method} (streamed)", enabled=progress)
    if getattr(cfg, "recipe", None) is not None and hasattr(cfg, "bind_layers"):   # rtn's per-layer recipe
        from macq.quantizers.mlx_recipes import mlx_lm_layer_index

        names = [name for kind, name, *_ in plan.order if kind == "record"]
        cfg = cfg.bind_layers(mlx_lm_layer_index(names, plan.layers_prefix.rstrip("."), plan.n_layers, cfg.recipe))

    def module_cfg(name: str) -> Any:
        return cfg.for_module(name) if hasattr(cfg, "for_module") else cfg  # per-module --override

    def reads() -> Iterator[tuple[int, Callable[[], torch.Tensor]]]:
        for kind, name, src_key, transposed in plan.order:
            spans = read_spans(plan.store, src_key, transposed, method, module_cfg(name)) if kind == "record" else None
            yield from piece_reads(plan.store, src_key, spans)

    pieces = prefetched(reads(), PREFETCH_BYTES)
    try:
        for kind, name, src_key, transposed in plan.order:
            layer = _layer_of(name, plan.layers_prefix)
            if layer is not None:
                log.layer(layer, "quantize")
            if kind == "record":
                rec = quantize_stored(plan.store, src_key, transposed, method, module_cfg(name), fn, pieces)
                rec.transposed = transposed
                yield "record", name, rec
            else:
                yield "float", name, next(pieces)
    finally:
        pieces.close()    # stops the reader thread if the consumer stopped early (an error, an interrupt)
    log.done()


def stream_quantize(src: str | Path, out: str | Path, method: str, cfg: Any, *, source: str = "",
                    force: bool = False, progress: bool = False, shard_bytes: int = SHARD_BYTES,
                    trust_remote_code: bool = False) -> dict[str, Any]:
    """Quantize the checkpoint at ``src`` into the macq quantization directory ``out`` (sharded records and
    float tensors with indices), one tensor in memory at a time. Returns the CLI summary."""
    out = Path(out)
    if out.exists() and not force:
        raise MacqError(f"output: {out} exists (pass --force to overwrite)")
    plan = plan_stream(src, cfg, trust_remote_code)
    with QuantDirWriter.create(out, plan.config, source=source or str(src), tokenizer=plan.src,
                               shard_bytes=shard_bytes) as w:
        write_items(w, iter_quantized(plan, method, cfg, progress))
        w.close({**cfg.to_dict(), "streamed": True}, tied=plan.tied, act_quant={})
    return {**w.summary, "streamed": True}
