"""Layer-by-layer calibration engine shared by the calibrated methods (GPTQ, AWQ, SmoothQuant, kmeans-cal, learned,
mixed's GPTQ rounding and proxy sensitivities).

1. Run the calibration batches through the embeddings only, catching what the first decoder layer
   receives (hidden states + the keyword arguments the model passes it: rotary embeddings, masks).
2. For each decoder layer in turn: the method collects statistics on that layer's inputs with hooks,
   quantizes the layer in place, then the *quantized* layer is run to produce the next layer's inputs,
   so errors propagate as they will at inference.

Peak memory is one layer plus the calibration activations (``offload=True`` keeps those on the CPU
while the layer runs on an accelerator). Everything is deterministic given the calibration ids.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from macq.arch import arch_spec, decoder_layers
from macq.progress import track
from macq.record import record_to


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What one decoder layer receives for every calibration batch."""

    hidden: list[torch.Tensor]                      # [b, seq, hidden] per batch
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    storage: torch.device = torch.device("cpu")

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def plain(x: Any) -> Any:
    """Ordinary (non-inference) copies of captured tensors, so autograd may save them for backward."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x


def layer_out(layer: nn.Module, weights: dict[str, torch.Tensor], hs: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's hidden-state output with ``weights`` (by parameter name) in place of its own."""
    from torch.func import functional_call

    out = functional_call(layer, weights, (hs,), kw)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def capture_first_layer_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                               device: torch.device | str = "cpu", offload: bool = False,
                               into: LayerInputs | None = None) -> LayerInputs:
    """Run the model up to its first decoder layer for each batch of ``calib_ids [N, L]``.

    Only the modules before the first layer (embeddings, rotary) need to be on ``device`` (the decoder
    layers may be meta tensors: the forward stops before the first one). ``into``: append to these inputs
    (e.g. a spilling activation store as ``hidden``) instead of new lists.
    """
    device = torch.device(device)
    storage = torch.device("cpu") if offload else device
    layers = decoder_layers(model)
    captured = into if into is not None else LayerInputs(hidden=[], storage=storage)

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value", "layer_past")}
        kw["use_cache"] = False
        captured.hidden.append(hs.detach().to(storage))
        captured.kwargs.append(_to(kw, storage))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            try:
                model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


class ReuseOutputs:
    """Stored outputs of a layer's finished linears, for a method that runs the same layer over the same
    calibration batches several times (true-sequential GPTQ: one partial forward per input group, then the
    forward for the next layer's inputs). After :meth:`freeze`, each named linear computes its output once per
    batch and returns the stored tensor on later passes: one forward per layer instead of about two.

    Sound only for modules whose weights no longer change and whose inputs are the same on every pass: the
    groups before the one being collected, whose inputs come from the layer input, the layer's fixed parts
    and earlier frozen modules. Calls are keyed by (batch, call within the batch), set by :func:`batch_calls`;
    :func:`end_reuse` restores the modules and drops the outputs (float32 on the layer's device: at 8B and
    4096 tokens, q/k/v/o 160 MB and gate/up 470 MB)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.batch = layer, 0
        self.saved: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.frozen: set[str] = set()

    def start(self, batch: int) -> None:
        self.batch, self.calls = batch, {}

    def freeze(self, names: list[str]) -> None:
        for name in names:
            mod = self.layer.get_submodule(name)
            store = self.saved.setdefault(name, {})
            self.frozen.add(name)

            def forward(x: torch.Tensor, _orig=mod.forward, _store=store, _name=name, _mod=mod) -> torch.Tensor:
                call = self.calls[_name] = self.calls.get(_name, -1) + 1
                y = _store.get((self.batch, call))
                _mod._macq_reused = y is not None       # progress's operation count skips a stored output
                if y is None:
                    y = _store[(self.batch, call)] = _orig(x)
                return y
            mod.forward = forward


def reuse_outputs(layer: nn.Module) -> ReuseOutputs:
    """The layer's :class:`ReuseOutputs`, attached until :func:`end_reuse` (the drivers call it after the
    layer's forward)."""
    if getattr(layer, "_macq_reuse", None) is None:
        layer._macq_reuse = ReuseOutputs(layer)
    return layer._macq_reuse


def end_reuse(layer: nn.Module) -> None:
    reuse = getattr(layer, "_macq_reuse", None)
    if reuse is None:
        return
    for name in reuse.frozen:
        mod = layer.get_submodule(name)
        mod.__dict__.pop("forward", None)      # the class's forward again
        mod.__dict__.pop("_macq_reused", None)
    reuse.saved.clear()
    del layer._macq_reuse


def batch_calls(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> Iterator[tuple[torch.Tensor, dict]]:
    """``(hidden, kwargs)`` of each calibration batch on ``device``, telling the layer's
    :class:`ReuseOutputs` (if any) which batch runs."""
    reuse = getattr(layer, "_macq_reuse", None)
    for b, (hs, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        if reuse is not None:
            reuse.start(b)
        yield hs.to(device), _to(kw, device)


def layer_device(layer: nn.Module, default: torch.device) -> torch.device:
    """Where ``layer`` computes: its first parameter's device (``default`` for a layer without any)."""
    p = next(layer.parameters(), None)
    return default if p is None else p.device


@torch.inference_mode()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """The layer's outputs for every batch, computed on ``device`` (default: where the layer's weights are),
    stored where the inputs are."""
    device = torch.device(device) if device is not None else layer_device(layer, inputs.storage)
    outs = []
    for hs, kw in batch_calls(layer, inputs, device):
        out = layer(hs, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        outs.append(out.detach().to(inputs.storage))
    return outs


@contextmanager
def module_inputs(layer: nn.Module, names: list[str] | tuple[str, ...],
                  callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, ``callback(name, x)`` receives the input of each named submodule of ``layer``
    on every forward, as a 2-D ``[tokens, in_features]`` tensor."""
    handles = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, _name: str = name) -> None:
            x = args[0]
            callback(_name, x.detach().reshape(-1, x.shape[-1]))
        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


LayerFn = Callable[[int, str, nn.Module, LayerInputs], None]


@dataclass
class LayerJob:
    """A calibrated method's per-layer step, as both drivers (:func:`layerwise`, in memory, and the streaming
    engine :mod:`macq.quantizers.stream_calib`) call it: ``fn`` quantizes one decoder layer in place and adds
    its records (by full module path) to ``records``; ``stats`` is the method's per-module diagnostics,
    stored in the manifest's ``method["stats"]`` when ``stats_in_manifest``; ``act_quant`` the input
    quantization of each linear (W8A8 methods: the manifest's ``act_quant``).

    A method that must measure the whole float model before it can quantize any layer (mixed precision: every
    unit's sensitivity, then one allocation) sets ``prepass`` (a per-layer step over the *float* layers, which
    the streaming engine runs in a first pass) and ``after_prepass`` (called between the passes);
    ``method_info`` returns entries for the manifest's method dict once every layer is done."""

    fn: LayerFn
    records: dict[str, Any]
    stats: dict[str, Any]
    device: torch.device
    batch_size: int
    stats_in_manifest: bool = False
    act_quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepass: LayerFn | None = None
    after_prepass: Callable[[], None] | None = None
    method_info: Callable[[], dict[str, Any]] | None = None
    backward: Callable[[Any, torch.Tensor], dict[str, Any]] | None = None
    own_heads: set[str] = field(default_factory=set)
    finish: Callable[[Any, torch.Tensor, Any, dict[str, Any]], dict[str, Any]] | None = None


def layerwise(model: nn.Module, calib_ids: torch.Tensor, fn: LayerFn, batch_size: int = 8,
              device: torch.device | str = "cpu", offload: bool = False, progress: bool = False,
              description: str = "calibrating") -> None:
    """Drive ``fn(index, layer_path, layer, inputs)`` over every decoder layer in order.

    ``fn`` quantizes the layer in place (writing dequantized weights, folding scales); the engine then
    runs the quantized layer to feed the next one. With ``offload`` each layer is moved to ``device``
    only while it is processed, so an accelerator holds one layer at a time.
    """
    device = torch.device(device)
    spec = arch_spec(model)
    layers = decoder_layers(model)
    if offload:
        _move_outside_layers(model, spec.layers, device)
    inputs = capture_first_layer_inputs(model, calib_ids, batch_size, device, offload)
    for i in track(range(len(layers)), description, enabled=progress, total=len(layers)):
        layer = layers[i]
        if offload:
            layer.to(device)
        try:
            fn(i, f"{spec.layers}.{i}", layer, inputs)
            inputs.hidden = run_layer(layer, inputs, device)
        finally:
            end_reuse(layer)   # the caller's modules get their own forward back, also on error
        if offload:
            layer.to("cpu")
    if offload:
        _move_outside_layers(model, spec.layers, torch.device("cpu"))


def run_job(model: nn.Module, calib_ids: torch.Tensor, job: LayerJob, progress: bool = False,
            description: str = "calibrating") -> None:
    """A method's :class:`LayerJob` over an in-memory model, on ``job.device``: an accelerator holds one decoder
    layer at a time (the model stays in CPU memory), and the records come back to the CPU as the job ends."""
    layerwise(model, calib_ids, job.fn, batch_size=job.batch_size, device=job.device,
              offload=job.device.type != "cpu", progress=progress, description=description)
    for name, rec in job.records.items():
        job.records[name] = record_to(rec, "cpu")


@contextmanager
def model_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The whole model on ``device`` for a whole-model pass of the in-memory path (Fisher gradients, the logits
    stage), back in CPU memory afterwards."""
    if device.type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def _move_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter/buffer except the decoder layers' (embeddings, rotary, norms), module by module as
    ``Module.to`` does it (a tied embedding and head stay one parameter)."""
    prefix = layers_path + "."
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(prefix):
            continue
        mod._apply(lambda t: t.to(device), recurse=False)


def target_linears(layer: nn.Module, path: str, groups, targets) -> Iterator[tuple[Any, str, nn.Module]]:
    """``(group, full_name, module)`` for each linear of ``layer``, in ``groups`` order, that is in ``targets``."""
    for grp in groups:
        for name in grp:
            full = f"{path}.{name}"
            if full in targets:
                yield grp, full, layer.get_submodule(name)
