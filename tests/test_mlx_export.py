"""End to end through the real loader: export tiny Llama / Qwen2 / GPT-2 with mixed-precision records,
``mlx_lm.load`` them, and compare logits with torch carrying the same dequantized weights, the weights
mlx_lm dequantizes with the records', and an RTN "float" export with ``mlx_lm.convert`` byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from macq.models import get_weight, is_conv1d, quantizable_modules  # noqa: E402
from macq.qmodel import QuantizedModel  # noqa: E402
from macq.quantizers.rtn import RTNConfig, quantize_weight  # noqa: E402
from macq.tiny import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402
from mlx_backend import eval_mlx, export_mlx, generate_mlx, load_mlx, mlx_logits  # noqa: E402
from mlx_backend.layout import mlx_arch, mlx_name  # noqa: E402

# (bits, group, symmetric, zero_point): symmetric, integer zero-point and MLX bias forms, 2..8 bits.
FORMS = [(4, 32, True, "int"), (3, 64, False, "int"), (8, 32, False, "float"), (2, 64, True, "int"),
         (5, 32, False, "float"), (6, 64, False, "int")]
IDS = np.array([3, 17, 101, 7, 250, 33, 480, 12, 64, 9, 300, 2, 45, 200, 150, 99], dtype=np.int64)


def mixed_qm(arch: str, **overrides) -> QuantizedModel:
    """Every linear + the embedding (+ untied lm_head) quantized, forms cycling through FORMS."""
    model = tiny_model(arch, **overrides)
    records = {}
    for i, (name, mod) in enumerate(quantizable_modules(model, include_embeddings=True, include_lm_head=True).items()):
        bits, group, sym, zp = FORMS[i % len(FORMS)]
        rec = quantize_weight(get_weight(mod).detach().float(),
                              RTNConfig(bits=bits, group_size=group, symmetric=sym, zero_point=zp))
        rec.transposed = is_conv1d(mod)
        records[name] = rec
    return QuantizedModel.from_model(model, records, method={"method": "test-mixed"})


def torch_logits(qm: QuantizedModel) -> np.ndarray:
    with torch.no_grad():
        return qm.to_torch()(torch.from_numpy(IDS)[None]).logits[0].numpy()


def loaded_dequantized(model, path: str) -> tuple[object, np.ndarray]:
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    w = mx.dequantize(mod.weight, mod.scales, mod.biases, mod.group_size, mod.bits)
    return mod, np.array(w.astype(mx.float32))


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {"rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}}),  # mlx default is 10000
    ("qwen2", {}),                                                                   # mlx default is 1e6
    ("gpt2", {}),
])
def test_round_trip_fp16(tmp_path, arch, overrides):
    qm = mixed_qm(arch, **overrides)
    res = export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float16")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"]
    assert len([k for k in cfg["quantization"] if "." in k]) > 0           # mixed precision -> overrides
    assert 2 < res.bits_per_weight < 9 and res.bytes_on_disk > 0

    model, tok = load_mlx(tmp_path / "m")
    lm, lt = mlx_logits((model, tok), IDS), torch_logits(qm)
    rel = float(np.abs(lm - lt).max() / np.abs(lt).max())
    print(f"\n{arch}: fp16 export vs torch(dequantized records) logits max rel err {rel:.2e}")
    assert rel < 1e-2

    arch_t = mlx_arch(qm.config.model_type)
    worst = 0.0
    for name, rec in qm.records.items():
        mod, w_mlx = loaded_dequantized(model, mlx_name(name, arch_t))
        assert (mod.bits, mod.group_size) == (rec.bits, rec.group_size), name
        # MLX's fp16 kernel: fl16(fl16(s*q) + b16); reproduce it from the record's codes -> exact.
        s16 = rec.scales.half().repeat_interleave(rec.group_size, 1).numpy()
        b16 = rec.effective_biases().half().repeat_interleave(rec.group_size, 1).numpy()
        emulated = ((s16 * rec.codes.numpy().astype(np.float16)).astype(np.float16) + b16).astype(np.float32)
        np.testing.assert_array_equal(w_mlx, emulated, err_msg=name)
        # ... and vs the record's exact dequantization: three fp16 roundings (bias, s*q, sum), each
        # <= half an ulp of the largest magnitude involved.
        ref = rec.dequantize().numpy()
        sq = s16.astype(np.float32) * rec.codes.numpy()
        mag = np.maximum.reduce([np.abs(ref), np.abs(b16.astype(np.float32)), np.abs(sq)])
        err = np.abs(w_mlx - ref)
        assert (err <= 1.5 * np.spacing(mag.astype(np.float16)).astype(np.float32)).all(), name
        if rec.symmetric:   # symmetric: the bias is exact, only fp16 arithmetic remains
            assert np.array_equal(rec.effective_biases().half().float().numpy(), rec.effective_biases().numpy())
        worst = max(worst, float(err.max()))
    print(f"{arch}: max |mlx dequant - record dequant| = {worst:.2e}")


def test_float32_export_dequantizes_exactly(tmp_path):
    """With float32 storage the bias -s*z is exact, so mlx_lm's dequantized weights equal the records'."""
    qm = mixed_qm("llama")
    export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float32")
    model, tok = load_mlx(tmp_path / "m")
    for name, rec in qm.records.items():
        _, w = loaded_dequantized(model, name)
        np.testing.assert_array_equal(w, rec.dequantize().numpy(), err_msg=name)
    rel = float(np.abs(mlx_logits((model, tok), IDS) - torch_logits(qm)).max() / np.abs(torch_logits(qm)).max())
    print(f"\nllama fp32 export: logits max rel err {rel:.2e}")
    assert rel < 1e-4


def test_sharded_export_loads_identically(tmp_path):
    qm = mixed_qm("qwen2")
    export_mlx(qm, tmp_path / "one", tokenizer=tiny_tokenizer())
    res = export_mlx(qm, tmp_path / "many", tokenizer=tiny_tokenizer(), shard_bytes=20_000)
    shards = sorted(p.name for p in res.path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (res.path / "model.safetensors").exists()
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    np.testing.assert_array_equal(mlx_logits(tmp_path / "one", IDS), mlx_logits(tmp_path / "many", IDS))


def test_rtn_float_export_is_byte_identical_to_mlx_lm_convert(tmp_path):
    """macq RTN in MLX's bias form on fp16-rounded weights == mlx_lm.convert -q (which casts to fp16
    first), tensor for tensor, including the quantized embedding and lm_head."""
    from mlx_lm.convert import convert

    hf = save_tiny_model(tmp_path / "hf", "llama")
    convert(str(hf), str(tmp_path / "ref"), quantize=True, q_bits=4, q_group_size=32, dtype="float16")
    model = tiny_model("llama").half().float()
    cfg = RTNConfig(bits=4, group_size=32, symmetric=False, zero_point="float", include_embeddings=True,
                    include_lm_head=True)
    records = {n: quantize_weight(get_weight(m).detach().float(), cfg)
               for n, m in quantizable_modules(model, True, True).items()}
    qm = QuantizedModel.from_model(model, records)
    export_mlx(qm, tmp_path / "ours", tokenizer=hf, dtype="float16")
    ref = mx.load(str(tmp_path / "ref" / "model.safetensors"))
    ours = mx.load(str(tmp_path / "ours" / "model.safetensors"))
    assert ref.keys() == ours.keys()
    for k in ref:
        assert ref[k].dtype == ours[k].dtype, k
        assert mx.array_equal(ref[k], ours[k]).item(), k
    q_ref = json.loads((tmp_path / "ref" / "config.json").read_text())["quantization"]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization"] == q_ref


def test_runner_generate_and_eval_match_torch(tmp_path):
    from macq.data import eval_tokens
    from macq.eval.perplexity import perplexity

    qm = mixed_qm("llama")
    path = export_mlx(qm, tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float32").path
    text = generate_mlx(path, "Once upon a time", max_tokens=8, chat=True)   # no template: plain prompt
    assert isinstance(text, str) and len(text) > 0
    res = eval_mlx(path, dataset="tinystories", context=64, max_tokens=200, speed_prompt=16, speed_tokens=4)
    ref = perplexity(qm.to_torch(), eval_tokens(tiny_tokenizer(), "tinystories", 200), context=64)
    assert res["n_tokens"] == ref.n_tokens
    assert abs(res["ppl"] - ref.ppl) / ref.ppl < 1e-4
    assert res["tokens_per_s"] > 0 and res["prefill_tokens_per_s"] > 0
