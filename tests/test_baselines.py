"""Each baseline runner's CPU path on a tiny model, the llm-compressor file protocol, the CUDA guards,
and the MLX run file (KL through MLX, bits per weight read from the export)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from macq.baselines import BaselineConfig, run_baseline
from macq.baselines import reference as llmc
from macq.errors import MacqError
from macq.tiny import save_tiny_model

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


def small(runner: str, **kw) -> BaselineConfig:
    base = dict(runner=runner, dataset="tinystories", max_tokens=200, context=64, prompt_len=8, new_tokens=2,
                repeats=1, threads=1, group_size=32, n_calib=2, seq_len=32)
    return BaselineConfig(**{**base, **kw})


def fp_ppl_with(tiny_dir, weights: dict[str, torch.Tensor]) -> float:
    """Independent reference: macq's torch evaluator on the float model carrying the given weights."""
    from macq.data import eval_tokens
    from macq.eval import perplexity
    from macq.models import load_model

    model, tok = load_model(str(tiny_dir))
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return perplexity(model, eval_tokens(tok, "tinystories", 200), context=64).ppl


def nf4_layer_bits(out: int, inp: int) -> int:
    """bnb 4-bit with double quant, blocksize 64, counted by hand: codes, 8-bit absmax codes, fp32
    second-level absmax per 256 blocks, the 256-entry fp32 nested code, the fp32 offset, the 16-entry code."""
    n = out * inp
    blocks = n // 64
    return n * 4 + blocks * 8 + math.ceil(blocks / 256) * 32 + 256 * 32 + 32 + 16 * 32


@pytest.mark.parametrize("runner", ["bnb-nf4", "bnb-fp4"])
def test_bnb_4bit_cpu(tiny_dir, runner):
    pytest.importorskip("bitsandbytes")
    run = run_baseline(str(tiny_dir), small(runner))
    assert run.runtime == "bitsandbytes Linear4bit" and run.device_kind == "cpu"
    assert len(run.layers) == 14 and all(r["equal"] for r in run.layers)   # bit-equal to macq's records
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    bits = sum(nf4_layer_bits(*shapes[r["layer"].rsplit(".", 1)[1]]) for r in run.layers)
    n = sum(o * i for o, i in shapes.values()) * 2
    assert run.metric("bits_per_weight") == pytest.approx(bits / n, rel=1e-12)
    # the library's kernels compute what its dequantized weights say (fp32 compute on CPU)
    from macq.baselines.bnb import BNB_RUNNERS, macq_record_for
    from macq.models import load_model

    fp, _ = load_model(str(tiny_dir), with_tokenizer=False)
    deq = {r["layer"]: macq_record_for(BNB_RUNNERS[runner], fp.get_submodule(r["layer"]).weight.detach()).dequantize()
           for r in run.layers}
    # bnb's CPU kernel may compute in bf16 (AVX512-BF16 repacking, said in the notes): bf16-level tolerance
    repacked = any("bf16" in n for n in run.notes)
    assert run.metric("ppl") == pytest.approx(fp_ppl_with(tiny_dir, deq), rel=5e-3 if repacked else 1e-4)
    assert 0 < run.metric("kl") < 0.5 and 0 < run.metric("top1") <= 1
    assert run.metric("decode_tokens_per_s") > 0 and run.metric("prefill_ms_per_token") > 0


def test_bnb_int8_cpu(tiny_dir):
    """LLM.int8 runs on CPU with bitsandbytes 0.50.2; its dequantized weights are what its kernel uses."""
    bnb = pytest.importorskip("bitsandbytes")
    from macq.baselines.bnb import BNB_RUNNERS, dequantized_weight, load_bnb, quantized_layers

    run = run_baseline(str(tiny_dir), small("bnb-int8"))
    assert run.runtime == "bitsandbytes Linear8bitLt"
    in_dims = {"down_proj": 128}
    expect = sum((r["n"] * 8 + r["n"] // in_dims.get(r["layer"].rsplit(".", 1)[1], 64) * 32) for r in run.layers)
    assert run.metric("bits_per_weight") == pytest.approx(expect / sum(r["n"] for r in run.layers), rel=1e-12)
    assert run.metric("kl") < 5e-3
    model = load_bnb(str(tiny_dir), BNB_RUNNERS["bnb-int8"], torch.device("cpu"))
    name, mod = next(iter(quantized_layers(model).items()))
    assert isinstance(mod, bnb.nn.Linear8bitLt)
    x = torch.randn(3, mod.in_features) * 0.5            # |x| < 6: no outlier decomposition
    w = dequantized_weight(mod)
    with torch.no_grad():
        y = mod(x).float()
        y_ref = x @ w.T + (mod.bias.float() if mod.bias is not None else 0)
    assert torch.allclose(y, y_ref, atol=2e-2, rtol=2e-2)  # the int8 kernel computes in fp16


def test_bnb_4bit_kernel_matches_dequantized(tiny_dir):
    """What Linear4bit computes is x @ W_deq^T, W_deq from bnb's own dequantizer (taken before the first
    forward, which may repack the layer for the bf16 CPU kernel; dequantizing after that is refused)."""
    pytest.importorskip("bitsandbytes")
    from macq.baselines.bnb import BNB_RUNNERS, cpu_repacked, dequantized_weight, load_bnb, quantized_layers

    model = load_bnb(str(tiny_dir), BNB_RUNNERS["bnb-nf4"], torch.device("cpu"))
    mod = next(iter(quantized_layers(model).values()))
    w = dequantized_weight(mod)
    x = torch.randn(3, mod.in_features)
    with torch.no_grad():
        y = mod(x)
    tol = 3e-2 if cpu_repacked(mod) else 1e-5                # bf16 kernel vs fp32
    assert torch.allclose(y, x @ w.T, atol=tol * float((x @ w.T).abs().max()))
    if cpu_repacked(mod):
        with pytest.raises(MacqError, match="repacked for bnb's bf16 CPU kernel"):
            dequantized_weight(mod)


def test_fp16_cpu(tiny_dir):
    run = run_baseline(str(tiny_dir), small("fp16"))
    assert run.metric("bits_per_weight") == 16 and run.metric("kl") < 1e-4
    assert run.runtime.startswith("torch (fp16 weights")
    assert run.metric("decode_ms_per_token") > 0 and "RSS" in run.metrics["peak_memory"].unit


def test_runner_errors(tiny_dir, monkeypatch):
    with pytest.raises(MacqError, match="--runner 'bnb-q2': expected one of"):
        small("bnb-q2")
    with pytest.raises(MacqError, match="--device 'tpu'"):
        small("fp16", device="tpu")
    monkeypatch.setenv("MACQ_LLMC_VENV", "/nonexistent/venv")
    for runner in ("gptq", "awq"):
        with pytest.raises(MacqError, match=f"--runner {runner} runs llmcompressor==0.14.0.1 in its own venv, not found "
                                            "at /nonexistent/venv: create it with `bash scripts/setup_reference_venv.sh`"):
            run_baseline(str(tiny_dir), small(runner))


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal where CUDA is absent")
def test_cuda_refused_without_gpu(tiny_dir, tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, "-m", "macq.cli", "baseline", str(tiny_dir), "--runner", "bnb-nf4",
                        "--device", "cuda", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: --device cuda: no CUDA device here") and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA-only path: runs where an NVIDIA GPU is present")
@pytest.mark.parametrize("runner", ["bnb-nf4", "bnb-int8", "fp16"])
def test_cuda_runners(tiny_dir, runner):
    pytest.importorskip("bitsandbytes")
    run = run_baseline(str(tiny_dir), small(runner, device="cuda"))
    assert run.device_kind == "cuda" and "CUDA" in run.metrics["peak_memory"].unit
    assert run.metric("kl") < 0.5 and run.metric("decode_tokens_per_s") > 0


def test_worker_protocol_failure_is_one_line(tmp_path, monkeypatch):
    """A venv whose Python lacks llm-compressor: the worker's own error comes back as one line."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    monkeypatch.setenv("MACQ_LLMC_VENV", str(venv))
    req = {"method": "gptq", "model_dir": str(tmp_path), "bits": 4, "group_size": 32, "symmetric": True,
           "damp": 0.01, "device": "cpu", "threads": 1}
    with pytest.raises(MacqError, match=r"--runner gptq: llm-compressor worker failed \(ModuleNotFoundError: "):
        llmc.run_worker("gptq", req, torch.zeros(1, 8, dtype=torch.long), tmp_path / "work")
    assert (tmp_path / "work" / "request.json").is_file() and (tmp_path / "work" / "calib.safetensors").is_file()


@pytest.mark.skipif(not (llmc.venv_dir() / "bin" / "python").is_file(), reason="reference venv not built "
                    "(bash scripts/setup_reference_venv.sh)")
def test_llmc_gptq_real(tiny_dir, tmp_path):
    """llm-compressor's GPTQ for real: weights on its own symmetric 4-bit grid, evaluated by macq."""
    from macq.data import calibration_samples
    from macq.models import load_model

    _, tok = load_model(str(tiny_dir))
    req = {"method": "gptq", "model_dir": str(tiny_dir), "bits": 4, "group_size": 32, "symmetric": True,
           "damp": 0.01, "device": "cpu", "threads": 1}
    tensors, res = llmc.run_worker("gptq", req, calibration_samples(tok, "c4", 2, 32), tmp_path / "w")
    names = llmc.layer_names(tensors)
    assert len(names) == 14 and res["versions"]["llmcompressor"] == "0.14.0.1"
    for name in names:
        w, s = tensors[name + ".weight"], tensors[name + ".weight_scale"].float()
        q = w.view(w.shape[0], -1, 32) / s.view(w.shape[0], -1, 1)
        assert torch.allclose(q, q.round(), atol=1e-3) and q.round().min() >= -8 and q.round().max() <= 7
    run = run_baseline(str(tiny_dir), small("gptq", work_dir=str(tmp_path / "w2")))
    assert run.metric("bits_per_weight") == pytest.approx(4 + 16 / 32)   # fp16 scale per 32, no zero-point
    assert "decode_tokens_per_s" not in run.metrics and len(run.layers) == 14


def test_mlx_eval_run_file(tiny_dir, tmp_path):
    """``macq eval EXPORT --reference --out``: KL through MLX equals KL through torch on the same weights,
    bits per weight read back from the export's tensors, model hash = the source model's."""
    pytest.importorskip("mlx_lm")
    from macq.data import eval_tokens
    from macq.eval import agreement
    from macq.evaluate import evaluate_any
    from macq.models import load_model
    from macq.pipeline import quantize
    from macq.results import model_hash
    from macq.runs import run_from_eval
    from mlx_backend import export_mlx

    fp, tok = load_model(str(tiny_dir))
    qm = quantize(fp, tok, "rtn", {"bits": 4, "group_size": 32, "symmetric": False}, source=str(tiny_dir))
    path = tmp_path / "mlx"
    export_mlx(qm, path, tokenizer=tok, dtype="float32")
    res, _ = evaluate_any(str(path), dataset="tinystories", context=64, max_tokens=200, reference=str(tiny_dir))
    ids = eval_tokens(tok, "tinystories", 200)
    ag = agreement(fp, qm.to_torch(), ids, context=64)
    assert res["kl"] == pytest.approx(ag.kl, rel=2e-3, abs=1e-6) and res["top1"] == pytest.approx(ag.top1, abs=0.02)
    run = run_from_eval(res, str(path), "tinystories", 64, None, 200)
    assert run.runtime == "mlx" and run.model_hash == model_hash(tiny_dir) is not None
    assert run.metric("bits_per_weight") == pytest.approx(4 + 2 * 32 / 32)   # fp32 scale + bias per 32
    assert run.metric("kl") == res["kl"] and Path(path).is_dir()


def test_macq_dir_size_counts_tied_embedding_once(tmp_path):
    """The run file's size of a macq dir equals the evaluator's own size report (ties counted once)."""
    from macq.eval import model_size_report
    from macq.pipeline import quantize
    from macq.runs import macq_dir_bytes
    from macq.tiny import tiny_model, tiny_tokenizer

    fp = tiny_model("qwen2")                                   # tie_word_embeddings=True
    qm = quantize(fp, tiny_tokenizer(), "nf4", {"block_size": 64})
    path = qm.save(tmp_path / "q")
    assert macq_dir_bytes(path) == model_size_report(qm, fp)["quantized_bytes"]
    assert macq_dir_bytes(path) < qm.nbytes()                  # nbytes charges the tied copy twice
