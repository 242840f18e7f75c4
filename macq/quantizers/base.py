"""Config base for every quantizer: self-validating dataclasses (one-line MacqError naming the field).

Configs round-trip through plain dicts (``to_dict`` / ``from_dict``, with ``CONFIG_VERSION``): the dict is
what a quantization's manifest stores, so a saved quantization says exactly how it was made. Field metadata
(``help``, ``groups``) is read by the CLI, whose ``quantize`` / ``export`` options are generated from these
fields (:mod:`macq.options`): a new field is a new flag in both commands, never one of them only.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from macq.errors import MacqError

CONFIG_VERSION = 1
RENAMED_FIELDS = {"damp": "damp_percent"}   # older dict keys -> current field names (from_dict accepts both)
_NOT_OVERRIDABLE = ("include_embeddings", "include_lm_head", "skip", "overrides")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise MacqError(msg)


def check_model_inputs(method: str, cfg: Any, cls: type, calib_ids: Any) -> None:
    """The entry check every calibrated model method shares: its own config type and ``[n, seq_len]`` token ids."""
    if not isinstance(cfg, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise MacqError(f"{method}: expected {article} {cls.__name__}, got {type(cfg).__name__}")
    if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise MacqError(f"{method} needs calibration token ids [n_samples, seq_len]")


def check_bits(bits: int, allowed: tuple[int, ...] | range, method: str) -> None:
    check(bits in allowed, f"--bits {bits}: {method} supports {', '.join(map(str, allowed))}")


def _parse_value(text: str, typ: Any, flag: str) -> Any:
    """A string from the command line as ``typ`` (bool, int, float, str, Optional of those)."""
    base = typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(typ) if a is not type(None))
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if base in (int, float, str):
            return base(text)
    except ValueError:
        raise MacqError(f"{flag}: {text!r} is not a valid {getattr(base, '__name__', base)}") from None
    raise MacqError(f"{flag}: field of type {typ} cannot be overridden per module")


@dataclass
class QuantConfig:
    """Which modules a method touches. Default: every Linear / Conv1D in the decoder layers."""

    include_embeddings: bool = field(default=False, metadata={"help": "also quantize the token embedding"})
    include_lm_head: bool = field(default=False, metadata={"help": "also quantize the lm_head (tied: the embedding)"})
    skip: tuple[str, ...] = field(default=(), metadata={"help": "substrings of module names to keep float (comma-separated)"})
    overrides: tuple[str, ...] = field(default=(), metadata={
        "help": "per-module options by name pattern, 'REGEX=field:value[,field:value]' (e.g. 'down_proj=bits:6'); "
                "the first matching pattern wins (repeatable)", "split": False})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["method"] = getattr(self, "method", type(self).__name__)
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a dict from a newer macq must not be half-read)."""
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        method = d.pop("method", None)
        if version != CONFIG_VERSION:
            raise MacqError(f"method config version {version}: this macq reads version {CONFIG_VERSION}")
        if method is not None and method != getattr(cls, "method", method):
            raise MacqError(f"method config for {method!r} given to {cls.__name__}")
        d = {RENAMED_FIELDS.get(k, k) if RENAMED_FIELDS.get(k) in _field_names(cls) else k: v for k, v in d.items()}
        stray = sorted(set(d) - _field_names(cls))
        if stray:
            raise MacqError(f"method config: unknown field(s) {', '.join(stray)} for {getattr(cls, 'method', cls.__name__)}")
        hints = typing.get_type_hints(cls)
        d = {k: tuple(v) if isinstance(v, list) and typing.get_origin(hints[k]) is tuple else v for k, v in d.items()}
        cfg = cls(**d)
        cfg.parsed_overrides()
        return cfg

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "QuantConfig":
        """Build from CLI-style keyword args, ignoring the ones this config does not have."""
        names = _field_names(cls)
        kw = {RENAMED_FIELDS.get(k, k) if RENAMED_FIELDS.get(k) in names else k: v for k, v in kw.items()}
        cfg = cls(**{k: v for k, v in kw.items() if k in names and v is not None})
        cfg.parsed_overrides()
        return cfg

    # ------------------------------------------------------------------ per-module overrides
    def parsed_overrides(self) -> list[tuple[re.Pattern, dict[str, Any]]]:
        """``[(pattern, {field: value})]``, each validated by building the overridden config once."""
        hints = typing.get_type_hints(type(self))
        out = []
        for spec in self.overrides:
            pat, sep, body = spec.partition("=")
            if not sep or not pat or not body:
                raise MacqError(f"--override {spec!r}: expected 'PATTERN=field:value[,field:value]'")
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise MacqError(f"--override {spec!r}: bad pattern ({e})") from None
            kv: dict[str, Any] = {}
            for item in body.split(","):
                k, sep, v = item.partition(":")
                k = RENAMED_FIELDS.get(k.strip().replace("-", "_"), k.strip().replace("-", "_"))
                if not sep or k not in hints or k in _NOT_OVERRIDABLE:
                    raise MacqError(f"--override {spec!r}: {k!r} is not a per-module option of "
                                    f"{getattr(self, 'method', type(self).__name__)}")
                kv[k] = _parse_value(v.strip(), hints[k], f"--override {spec!r}")
            try:
                replace(self, overrides=(), **kv)  # runs __post_init__: the overridden values validate themselves
            except MacqError as e:
                raise MacqError(f"--override {spec!r}: {e}") from None
            out.append((rx, kv))
        return out

    def for_module(self, name: str) -> "QuantConfig":
        """This config as it applies to module ``name`` (first matching override, else unchanged)."""
        for rx, kv in self.parsed_overrides():
            if rx.search(name):
                return replace(self, overrides=(), **kv)
        return self


def _field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


@dataclass
class HeadOptions:
    head_gptq: bool = field(default=False, metadata={
        "help": "the output head (with tied embeddings: the embedding) by GPTQ on the quantized model's final hidden "
                "states instead of data-free rounding; needs --include-lm-head; whole model in memory (not --stream)"})

    def check_head_options(self) -> None:
        if self.head_gptq and not (self.include_lm_head or self.include_embeddings):
            raise MacqError("--head-gptq: the head is not quantized; pass --include-lm-head")

    def stream_refusal(self) -> str:
        if self.head_gptq:
            return ("--head-gptq calibrates the head on the whole quantized model's final hidden states; pass "
                    "--no-head-gptq to stream, or --no-stream")
        return super().stream_refusal()
