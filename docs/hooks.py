"""MkDocs hook: the methods reference is generated from the method registry and the config dataclasses.

A page that contains ``<!-- macq:methods -->`` gets, in its place, one summary table of every registered
method (``macq.quantizers.METHODS``) and one section per method with its options. Each option row is read
from the method's config dataclass (field, type, default) and named by the CLI flag that
``macq.options.method_options`` generates for it, so the reference cannot drift from the code: a field added
to a config is a row here at the next ``mkdocs build``.
"""

from __future__ import annotations

import importlib
import re
import typing
from dataclasses import MISSING, fields
from typing import Any

MARKER = "<!-- macq:methods -->"
TARGETS_MARKER = "<!-- macq:targets -->"

# What each record kind can be written to without re-quantizing (the targets' rules, stated once here).
TARGETS = {
    "affine": "MLX, Core ML",
    "lut": "Core ML (MLX: only re-quantized, `--requantize-lut`)",
    "any": "per layer: MLX when every layer's format is one MLX stores, Core ML when every layer's is one Core ML stores",
}


def _rst_to_md(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _description(spec: Any, cls: type) -> str:
    """The registry's one-line description when it has one, else the module's first paragraph."""
    for attr in ("description", "summary", "help"):
        value = getattr(spec, attr, None)
        if isinstance(value, str) and value.strip():
            return _rst_to_md(value.strip())
    module = importlib.import_module(cls.__module__)
    doc = (module.__doc__ or "").strip().split("\n\n")[0]
    return _rst_to_md(" ".join(doc.split()))


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union,) or type(hint).__name__ == "UnionType":
        hint = args[0] if args else hint
    if typing.get_origin(hint) is tuple:
        return "list"
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _default(f: Any) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value is None:
        return "auto"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag(opt: Any, is_bool: bool) -> str:
    decl = opt.decl if is_bool else opt.flag
    return " / ".join(f"`{d}`" for d in decl.split("/"))


def methods_markdown() -> str:
    from macq.options import CLI_FIELDS, method_options
    from macq.quantizers import METHODS

    opts = method_options()
    out = ["| method | kind | calibration | records | streams | written to |", "|---|---|---|---|---|---|"]
    for name, spec in METHODS.items():
        records = "affine, activations" if spec.activations else spec.records
        targets = "neither (activation quantization; evaluated in torch)" if spec.activations else TARGETS[spec.records]
        out.append(f"| [`{name}`](#{name}) | {spec.kind} | {'yes' if spec.needs_calibration else 'no'} | {records} | "
                   f"{'yes' if spec.streams else 'no'} | {targets} |")
    out += ["", "Calibrated methods also read the shared calibration options `--calib-dataset`, `--n-calib`, "
            "`--seq-len` and `--seed` (see [Commands](commands.md)).", ""]
    for name, spec in METHODS.items():
        cls, _ = spec.load()
        hints = typing.get_type_hints(cls)
        out += [f"## `{name}` {{#{name}}}", "", _description(spec, cls), ""]
        facts = [f"config `{cls.__module__}.{cls.__name__}`", f"kind: {spec.kind}",
                 "calibrated" if spec.needs_calibration else "calibration-free",
                 "streams from a checkpoint" if spec.streams else f"in memory only ({spec.whole_model or 'whole model'})"]
        if getattr(spec, "cost", ""):
            facts.append(f"cost: {spec.cost}")
        out += ["*" + "; ".join(facts) + ".*", "", "| flag | type | default | what it does |", "|---|---|---|---|"]
        for f in fields(cls):
            if f.name in CLI_FIELDS or f.name not in opts:
                continue
            is_bool = hints[f.name] is bool
            help_text = f.metadata.get("help") or "–"
            out.append(f"| {_flag(opts[f.name], is_bool)} | {_type_name(hints[f.name])} | {_default(f)} | "
                       f"{_cell(help_text)} |")
        out.append("")
    return "\n".join(out)


def targets_markdown() -> str:
    """The target table's rows (``macq.targets.TARGETS``): name, what it is, what it holds, its own options."""
    try:
        from macq.targets import TARGETS
    except ImportError:  # a checkout without the target table: say where targets are written instead
        return ("The targets are written by `mlx_backend/` (MLX) and `converters/` (Core ML); "
                "`macq quantize` writes the macq quantization directory.")
    out = ["| target | what it writes | holds | preferred defaults | its options |", "|---|---|---|---|---|"]
    for spec in TARGETS.values():
        defaults = ", ".join(f"`{k}={v}`" for k, v in spec.defaults.items()) or "–"
        options = ", ".join(f"`--{o.replace('_', '-')}`" for o in spec.options) or "–"
        out.append(f"| `{spec.name}` | {_cell(spec.summary)} | {_cell(spec.holds.describe())} | {defaults} | {options} |")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 (MkDocs API)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, methods_markdown())
    if TARGETS_MARKER in markdown:
        markdown = markdown.replace(TARGETS_MARKER, targets_markdown())
    return markdown
