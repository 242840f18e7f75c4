"""A stand-in accelerator for testing ``--device`` code paths on a machine without one.

Tensors on it hold ordinary CPU data but report ``device.type == "lazy"`` (a device type the CPU build of torch
has a device guard for, so autograd runs on it). Every op is checked with CUDA's placement rules before it runs
on the CPU data: tensors of one op must share a device, except 0-dim CPU tensors (scalars), CPU index tensors,
and the copies between devices (``.to``, ``copy_``). Code that builds a CPU tensor and mixes it into the
accelerator's work fails here as it would on a GPU, and ``to_numpy`` of an accelerator tensor fails as on CUDA.
The harness also counts matmul FLOPs per device, so a test can tell that the heavy work ran on the accelerator
and not quietly on the CPU. Float64 can be refused on it (MPS has no float64).

What it cannot show: kernels missing on a real backend, numerical differences of GPU kernels, speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ACC = torch.device("lazy")
aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_MATMUL = {aten.mm.default: lambda a, b: a.shape[0] * a.shape[1] * b.shape[1],
           aten.addmm.default: lambda c, a, b, **_: a.shape[0] * a.shape[1] * b.shape[1],
           aten.bmm.default: lambda a, b: a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
           aten.baddbmm.default: lambda c, a, b, **_: a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]}


class DeviceMismatch(RuntimeError):
    pass


class AccTensor(torch.Tensor):
    """CPU storage behind a tensor that says it lives on the accelerator."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> AccTensor:
        r = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                storage_offset=data.storage_offset(), device=ACC)
        r.data_ = data
        return r

    def tolist(self):   # CUDA copies to the host for it
        return self.data_.tolist()

    def __repr__(self) -> str:
        return f"AccTensor({self.data_!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _State:
    mismatches: list[str] = []
    flops = {"acc": 0, "cpu": 0}
    float64 = True


def _run(func, args, kwargs):
    acc_in, cpu_in = [], []
    for i, x in enumerate(tree_flatten((args, kwargs))[0]):
        if isinstance(x, AccTensor):
            acc_in.append(x)
        elif isinstance(x, torch.Tensor) and x.dim() > 0 and not (func in _INDEXING and i > 0 and not
                                                                   x.is_floating_point()):
            cpu_in.append(x)     # (an index may stay on the CPU; the values put there may not)
    if acc_in and cpu_in and func not in _COPIES:
        msg = f"{func}: accelerator tensors mixed with CPU tensors of shapes {[tuple(c.shape) for c in cpu_in]}"
        _State.mismatches.append(msg)
        raise DeviceMismatch(msg)
    unwrap = lambda x: x.data_ if isinstance(x, AccTensor) else x  # noqa: E731
    a, k = tree_map(unwrap, args), tree_map(unwrap, dict(kwargs))
    if func in _MATMUL:
        _State.flops["acc" if acc_in else "cpu"] += 2 * _MATMUL[func](*a, **k)
    devs = [x for x in tree_flatten((a, k))[0] if isinstance(x, torch.device)]   # factories, .to(device)
    dev = devs[0] if devs else None
    cpu = lambda x: torch.device("cpu") if isinstance(x, torch.device) and x.type == ACC.type else x  # noqa: E731
    a, k = tree_map(cpu, a), tree_map(cpu, k)
    if func is aten.copy_.default:
        a[0].copy_(a[1])
        return args[0]
    out = func(*a, **k)
    to_acc = dev.type == ACC.type if dev is not None else bool(acc_in)
    inputs = {id(x.data_): x for x in acc_in}

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in inputs:            # an in-place op: the same tensor back
            return inputs[id(x)]
        if not to_acc:
            return x
        if x.dtype == torch.float64 and not _State.float64:
            msg = f"{func}: float64 on an accelerator without float64"
            _State.mismatches.append(msg)
            raise DeviceMismatch(msg)
        return AccTensor(x)

    return tree_map(wrap, out)


class _Mode(TorchDispatchMode):
    """Sends factory calls with ``device=lazy`` (which have no tensor argument) to the harness."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


@contextlib.contextmanager
def accelerator(float64: bool = True) -> Iterator[_State]:
    """Inside, ``torch.device("lazy")`` is a working accelerator; yields the counters (``flops`` per device,
    ``mismatches`` seen, including any the code caught and swallowed)."""
    _State.mismatches, _State.flops, _State.float64 = [], {"acc": 0, "cpu": 0}, float64
    made = {f: getattr(torch, f) for f in ("tensor", "as_tensor")}

    def maker(f):   # these build on the CPU below the dispatcher, then copy: route the copy through the harness
        def make(*args, device=None, **kwargs):
            t = made[f](*args, **kwargs)
            return t.to(device) if device is not None else t
        return make

    inference = torch._C._InferenceMode
    try:
        for f in made:
            setattr(torch, f, maker(f))
        torch._C._InferenceMode = _NoGrad   # wrapper views cannot be inference tensors; no_grad computes the same
        with _Mode():
            yield _State
    finally:
        for f, fn in made.items():
            setattr(torch, f, fn)
        torch._C._InferenceMode = inference


class _NoGrad:
    def __init__(self, mode: bool) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.prev and not self.mode)

    def __exit__(self, *exc) -> None:
        torch._C._set_grad_enabled(self.prev)
