"""Streaming calibrated quantization (GPTQ / AWQ one decoder layer at a time) on tiny checkpoints.

Reference: the in-memory path (whole float32 model, ``layerwise``). With float32 activations the streamed
records must equal it bit for bit; with fp16 activations the result is a different but equally good
quantization (checked on the model's output error against the float model); a small ``--max-memory`` spills
activations to disk without changing a bit; an interrupt leaves nothing; bad options fail before any work."""

import json
import shutil
import subprocess

import pytest
import torch

import macq.quantizers.gptq as gptq
from macq.errors import MacqError
from macq.models import load_model
from macq.pipeline import calibration_ids, config_for, quantize
from macq.qmodel import QuantizedModel
from macq.quantizers.activations import ActivationStore, Budget, parse_size
from macq.quantizers.stream_calib import stream_calibrate
from macq.shards import TensorStore
from macq.tiny import save_tiny_model, tiny_model, tiny_tokenizer
from tests.test_streaming import assert_same_records

CAL = dict(dataset="tinystories", n_calib=8, seq_len=32, seed=0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    out = {a: save_tiny_model(root / a, a) for a in ("llama", "qwen2", "gpt2")}
    bf = root / "llama-bf16"            # a bf16 checkpoint: unchanged floats keep bf16, folded ones need float32
    tiny_model("llama", seed=1).to(torch.bfloat16).save_pretrained(bf, safe_serialization=True)
    tiny_tokenizer().save_pretrained(bf)
    out["llama-bf16"] = bf
    return out


def _ids(src):
    _, tok = load_model(str(src), with_tokenizer=True)
    return calibration_ids(tok, CAL["dataset"], CAL["n_calib"], CAL["seq_len"], CAL["seed"])


def _in_memory(src, method, cfg):
    model, tok = load_model(str(src))
    return quantize(model, tok, method, cfg, CAL["dataset"], CAL["n_calib"], CAL["seq_len"], CAL["seed"])


CASES = [
    ("llama", "gptq", dict(bits=4, group_size=32)),
    ("qwen2", "gptq", dict(bits=3, group_size=16, true_sequential=False, act_order=True, static_groups=True,
                           include_embeddings=True)),
    ("gpt2", "gptq", dict(bits=4, group_size=0, include_lm_head=True)),
    ("llama", "awq", dict(bits=4, group_size=32, include_lm_head=True)),
    ("qwen2", "awq", dict(bits=4, group_size=32, include_embeddings=True)),
    ("llama-bf16", "awq", dict(bits=3, group_size=32)),
    ("llama", "awq-gptq", dict(bits=4, group_size=32)),
    ("llama", "awq", dict(mode="mxfp4", include_embeddings=True)),
    ("qwen2", "awq-gptq", dict(mode="nvfp4", include_lm_head=True)),
    ("llama", "kmeans-cal", dict(bits=3, group_size=8, sensitivity="hessian", include_embeddings=True)),
    ("qwen2", "kmeans-cal", dict(bits=4, sensitivity="hessian", refit_rounds=1, include_lm_head=True)),
    ("gpt2", "kmeans-cal", dict(bits=2, group_size=1, sensitivity="hessian", error_feedback=False)),
    ("llama", "learned", dict(bits=3, group_size=32, kl_steps=0, steps=4, eval_every=2, include_embeddings=True)),
    ("qwen2", "learned", dict(bits=4, group_size=16, kl_steps=0, init="rtn", steps=3, include_lm_head=True)),
    ("gpt2", "learned", dict(bits=4, group_size=32, kl_steps=0, steps=2)),
    ("llama-bf16", "learned", dict(bits=3, group_size=32, kl_steps=0)),
    ("llama", "smoothquant", dict()),
    ("qwen2", "smoothquant", dict(act_mode="per_tensor_static", alpha=0.7, weight_bits=6)),
    ("gpt2", "smoothquant", dict(act_bits=6)),
    ("llama-bf16", "smoothquant", dict(act_mode="per_tensor_static")),
    ("llama", "mixed", dict(target_bpw=3.5, sensitivity="proxy")),
    ("qwen2", "mixed", dict(target_bpw=3.3, sensitivity="proxy", base_method="gptq", granularity="layer")),
    ("gpt2", "mixed", dict(target_bpw=4.2, sensitivity="proxy", target="coreml", base_method="gptq")),
    ("llama", "mixed", dict(recipe="q3_k_m-like", base_method="gptq")),
]
# the stages each method marks (macq.progress.stage), in the streamed summary's timings
STAGES = {"gptq": {"column_loop_s", "cholesky_s"}, "awq": {"search_s", "round_s"}, "awq-gptq": {"search_s", "round_s"},
          "kmeans-cal": {"hessian_s", "palettize_s"}, "learned": {"target_s", "search_s", "tune_s"},
          "smoothquant": {"stats_s", "round_s"}, "mixed": {"round_s"}}


@pytest.mark.parametrize("arch,method,opts", CASES, ids=[f"{a}-{m}-{i}" for i, (a, m, _) in enumerate(CASES)])
def test_streamed_records_equal_in_memory_fp32(ckpts, tmp_path, arch, method, opts):
    extra = dict(n_calib=CAL["n_calib"], seq_len=CAL["seq_len"]) if method == "gptq" else {}
    cfg = config_for(method, dict(opts, batch_size=3, act_dtype="float32", **extra))  # 8 = 3+3+2: uneven batches
    ref = _in_memory(ckpts[arch], method, cfg)
    out = tmp_path / "s"
    summary = stream_calibrate(ckpts[arch], out, method, cfg, _ids(ckpts[arch]), shard_bytes=20_000)
    got = QuantizedModel.load(out)
    assert_same_records(ref, got)
    assert got.tied == ref.tied and got.act_quant == ref.act_quant
    assert set(got.float_tensors) == set(ref.float_tensors)
    store = TensorStore.open(ckpts[arch])
    for k, t in ref.float_tensors.items():   # same values; the checkpoint's dtype where it holds them exactly
        g = got.float_tensors[k]
        assert torch.equal(t, g.to(t.dtype)), k
        if k in store and store.dtype(k) != torch.float32:
            assert g.dtype == (store.dtype(k) if torch.equal(t.to(store.dtype(k)).float(), t) else torch.float32), k
    assert summary["bits_per_weight"] == pytest.approx(ref.bits_per_weight(), abs=1e-4)
    assert summary["bytes"] == ref.nbytes()
    assert len(set(json.loads((out / "records.safetensors.index.json").read_text())["weight_map"].values())) > 1
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(ref.to_torch()(x).logits, got.to_torch()(x).logits)
    if "stats" in ref.method:   # AWQ's scales / kmeans-cal's per-linear output errors: the same numbers
        assert got.method["stats"] == ref.method["stats"]
    assert {k: v for k, v in got.method.items() if k not in ("streamed", "stats")} == \
        {k: v for k, v in ref.method.items() if k not in ("stats", "calibration")}   # (calibration: the CLI's)
    if "allocation" in ref.method:   # mixed: a real mixture, decided from the streamed first pass
        assert len(set(got.method["allocation"].values())) > 1
        assert ("sensitivity_s" in summary["timings"]) == (opts.get("recipe") is None)
    t = summary["timings"]
    assert t["io_s"] > 0 and t["forward_s"] > 0 and t["total_s"] >= sum(v for k, v in t.items() if k != "total_s") * 0.99
    assert STAGES[method] <= set(t)


def test_bf16_checkpoint_awq_folds_into_float32_norms(ckpts, tmp_path):
    cfg = config_for("awq", dict(bits=3, group_size=32, act_dtype="float32"))
    stream_calibrate(ckpts["llama-bf16"], tmp_path / "s", "awq", cfg, _ids(ckpts["llama-bf16"]))
    ft = QuantizedModel.load(tmp_path / "s").float_tensors
    assert ft["model.layers.0.input_layernorm.weight"].dtype == torch.float32      # scale folded in
    assert ft["model.norm.weight"].dtype == torch.bfloat16                         # untouched
    assert ft["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("qwen2", "gptq"), ("llama", "awq"), ("qwen2", "awq")])
def test_fp16_activations_equally_good(ckpts, tmp_path, arch, method):
    """fp16 storage rounds each layer's inputs (rel. error <= 2^-11); GPTQ amplifies such perturbations into
    different codes (many near-equal solutions), so the check is on what the codes are for: the quantized
    model's output error against the float model, next to the in-memory float32 path's, over three
    calibration sets (one set alone varies by chance: measured 0.93-1.12x over six sets, means 0.98-1.02x)."""
    extra = dict(n_calib=CAL["n_calib"], seq_len=CAL["seq_len"]) if method == "gptq" else {}
    cfg = config_for(method, dict(bits=4, group_size=32, batch_size=4, act_dtype="float16", **extra))
    assert config_for(method, {}).act_dtype == "float32"   # the default: exact
    fm, tok = load_model(str(ckpts[arch]))
    x = calibration_ids(tok, "wiki", 4, 64, 1)          # held-out text
    with torch.no_grad():
        lf = fm(x).logits
    ratios = []
    for seed in range(3):
        model, tok = load_model(str(ckpts[arch]))
        ref = quantize(model, tok, method, cfg, CAL["dataset"], CAL["n_calib"], CAL["seq_len"], seed)
        ids = calibration_ids(tok, CAL["dataset"], CAL["n_calib"], CAL["seq_len"], seed)
        stream_calibrate(ckpts[arch], tmp_path / f"s{seed}", method, cfg, ids)
        got = QuantizedModel.load(tmp_path / f"s{seed}")
        with torch.no_grad():
            e_ref = (ref.to_torch()(x).logits - lf).pow(2).mean().item()
            e_got = (got.to_torch()(x).logits - lf).pow(2).mean().item()
        ratios.append(e_got / e_ref)
    assert all(0.8 < r < 1.25 for r in ratios) and 0.9 < sum(ratios) / 3 < 1.1, ratios


def test_spill_beyond_max_memory_gives_identical_records(ckpts, tmp_path, monkeypatch):
    src = ckpts["qwen2"]
    limit = parse_size("20KiB")
    assert TensorStore.open(src).total_bytes() > 10 * limit        # the float weights exceed the budget
    cfg = config_for("gptq", dict(bits=4, group_size=32, batch_size=2, n_calib=8, seq_len=32))
    ids = _ids(src)
    a = stream_calibrate(src, tmp_path / "a", "gptq", cfg, ids)
    spill_dirs = []
    orig = Budget.new_file

    def spy(self):
        p = orig(self)
        spill_dirs.append(self.spill_dir)
        return p

    monkeypatch.setattr(Budget, "new_file", spy)
    cfg2 = config_for("gptq", dict(bits=4, group_size=32, batch_size=2, n_calib=8, seq_len=32, max_memory="20KiB"))
    b = stream_calibrate(src, tmp_path / "b", "gptq", cfg2, ids)
    assert a["activations"]["spilled_batches"] == 0
    act = b["activations"]
    assert act["spilled_batches"] > 0 and act["spilled_bytes"] > 0 and act["peak_in_memory_bytes"] <= limit
    assert spill_dirs and spill_dirs[0].parent == tmp_path            # beside the output ...
    assert not spill_dirs[0].exists()                                  # ... and removed at the end
    assert_same_records(QuantizedModel.load(tmp_path / "a"), QuantizedModel.load(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_learned_float_stream_spills_with_the_budget(ckpts, tmp_path):
    """learned carries the float model's activations next to the quantized ones; under --max-memory 0 every batch
    of both spills (AWQ, one stream: the first layer's inputs and one layer's outputs; learned also the float
    layer's outputs), and the records stay those of the unlimited run."""
    src, ids = ckpts["llama"], _ids(ckpts["llama"])
    base = dict(bits=3, group_size=32, batch_size=2, kl_steps=0, steps=2)
    a = stream_calibrate(src, tmp_path / "a", "learned", config_for("learned", base), ids)
    b = stream_calibrate(src, tmp_path / "b", "learned", config_for("learned", dict(base, max_memory="0")), ids)
    c = stream_calibrate(src, tmp_path / "c", "awq", config_for("awq", dict(bits=3, group_size=32, batch_size=2,
                                                                              max_memory="0")), ids)
    assert a["activations"]["spilled_batches"] == 0
    assert c["activations"]["spilled_batches"] == 2 * 4                  # 8 sequences in batches of 2, 2 layers
    assert b["activations"]["spilled_batches"] == 3 * 4 and b["activations"]["peak_in_memory_bytes"] == 0
    assert_same_records(QuantizedModel.load(tmp_path / "a"), QuantizedModel.load(tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_interrupt_leaves_nothing(ckpts, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = gptq.gptq_quantize

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:              # second layer, after spill files and shards exist
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(gptq, "gptq_quantize", boom)
    cfg = config_for("gptq", dict(bits=4, group_size=32, batch_size=2, n_calib=8, seq_len=32, max_memory="0"))
    with pytest.raises(KeyboardInterrupt):
        stream_calibrate(ckpts["llama"], tmp_path / "q", "gptq", cfg, _ids(ckpts["llama"]))
    assert calls["n"] == 9
    assert list(tmp_path.iterdir()) == []     # neither output, nor its temp dir, nor the spill dir


def test_one_cholesky_per_input_group(ckpts, tmp_path, monkeypatch):
    """q/k/v share one factorisation, gate/up another: 4 per Llama layer instead of 7, same records."""
    n = {"calls": 0}
    orig = gptq.inverse_hessian_cholesky

    def count(*a, **k):
        n["calls"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(gptq, "inverse_hessian_cholesky", count)
    cfg = config_for("gptq", dict(bits=4, group_size=32, act_dtype="float32", n_calib=8, seq_len=32))
    stream_calibrate(ckpts["llama"], tmp_path / "s", "gptq", cfg, _ids(ckpts["llama"]))
    assert n["calls"] == 4 * 2
    # sharing is exact: a per-linear factorisation gives the same record
    W, X = torch.randn(24, 64), torch.randn(300, 64)
    H = 2 * X.T.double() @ X.double() / 300
    c = config_for("gptq", dict(bits=3, group_size=16, act_order=True, static_groups=True))
    r1, s1 = gptq.gptq_quantize(W, H, c)
    r2, s2 = gptq.gptq_quantize(W, None, c, gptq.prepare_hessian(H, c, W.device))
    assert torch.equal(r1.codes, r2.codes) and torch.equal(r1.scales, r2.scales) and s1 == s2


def test_activation_store_roundtrip(tmp_path):
    x = torch.randn(2, 5, 8) * 100
    b = Budget(parse_size("100"), tmp_path)          # 100 bytes: the first fp16 batch (80 B) fits, the next spills
    s = ActivationStore(torch.float16, b)
    big = x.clone()
    big[0, 0, 0] = 1e6                               # beyond fp16's range
    for t in (x[:1], x[1:], big[:1]):
        s.append(t)
    assert b.spilled_batches == 2 and b.overflow_batches == 1 and b.peak == 80
    assert torch.equal(s[0], x[:1].half().float()) and torch.equal(s[1], x[1:].half().float())  # memory, disk
    assert torch.equal(s[2], big[:1])                # kept exactly in float32, not inf
    assert [t.dtype for t in s] == [torch.float32] * 3
    files = list(b.spill_dir.iterdir())
    assert len(files) == 2 and sum(f.stat().st_size for f in files) == 80 + 160
    s.release()
    assert b.used == 0 and list(b.spill_dir.iterdir()) == [] and len(s) == 0
    b.cleanup()
    assert not b.spill_dir.exists()


def test_parse_size():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5G") == 3 << 29 and parse_size("1000") == 1000 and parse_size("0") == 0
    for bad in ("", "4 XB", "-1G", "G"):
        with pytest.raises(MacqError, match="--max-memory .*expected a size"):
            parse_size(bad)


def _main(capsys, *args):
    """The CLI in-process (no interpreter start-up, seconds per call), as a ``CompletedProcess``; the subprocess
    boundary of ``macq quantize`` is covered in tests/test_streaming.py and tests/test_cli.py."""
    from macq.cli import main

    argv, code = [str(a) for a in args], 0
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["macq", *argv], code, out.out, out.err)


def test_cli_streams_calibrated_by_default_with_timings(ckpts, tmp_path, capsys):
    src = ckpts["llama"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "8", "--seq-len", "32", "--group-size", "32")
    r = _main(capsys, "quantize", src, "--method", "gptq", *cal, "-o", tmp_path / "s", "--json")     # default float32: exact
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["method"]["act_dtype"] == "float32" and res["layers"] == 14
    assert {"hessian_s", "cholesky_s", "column_loop_s", "forward_s", "io_s", "total_s"} <= set(res["timings"])
    assert res["memory"]["peak_rss_bytes"] > 0
    r = _main(capsys, "quantize", src, "--method", "gptq", *cal, "--no-stream", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert_same_records(QuantizedModel.load(tmp_path / "m"), QuantizedModel.load(tmp_path / "s"))
    r = _main(capsys, "quantize", src, "--method", "awq", *cal, "--stream", "--max-memory", "8KiB", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("awq (streamed) layer:")]
    assert len(lines) == 2 and "hessian" in lines[0] and "search" in lines[0] and "forward" in lines[0]
    assert "streamed, calibrated" in r.stdout


def test_cli_kmeans_cal_streams_with_hessian_sensitivity(ckpts, tmp_path, capsys):
    """--sensitivity hessian streams by default (records = --no-stream's)."""
    src = ckpts["qwen2"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "kmeans-cal",
           "--bits", "3", "--refit-rounds", "1")
    r = _main(capsys, "quantize", src, *cal, "--sensitivity", "hessian", "-o", tmp_path / "s", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["layers"] == 14 and res["memory"]["peak_rss_bytes"] > 0
    assert {"hessian_s", "palettize_s", "forward_s", "io_s", "total_s"} <= set(res["timings"])
    r = _main(capsys, "quantize", src, *cal, "--sensitivity", "hessian", "--no-stream", "-o", tmp_path / "m", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["streamed"] is False
    assert_same_records(QuantizedModel.load(tmp_path / "m"), QuantizedModel.load(tmp_path / "s"))


@pytest.mark.parametrize("arch,heads", [("qwen2", ("--include-embeddings",)),                    # tied
                                        ("llama", ("--include-embeddings", "--include-lm-head")),  # untied
                                        ("llama", ("--include-lm-head", "--no-weighted-heads"))])
def test_cli_kmeans_cal_streams_fisher_with_the_in_memory_records(ckpts, tmp_path, capsys, arch, heads):
    """The default Fisher sensitivities stream (a backward pass layer by layer before the first layer is
    palettized) and give the in-memory path's records bit for bit: Fisher-weighted heads (a tied embedding's
    Fisher sums both uses before squaring) and data-free ones (the Fisher then sees the quantized head)."""
    src = ckpts[arch]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "kmeans-cal",
           "--bits", "3", "--refit-rounds", "1", *heads)
    r = _main(capsys, "quantize", src, *cal, "-o", tmp_path / "s", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["method"]["sensitivity"] == "fisher"
    assert {"head_s", "backward_s", "palettize_s"} <= set(res["timings"])
    r = _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert_same_records(QuantizedModel.load(tmp_path / "m"), QuantizedModel.load(tmp_path / "s"))
    assert not list(tmp_path.glob(".*acts-*"))                       # the per-layer Fisher files are gone


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streamed_fisher_equals_autograd_over_the_whole_model(ckpts, tmp_path, arch):
    """The layer-streamed backward (chunked head, per-layer recompute) against one autograd graph over the
    float model, for every linear and both heads (untied llama: two weights; tied qwen2 / gpt2: one)."""
    from macq.models import quantizable_modules
    from macq.quantizers.kmeans_cal import KMeansCalConfig
    from macq.quantizers.meta_layers import skeleton
    from macq.quantizers.sensitivity import fisher_diagonal
    from macq.quantizers.stream_grad import FisherStore, LayerStream, stream_fisher
    from macq.streaming import plan_stream

    src = ckpts[arch]
    model, _ = load_model(str(src))
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    mods = quantizable_modules(model, True, True)
    decoder = set(quantizable_modules(model))
    ref = fisher_diagonal(model, ids, mods)
    plan = plan_stream(src, KMeansCalConfig(sensitivity="hessian"))
    stream = LayerStream(plan, skeleton(plan.config), torch.device("cpu"), Budget(None, tmp_path, ".t-"))
    got = FisherStore(tmp_path / "f")
    stream_fisher(stream, ids, decoder, set(mods) - decoder, got)
    assert set(got.files) == decoder and set(got.held) == set(mods) - decoder
    for name in mods:
        f, r = got.pop(name), ref[name]
        assert f.shape == r.shape and float(r.max()) > 0
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-6 * float(r.max()))


def test_cli_learned_streams_without_the_logits_stage(ckpts, tmp_path, capsys):
    src = ckpts["llama"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "learned",
           "--group-size", "32", "--kl-steps", "0", "--steps", "2")
    r = _main(capsys, "quantize", src, *cal, "-o", tmp_path / "s", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["layers"] == 14 and res["memory"]["peak_rss_bytes"] > 0
    assert {"target_s", "hessian_s", "search_s", "tune_s", "forward_s", "io_s"} <= set(res["timings"])
    assert set(res["method"]["stats"]["layers"]) == {"model.layers.0", "model.layers.1"}
    r = _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert_same_records(QuantizedModel.load(tmp_path / "m"), QuantizedModel.load(tmp_path / "s"))


def test_cli_learned_streams_the_logits_stage(ckpts, tmp_path, capsys):
    """The logits stage streams (the default --kl-steps too): the tied embedding tuned, the held-out KL path and
    the keep-best step the in-memory stage's; scales equal but for fp16 ties (summation order of the chunked
    head: at most one ulp on a few groups)."""
    src = ckpts["qwen2"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "learned",
           "--group-size", "32", "--include-embeddings", "--kl-steps", "4", "--kl-eval-every", "1",
           "--kl-rows", "4", "--kl-holdout", "0")
    r = _main(capsys, "quantize", src, *cal, "-o", tmp_path / "s", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and {"target_s", "head_s", "backward_s", "tune_s"} <= set(res["timings"])
    r = _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m", "--json")
    assert r.returncode == 0, r.stderr
    s_kl, m_kl = res["method"]["stats"]["logits"], json.loads(r.stdout)["method"]["stats"]["logits"]
    assert s_kl["kl"] < s_kl["kl_init"] and s_kl["best_step"] == m_kl["best_step"] > 0
    assert s_kl["kl_init"] == pytest.approx(m_kl["kl_init"], rel=1e-5) and s_kl["kl"] == pytest.approx(m_kl["kl"], rel=1e-5)
    s, m = QuantizedModel.load(tmp_path / "s"), QuantizedModel.load(tmp_path / "m")
    assert set(s.records) == set(m.records) and "model.embed_tokens" in s.records
    n = same = 0
    for k, rm in m.records.items():
        rs = s.records[k]
        assert torch.equal(rs.codes, rm.codes) and torch.equal(rs.zeros, rm.zeros)
        ratio = rs.scales.float() / rm.scales.float()
        assert float((ratio - 1).abs().max()) < 2e-3                            # one fp16 ulp at most
        n, same = n + rs.scales.numel(), same + int((rs.scales == rm.scales).sum())
    assert same / n > 0.99
    assert not list(tmp_path.glob(".*acts-*"))                                # the kept layers are gone


@pytest.mark.parametrize("arch,heads", [("llama", ("--include-embeddings", "--include-lm-head")),   # untied
                                        ("qwen2", ("--include-embeddings",)),                      # tied
                                        ("llama", ())])      # float head: the teacher reuses the student's rows
def test_streamed_logits_gradient_equals_autograd_over_the_whole_model(ckpts, tmp_path, capsys, arch, heads):
    """One row's KL and its gradient on every log-scale (embedding / head included): the streamed stage
    (quantized layers read from their files, chunked head, per-layer reverse) against one autograd graph over
    the quantized model, as :func:`macq.quantizers.learned_kl.tune_logits` takes it."""
    from macq.quantizers.learned import LearnedConfig
    from macq.quantizers.learned_kl import _kl, dequantized, from_record, teacher_logprobs, tunable
    from macq.quantizers.learned_stream import _Stage, _Student, _Teacher
    from macq.quantizers.meta_layers import skeleton
    from macq.quantizers.stream_grad import LayerFiles, LayerStream
    from macq.streaming import plan_stream

    src = ckpts[arch]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "2", "--seq-len", "16", "--method", "learned",
           "--group-size", "32", "--kl-steps", "0", *heads)
    assert _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m").returncode == 0
    qm = QuantizedModel.load(tmp_path / "m")
    float_model, _ = load_model(str(src))
    ids = torch.randint(0, float_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    teacher = teacher_logprobs(float_model, ids)
    model = qm.to_torch().requires_grad_(False)
    params = {n: from_record(r) for n, r in qm.records.items() if tunable(r)}
    leaves = {n: p.log_scale.requires_grad_(True) for n, p in params.items()}
    loss = _kl(model, {f"{n}.weight": dequantized(p) for n, p in params.items()}, ids[1:2], teacher[1][None])
    loss.backward()

    plan = plan_stream(src, LearnedConfig(kl_steps=0))
    stream = LayerStream(plan, skeleton(plan.config), torch.device("cpu"), Budget(None, tmp_path, ".t-"))
    files, pre = LayerFiles(tmp_path / "layers"), stream.spec.layers
    for i in range(len(stream.layers)):
        files.add({n: r for n, r in qm.records.items() if n.startswith(f"{pre}.{i}.")},
                  {k: qm.float_tensors[k] for k in qm.float_tensors if k.startswith(f"{pre}.{i}.")})
    heads_recs = {n: r for n, r in qm.records.items() if not n.startswith(pre + ".")}
    assert bool(heads_recs) == bool(heads)
    student = _Student(stream, files, heads_recs)
    assert student.float_head == (not heads)
    run = _Stage(student, _Teacher(stream, ids), ids)
    assert run.kl(1) == pytest.approx(float(loss), rel=1e-5)
    run.backward(1, 1.0)
    assert set(student.leaves) == set(leaves)
    for n, leaf in leaves.items():
        torch.testing.assert_close(student.leaves[n].grad, leaf.grad, rtol=1e-4, atol=1e-5 * float(leaf.grad.abs().max()))


def test_cli_smoothquant_streams_w8a8(ckpts, tmp_path, capsys):
    """The streamed W8A8 result carries the same act-quant metadata as the in-memory one (a model that runs
    with fake-quantized inputs gives the same logits)."""
    src = ckpts["llama"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "smoothquant",
           "--act-mode", "per_tensor_static")
    r = _main(capsys, "quantize", src, *cal, "-o", tmp_path / "s", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["streamed"] is True and res["layers"] == 14 and res["memory"]["peak_rss_bytes"] > 0
    assert {"stats_s", "round_s", "forward_s", "io_s"} <= set(res["timings"])
    r = _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    s, m = QuantizedModel.load(tmp_path / "s"), QuantizedModel.load(tmp_path / "m")
    assert_same_records(m, s)
    assert s.act_quant == m.act_quant and len(s.act_quant) == 14
    assert all(a["mode"] == "per_tensor_static" and a["scale"] > 0 for a in s.act_quant.values())
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(s.to_torch()(x).logits, m.to_torch()(x).logits)


@pytest.mark.parametrize("sensitivity", ["proxy", "fisher"])
def test_cli_mixed_streams_in_two_passes(ckpts, tmp_path, capsys, sensitivity):
    """The first pass measures (the Hessian proxy; or the Fisher-weighted error, on a streamed Fisher diagonal
    from a backward pass before it), the allocation runs between the passes: records and allocation are the
    in-memory path's."""
    src = ckpts["llama"]
    cal = ("--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--method", "mixed",
           "--target-bpw", "3.5", "--sensitivity", sensitivity, "--base-method", "gptq")
    r = _main(capsys, "quantize", src, *cal, "-o", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    first = [ln for ln in r.stderr.splitlines() if ln.startswith("mixed (streamed, first pass) layer:")]
    second = [ln for ln in r.stderr.splitlines() if ln.startswith("mixed (streamed) layer:")]
    assert len(first) == 2 and len(second) == 2 and "sensitivity" in first[0], r.stderr
    r = _main(capsys, "quantize", src, *cal, "--no-stream", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    s, m = QuantizedModel.load(tmp_path / "s"), QuantizedModel.load(tmp_path / "m")
    assert_same_records(m, s)
    assert s.method["allocation"] == m.method["allocation"] and s.method["achieved_bpw"] == m.method["achieved_bpw"]


def test_kmeans_cal_bad_group_size_fails_before_reading(ckpts, tmp_path, monkeypatch):
    def no_read(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(TensorStore, "__getitem__", no_read)
    cfg = config_for("kmeans-cal", dict(group_size=5, sensitivity="hessian"))
    with pytest.raises(MacqError, match="--group-size 5 does not divide the output dim"):
        stream_calibrate(ckpts["llama"], tmp_path / "q", "kmeans-cal", cfg, _ids(ckpts["llama"]))
    cfg = config_for("kmeans-cal", dict(group_size=5))                 # Fisher (default): before its backward pass
    with pytest.raises(MacqError, match="--group-size 5 does not divide the output dim"):
        stream_calibrate(ckpts["llama"], tmp_path / "q", "kmeans-cal", cfg, _ids(ckpts["llama"]))
    assert not (tmp_path / "q").exists()


def test_learned_logits_stage_on_gpt2_refused_before_reading(ckpts, tmp_path, monkeypatch):
    """GPT-2's learned position embeddings are outside the streamed stage's direct embedding lookup: one line
    before any weight is read (the block-wise pass alone, --kl-steps 0, streams there)."""
    def no_read(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(TensorStore, "__getitem__", no_read)
    cfg = config_for("learned", dict(kl_steps=2))
    with pytest.raises(MacqError, match=r"logits stage streams families without learned position embeddings \(gpt2"):
        stream_calibrate(ckpts["gpt2"], tmp_path / "q", "learned", cfg, _ids(ckpts["gpt2"]))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args,msg", [
    (("--method", "gptq", "--max-memory", "4 XB"), "error: --max-memory '4 XB': expected a size"),
    (("--method", "awq", "--act-dtype", "int8"), "error: --act-dtype int8: expected one of"),
    (("--method", "gptq", "--device", "warp"), "error: --device warp: expected cpu, cuda"),
    (("--method", "kmeans-cal", "--device", "tpu"), "error: --device tpu: expected cpu, cuda, cuda:N, mps or auto"),
    (("--method", "gptq", "--max-memory", "1GiB", "--no-stream"), "error: --max-memory applies to the streamed path"),
    (("--method", "rtn", "--max-memory", "1GiB"), "error: --max-memory does not apply to --method rtn"),
    (("--method", "dkm", "--stream"), "error: --stream: --method dkm runs on the in-memory path only (it trains every "
     "layer's clustering end to end through the whole model); streaming covers rtn, nf4, fp4, kmeans, uniform, gptq, "
     "awq, awq-gptq, smoothquant, mixed, learned, kmeans-cal"),
    (("--method", "learned", "--kl-holdout", "8", "--stream"), "error: --kl-holdout 8: must leave training "
     "sequences of the --kl-rows 8"),
    (("--method", "mixed", "--sensitivity", "kl", "--stream"), "error: --stream: mixed --sensitivity kl needs the "
     "whole model's logits; pass --sensitivity fisher or proxy (or a --recipe) to stream, or --no-stream"),
    (("--method", "mixed", "--sensitivity", "proxy", "--include-embeddings", "--stream"),
     "error: --stream: mixed --include-embeddings: the embedding / lm_head are sized on the whole model's"),
] + ([(("--method", m, *extra, "--device", "cuda"), "error: --device cuda: 'cuda' requested but CUDA is not available")
      for m, extra in (("gptq", ()), ("mixed", ("--sensitivity", "proxy")), ("awq", ()), ("awq-gptq", ()),
                       ("learned", ()), ("kmeans-cal", ()), ("smoothquant", ()))]
     if not torch.cuda.is_available() else []) + ([(("--method", m, "--device", "mps"),
                                                   "error: --device mps: 'mps' requested but MPS is not available")
                                                  for m in ("gptq", "awq", "learned")]
                                                 if not torch.backends.mps.is_available() else []))
def test_cli_bad_stream_options_fail_before_work(ckpts, tmp_path, capsys, args, msg):
    """One line, exit 2, before any weight is read: the checkpoint's weights file here is corrupt, so any
    attempt to read it would fail with a different message."""
    from macq.cli import main

    bad = tmp_path / "m"
    shutil.copytree(ckpts["llama"], bad)
    (bad / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(bad), *args, "-o", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(msg) and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_default_model_streamed_gptq_records_unchanged(tmp_path):
    """On the real default model's weights the streamed GPTQ (float32 activations) gives the in-memory records
    bit for bit, so the documented GPTQ quality rows hold for the streamed path with --act-dtype float32. The
    checkpoint is the real model cut to its first 6 of 30 decoder layers (real weights, tokenizer, tied head):
    every layer runs the same code on the same shapes, and the per-column GPTQ loop over all 30 layers, twice,
    was the slowest test of the suite."""
    from macq.models import prepare_default_model

    model, tok = load_model(str(prepare_default_model()))
    model.model.layers = model.model.layers[:6]
    model.config.num_hidden_layers = 6
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:6]
    src = tmp_path / "first6"
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    cal = dict(dataset="c4", n_calib=2, seq_len=64, seed=0)
    cfg = config_for("gptq", dict(bits=4, group_size=64, act_dtype="float32", n_calib=2, seq_len=64))
    model, tok = load_model(str(src))
    assert model.config.num_hidden_layers == 6 and model.config.tie_word_embeddings
    ref = quantize(model, tok, "gptq", cfg, cal["dataset"], cal["n_calib"], cal["seq_len"], cal["seed"])
    del model
    ids = calibration_ids(tok, cal["dataset"], cal["n_calib"], cal["seq_len"], cal["seed"])
    stream_calibrate(src, tmp_path / "s", "gptq", cfg, ids)
    got = QuantizedModel.load(tmp_path / "s")
    assert len(got.records) == 6 * 7
    assert_same_records(ref, got)
