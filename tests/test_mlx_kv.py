"""Quantized KV cache through mlx_lm (``QuantizedKVCache``, what ``--kv-bits`` decodes with): the one-forward
evaluation equals decoding token by token through that cache, and the rows order as they must."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from macq.errors import MacqError  # noqa: E402
from macq.quantizers import quantize_model  # noqa: E402
from macq.quantizers.rtn import RTNConfig  # noqa: E402
from macq.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from mlx_backend import export_mlx, load_mlx  # noqa: E402
from mlx_backend.runner import eval_mlx_kv, kv_logits_fn  # noqa: E402

DIMS = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)   # one KV group per head


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    qm = quantize_model(tiny_model("llama", **DIMS), "rtn", RTNConfig(mode="mxfp4"))
    out = tmp_path_factory.mktemp("kv") / "m"
    export_mlx(qm, out, tokenizer=tiny_tokenizer(), dtype="float32")
    return out


@pytest.fixture(scope="module")
def loaded(path):
    return load_mlx(path)


def test_one_forward_equals_token_by_token_decoding(loaded):
    from mlx_lm.models.cache import QuantizedKVCache

    net, _ = loaded
    ids = np.array([[3, 17, 101, 7, 250, 33, 480, 12, 64, 9, 300, 2, 45, 200, 150, 99]])
    ours = kv_logits_fn(loaded, kv_bits=4, kv_group_size=32)(ids)[0]
    cache = [QuantizedKVCache(group_size=32, bits=4) for _ in net.layers]
    steps = [np.array(net(mx.array(ids[:, t:t + 1].astype(np.int32)), cache=cache).astype(mx.float32))[0, 0]
             for t in range(ids.shape[1])]
    np.testing.assert_allclose(ours, np.stack(steps), rtol=0, atol=2e-4 * float(np.abs(ours).max()))
    plain = kv_logits_fn(loaded)(ids)[0]
    assert float(np.abs(plain - ours).max()) > 1e-3       # 4-bit keys / values really changed the logits


def test_rows_order_by_bits(loaded):
    rows = eval_mlx_kv(loaded, kv_bits=(8, 4, 2), dataset="tinystories", context=128, max_tokens=256,
                       kv_group_size=32)
    assert [r["kv_bits"] for r in rows] == [None, 8, 4, 2]
    assert rows[0]["kl"] == 0.0 and len({r["n_tokens"] for r in rows}) == 1 and rows[0]["n_tokens"] > 200
    kl = [r["kl"] for r in rows[1:]]
    assert 0 < kl[0] < kl[1] < kl[2]
    assert abs(rows[1]["ppl"] / rows[0]["ppl"] - 1) < 0.01


def test_refusals(loaded):
    with pytest.raises(MacqError, match="--kv-bits 7: a quantized KV cache holds 2, 3, 4, 5, 6, 8 bits"):
        eval_mlx_kv(loaded, kv_bits=(7,))
    with pytest.raises(MacqError, match="--kv-group-size 16: expected one of 32, 64, 128"):
        eval_mlx_kv(loaded, kv_group_size=16)


def test_cli_eval_kv_bits(path, capsys):
    import json

    from macq.cli import main

    main(["eval", str(path), "--kv-bits", "8", "--kv-bits", "4", "--kv-group-size", "32", "--context", "128",
          "--max-tokens", "256", "--dataset", "tinystories", "--json"])
    rows = json.loads(capsys.readouterr().out)["kv_rows"]
    assert [r["kv"] for r in rows] == ["float", "8-bit g32", "4-bit g32"] and rows[2]["kl"] > rows[1]["kl"] > 0
    with pytest.raises(SystemExit) as e:
        main(["eval", str(path), "--kv-bits", "7"])
    assert e.value.code == 2
    assert "error: --kv-bits 7: a quantized KV cache holds" in capsys.readouterr().err


# ---------------------------------------------------------------- the torch simulation against mlx_lm's cache
@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    qm = quantize_model(tiny_model("llama", **DIMS), "rtn", RTNConfig(mode="mxfp4"))
    return qm.save(tmp_path_factory.mktemp("kvq") / "q", tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (2, 32)])
def test_fake_quantize_kv_equals_mx_quantize(bits, group):
    import torch

    from macq.eval.kvsim import fake_quantize_kv

    x = np.random.default_rng(bits).standard_normal((3, 5, 7, 128)).astype(np.float32) * 4
    x[0, 0, 0, :group] = 0.5                       # a constant group (zero range)
    ref = mx.dequantize(*mx.quantize(mx.array(x), group_size=group, bits=bits), group_size=group, bits=bits)
    ours = fake_quantize_kv(torch.from_numpy(x), bits, group).numpy()
    step = float(np.abs(x).max()) * 2 / (2 ** bits - 1)
    np.testing.assert_allclose(ours, np.array(ref), rtol=0, atol=1e-5 * step)


def test_torch_simulation_matches_mlx_lm_cache(path, qdir):
    from macq.evaluate import evaluate_kv

    kw = dict(dataset="tinystories", context=128, max_tokens=256, kv_group_size=32)
    mlx_rows = evaluate_kv(str(path), [8, 4], **kw)[0]["kv_rows"]
    sim = evaluate_kv(str(qdir), [8, 4], **kw)[0]
    assert sim["kv_runtime"].startswith("torch")
    for m, t in zip(mlx_rows, sim["kv_rows"]):
        assert m["kv"] == t["kv"]
        assert abs(t["ppl"] / m["ppl"] - 1) < 1e-4, (m, t)
    for b in (1, 2):                               # KL of each KV width against its float-KV row
        assert abs(sim["kv_rows"][b]["kl"] / mlx_rows[b]["kl"] - 1) < 1e-2, (mlx_rows, sim["kv_rows"])


def test_torch_simulation_refusals(qdir, tmp_path):
    from macq.evaluate import evaluate_kv

    with pytest.raises(MacqError, match="--kv-group-size 64: does not divide the model's head dim 32"):
        evaluate_kv(str(qdir), [4], kv_group_size=64)
    pkg = tmp_path / "m.mlpackage"
    pkg.mkdir()
    with pytest.raises(MacqError, match="--kv-bits: needs a checkpoint, a macq quantization or an MLX export"):
        evaluate_kv(str(pkg), [4])
