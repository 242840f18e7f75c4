"""``--device`` of the calibrated methods, streamed and in memory.

Without a GPU the methods run on a stand-in accelerator (:mod:`tests.vdevice`): every op is checked with CUDA's
placement rules (a CPU tensor mixed into the device's work fails as it would on a GPU), the matmuls are counted per
device (the work must run on the device, not quietly on the CPU), and the records must be those of the CPU run. The
last allows float-rounding differences only: a device's Gram matrix is a plain product, the CPU's a ``syrk``, and
GPTQ factors on the device with ``torch.linalg`` where the CPU uses LAPACK through SciPy. With ``float64=False`` the
stand-in is an MPS-like device: no float64 tensor may be made there (the code keeps float32 sums on it and runs
MLX's float64 rounding on the CPU). Where CUDA is present, the same cases run on the GPU itself.
"""

from __future__ import annotations

import sys

import pytest
import torch

import macq.device
from macq.pipeline import config_for
from macq.qmodel import QuantizedModel
from macq.quantizers.stream_calib import stream_calibrate
from macq.tiny import save_tiny_model
from tests.test_stream_calib import _ids, _in_memory
from tests.vdevice import ACC, DeviceMismatch, accelerator

STREAMED = [
    ("llama", "gptq", dict(bits=4, group_size=32)),
    ("llama", "awq", dict(bits=3, group_size=32, greedy_rounding=True, salience="l2", duo_scaling=True,
                          include_lm_head=True)),
    ("qwen2", "awq-gptq", dict(bits=4, group_size=16, include_lm_head=True)),
    ("gpt2", "smoothquant", dict(act_mode="per_tensor_static")),
    ("llama", "kmeans-cal", dict(bits=4, outlier_frac=0.01)),  # Fisher
    ("qwen2", "learned", dict(bits=4, group_size=16, steps=2, kl_steps=2, include_lm_head=True)),   # logits stage
    ("llama", "mixed", dict(target_bpw=3.5, base_method="gptq")),                                   # Fisher
]
IN_MEMORY = [
    ("qwen2", "gptq", dict(bits=4, group_size=32)),          # the whole model on the device (no offload)
    ("llama", "awq", dict(bits=4, group_size=32)),
    ("llama", "kmeans-cal", dict(bits=3)),
    ("llama", "learned", dict(bits=3, group_size=32, steps=2, kl_steps=2)),
    ("llama", "mixed", dict(target_bpw=3.5, sensitivity="proxy", base_method="gptq")),
]
NO_FLOAT64 = [
    ("llama", "awq", dict(mode="mxfp4", include_embeddings=True)),
    ("qwen2", "kmeans-cal", dict(bits=3, sensitivity="hessian")),       # LUT refits solved on the CPU
    ("llama", "learned", dict(bits=3, group_size=32, steps=2, kl_steps=2)),
    ("llama", "mixed", dict(target_bpw=3.5)),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {a: save_tiny_model(root / a, a) for a in ("llama", "qwen2", "gpt2")}


@pytest.fixture
def stand_in(monkeypatch):
    """``--device cuda`` resolves to the stand-in accelerator; the GEMM probe is left out of the FLOP counts."""
    real = macq.device.resolve_device

    def resolve(device="auto"):
        return ACC if str(device).startswith("cuda") else real(device)

    for mod in [m for n, m in sys.modules.items() if n.startswith("macq")]:
        if getattr(mod, "resolve_device", None) is real:
            monkeypatch.setattr(mod, "resolve_device", resolve)
    monkeypatch.setattr("macq.perf._probe", lambda *_a: (1.0, None))


def assert_near(ref: QuantizedModel, got: QuantizedModel) -> None:
    """Same records up to float rounding: on every record at most 2% of the weights on another grid point and the
    dequantized weights within 0.2% (relative Frobenius); float tensors within float32 rounding; all on the CPU."""
    assert set(ref.records) == set(got.records)
    for k, ra in ref.records.items():
        rb = got.records[k]
        assert ra.meta() == rb.meta(), k
        assert all(t.device.type == "cpu" for t in rb.to_tensors().values()), k
        a, b = ra.dequantize(torch.float32), rb.dequantize(torch.float32)
        assert float((a != b).float().mean()) <= 0.02, k
        assert float((a - b).norm()) <= 2e-3 * float(a.norm()), k
    for k, t in ref.float_tensors.items():
        assert got.float_tensors[k].device.type == "cpu", k
        torch.testing.assert_close(got.float_tensors[k], t, rtol=1e-5, atol=1e-6, msg=k)


def _config(method, opts, device):
    return config_for(method, dict(opts, batch_size=3, act_dtype="float32", device=device))


@pytest.mark.parametrize("arch,method,opts", STREAMED, ids=[f"{a}-{m}" for a, m, _ in STREAMED])
def test_streamed_methods_run_on_the_device(ckpts, tmp_path, stand_in, arch, method, opts):
    src, ids = ckpts[arch], _ids(ckpts[arch])
    stream_calibrate(src, tmp_path / "cpu", method, _config(method, opts, "cpu"), ids)
    with accelerator() as acc:
        summary = stream_calibrate(src, tmp_path / "acc", method, _config(method, opts, "cuda"), ids)
    assert summary["device"] == str(ACC) and acc.mismatches == []
    assert acc.flops["acc"] > 0 and acc.flops["cpu"] == 0, acc.flops   # every counted product on the device
    assert_near(QuantizedModel.load(tmp_path / "cpu"), QuantizedModel.load(tmp_path / "acc"))


@pytest.mark.parametrize("arch,method,opts", IN_MEMORY, ids=[f"{a}-{m}" for a, m, _ in IN_MEMORY])
def test_in_memory_methods_run_on_the_device(ckpts, stand_in, arch, method, opts):
    ref = _in_memory(ckpts[arch], method, _config(method, opts, "cpu"))
    with accelerator() as acc:
        got = _in_memory(ckpts[arch], method, _config(method, opts, "cuda"))
    assert acc.mismatches == [] and acc.flops["acc"] > 0 and acc.flops["cpu"] == 0, acc.flops
    assert_near(ref, got)


@pytest.mark.parametrize("arch,method,opts", NO_FLOAT64, ids=[f"{a}-{m}" for a, m, _ in NO_FLOAT64])
def test_a_device_without_float64(ckpts, tmp_path, stand_in, monkeypatch, arch, method, opts):
    """MPS has no float64: sums are float32 there, MLX's float64 rounding runs on the CPU (a small share of the
    products), and the records are the CPU run's up to rounding."""
    src, ids = ckpts[arch], _ids(ckpts[arch])
    stream_calibrate(src, tmp_path / "cpu", method, _config(method, opts, "cpu"), ids)
    monkeypatch.setattr(macq.device, "NO_FLOAT64", ("mps", ACC.type))
    with accelerator(float64=False) as acc:
        stream_calibrate(src, tmp_path / "acc", method, _config(method, opts, "cuda"), ids)
    assert acc.mismatches == [] and acc.flops["acc"] >= 0.9 * (acc.flops["acc"] + acc.flops["cpu"]), acc.flops
    assert_near(QuantizedModel.load(tmp_path / "cpu"), QuantizedModel.load(tmp_path / "acc"))


def test_the_stand_in_refuses_what_cuda_refuses():
    """The harness itself: what CUDA refuses fails, what CUDA allows runs, products are counted per device."""
    a, c = torch.randn(4, 3), torch.randn(3, 2)
    ac = a @ c
    with accelerator(float64=False) as acc:
        x = a.to(ACC)
        assert x.device == ACC and (x * torch.tensor(2.0)).device == ACC          # a CPU scalar is allowed
        assert torch.equal(x[torch.tensor([2, 0])].cpu(), a[[2, 0]])              # so are CPU indices
        assert torch.equal((x @ c.to(ACC)).cpu(), ac)
        with pytest.raises(DeviceMismatch, match=r"aten.mm.default: accelerator tensors mixed with CPU tensors"):
            x @ c
        with pytest.raises(DeviceMismatch, match="float64 on an accelerator without float64"):
            x.double()
        with pytest.raises((TypeError, RuntimeError), match="numpy"):                # CUDA: TypeError
            x.numpy()
        assert torch.zeros(2, device=ACC).device == ACC and torch.tensor([1.0], device=ACC).device == ACC
    assert acc.flops == {"acc": 2 * 4 * 3 * 2, "cpu": 0} and len(acc.mismatches) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch,method,opts", STREAMED, ids=[f"{a}-{m}" for a, m, _ in STREAMED])
def test_streamed_methods_on_cuda(ckpts, tmp_path, arch, method, opts):
    src, ids = ckpts[arch], _ids(ckpts[arch])
    stream_calibrate(src, tmp_path / "cpu", method, _config(method, opts, "cpu"), ids)
    summary = stream_calibrate(src, tmp_path / "gpu", method, _config(method, opts, "cuda"), ids)
    assert summary["device"].startswith("cuda")
    assert_near(QuantizedModel.load(tmp_path / "cpu"), QuantizedModel.load(tmp_path / "gpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch,method,opts", IN_MEMORY, ids=[f"{a}-{m}" for a, m, _ in IN_MEMORY])
def test_in_memory_methods_on_cuda(ckpts, arch, method, opts):
    ref = _in_memory(ckpts[arch], method, _config(method, opts, "cpu"))
    assert_near(ref, _in_memory(ckpts[arch], method, _config(method, opts, "cuda")))
