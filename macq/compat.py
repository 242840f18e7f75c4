"""Version seams of transformers that macq must cross, in one place.

transformers 5.24 renamed the cache argument of every model ``forward`` from ``past_key_values`` to ``cache``
(the old name warns until 5.40) and the cache field of the outputs likewise. macq asks the model which
name it takes instead of assuming one, so the same code runs on both sides of that rename.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model.forward`` takes its KV cache by (``cache`` from 5.24, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_NAMES if n in params), "past_key_values")


def output_cache(out: Any) -> Any:
    """The KV cache a model output carries, whatever the field is called."""
    for name in CACHE_NAMES:
        value = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if value is not None:
            return value
    return None
