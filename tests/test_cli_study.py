"""``macq analyze -o`` (the study) and ``macq bench -o`` (the method matrix) end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from macq.cli import main
from macq.tiny import save_tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["macq", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_analyze_study(tiny_dir, tmp_path, monkeypatch, capsys):
    q = tmp_path / "q"
    code, _, err = run_main(monkeypatch, capsys, "quantize", tiny_dir, "--method", "rtn", "--bits", "3",
                            "--group-size", "32", "-o", q)
    assert code == 0, err
    out = tmp_path / "an"
    code, stdout, err = run_main(monkeypatch, capsys, "analyze", q, "--methods", "rtn-int4,nf4,kmeans4",
                                 "-o", out, "--max-tokens", "96", "--context", "32", "--n-calib", "2", "--seq-len", "32",
                                 "--threads", "1", "--json")
    assert code == 0, err
    res = json.loads((out / "analysis.json").read_text())
    assert res["schema"] == "macq.analyze/1" and res["labels"] == ["q", "rtn-int4", "nf4", "kmeans4"]
    assert len(res["layers"]) == 14 and set(res["alone"]) == set(res["layers"])  # 2 layers: both are first/last
    for n in res["layers"]:
        s = res["weight_stats"][n]
        assert 0.5 < s["ggd_beta"] < 4 and s["variance"] > 0
        # 3-bit RTN is worse than 4-bit RTN on every layer, in weight and in output space
        assert res["per_layer"][n]["q"]["weight_mse"] > res["per_layer"][n]["rtn-int4"]["weight_mse"]
        assert res["per_layer"][n]["q"]["output_mse"] > res["per_layer"][n]["rtn-int4"]["output_mse"]
    assert {r["kind"] for r in res["sensitivity"]["by_kind"]} >= {"self_attn.q_proj", "mlp.down_proj"}
    assert sorted(r["rank"] for r in res["sensitivity"]["by_layer"]) == [1, 2]
    c = res["summary"]["contest"]
    assert set(c["labels"]) == {"rtn-int4", "nf4", "kmeans4"} and sum(w["n"] for w in c["wins"].values()) == 14
    for f in ("histograms", "rate_distortion", "weight_vs_output", "sensitivity"):
        assert (out / f"{f}.png").read_bytes()[:8] == PNG
    assert "## Weight error vs output error" in (out / "analysis.md").read_text()
    # the output exists now: refused without --force, nothing touched
    code, _, err = run_main(monkeypatch, capsys, "analyze", q, "-o", out)
    assert code == 2 and "exists" in err


def test_analyze_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "analyze", "--model", tiny_dir, "--methods", "rtn-int4;x=rtn:bits=99",
                            "-o", tmp_path / "o")
    assert code == 2 and err.startswith("error:") and "bits" in err and not (tmp_path / "o").exists()
    code, _, err = run_main(monkeypatch, capsys, "analyze", "--model", tiny_dir, "--methods", "nosuch", "-o", tmp_path / "o")
    assert code == 2 and "catalogue" in err
    code, _, err = run_main(monkeypatch, capsys, "analyze", "--model", tiny_dir, "--methods", "nf4",
                            "--func-layers", "a,b", "-o", tmp_path / "o")
    assert code == 2 and "--func-layers" in err
    code, _, err = run_main(monkeypatch, capsys, "analyze", "--model", tiny_dir, "--methods", "nf4", "--layers", "5",
                            "-o", tmp_path / "o")
    assert code == 2 and "--layers 5: the model has 2 decoder layers" in err and not (tmp_path / "o").exists()


def test_bench_matrix_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    common = ["--datasets", "wiki,tinystories", "--max-tokens", "80", "--context", "40", "--n-calib", "2",
              "--seq-len", "32", "--threads", "1", "-o", out, "--json"]
    code, stdout, err = run_main(monkeypatch, capsys, "bench", tiny_dir, "--methods", "fp16,rtn-int4", *common)
    assert code == 0, err
    first = json.loads(stdout)["rows"]
    assert [r["label"] for r in first] == ["fp16", "rtn-int4"]
    assert first[0]["kl_wiki"] == pytest.approx(0.0, abs=1e-9) and first[0]["top1_wiki"] == 1.0
    assert first[1]["bpw"] == pytest.approx(4 + (16 + 4) / 64, rel=1e-9)  # fp16 scale + 4-bit zero per 64
    assert first[1]["ppl_tinystories"] > 1
    assert first[1]["quantize_s"] > 0 and first[1]["peak_mib"] > 0
    # File rates from the real exports: MLX stores an fp16 scale and an fp16 bias per group of 64; Core ML holds
    # the record as it is (uint4 codes, fp16 scale, uint4 zero point per block).
    assert first[1]["file_bpw_mlx"] == pytest.approx(4 + 32 / 64, rel=1e-9)
    assert first[1]["file_bpw_coreml"] == pytest.approx(first[1]["bpw"], rel=1e-9)
    assert 0 < first[1]["file_mib_mlx"] and 0 < first[1]["file_mib_coreml"] and first[0]["file_bpw_mlx"] == 16.0
    # Resume: the two rows are read back unchanged, only the new one is measured.
    code, stdout, err = run_main(monkeypatch, capsys, "bench", tiny_dir, "--methods", "fp16,rtn-int4;r3=rtn:bits=3,group_size=32;"
                                 "k4=kmeans:bits=4,granularity=per_grouped_channel,group_size=16", *common)
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert rows[:2] == first and rows[2]["label"] == "r3" and rows[2]["ppl_wiki"] > 1
    # a lookup table has no MLX form: no number, a note, never a re-quantized export
    assert rows[3]["file_bpw_mlx"] is None and any(n.startswith("mlx: not exported") for n in rows[3]["file_notes"])
    assert rows[3]["file_bpw_coreml"] == pytest.approx(rows[3]["bpw"], rel=1e-9)
    assert "resumed: fp16, rtn-int4" in (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == PNG and (out / "methods.png").read_bytes()[:8] == PNG
    # Other settings into the same results: refused, one line, exit 2.
    code, _, err = run_main(monkeypatch, capsys, "bench", tiny_dir, "--methods", "fp16", "--max-tokens", "64", "-o", out)
    assert code == 2 and "other settings" in err
    code, _, err = run_main(monkeypatch, capsys, "bench", tiny_dir, "--methods", "fp16", "--file-targets", "gguf",
                            "-o", tmp_path / "b2")
    assert code == 2 and "--file-targets" in err and not (tmp_path / "b2").exists()


def test_collapse_notes_counts_per_layer_notes():
    from macq.analysis.report import collapse_notes

    notes = [f"coreml: model.layers.{i}.mlp.up_proj: stored as an exact per-block LUT (8.00 bits/weight)" for i in range(3)]
    notes += ["mlx: not exported: MLX export: 3 layer(s) hold look-up-table codes", "coreml: model.norm: odd"]
    assert collapse_notes(notes) == ["coreml: 3 layer(s): stored as an exact per-block LUT (8.00 bits/weight)",
                                     "mlx: not exported: MLX export: 3 layer(s) hold look-up-table codes",
                                     "coreml: 1 layer(s): odd"]
