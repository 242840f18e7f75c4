"""Streaming quantization and MLX export on tiny checkpoints: the streamed path must give the
in-memory path's records bit for bit, write valid sharded safetensors, stay within one tensor of memory, and
leave nothing behind when interrupted."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import macq.streaming as streaming
from macq.errors import MacqError
from macq.models import load_model
from macq.pipeline import config_for, quantize
from macq.qmodel import QuantizedModel
from macq.shards import SafetensorsFile, ShardWriter, TensorStore
from macq.tiny import save_tiny_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {a: save_tiny_model(root / a, a) for a in ("llama", "qwen2", "gpt2")}


CASES = [
    ("llama", "rtn", dict(bits=4, group_size=32)),
    ("qwen2", "rtn", dict(bits=3, group_size=32, symmetric=False, zero_point="float", include_embeddings=True)),
    ("gpt2", "rtn", dict(bits=4, group_size=0, symmetric=False, mse_clip=True)),
    ("llama", "nf4", dict(block_size=32, include_lm_head=True)),
    ("gpt2", "fp4", dict(block_size=64)),
    ("qwen2", "kmeans", dict(bits=3, granularity="per_grouped_channel", group_size=16)),
]


def assert_same_records(a: QuantizedModel, b: QuantizedModel) -> None:
    assert list(a.records) == list(b.records) or set(a.records) == set(b.records)
    for k in a.records:
        ra, rb = a.records[k], b.records[k]
        assert ra.meta() == rb.meta(), k
        ta, tb = ra.to_tensors(), rb.to_tensors()
        assert ta.keys() == tb.keys(), k
        for f in ta:
            assert ta[f].dtype == tb[f].dtype and torch.equal(ta[f], tb[f]), f"{k}.{f}"


@pytest.mark.parametrize("arch,method,opts", CASES, ids=[f"{a}-{m}" for a, m, _ in CASES])
def test_streamed_records_equal_in_memory(ckpts, tmp_path, arch, method, opts):
    cfg = config_for(method, opts)
    out = tmp_path / "s"
    summary = streaming.stream_quantize(ckpts[arch], out, method, cfg, shard_bytes=20_000)
    model, tok = load_model(str(ckpts[arch]))
    ref = quantize(model, tok, method, cfg)
    got = QuantizedModel.load(out)
    assert_same_records(ref, got)
    assert got.tied == ref.tied
    assert set(got.float_tensors) == set(ref.float_tensors)
    for k, t in ref.float_tensors.items():   # values equal; the stream keeps the checkpoint dtype
        assert torch.equal(t, got.float_tensors[k].to(t.dtype)), k
    assert summary["bits_per_weight"] == pytest.approx(ref.bits_per_weight(), abs=1e-4)
    assert summary["bytes"] == ref.nbytes()
    index = json.loads((out / "records.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1          # 20 kB shards: really sharded
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref.to_torch()(x).logits, got.to_torch()(x).logits)


def test_row_blocks_give_identical_records(ckpts, tmp_path, monkeypatch):
    cfg = config_for("rtn", dict(bits=4, group_size=32, symmetric=False, zero_point="float", include_embeddings=True))
    streaming.stream_quantize(ckpts["llama"], tmp_path / "a", "rtn", cfg)
    monkeypatch.setattr(streaming, "ROW_BLOCK_ELEMS", 64 * 3)  # 3 rows per block: uneven last block too
    streaming.stream_quantize(ckpts["llama"], tmp_path / "b", "rtn", cfg)
    assert_same_records(QuantizedModel.load(tmp_path / "a"), QuantizedModel.load(tmp_path / "b"))


def test_shard_writer_files_open_in_safetensors_and_mlx(tmp_path):
    import mlx.core as mx
    import numpy as np

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16), "b": torch.arange(9, dtype=torch.int32),
               "c": torch.randint(0, 2**31, (3, 4), dtype=torch.int64).to(torch.uint32), "d": torch.randn(300, generator=g),
               "e": torch.zeros(0, 3)}
    w = ShardWriter(tmp_path, "model", shard_bytes=1000, metadata={"format": "mlx"})
    w.add_all(tensors)
    files = w.close()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    store = TensorStore.open(tmp_path, "model")
    for k, t in tensors.items():
        assert torch.equal(store[k], t) and store[k].dtype == t.dtype
    assert torch.equal(store.get_rows("a.weight", 2, 5), tensors["a.weight"][2:5])
    assert torch.equal(store.get_rows("d", 290, 400), tensors["d"][290:])
    for f in files:
        with safe_open(f, "pt") as sf:
            assert sf.metadata() == {"format": "mlx"}
            for k in sf.keys():
                assert torch.equal(sf.get_tensor(k), tensors[k])
        for k, v in mx.load(str(f)).items():
            assert np.array_equal(np.array(v.astype(mx.float32)), tensors[k].float().numpy())
    assert SafetensorsFile(files[0]).metadata == {"format": "mlx"}
    with pytest.raises(MacqError, match="written twice"):
        w2 = ShardWriter(tmp_path / ".", "x")
        w2.add("k", torch.ones(1))
        w2.add("k", torch.ones(1))


def test_interrupted_run_leaves_nothing(ckpts, tmp_path, monkeypatch):
    from macq.quantizers import rtn

    calls = {"n": 0}
    real = rtn.quantize_weight

    def failing(w, cfg):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as Ctrl-C mid-run
        return real(w, cfg)

    monkeypatch.setattr(rtn, "quantize_weight", failing)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        streaming.stream_quantize(ckpts["llama"], out, "rtn", config_for("rtn", dict(group_size=32)))
    assert calls["n"] == 5 and not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_checkpoint_fails_before_work(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["llama"], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    from safetensors.torch import save_file

    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(MacqError, match="missing model.layers.1.mlp.down_proj.weight"):
        streaming.stream_quantize(bad, tmp_path / "o", "rtn", config_for("rtn", dict(group_size=32)))
    assert not (tmp_path / "o").exists()
    from macq.plan import Request, make_plan

    src = str(ckpts["llama"])
    with pytest.raises(MacqError, match="--stream: --method dkm runs on the in-memory path only"):
        make_plan(Request(src, tmp_path / "p", method="dkm", stream=True))
    assert make_plan(Request(src, tmp_path / "p", method="gptq")).route == "stream-layers"   # calibrated: streams too
    assert make_plan(Request(src, tmp_path / "p", target="mlx", method="gptq")).route == "stream-layers"
    assert make_plan(Request(src, tmp_path / "p", target="mlx", method="rtn")).route == "stream"
    assert make_plan(Request(src, tmp_path / "p", target="mlx", method="rtn", stream=False)).route == "memory"
    assert not (tmp_path / "p").exists()


def test_memory_stays_one_tensor(ckpts, tmp_path):
    """A checkpoint whose float32 weights are ~200 MB quantizes with its RSS growing by under a third of that
    (one tensor at a time, largest 1 M weights), measured with the kernel's reset peak after a warm-up run
    (imports). The in-memory path would hold the whole float32 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from macq.eval.memory import measure_peak_detail

    cfg = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    src = tmp_path / "m"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    from macq.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(src)
    fp32_bytes = sum(t.numel() * 4 for t in load_file(src / "model.safetensors").values())
    assert fp32_bytes > 190e6
    rcfg = config_for("rtn", dict(bits=4, group_size=64))
    streaming.stream_quantize(ckpts["llama"], tmp_path / "warm", "rtn", rcfg)
    _, peak = measure_peak_detail(lambda: streaming.stream_quantize(src, tmp_path / "q", "rtn", rcfg))
    if peak.delta_bytes is None:
        pytest.skip("no /proc RSS on this platform")
    assert peak.delta_bytes < fp32_bytes / 3, peak


def test_streamed_mlx_export_equals_in_memory_and_loads(ckpts, tmp_path):
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from macq.plan import Request, run
    from macq.qmodel import write_items
    from mlx_backend import export_mlx
    from mlx_backend.export import MLXWriter

    for arch in ("llama", "qwen2", "gpt2"):
        cfg = config_for("rtn", dict(bits=4, group_size=32, symmetric=False, zero_point="float",
                                     include_embeddings=True))
        model, tok = load_model(str(ckpts[arch]))
        ref = quantize(model, tok, "rtn", cfg)
        export_mlx(ref, tmp_path / f"{arch}-mem", tokenizer=tok)
        sp = streaming.plan_stream(ckpts[arch], cfg)
        with MLXWriter.create(tmp_path / f"{arch}-st", sp.config, shard_bytes=50_000) as w:
            write_items(w, streaming.iter_quantized(sp, "rtn", cfg))
            w.close(cfg.to_dict(), str(ckpts[arch]), sp.src)
        assert w.result.record_bits_per_weight == pytest.approx(ref.bits_per_weight())
        streaming.stream_quantize(ckpts[arch], tmp_path / f"{arch}-q", "rtn", cfg)
        run(Request(str(tmp_path / f"{arch}-q"), tmp_path / f"{arch}-dir", target="mlx"))
        mem = TensorStore.open(tmp_path / f"{arch}-mem")
        for variant in ("st", "dir"):
            got = TensorStore.open(tmp_path / f"{arch}-{variant}")
            assert set(got) == set(mem)
            for k in mem:
                assert torch.equal(got[k], mem[k]), (arch, variant, k)
        assert len(list((tmp_path / f"{arch}-st").glob("model-*-of-*.safetensors"))) > 1
        cfg_mem = json.loads((tmp_path / f"{arch}-mem" / "config.json").read_text())
        cfg_st = json.loads((tmp_path / f"{arch}-st" / "config.json").read_text())
        assert cfg_st["quantization"] == cfg_mem["quantization"]
        m, _ = load(str(tmp_path / f"{arch}-st"), lazy=True)
        ids = mx.array([[1, 2, 3, 4]])
        m2, _ = load(str(tmp_path / f"{arch}-mem"))
        assert np.array_equal(np.array(m(ids)), np.array(m2(ids)))


def test_cli_streams_weight_methods_and_reports_memory(ckpts, tmp_path, capsys):
    """The first command runs in its own process (its peak RSS is a fresh interpreter's); the others call the
    console entry point in-process (the same argv and outputs, no interpreter start-up)."""
    from tests.test_cli import macq
    from tests.test_stream_calib import _main

    def run(*args, check=True):
        r = _main(capsys, *args)
        assert not check or r.returncode == 0, r.stderr
        return r

    out = tmp_path / "q"
    # --target mlx: the same (MLX) defaults as the export below, so the two routes must give the same tensors
    r = macq("quantize", ckpts["llama"], "--method", "rtn", "--bits", "4", "--group-size", "32", "--target", "mlx",
             "-o", out, "--json")
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["layers"] == 14
    assert res["memory"]["peak_rss_bytes"] > 50 * 2**20
    assert r.stderr.count("layer: ") == 0          # --json: no progress
    r = run("quantize", ckpts["llama"], "--method", "rtn", "--bits", "4", "--group-size", "32", "--target", "mlx",
            "--no-stream", "-o", tmp_path / "q2")
    assert_same_records(QuantizedModel.load(out), QuantizedModel.load(tmp_path / "q2"))
    r = run("export", ckpts["llama"], "--target", "mlx", "--method", "rtn", "--bits", "4", "--group-size", "32",
            "-o", tmp_path / "mlx")
    assert "streamed" in r.stdout
    assert "rtn (streamed) layer: 2/2" in r.stderr   # one log line per layer off a terminal
    r = run("export", out, "--target", "mlx", "-o", tmp_path / "mlx2", "--json")
    assert json.loads(r.stdout)["streamed"] is True
    a, b = TensorStore.open(tmp_path / "mlx"), TensorStore.open(tmp_path / "mlx2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = run("quantize", ckpts["llama"], "--method", "dkm", "--stream", "-o", tmp_path / "g", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --stream: --method dkm")
    # Core ML with --stream: the streamed quantization into a temp dir, then the export of its records
    r = run("export", ckpts["llama"], "--target", "coreml", "--stream", "-o", tmp_path / "c.mlpackage", "--json")
    assert json.loads(r.stdout)["quantization"]["streamed"] is True and (tmp_path / "c.mlpackage").is_dir()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".c.mlpackage")]


@pytest.mark.slow
def test_default_model_streamed_records_unchanged(tmp_path):
    """On the real default model the streamed path gives the in-memory records bit for bit, so every quality
    table measured on the in-memory path (perplexity included) holds for the streamed one."""
    from macq.models import prepare_default_model

    cfg = config_for("rtn", dict(bits=4, group_size=64, symmetric=False))
    streaming.stream_quantize(prepare_default_model(), tmp_path / "s", "rtn", cfg)
    model, tok = load_model(None)
    assert_same_records(quantize(model, tok, "rtn", cfg, copy_model=False), QuantizedModel.load(tmp_path / "s"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_streamed_source_with_nan_or_inf_is_refused(dtype, bad):
    """``finite`` checks block by block with min/max, which propagate NaN and are infinite iff an element is."""
    rows = streaming.ROW_BLOCK_ELEMS // 64 + 3     # the bad value in the second block
    t = torch.randn(rows, 64).to(dtype)
    assert streaming.finite("w", t) is t
    t[rows - 1, 5] = bad
    with pytest.raises(MacqError, match="model: tensor w holds NaN or inf values"):
        streaming.finite("w", t)
