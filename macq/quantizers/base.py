"""Config base for every quantizer: self-validating dataclasses (one-line MacqError naming the field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from macq.errors import MacqError


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise MacqError(msg)


def check_bits(bits: int, allowed: tuple[int, ...] | range, method: str) -> None:
    check(bits in allowed, f"--bits {bits}: {method} supports {', '.join(map(str, allowed))}")


@dataclass
class QuantConfig:
    """Which modules a method touches. Default: every Linear / Conv1D in the decoder layers."""

    include_embeddings: bool = False
    include_lm_head: bool = False
    skip: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = getattr(self, "method", type(self).__name__)
        return d

    @classmethod
    def from_kwargs(cls, **kw: Any) -> "QuantConfig":
        """Build from CLI-style keyword args, ignoring the ones this config does not have."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kw.items() if k in names and v is not None})
