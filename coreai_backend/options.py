"""What the Core AI target takes (:class:`CoreAIOptions`), what records it holds (:data:`COREAI_CAPS`), and the
checks that refuse a bad request before any weight is read (:func:`check_coreai`, :func:`check_records`).

Why these limits (coreai-torch 0.4.3, ``coreai_torch/_compression``):

* LUT records become ``coreai::lut_to_dense``, whose indices the op types as uint1/2/3/4/6/8, but coreai-torch
  0.4.3 packs only uint1/2/4/6 (and plain uint8): "only uint1/2/4/6 is supported yet, nbits=3". A 3-, 5- or 7-bit
  record is held exactly in the next width (4 / 6 / 8 bits) with its LUT padded by repeating the last entry: the
  indices never point at the padding, so the dense weight is unchanged; the file charges the wider index.
* Affine records become ``coreai::constexpr_blockwise_shift_scale`` (the op coreai-opt's int4 block-32
  ``Quantizer`` emits), whose data types are int2/int4/int8: codes of 1-2 / 3-4 / 5-8 bits go in the 2 / 4 / 8-bit
  container (stored as ``q - 2^(b-1)``, signed, like coreai-opt's), a zero-point as ``z - 2^(b-1)`` in the same
  type, MLX's bias form ``w = s*q + b`` as the op's ``minval`` offset (exact: ``s*(q' - qmin) + minval``).
* Scales, LUT entries and biases are stored in fp16 (the graph computes in fp16): a record whose values are not
  fp16 numbers would be changed by the export, so it is refused (never re-quantized).
* Activation quantization, double-quantized scales and outliers have no exact form here and are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from macq.errors import MacqError

HARDWARE = ("any", "neural_engine", "gpu")
LUT_WIDTHS = (1, 2, 4, 6, 8)           # coreai::lut_to_dense index types coreai-torch 0.4.3 can pack
AFFINE_WIDTHS = (2, 4, 8)              # coreai::constexpr_blockwise_shift_scale data types

# The records the target holds, for the target table (macq/targets.py) and the docs.
COREAI_CAPS: dict[str, Any] = {
    "affine": {
        "bits": (1, 2, 3, 4, 5, 6, 7, 8),           # stored at width 2 (1-2), 4 (3-4), 8 (5-8)
        "stored_width": {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8},
        "group_sizes": "any divisor of the input dim (per group), the whole row (per channel), per tensor",
        "granularities": ("per_group", "per_channel", "per_tensor"),
        "zero_point": ("none (symmetric)", "int (in code range)", "float bias form w = s*q + b (fp16 b)"),
    },
    "lut": {
        "bits": (1, 2, 3, 4, 5, 6, 7, 8),           # stored at width 1/2/4/6/8 (3 -> 4, 5 -> 6, 7 -> 8)
        "stored_width": {1: 1, 2: 2, 3: 4, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8},
        "lut_groups": "any number of output-channel groups dividing the output dim (per tensor .. per channel)",
        "block_scales": "fp16 scale per input block (NF4/FP4 absmax) as lut_to_dense -> blockwise_shift_scale",
        "double_quant": False,
        "outliers": False,
    },
    "act_quant": False,
    "scales_dtype": "fp16-exact values",
    "architectures": "Llama family (llama, mistral, qwen2, qwen3) with SiLU-gated MLPs",
}


@dataclass(frozen=True)
class CoreAIOptions:
    """Options of ``--target coreai``.

    ``context``: fixed KV-cache length. ``prefill_len``: tokens per ``prefill`` call (default ``min(64,
    context)``). ``chunks`` / ``max_chunk_mb``: split the decoder into that many layer ranges / ranges under that
    size (plus an embedding and a head asset), default one asset. ``hardware``: the compute unit the asset is
    meant for (``any``, ``neural_engine``, ``gpu``); stored in the asset metadata and used as the preferred
    compute unit when the runner loads it on macOS. ``force``: replace an existing macq Core AI export.
    """

    context: int = 512
    prefill_len: int | None = None
    chunks: int | None = None
    max_chunk_mb: float | None = None
    hardware: str = "any"
    force: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 2:
            raise MacqError(f"--context {self.context!r}: expected an int >= 2")
        if self.prefill_len is not None and (not isinstance(self.prefill_len, int) or isinstance(self.prefill_len, bool)
                                             or not 1 <= self.prefill_len <= self.context):
            raise MacqError(f"--prefill-len {self.prefill_len!r}: expected an int in [1, context={self.context}]")
        if self.chunks is not None and self.max_chunk_mb is not None:
            raise MacqError("--chunks and --max-chunk-mb: give one of them")
        if self.chunks is not None and (not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 1):
            raise MacqError(f"--chunks {self.chunks!r}: expected an int >= 1")
        if self.max_chunk_mb is not None and not (isinstance(self.max_chunk_mb, (int, float)) and self.max_chunk_mb > 0):
            raise MacqError(f"--max-chunk-mb {self.max_chunk_mb!r}: expected a positive size")
        if self.hardware not in HARDWARE:
            raise MacqError(f"--hardware {self.hardware!r}: expected one of {', '.join(HARDWARE)}")

    @property
    def block(self) -> int:
        """Tokens per prefill call."""
        return self.prefill_len if self.prefill_len is not None else min(64, self.context)

    @property
    def chunked(self) -> bool:
        return self.chunks is not None or self.max_chunk_mb is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CoreAIOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MacqError(f"Core AI options: unknown {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**d)


def affine_width(bits: int) -> int:
    return next(w for w in AFFINE_WIDTHS if w >= bits)


def lut_width(bits: int) -> int:
    return next(w for w in LUT_WIDTHS if w >= bits)


def check_model(config, options: CoreAIOptions) -> None:
    """The model's family and sizes against the options (config only, no weights)."""
    from macq.arch import arch_spec

    spec = arch_spec(config.model_type)
    if getattr(spec, "export_model", "") != "llama":
        raise MacqError(f"model_type {config.model_type!r}: the Core AI target supports the Llama family "
                        "(llama, mistral, qwen2, qwen3)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise MacqError(f"hidden_act {act!r}: the Core AI graph implements SiLU-gated MLPs only")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and options.context > max_pos:
        raise MacqError(f"--context {options.context}: expected an int in [2, {max_pos}] (the model's maximum)")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and options.context > window:
        raise MacqError(f"--context {options.context}: beyond the model's sliding window {window}, which the graph "
                        "does not implement (full causal attention); use a context <= the window")
    n = config.num_hidden_layers
    if options.chunks is not None and options.chunks > n:
        raise MacqError(f"--chunks {options.chunks}: expected an int in [1, {n}] (the model has {n} layers)")


def check_coreai(config, method_records_kind: str | None, options: CoreAIOptions, cfg=None,
                 activations: bool = False) -> list[str]:
    """Refuse, before any weight is read, what the Core AI target cannot hold; returns notes.

    ``method_records_kind``: the kind of records the method writes (``"affine"``, ``"lut"``, ``"any"`` = chosen
    per layer, e.g. ``mixed``), or ``None`` when
    exporting existing records (then :func:`check_records` checks each record's metadata). ``cfg``: the method's
    config, read for ``bits`` / ``double_quant`` / ``outliers`` when present. ``activations``: the method
    quantizes activations."""
    check_model(config, options)
    notes: list[str] = []
    if activations:
        raise MacqError("activation quantization cannot be expressed in a Core AI weight-only export")
    if method_records_kind is None:
        return notes
    if method_records_kind not in ("affine", "lut", "any"):
        raise MacqError(f"records of kind {method_records_kind!r}: the Core AI target holds affine and lut records")
    bits = getattr(cfg, "bits", getattr(cfg, "weight_bits", None)) if cfg is not None else None
    if bits is not None and not 1 <= bits <= 8:
        raise MacqError(f"--bits {bits}: the Core AI target holds 1..8-bit records")
    if bits is not None:
        width = lut_width(bits) if method_records_kind == "lut" else affine_width(bits)
        if width != bits:
            notes.append(f"--bits {bits}: stored in Core AI's {width}-bit type (exact, {width} bits per code)")
    if cfg is not None and method_records_kind == "lut" and getattr(cfg, "block_size", None):
        raise MacqError(f"--method {type(cfg).__name__.removesuffix('Config').lower()}: its code book times a per-block "
                        "scale is exact in Core AI only with fp16 code-book values, which NF4/FP4 do not have; use "
                        "kmeans/uniform palettization or an affine method")
    if cfg is not None and getattr(cfg, "double_quant", False):
        raise MacqError("--double-quant: double-quantized scales have no exact Core AI form; drop --double-quant")
    if cfg is not None and (getattr(cfg, "outliers", 0) or 0) > 0:
        raise MacqError("--outliers: the Core AI target does not hold sparse outliers yet; use --outliers 0")
    return notes


def check_records(qm, options: CoreAIOptions) -> None:
    """Every record's metadata (kind, bits, orientation, double quant, outliers) against the target, from the
    manifest alone when ``qm`` was loaded lazily (no tensor is read)."""
    metas = getattr(qm.records, "metas", None)
    store = getattr(qm.records, "store", None)
    if metas is None:
        metas = {k: dict(r.meta(), outliers=getattr(r, "n_outliers", 0)) for k, r in qm.records.items()}
    if qm.act_quant:
        raise MacqError("activation quantization cannot be expressed in a Core AI weight-only export")
    for name, m in metas.items():
        kind, bits = m.get("kind"), m.get("bits")
        if kind not in ("affine", "lut"):
            raise MacqError(f"record {name}: kind {kind!r}, expected affine or lut")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise MacqError(f"record {name}: {bits} bits; the Core AI target holds 1..8")
        if m.get("transposed"):
            raise MacqError(f"record {name}: transposed (Conv1D) weights are not in the Llama-family graph")
        if "dq_offset" in m:
            raise MacqError(f"record {name}: double-quantized scales have no exact Core AI form")
        has_outliers = m.get("outliers", 0) if store is None else f"{name}.outlier_pos" in store
        if has_outliers:
            raise MacqError(f"record {name}: sparse outliers are not held by the Core AI target yet")
