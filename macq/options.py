"""The method options of ``macq quantize`` and ``macq export``, generated from the method config dataclasses.

One table (:func:`method_options`) is built from every registered method's config fields: each field is one
flag (``group_size`` -> ``--group-size``), its help comes from the field's metadata and says which methods
read it. Both commands add exactly these parameters, so they cannot drift, and a field added to a config is
a flag in both at once. Every option defaults to ``None`` ("not given"), so the method's own default, a
target's preferred default or an automatic choice (group size) applies, and options that do not apply to
the chosen method are refused by name instead of being ignored.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import lru_cache
from typing import Any, List, Optional

import typer

from macq.errors import MacqError
from macq.quantizers import METHODS, method_spec

# Config fields that the command line fills from its own options rather than from a generated flag:
# the calibration set-up is shared by every calibrated method, the target is the command's.
CLI_FIELDS = {"n_calib": "n_calib", "seq_len": "seq_len", "seed": "seed", "dataset": "calib_dataset",
              "target": "target"}
# Flags whose name is not the field's: a bool whose "no" form has a better name; a repeatable singular.
FLAG_NAMES = {"symmetric": "--symmetric/--asymmetric", "overrides": "--override"}


@dataclass(frozen=True)
class MethodOption:
    name: str                 # config field name
    type: Any                 # bool | int | float | str | tuple (of str)
    methods: tuple[str, ...]  # methods whose config has this field
    help: str
    split: bool = True        # tuple fields: split each value on commas

    @property
    def flag(self) -> str:
        return FLAG_NAMES.get(self.name, "--" + self.name.replace("_", "-")).split("/")[0]

    @property
    def decl(self) -> str:
        """typer's declaration: ``--x/--no-x`` for booleans (or the FLAG_NAMES form), else the flag."""
        if self.type is bool:
            return FLAG_NAMES.get(self.name, f"{self.flag}/--no-{self.flag[2:]}")
        return self.flag


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return tuple if typing.get_origin(hint) is tuple else hint


@lru_cache(maxsize=1)
def method_options() -> dict[str, MethodOption]:
    """``{field: MethodOption}`` over every method's config (CLI-owned fields excluded)."""
    seen: dict[str, dict[str, Any]] = {}
    for name, spec in METHODS.items():
        cls, _ = spec.load()
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in CLI_FIELDS:
                continue
            typ = _base_type(hints[f.name])
            entry = seen.setdefault(f.name, {"type": typ, "methods": [], "helps": {}, "split": True})
            if entry["type"] is not typ:
                raise TypeError(f"config field {f.name!r} is {entry['type']} in one method and {typ} in {name}")
            entry["methods"].append(name)
            default = f.default if f.default is not MISSING else None
            text = f.metadata.get("help") or _describe(f.name, default)
            entry["helps"].setdefault(text, []).append(name)
            entry["split"] = entry["split"] and f.metadata.get("split", True)
    out = {}
    for fname, e in seen.items():
        helps = "; ".join(f"{', '.join(ms)}: {text}" if len(e["helps"]) > 1 else f"{text} ({', '.join(ms)})"
                          for text, ms in e["helps"].items())
        out[fname] = MethodOption(fname, e["type"], tuple(e["methods"]), helps, e["split"])
    return out


def _describe(name: str, default: Any) -> str:
    return f"{name.replace('_', ' ')} (method default {default!r})"


def typer_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """The generated options as ``inspect.Parameter`` s with typer defaults, for a command's signature."""
    params = []
    for o in method_options().values():
        if o.name in exclude:
            continue
        decl = o.decl
        ann: Any = Optional[bool] if o.type is bool else Optional[List[str]] if o.type is tuple else Optional[o.type]
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                        default=typer.Option(None, decl, help=o.help, show_default=False,
                                                             rich_help_panel=panel_of(o.name))))
    return params


def given_method_options(values: dict[str, Any]) -> dict[str, Any]:
    """The generated options the user actually gave, tuple fields parsed (comma-split where allowed)."""
    opts = method_options()
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in opts or v is None or (isinstance(v, (list, tuple)) and not v):
            continue
        if opts[k].type is tuple:
            parts = [p.strip() for s in v for p in (s.split(",") if opts[k].split else [s])]
            v = tuple(p for p in parts if p)
        out[k] = v
    return out


def check_applicable(method: str, given: dict[str, Any]) -> None:
    """Refuse options the chosen method has no field for, naming the flag and who reads it."""
    cls, _ = method_spec(method).load()
    names = {f.name for f in fields(cls)}
    opts = method_options()
    for k in sorted(given):
        if k not in names:
            users = ", ".join(opts[k].methods) if k in opts else "no method"
            flag = opts[k].flag if k in opts else "--" + k.replace("_", "-")
            raise MacqError(f"{flag} does not apply to --method {method} (it is read by {users})")


def all_flags() -> set[str]:
    """Every generated flag (both forms of booleans), for tests that error messages name real flags."""
    return {f for o in method_options().values() for f in o.decl.split("/")}


# Help panels: ``--help`` groups options by what they are for.
PANEL_MODEL, PANEL_METHOD, PANEL_CALIB = "Model and text", "Method", "Calibration"
PANEL_TARGET, PANEL_OUTPUT, PANEL_PERF = "Target", "Output", "Performance"
PERFORMANCE_FIELDS = ("device", "max_memory", "act_dtype", "batch_size", "threads")


def panel_of(field_name: str) -> str:
    return PANEL_PERF if field_name in PERFORMANCE_FIELDS else PANEL_METHOD


def target_parameters() -> list[inspect.Parameter]:
    """Every target option of :data:`macq.targets.OPTIONS` as a typer parameter, its help naming the targets that
    read it (an option given for another target is refused by the planner)."""
    from macq.targets import OPTIONS, TARGETS

    params = []
    for o in OPTIONS.values():
        users = [t.title for t in TARGETS.values() if o.name in t.options]
        ann: Any = Optional[o.type]
        decl = o.flag or "--" + o.name.replace("_", "-")
        default = "" if o.default is None or o.type is bool else f" (default {o.default})"
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                        default=typer.Option(None, decl, help=f"{', '.join(users)}: {o.help}{default}",
                                                             show_default=False, rich_help_panel=PANEL_TARGET)))
    return params
