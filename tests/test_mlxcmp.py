"""``scripts/benchmarks/bench_quality.py --runtime mlx`` (measured through mlx_lm): the mlx scoring agrees with the
torch scoring of the same records, the metrics equal a float64 recomputation, the MLX file size is MLX's
published layout, the macq CLI command a row runs builds the config the row stands for, and mlx-lm's own
quantizers run offline on given ids through ``scripts/benchmarks/mlx_lm_quant.py`` (and refuse what they refuse)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"
sys.path.insert(0, str(SCRIPTS))
bench = importlib.import_module("bench_quality")
rows = importlib.import_module("mlx_rows")

from macq.models import get_weight, quantizable_modules  # noqa: E402
from macq.qmodel import QuantizedModel  # noqa: E402
from macq.quantizers.rtn import RTNConfig, quantize_weight  # noqa: E402
from macq.tiny import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402
from mlx_backend import export_mlx, load_mlx  # noqa: E402


def rtn_qm(model, bits: int, group: int, zero_point: str = "int") -> QuantizedModel:
    recs = {n: quantize_weight(get_weight(m).detach().float(), RTNConfig(bits=bits, group_size=group, symmetric=False,
                                                                         zero_point=zero_point))
            for n, m in quantizable_modules(model, include_embeddings=True).items()}
    return QuantizedModel.from_model(model, recs, method={"method": "test-rtn"})


def text_ids(n: int) -> torch.Tensor:
    from macq.data import eval_tokens

    return eval_tokens(tiny_tokenizer(), "wiki", n)


def test_mlx_scores_match_torch_scores(tmp_path):
    """The same 3-bit records scored by torch (records dequantized into the HF model) and through mlx_lm (the
    MLX export, fp32 arithmetic) on the same windows against the same float reference: equal ppl / KL / top-1
    to the precision the fp16-stored norms allow. A wrong rope, layout or scoring offset moves them by far more."""
    model = tiny_model("llama3")                        # tied embedding/head, nested rope_parameters (as SmolLM2)
    qm = rtn_qm(model, 3, 32)
    export_mlx(qm, tmp_path / "mlx", tokenizer=tiny_tokenizer(), dtype="float16")
    ids, ctx = text_ids(300), 128
    ref = bench.window_logprobs(model, ids, ctx)
    t = bench.one_pass_scores(qm.to_torch(), ids, ref, ctx)
    m = bench.one_pass_scores(None, ids, ref, ctx, forward=bench.mlx_forward(load_mlx(tmp_path / "mlx", "float32")))
    assert t["kl"] > 0.05                               # the quantization is visible, so agreement means something
    assert m["ppl"] == pytest.approx(t["ppl"], rel=2e-3)
    assert m["kl"] == pytest.approx(t["kl"], rel=1e-2, abs=1e-3)
    assert abs(m["top1"] - t["top1"]) <= 2 / (ids.numel() - 3)


def test_one_pass_scores_equal_float64_recomputation():
    model, ids, ctx = tiny_model("llama"), text_ids(200), 64
    other = rtn_qm(model, 2, 32).to_torch()
    ref = bench.window_logprobs(model, ids, ctx)
    got = bench.one_pass_scores(other, ids, ref, ctx)
    nll, kl, top1, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for s in range(0, ids.numel() - 1, ctx):
            w = ids[s:s + ctx]
            if w.numel() < 2:
                continue
            p = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            q = torch.log_softmax(other(w[None]).logits[0, :-1].double(), -1)
            nll -= q.gather(1, w[1:, None]).sum().item()
            kl += (p.exp() * (p - q)).sum().item()
            top1 += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += w.numel() - 1
    assert n == ids.numel() - (ids.numel() + ctx - 1) // ctx
    assert got["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-5)
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert got["top1"] == pytest.approx(top1 / n, abs=1.5 / n)


@pytest.mark.parametrize("bits,group,expected", [(3, 64, 3.5), (4, 32, 5.0)])
def test_mlx_file_size_is_mlx_layout(tmp_path, bits, group, expected):
    """MLX's affine format: ``bits`` per code plus one fp16 scale and one fp16 bias per group."""
    model = tiny_model("llama3")
    export_mlx(rtn_qm(model, bits, group, "float"), tmp_path / "m", tokenizer=tiny_tokenizer(), dtype="float16")
    size = rows.mlx_file_size(tmp_path / "m")
    assert size["bpw"] == pytest.approx(expected, abs=1e-9)
    assert size["size_mib"] * 2**20 == sum(f.stat().st_size for f in (tmp_path / "m").glob("model*.safetensors"))


class _Args:
    calib_dataset, n_calib, seq_len, bits, group_size = "c4", 2, 32, 4, 32


def test_macq_row_command_builds_the_config_it_stands_for(tmp_path):
    """The child ``macq quantize`` command of a row, run for real, writes a manifest that ``same_settings``
    accepts for the row's options and rejects for any other bits or calibration (``--reuse`` relies on it)."""
    hf = save_tiny_model(tmp_path / "hf", "llama3")
    opts = {"bits": 4, "group_size": 32, "symmetric": False, "include_embeddings": True}
    class A(_Args):
        model = hf
    res = rows.run_child(rows.macq_cmd("awq", opts, A, tmp_path / "q"), tmp_path / "log")
    assert res["rc"] == 0, res["tail"]
    assert res["peak_mib"] > 50 and res["seconds"] > 0
    assert rows.same_settings(tmp_path / "q", "awq", opts, _Args)
    assert not rows.same_settings(tmp_path / "q", "awq", {**opts, "bits": 3}, _Args)

    class Other(_Args):
        n_calib = 3
    assert not rows.same_settings(tmp_path / "q", "awq", opts, Other)
    assert not rows.same_settings(tmp_path / "missing", "awq", opts, _Args)


def _tool(tmp_path, tool: str, hf: Path, bits: int, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    ids = np.asarray([text_ids(4 * 33)[i * 33:(i + 1) * 33].numpy() for i in range(4)], dtype=np.int32)
    np.save(tmp_path / "ids.npy", ids)

    class A(_Args):
        n_calib, seq_len, kl_holdout, dwq_repeat, kl_batch, dwq_lr = 4, 33, 1, 2, 1, 1e-3
    A.bits = bits
    out = tmp_path / f"{tool}-{bits}"
    cmd = rows.tool_cmd(f"mlx-{tool}", A, hf, tmp_path / "ids.npy", out) + list(extra)
    return out, rows.run_child(cmd, tmp_path / f"{tool}.log")


def test_mlx_lm_tools_run_offline_on_given_ids(tmp_path):
    """``mlx_lm.gptq`` and ``mlx_lm.dwq`` through the driver: no download (the patched data loader), every linear
    and the embedding quantized at the asked bits, fp16 scales, and the output loads in mlx_lm. dwq changes the
    scales of the RTN start it trains from (the ``mlx-convert`` row's, bit-exact codes)."""
    hf = save_tiny_model(tmp_path / "hf", "llama")
    conv, res = _tool(tmp_path, "convert", hf, 4)
    assert res["rc"] == 0, res["tail"]
    for tool in ("gptq", "dwq"):
        out, res = _tool(tmp_path, tool, hf, 4)
        assert res["rc"] == 0, res["tail"]
        cfg = json.loads((out / "config.json").read_text())["quantization"]
        assert cfg["bits"] == 4 and cfg["group_size"] == 32
        t = mx.load(str(out / "model.safetensors"))
        scales = [k for k in t if k.endswith(".scales")]
        assert "model.embed_tokens.scales" in scales and len(scales) == 2 * 7 + 2    # 7 linears/layer, emb, head
        assert all(t[k].dtype == mx.float16 for k in scales)
        assert rows.mlx_file_size(out)["bpw"] == pytest.approx(5.0)
        load_mlx(out, "float32")
    c, d = mx.load(str(conv / "model.safetensors")), mx.load(str(tmp_path / "dwq-4" / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj"
    assert mx.array_equal(c[k + ".weight"], d[k + ".weight"]).item()
    assert not mx.array_equal(c[k + ".scales"], d[k + ".scales"]).item()


def test_mlx_lm_gptq_refuses_3_bits(tmp_path):
    hf = save_tiny_model(tmp_path / "hf", "llama")
    _, res = _tool(tmp_path, "gptq", hf, 3)
    assert res["rc"] != 0
    assert any("Unsupported bits 3" in ln for ln in res["tail"])


def test_dwq_data_split_and_bad_holdout():
    ids = np.arange(12).reshape(4, 3)
    train, valid = importlib.import_module("mlx_lm_quant").dwq_data(ids, 1, 2)
    assert [t for t, _ in train] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] * 2 and valid == [([9, 10, 11], 0)]
    with pytest.raises(SystemExit, match="--dwq-valid 4"):
        importlib.import_module("mlx_lm_quant").dwq_data(ids, 4, 1)


def test_dense_kernels_equal_quantized_matmul_with_gradients():
    """The dequantize + matmul replacement (mlx_lm_quant.dense_quantized_kernels) gives mlx's quantized_matmul's
    outputs and its gradients to scales, biases and inputs (what dwq trains), for a layer and a tied head."""
    import mlx.nn as nn

    mx.random.seed(0)
    lin = nn.Linear(128, 48).to_quantized(group_size=32, bits=3)
    emb = nn.Embedding(40, 128).to_quantized(group_size=64, bits=4)
    x = mx.random.normal((2, 5, 128))

    def run():
        def loss(s, b, xx):
            lin.scales, lin.biases = s, b
            return (lin(xx) ** 2).sum() + (emb.as_linear(xx) ** 3).sum()
        out = mx.concatenate([lin(x).flatten(), emb.as_linear(x).flatten()])
        return out, mx.grad(loss, argnums=(0, 1, 2))(lin.scales, lin.biases, x)

    ref_out, ref_g = run()
    old = nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear
    try:
        importlib.import_module("mlx_lm_quant").dense_quantized_kernels()
        out, g = run()
    finally:
        nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear = old
    assert mx.allclose(out, ref_out, rtol=1e-5, atol=1e-4).item()
    for a, b in zip(g, ref_g):
        assert mx.abs(a).max().item() > 0
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-3 * mx.abs(b).max().item()).item()


def test_dense_mlx_scores_equal_quantized_kernels(tmp_path):
    """bench's mlx scoring with the layers dequantized by mlx (``dense_mlx``) equals scoring with mlx's quantized
    kernels on the same export."""
    model = tiny_model("llama3")
    export_mlx(rtn_qm(model, 3, 32), tmp_path / "mlx", tokenizer=tiny_tokenizer(), dtype="float16")
    ids, ctx = text_ids(200), 100
    ref = bench.window_logprobs(model, ids, ctx)
    q = bench.one_pass_scores(None, ids, ref, ctx, forward=bench.mlx_forward(load_mlx(tmp_path / "mlx", "float32")))
    dense = rows.dense_mlx(load_mlx(tmp_path / "mlx", "float32"))
    assert not any("Quantized" in type(m).__name__ for _, m in dense[0].named_modules())
    d = bench.one_pass_scores(None, ids, ref, ctx, forward=bench.mlx_forward(dense))
    assert d["ppl"] == pytest.approx(q["ppl"], rel=1e-5)
    assert d["kl"] == pytest.approx(q["kl"], rel=1e-4, abs=1e-6)
    assert d["top1"] == q["top1"]


def test_build_row_makes_scores_and_reuses(tmp_path):
    """bench's glue for one macq row and one mlx-lm row on a tiny tied Llama: child run, export, MLX dir that
    mlx_lm loads, info with the child's rusage; a second call with ``--reuse`` runs nothing."""
    hf = save_tiny_model(tmp_path / "hf", "llama3")
    np.save(tmp_path / "ids.npy", np.zeros((2, 32), np.int32))

    class A(_Args):
        model, reuse = hf, True
    opts = {"bits": 4, "group_size": 32, "symmetric": False, "include_embeddings": True}
    rtn = {**opts, "zero_point": "float"}                # uncalibrated: the command must carry no calibration flags
    for row, method, o in (("awq", "awq", opts), ("rtn", "rtn", rtn), ("mlx-convert", None, None)):
        mdir, info = rows.build_row(row, method, o, A, hf, tmp_path / "ids.npy", tmp_path / "w")
        assert mdir is not None and info["rc"] == 0 and "reused" not in info, info["tail"]
        assert rows.mlx_file_size(mdir)["bpw"] == pytest.approx(5.0)
        load_mlx(mdir, "float32")
        again, info2 = rows.build_row(row, method, o, A, hf, tmp_path / "ids.npy", tmp_path / "w")
        assert again == mdir and info2["reused"] and info2["seconds"] == info["seconds"]
