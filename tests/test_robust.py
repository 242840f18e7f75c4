"""Failure paths that lose nothing (issue 12) and the CLI generated from the method configs (issue 10)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from macq.errors import MacqError
from macq.tiny import save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama")


def run_main(capsys, *args):
    from macq.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ records / packing
def test_records_validate_range_dtype_finiteness():
    from macq.record import AffineRecord, LUTRecord

    codes = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(MacqError, match="scales: holds NaN"):
        AffineRecord(codes=codes, scales=torch.tensor([[float("nan")], [1.0]]), bits=4, group_size=4)
    with pytest.raises(MacqError, match=r"values in \[16, 16\] do not fit 4 bits"):
        AffineRecord(codes=codes + 16, scales=torch.ones(2, 1), bits=4, group_size=4)
    with pytest.raises(MacqError, match="codes: dtype float32"):
        AffineRecord(codes=codes.float(), scales=torch.ones(2, 1), bits=4, group_size=4)
    with pytest.raises(MacqError, match="zeros"):
        AffineRecord(codes=codes, scales=torch.ones(2, 1), zeros=torch.full((2, 1), 0.5), bits=4, group_size=4)
    with pytest.raises(MacqError, match="lut: holds NaN"):
        LUTRecord(indices=codes, lut=torch.full((1, 16), float("inf")), bits=4)
    with pytest.raises(MacqError, match="indices: values in"):
        LUTRecord(indices=codes + 4, lut=torch.zeros(1, 4), bits=2)


def test_pack_bits_refuses_codes_that_do_not_fit():
    from macq.packing import pack_bits, unpack_bits

    ok = torch.tensor([[0, 7, 3, 5]], dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(ok, 3), 3, 4), ok)
    with pytest.raises(MacqError, match=r"codes in \[0, 8\] do not fit 3 bits"):
        pack_bits(torch.tensor([[0, 8]], dtype=torch.uint8), 3)  # old code kept 0 (8 & 7) silently


def test_records_validated_when_loaded(tiny_dir, tmp_path):
    """A record file whose scales were damaged on disk is refused by load, naming file and record."""
    from safetensors.torch import load_file, save_file

    from macq.pipeline import load_quantized_or_model, quantize
    from macq.qmodel import QuantizedModel

    _, fp, tok = load_quantized_or_model(str(tiny_dir))
    qm = quantize(fp, tok, "rtn", {"bits": 4, "group_size": 32})
    d = qm.save(tmp_path / "q")
    rec = load_file(d / "records.safetensors")
    rec["model.layers.1.self_attn.o_proj.scales"][1, 0] = float("nan")
    save_file(rec, d / "records.safetensors")
    with pytest.raises(MacqError, match=r"records.safetensors: \d+ bytes, records.safetensors.index.json records \d+"):
        QuantizedModel.load(d)  # the shard checksums see the rewrite first
    (d / "records.safetensors.index.json").unlink()  # as an older writer left it (no checksums): the record check
    with pytest.raises(MacqError, match=r"records.safetensors: record model.layers.1.self_attn.o_proj: .*NaN"):
        dict(QuantizedModel.load(d).records)  # records load lazily: each is validated as it is read
    # a float tensor missing from float.safetensors would stay at random init in to_torch(): refused
    d2 = qm.save(tmp_path / "q2")
    flt = load_file(d2 / "float.safetensors")
    flt.pop("model.norm.weight")
    save_file(flt, d2 / "float.safetensors")
    (d2 / "float.safetensors.index.json").unlink()
    with pytest.raises(MacqError, match="lacks float tensor model.norm.weight"):
        QuantizedModel.load(d2).to_torch()


# ------------------------------------------------------------------------------------------ --force
def test_force_replaces_only_macq_outputs(tiny_dir, tmp_path, capsys):
    from macq.atomic import macq_artifact

    q = tmp_path / "q"
    assert run_main(capsys, "quantize", tiny_dir, "-o", q, "--bits", "4")[0] == 0
    assert macq_artifact(q) == "macq"
    first = (q / "manifest.json").read_text()
    code, _, err = run_main(capsys, "quantize", tiny_dir, "-o", q, "--bits", "8", "--force")
    assert code == 0, err
    assert json.loads((q / "manifest.json").read_text())["method"]["bits"] == 8 and first != (q / "manifest.json").read_text()
    m = tmp_path / "mlx"
    assert run_main(capsys, "export", tiny_dir, "--target", "mlx", "-o", m, "--bits", "4")[0] == 0
    assert macq_artifact(m) == "mlx"
    code, _, err = run_main(capsys, "export", tiny_dir, "--target", "mlx", "-o", m, "--bits", "3", "--force")
    assert code == 0 and json.loads((m / "config.json").read_text())["quantization"]["bits"] == 3, err
    # a user's directory that merely looks like a model is not macq's: refused, untouched
    user = tmp_path / "user-model"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "llama", "quantization": {"bits": 4}}')
    code, _, err = run_main(capsys, "export", tiny_dir, "--target", "mlx", "-o", user, "--force")
    assert code == 2 and "not written by macq" in err
    assert [p.name for p in user.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "q", "user-model"]  # no temp dirs left


def test_atomic_dir_refuses_foreign_target(tmp_path):
    from macq.atomic import atomic_dir

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_text("x")
    with pytest.raises(MacqError, match="not written by macq"):
        with atomic_dir(victim) as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert (victim / "data").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
    with atomic_dir(tmp_path / "new") as tmp:
        (tmp / "f").write_text("y")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert (tmp_path / "new").stat().st_mode == plain.stat().st_mode  # not mkdtemp's 0700


# ------------------------------------------------------------------------------------------ checks before work
def test_checks_run_before_weights_are_loaded(tiny_dir, tmp_path, capsys, monkeypatch):
    """Target and model checks fail without loading a single weight (old code: after GPTQ had run)."""
    import macq.models
    import macq.pipeline

    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(macq.models, "load_model", boom)
    monkeypatch.setattr(macq.pipeline, "load_quantized_or_model", boom)
    for args, msg in [
        (("--target", "mlx", "-o", tmp_path / "m", "--method", "gptq", "--bits", "7"), "--bits 7: MLX"),
        (("--target", "coreml", "-o", tmp_path / "m", "--method", "kmeans"), "must end in .mlpackage"),
        (("--target", "mlx", "-o", tmp_path / "m", "--dtype", "int8"), "dtype 'int8'"),
        (("--target", "mlx", "-o", tmp_path / "m", "--group-size", "96"), "--group-size 96 does not divide"),
    ]:
        code, _, err = run_main(capsys, "export", tiny_dir, *args)
        assert code == 2 and msg in err, err


def test_default_group_size_fits_the_model(tmp_path, capsys):
    """hidden 96: 128 and 64 do not divide it, so the default is 32 (old code: --group-size 128 error)."""
    d = save_tiny_model(tmp_path / "h96", "llama", hidden_size=96, intermediate_size=192)
    code, out, err = run_main(capsys, "quantize", d, "-o", tmp_path / "q", "--bits", "4", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["method"]["group_size"] == 32 and "--group-size 32" in res["notes"][0]
    assert res["bits_per_weight"] == pytest.approx(4 + 16 / 32)
    from macq.preflight import auto_group_size

    assert auto_group_size({"a": (1, 576), "b": (1, 1536)}) == 64  # SmolLM2-135M: hidden 576, intermediate 1536
    with pytest.raises(MacqError, match="none of 128, 64, 32 divides"):
        auto_group_size({"a": (1, 48)})


def test_mlx_defaults_are_mlx_affine(tiny_dir, tmp_path, capsys):
    """--target mlx with no form options: asymmetric with a float zero (MLX's own bias form), which fits each
    group's range better than symmetric at the same stored size (MLX keeps a bias per group anyway)."""
    from safetensors.torch import load_file

    from macq.models import load_model

    errs = {}
    for name, extra in (("default", ()), ("sym", ("--symmetric",))):
        out = tmp_path / name
        code, _, err = run_main(capsys, "export", tiny_dir, "--target", "mlx", "-o", out, "--bits", "3", *extra)
        assert code == 0, err
        cfg = json.loads((out / "config.json").read_text())
        w = load_file(out / "model.safetensors")
        fp, _ = load_model(str(tiny_dir), with_tokenizer=False)
        from macq.packing import unpack_bits

        key = "model.layers.0.mlp.down_proj"
        ref = fp.get_submodule(key).weight.detach()
        q = unpack_bits(w[f"{key}.weight"], 3, ref.shape[1]).float()
        g = cfg["quantization"]["group_size"]
        deq = (q.view(ref.shape[0], -1, g) * w[f"{key}.scales"].float()[..., None] + w[f"{key}.biases"].float()[..., None])
        errs[name] = (deq.view_as(ref) - ref).pow(2).mean().item()
        method = cfg["macq"]["method"]
        if name == "default":
            assert method["symmetric"] is False and method["zero_point"] == "float"
        assert os.path.getsize(out / "model.safetensors") > 0
    assert errs["default"] < 0.8 * errs["sym"], errs


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_windows_do_not_overlap_and_warn(tmp_path, capsys):
    from macq.data import calibration_samples, load_text, tokenize, window_starts

    for seed in range(5):
        s = window_starts(10_000, 19, 512, seed).sort().values
        assert len(s) == 19 and bool((s[1:] - s[:-1] >= 512).all()) and int(s[-1]) + 512 <= 10_000
    tok = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(load_text("tinystories")[:40_000])
    n_half = tokenize(tok, load_text(str(text))[len(load_text(str(text))) // 2:]).numel()
    fit = n_half // 64
    x = calibration_samples(tok, str(text), fit, 64, seed=1)
    assert x.shape == (fit, 64) and capsys.readouterr().err == ""
    calibration_samples(tok, str(text), fit + 5, 64, seed=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: calibration:") and "windows overlap" in err[0]


def test_c4_calibration_half_is_smaller_than_the_default_request():
    """The bundled c4 calibration half holds fewer tokens than 128 x 512 (the reason for the warning)."""
    from macq.data import load_text, tokenize
    from macq.models import default_model_dir

    if not (default_model_dir() / "tokenizer.json").is_file():
        pytest.skip("default model not prepared")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    text = load_text("c4")
    n = tokenize(tok, text[len(text) // 2:]).numel()
    assert 30_000 < n < 128 * 512


# ------------------------------------------------------------------------------------------ signals
_WRAPPER = textwrap.dedent("""
    import pathlib, sys, time
    from macq.shards import ShardWriter
    real = ShardWriter.add
    def slow(self, *a, **k):  # the export is writing: tell the test, then wait to be interrupted
        pathlib.Path(sys.argv[1]).write_text("writing")
        time.sleep(120)
        return real(self, *a, **k)
    ShardWriter.add = slow
    from macq.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.parametrize("sig,force", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_signal_mid_export_leaves_nothing(tiny_dir, tmp_path, capsys, sig, force):
    """SIGINT/SIGTERM while the MLX export writes: no output, no temp dir, and an existing macq output that
    --force was replacing survives unchanged. (Old code: SIGTERM killed the process with its temp dir.)"""
    from macq.atomic import macq_artifact

    outdir = tmp_path / "outs"
    outdir.mkdir()
    out = outdir / "mlx"
    if force:
        assert run_main(capsys, "export", tiny_dir, "--target", "mlx", "-o", out, "--bits", "4")[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    wrapper, marker = tmp_path / "w.py", tmp_path / "marker"
    wrapper.write_text(_WRAPPER)
    args = [sys.executable, str(wrapper), str(marker), "export", str(tiny_dir), "--target", "mlx", "--no-stream",
            "-o", str(out),
            "--bits", "3"] + (["--force"] if force else [])
    p = subprocess.Popen(args, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists():
        assert p.poll() is None and time.time() - t0 < 180, p.communicate()
        time.sleep(0.05)
    assert [x.name for x in outdir.iterdir() if x.name.startswith(".")]  # the temp dir exists mid-write
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"error: interrupted by {sig.name}; no output was written"
    assert [x.name for x in outdir.iterdir()] == (["mlx"] if force else [])
    if force:
        assert macq_artifact(out) == "mlx" and {x.name: x.read_bytes() for x in out.iterdir()} == before


# ------------------------------------------------------------------------------------------ configs and CLI
def test_method_configs_round_trip_with_version():
    from macq.quantizers import METHODS
    from macq.quantizers.base import CONFIG_VERSION

    for name, spec in METHODS.items():
        cls, _ = spec.load()
        cfg = cls.from_kwargs(skip=("lm_head",))
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["method"] == name and d["version"] == CONFIG_VERSION
        assert cls.from_dict(d) == cfg
    from macq.quantizers.awq import AWQGPTQConfig

    assert AWQGPTQConfig.from_dict({"damp": 0.05}).damp_percent == 0.05  # older key still read
    with pytest.raises(MacqError, match="version 99"):
        AWQGPTQConfig.from_dict({"version": 99})
    with pytest.raises(MacqError, match="unknown field"):
        AWQGPTQConfig.from_dict({"nosuch": 1})


def test_quantize_and_export_share_every_method_option():
    from typer.main import get_command

    from macq.cli import app
    from macq.options import all_flags, method_options
    from macq.quantizers import METHODS

    cmd = get_command(app)
    flags = {c: {o for p in cmd.commands[c].params for o in (*p.opts, *p.secondary_opts)} for c in ("quantize", "export")}
    assert all_flags() <= flags["quantize"] and all_flags() <= flags["export"]
    fields = set()
    for spec in METHODS.values():
        cls, _ = spec.load()
        fields |= set(cls.__dataclass_fields__)
    assert set(method_options()) == fields - {"n_calib", "seq_len", "seed", "dataset", "target"}
    for f in ("--steps", "--lr", "--mse-clip", "--damp-percent", "--alpha", "--override"):  # issue 10's missing ones
        assert f in flags["quantize"] and f in flags["export"]


def test_override_per_module(tiny_dir, tmp_path, capsys):
    from macq.qmodel import QuantizedModel

    out = tmp_path / "q"
    code, _, err = run_main(capsys, "quantize", tiny_dir, "-o", out, "--bits", "4", "--group-size", "32",
                            "--override", r"mlp\.down_proj=bits:6,group_size:64")
    assert code == 0, err
    qm = QuantizedModel.load(out)
    got = {k: (r.bits, r.group_size) for k, r in qm.records.items()}
    assert got["model.layers.0.mlp.down_proj"] == (6, 64) and got["model.layers.1.mlp.down_proj"] == (6, 64)
    assert {v for k, v in got.items() if "down_proj" not in k} == {(4, 32)}
    assert qm.method["overrides"] == [r"mlp\.down_proj=bits:6,group_size:64"] and qm.method["version"] == 1
    code, _, err = run_main(capsys, "quantize", tiny_dir, "-o", tmp_path / "q2", "--method", "awq-gptq",
                            "--damp-percent", "0.05", "--n-calib", "2", "--seq-len", "32", "--calib-dataset", "tinystories",
                            "--n-grid", "2", "--no-clip-search")
    assert code == 0, err  # old code: "--damp-percent does not apply" (the field was named damp)
    assert QuantizedModel.load(tmp_path / "q2").method["damp_percent"] == 0.05
