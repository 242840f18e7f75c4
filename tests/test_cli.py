"""The CLI end to end on a tiny model: results, one-line errors with exit code 2, no half-written output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macq.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


def run_main(monkeypatch, capsys, *args):
    """The console entry point in-process (fast): returns (exit code, stdout, stderr)."""
    from macq.cli import main

    monkeypatch.setattr(sys, "argv", ["macq", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def macq(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "macq.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"macq {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def test_quantize_info_eval(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"

    def ok(*args):
        code, stdout, err = run_main(monkeypatch, capsys, *args)
        assert code == 0, err
        return json.loads(stdout)

    summary = ok("quantize", tiny_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", out, "--json")
    assert summary["layers"] == 14
    assert summary["bits_per_weight"] == pytest.approx(4 + 16 / 32, abs=1e-6)  # symmetric: fp16 scale per 32
    info = ok("info", out, "--json")
    assert len(info["layers"]) == 14 and info["source"] == str(tiny_dir)
    ev = ok("eval", out, "--dataset", "tinystories", "--max-tokens", "256", "--context", "64", "--device", "cpu",
            "--json")
    assert ev["ppl"] > 1 and 0 <= ev["top1"] <= 1 and ev["kl"] >= 0
    assert ev["n_tokens"] == 256 - 4  # 4 windows of 64, first token of each unscored


@pytest.mark.parametrize("args,msg", [
    (["--method", "rtn", "--bits", "9"], "--bits 9"),
    (["--method", "rtn", "--bits", "4", "--group-size", "48"], "48"),
    (["--method", "nosuch"], "--method 'nosuch'"),
    (["--method", "rtn", "--granularity", "per_tensor"], "does not apply"),
])
def test_bad_quantize_options(tiny_dir, tmp_path, monkeypatch, capsys, args, msg):
    out = tmp_path / "q"
    code, _, err = run_main(monkeypatch, capsys, "quantize", tiny_dir, *args, "-o", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_model_and_dataset(tiny_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "quantize", tmp_path / "nope", "-o", tmp_path / "q")
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = run_main(monkeypatch, capsys, "eval", tiny_dir, "--dataset", empty)
    assert code == 2 and "no text" in err
    (tmp_path / "exists").mkdir()
    code, _, err = run_main(monkeypatch, capsys, "quantize", tiny_dir, "-o", tmp_path / "exists")
    assert code == 2 and "--force" in err
    code, _, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "onnx", "-o", tmp_path / "x")
    assert code == 2 and "--target 'onnx'" in err


def test_subprocess_exit_code(tmp_path):
    r = macq("quantize", tmp_path / "nope", "-o", tmp_path / "q", check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: model:")


def test_export_mlx_then_generate_and_eval(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mlx"
    code, stdout, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "mlx", "--method", "rtn",
                                 "--bits", "4", "--group-size", "32", "--asymmetric", "--zero-point", "float",
                                 "-o", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # fp16 scale + fp16 bias per 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    code, stdout, err = run_main(monkeypatch, capsys, "eval", out, "--dataset", "tinystories", "--max-tokens", "128",
                                 "--context", "64", "--json")
    assert code == 0, err
    assert json.loads(stdout)["ppl"] > 1
    code, stdout, err = run_main(monkeypatch, capsys, "generate", out, "--prompt", "Once upon a time",
                                 "--max-tokens", "8", "--raw")
    assert code == 0 and stdout.strip(), err
    # LUT records cannot be held by MLX: refused without the explicit flag, nothing written.
    code, _, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "mlx", "--method", "kmeans",
                            "--bits", "4", "-o", tmp_path / "lut")
    assert code == 2 and "error:" in err and not (tmp_path / "lut").exists()


def test_export_coreml_then_inspect(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.mlpackage"
    code, stdout, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "coreml", "--method", "kmeans",
                                 "--bits", "4", "--granularity", "per_grouped_channel", "--group-size", "16",
                                 "--context", "64", "-o", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["bits_per_weight"] == pytest.approx(res["record_bits_per_weight"], rel=1e-6)
    assert res["ane_report"][0] == "ANE gate: no findings"          # the default is the ANE graph
    code, stdout, err = run_main(monkeypatch, capsys, "inspect", out, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["ops"].get("constexpr_lut_to_dense") == 14
    from macq.atomic import macq_artifact

    assert macq_artifact(out) == "mlpackage"  # the marker --force relies on to replace only macq's packages
    code, _, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "coreml", "--method", "kmeans",
                            "--bits", "4", "--context", "64", "-o", out, "--force")
    assert code == 0, err
    assert data["functions"] == ["decode", "prefill"] and data["ane_findings"] == []
    # the old traced graph stays an option; its flexible shapes are reported by the gate
    code, stdout, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "coreml", "--method", "rtn",
                                 "--bits", "4", "--group-size", "32", "--graph", "hf", "--context", "64", "-o", tmp_path / "hf.mlpackage",
                                 "--json")
    assert code == 0, err
    assert any("RangeDim" in line for line in json.loads(stdout)["ane_report"])
    code, _, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "coreml", "--graph", "hf", "--chunks",
                            "2", "-o", tmp_path / "x")
    assert code == 2 and "--chunks" in err and not (tmp_path / "x").exists()


def test_export_coreml_chunks_eval_generate(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "chunks"
    code, stdout, err = run_main(monkeypatch, capsys, "export", tiny_dir, "--target", "coreml", "--method", "rtn",
                                 "--bits", "4", "--group-size", "32", "--context", "32", "--prefill-len", "8",
                                 "--chunks", "2", "-o", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert len(res["chunks"]) == 4 and (out / "coreml_manifest.json").is_file()
    assert res["ane_report"] == ["ANE gate: no findings"]
    code, stdout, err = run_main(monkeypatch, capsys, "inspect", out, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert len(data["chunks"]) == 4 and data["ane_findings"] == []
    assert sum(d["ops"].get("constexpr_blockwise_shift_scale", 0) for d in data["chunks"]) == 14
    code, stdout, err = run_main(monkeypatch, capsys, "eval", out, "--dataset", "tinystories", "--max-tokens", "40",
                                 "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert ev["backend"] == "mil" and ev["n_tokens"] == 31 + 7 and 1 < ev["ppl"] < 2000   # macq windows of 32: [0,32) [32,40)
    run_file = tmp_path / "run.json"
    code, stdout, err = run_main(monkeypatch, capsys, "eval", out, "--dataset", "tinystories", "--max-tokens", "40",
                                 "--reference", tiny_dir, "--decode-tokens", "0", "--out", run_file, "--json")
    assert code == 0, err
    ev0 = json.loads(stdout)
    assert ev0["kl"] > 0 and 0 <= ev0["top1"] <= 1 and ev0["decode_ms_per_token"] is None
    assert abs(ev0["ppl"] - ev["ppl"]) / ev["ppl"] < 5e-3            # all-prefill = half decode, within fp16 noise
    from macq.results import load_run

    run = load_run(run_file)
    assert run.runtime == "mil-graph-check" and run.method == "rtn" and run.method_config["bits"] == 4
    assert run.metrics["bits_per_weight"].value == pytest.approx(res["bits_per_weight"], rel=1e-9)
    assert run.metrics["size"].value == pytest.approx(res["bytes_on_disk"] / 2**20, rel=1e-9)
    assert run.metrics["kl"].value == pytest.approx(ev0["kl"]) and "decode_tokens_per_s" not in run.metrics
    code, _, err = run_main(monkeypatch, capsys, "eval", out, "--context", "64", "--out", tmp_path / "r2.json")
    assert code == 2 and "fixed context" in err and not (tmp_path / "r2.json").exists()
    code, stdout, err = run_main(monkeypatch, capsys, "generate", out, "--prompt", "Once upon a time",
                                 "--max-tokens", "3", "--raw")
    assert code == 0 and "graph check" in err, err


def test_analyze_and_bench(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    code, _, err = run_main(monkeypatch, capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", "4",
                            "--group-size", "32", "-o", out)
    assert code == 0, err
    png = tmp_path / "d.png"
    code, stdout, err = run_main(monkeypatch, capsys, "analyze", out, "--plot", png, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert len(data["layers"]) == 14 and data["summary"]["name"] == "(all)"
    assert all(r["sqnr_db"] > 0 and r["mse"] > 0 for r in data["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, stdout, err = run_main(monkeypatch, capsys, "bench", out, "--prompt-len", "8", "--new-tokens", "2",
                                 "--repeats", "1", "--device", "cpu", "--json")
    assert code == 0, err
    b = json.loads(stdout)
    assert b["prefill_ms"] > 0 and b["decode_ms_per_token"] > 0


def test_every_documented_command_exists():
    """The README and scripts/setup.sh call these commands; a CLI rewrite must not drop one."""
    from typer.main import get_command

    from macq.cli import app

    names = set(get_command(app).commands)
    documented = {"quantize", "export", "eval", "bench", "analyze", "baseline", "report", "info", "inspect",
                  "generate", "prepare-model"}
    assert documented <= names, documented - names
    assert "macq\" prepare-model" in (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
