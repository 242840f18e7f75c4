"""Targets as a table: one row per output format, the one place that says what it holds and how it is written.

A row says which records the target holds (:class:`Holds`: affine bits and groups, LUT index widths, zero-point
forms, activation quantization), which method options it prefers when the user leaves them unset (an MLX
group stores a float scale and bias whatever the record, so the asymmetric float-zero grid costs nothing;
Core ML holds integer zero-points exactly), its own options (with defaults and checks), its pre-check (run on
the options and ``config.json`` alone, before any weight is read) and its writer (``module:function``,
imported when used, so ``macq --help`` stays fast).

The planner (:mod:`macq.plan`), the CLI's options and help, ``macq bench``'s per-target file columns and the
docs read this table; the backends read their own row's facts from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macq.errors import MacqError


@dataclass(frozen=True)
class Holds:
    """The records a target stores exactly (without re-quantizing)."""

    affine_bits: tuple[int, ...] = ()
    affine_groups: tuple[int, ...] | None = None   # input-dim group sizes (0 per channel, -1 per tensor); None: any
    zero_points: tuple[str, ...] = ("int", "float")
    lut_bits: tuple[int, ...] = ()                  # LUT index widths; () = no look-up tables
    activations: bool = False                       # activation quantization (W8A8)
    fp_modes: tuple[str, ...] = ()                  # microscaled-float records (macq.microscale.FP_FORMATS)

    def describe(self) -> str:
        parts = []
        if self.affine_bits:
            groups = "any group" if self.affine_groups is None else "groups " + "/".join(map(str, self.affine_groups))
            parts.append(f"affine {','.join(map(str, self.affine_bits))}-bit ({groups}, {'/'.join(self.zero_points)} zero)")
        if self.lut_bits:
            parts.append(f"LUT {','.join(map(str, self.lut_bits))}-bit")
        if self.fp_modes:
            parts.append("/".join(self.fp_modes))
        if self.activations:
            parts.append("activation quantization")
        return "; ".join(parts)


@dataclass(frozen=True)
class TargetOption:
    """An option of one or more targets: its CLI flag comes from ``name`` (``max_chunk_mb`` -> ``--max-chunk-mb``)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None      # inclusive lower bound for numbers
    flag: str = ""                    # typer declaration when not the plain name (e.g. ``--stateful/--kv-io``)

    def check(self, value: Any) -> None:
        flag = self.flag.split("/")[0] or "--" + self.name.replace("_", "-")
        if self.choices and value not in self.choices:
            raise MacqError(f"{flag} {value!r}: expected one of {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value is not None and not value >= self.minimum:
            raise MacqError(f"{flag} {value}: expected a value >= {self.minimum:g}")


@dataclass(frozen=True)
class TargetSpec:
    name: str
    title: str                          # the name in messages ("MLX", "Core ML")
    summary: str
    artifact: str                       # :func:`macq.atomic.macq_artifact` kind of its outputs
    holds: Holds
    writer: str                         # "module:function": write(records, output, options, force) -> result dict
    precheck: str                       # "module:function": precheck(plan) on options and config.json alone
    defaults: dict[str, Any] = field(default_factory=dict)   # preferred method options (applied when not given)
    options: tuple[str, ...] = ()       # names in :data:`OPTIONS`
    suffix: str = ""                    # the output name's suffix a plain (unchunked) output needs
    whole_model: bool = False           # the writer reads a QuantizedModel (lazily), not a one-pass stream of records
    file_column: bool = False           # ``macq bench`` reports this target's file size and bits per weight

    def check(self, plan: Any) -> None:
        """Refuse, before any weight is read, what this target cannot write (raises MacqError)."""
        module, fn = self.precheck.split(":")
        getattr(importlib.import_module(module), fn)(plan)

    def write(self, records: Any, output: Path, options: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Write ``records`` (:class:`macq.qmodel.Records`) into ``output`` with this target's options."""
        module, fn = self.writer.split(":")
        return getattr(importlib.import_module(module), fn)(records, Path(output), options, force)


# ------------------------------------------------------------------------------------------------ options
OPTIONS: dict[str, TargetOption] = {o.name: o for o in (
    TargetOption("dtype", str, "float16", "float dtype of scales/biases and float layers",
                 choices=("float16", "bfloat16", "float32")),
    TargetOption("requantize_lut", bool, False, "re-quantize LUT records (k-means/NF4) to affine (lossy, reported)",
                 flag="--requantize-lut"),
    TargetOption("context", int, None, "maximum context (KV cache length; default 512 or the model's maximum if "
                 "smaller)", minimum=2),
    TargetOption("stateful", bool, True, "KV cache as state (default), or as inputs/outputs (graph hf)",
                 flag="--stateful/--kv-io"),
    TargetOption("fixed_shapes", bool, False, "fixed shapes, one token per call (graph hf)", flag="--fixed-shapes"),
    TargetOption("graph", str, "ane", "ane: macq's ANE-shaped graph (fixed shapes, prefill+decode) | hf: "
                 "transformers' model traced (flexible shapes)", choices=("ane", "hf")),
    TargetOption("prefill_len", int, None, "tokens per prefill call (default min(64, context))", minimum=1),
    TargetOption("chunks", int, None, "split the decoder layers into N packages (+ embedding, head)", minimum=1),
    TargetOption("max_chunk_mb", float, None, "split the decoder layers into packages of at most M MB",
                 minimum=1e-9),
    TargetOption("hardware", str, "any", "the compute unit the asset is meant for (stored in it; the runner's "
                 "preference on macOS)", choices=("any", "neural_engine", "gpu")),
    TargetOption("allow_fallback", bool, False, "fall back where a record is not exactly expressible (reported)",
                 flag="--allow-fallback"),
)}


# ------------------------------------------------------------------------------------------------ pre-checks
def _record_bits(cfg: Any) -> int | None:
    return getattr(cfg, "bits", getattr(cfg, "weight_bits", None))


def _group_words(group: int | None) -> str:
    return "per channel" if group in (0, None) else "per tensor" if group == -1 else str(group)


def check_records(target: "TargetSpec", method: str, cfg: Any, topts: dict[str, Any]) -> None:
    """What the method will produce against what ``target`` holds (``cfg`` None: existing records, which the
    writer checks one by one)."""
    from macq.quantizers import method_spec

    if cfg is None:
        return
    spec, holds, name = method_spec(method), target.holds, target.title
    if spec.activations and not holds.activations:
        raise MacqError(f"--method {method}: activation quantization cannot be expressed in a {name} weight-only export")
    bits = _record_bits(cfg)
    if spec.records == "lut":
        if not holds.lut_bits and not topts.get("requantize_lut"):
            raise MacqError(f"--method {method}: writes look-up-table codes, which {name} cannot hold; use an affine "
                            "method (rtn, gptq, awq, awq-gptq, learned, mixed) or pass --requantize-lut (lossy)")
        if holds.lut_bits and bits is not None and bits not in holds.lut_bits:
            raise MacqError(f"--bits {bits}: {name} LUT indices hold {', '.join(map(str, holds.lut_bits))} bits")
        return
    if spec.records != "affine":
        return
    group, mode = getattr(cfg, "group_size", 0), getattr(cfg, "mode", "affine")
    pairs = [(bits, group, mode, "")]
    pairs += [(kv.get("bits", bits), kv.get("group_size", group), kv.get("mode", mode), f"--override {rx.pattern}: ")
              for rx, kv in (cfg.parsed_overrides() if hasattr(cfg, "parsed_overrides") else [])]
    for b, g, m, where in pairs:
        if m != "affine":   # a float mode fixes its bits and block (the record checks them)
            if m not in holds.fp_modes:
                raise MacqError(f"{where}--mode {m}: {name} holds no microscaled-float records "
                                f"({'/'.join(holds.fp_modes) or 'none'}); export it to MLX (--target mlx)")
            continue
        if b is not None and b not in holds.affine_bits:
            raise MacqError(f"{where + 'bits ' if where else '--bits '}{b}: {name} affine holds "
                            f"{', '.join(map(str, holds.affine_bits))} bits")
        if holds.affine_groups is not None and g not in holds.affine_groups:
            raise MacqError(f"{where + 'group ' if where else '--group-size '}{_group_words(g)}: {name} affine holds "
                            f"groups of {', '.join(map(str, holds.affine_groups))}")
    zp = getattr(cfg, "zero_point", "int")
    if zp not in holds.zero_points and not getattr(cfg, "symmetric", True) and not topts.get("allow_fallback"):
        raise MacqError(f"--zero-point {zp}: {name} holds {'/'.join(holds.zero_points)} zero-points exactly; use "
                        f"--zero-point {holds.zero_points[0]} (or --allow-fallback for an approximate form)")


def check_macq(plan: Any) -> None:
    """The ``macq`` row's pre-check: a quantization made for a runtime must be one that runtime can hold."""
    if plan.runtime is not None:
        check_records(plan.runtime, plan.method, plan.cfg, {})


# ------------------------------------------------------------------------------------------------ the table
MLX_HOLDS = Holds(affine_bits=(2, 3, 4, 5, 6, 8), affine_groups=(32, 64, 128), zero_points=("float", "int"),
                  fp_modes=("mxfp4", "nvfp4", "mxfp8"))
COREAI_HOLDS = Holds(affine_bits=(1, 2, 3, 4, 5, 6, 7, 8), affine_groups=None, zero_points=("int", "float"),
                     lut_bits=(1, 2, 3, 4, 5, 6, 7, 8))   # widths without a Core AI type are stored in the next one
COREML_HOLDS = Holds(affine_bits=(1, 2, 3, 4, 5, 6, 7, 8), affine_groups=None, zero_points=("int",),
                     lut_bits=(1, 2, 3, 4, 6, 8))

TARGETS: dict[str, TargetSpec] = {t.name: t for t in (
    TargetSpec("macq", "macq", "macq quantization directory: records + float tensors + config (exported later)", "macq",
               Holds(affine_bits=tuple(range(1, 9)), lut_bits=tuple(range(1, 9)), activations=True,
                     fp_modes=("mxfp4", "nvfp4", "mxfp8")),
               "macq.qmodel:write_quant_dir", "macq.targets:check_macq"),
    TargetSpec("mlx", "MLX", "MLX model directory that mlx_lm.load runs unchanged", "mlx", MLX_HOLDS,
               "mlx_backend.export:write_records", "mlx_backend.export:precheck", defaults={"symmetric": False, "zero_point": "float"},
               options=("dtype", "requantize_lut"), file_column=True),
    TargetSpec("coreml", "Core ML", "Core ML package(s) for the Neural Engine (iOS 18 / macOS 15)", "mlpackage", COREML_HOLDS,
               "converters.export:write_records", "converters.export:precheck", defaults={"symmetric": False, "zero_point": "int"},
               options=("context", "stateful", "fixed_shapes", "graph", "prefill_len", "chunks", "max_chunk_mb",
                        "allow_fallback"), suffix=".mlpackage", whole_model=True, file_column=True),
    TargetSpec("coreai", "Core AI", "Core AI asset(s) (.aimodel) for iOS 27 / macOS 27", "coreai", COREAI_HOLDS,
               "coreai_backend.export:write_records", "coreai_backend.export:precheck",
               defaults={"symmetric": False, "zero_point": "int"},
               options=("context", "prefill_len", "chunks", "max_chunk_mb", "hardware"), suffix=".aimodel",
               whole_model=True, file_column=True),
)}

# Runtimes a quantization directory can be made for (``macq quantize --target``): their defaults and limits apply.
RUNTIMES = tuple(n for n in TARGETS if n != "macq")


def target_spec(name: str, *, runtimes_only: bool = False) -> TargetSpec:
    names = RUNTIMES if runtimes_only else tuple(TARGETS)
    if name not in names:
        raise MacqError(f"--target {name!r}: expected one of {', '.join(names)}")
    return TARGETS[name]


def target_options(target: TargetSpec, given: dict[str, Any]) -> dict[str, Any]:
    """The target's options with defaults filled and each value checked; an option of another target is refused
    by name."""
    for k, v in given.items():
        if v is not None and k not in target.options:
            users = [t.name for t in TARGETS.values() if k in t.options]
            raise MacqError(f"--{k.replace('_', '-')} does not apply to --target {target.name} "
                            f"(it is an option of {', '.join(users) or 'no target'})")
    out = {}
    for k in target.options:
        v = given.get(k)
        out[k] = OPTIONS[k].default if v is None else v
        OPTIONS[k].check(out[k])
    return out
