"""A model skeleton whose parameters live on the meta device, filled one module at a time from a checkpoint:
what both streaming engines (quantization, :mod:`macq.quantizers.stream_calib`; gradients,
:mod:`macq.quantizers.stream_grad`) hold instead of the model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.shards import TensorStore
from macq.streaming import finite


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (created, then moved before any
    initialisation touches them: ``torch.empty`` is never written, so it costs no resident memory); buffers
    stay real, so non-persistent ones (rotary ``inv_freq``) hold the values their constructors compute."""
    orig = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = orig  # type: ignore[method-assign]


def skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters[pname]
    mod._parameters[pname] = nn.Parameter(value, requires_grad=False if old is None else old.requires_grad)


def materialize(module: nn.Module, prefix: str, store: TensorStore, device: torch.device) -> None:
    """Read every meta parameter of ``module`` (checkpoint key ``prefix + name``) in float32 onto ``device``."""
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta":
            continue
        key = prefix + name
        if key not in store:
            raise MacqError(f"model: checkpoint lacks tensor {key}")
        _set_param(module, name, finite(key, store[key]).to(device, torch.float32))
    for name, b in list(module.named_buffers()):
        if b.device != device:
            mod_name, _, bname = name.rpartition(".")
            owner = module.get_submodule(mod_name) if mod_name else module
            owner._buffers[bname] = b.to(device)


def release(module: nn.Module) -> None:
    """Parameters back to meta (storage freed)."""
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if p.device.type != "meta":
            _set_param(module, name, torch.empty_like(p, device="meta"))


def _move_buffers(model: nn.Module, layers_prefix: str, device: torch.device) -> None:
    for name, b in list(model.named_buffers()):
        if not name.startswith(layers_prefix) and b.device != device:
            mod_name, _, bname = name.rpartition(".")
            model.get_submodule(mod_name)._buffers[bname] = b.to(device)
