"""The run schema round-trips and guards itself; ``macq report`` merges runs and refuses mismatched ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from macq.errors import MacqError
from macq.results import Metric, RunResult, check_comparable, load_run, save_run, text_identity


def make_run(label: str, model_hash: str = "sha256:aa", text_hash: str | None = "sha256:tt", **metrics) -> RunResult:
    ms = {k: Metric(v, "u", None) for k, v in metrics.items()}
    return RunResult(model_id="m", model_hash=model_hash, method=label, runtime="torch", device_kind="cpu",
                     device_name="test cpu", eval_text_id="wiki:first 10 tokens" if text_hash else None,
                     eval_text_hash=text_hash, metrics=ms, label=label)


def test_schema_round_trip(tmp_path):
    run = make_run("bnb-nf4", ppl=12.5)
    run.metrics["ppl"] = Metric(12.5, "perplexity", 0.25)
    run.metrics["kl"] = Metric(float("nan"), "nats/token")          # unknown: stored as null, never a number
    run.method_config = {"quant_type": "nf4", "blocksize": 64, "nested": {"a": [1, 2]}}
    run.libraries = {"torch": "2.13.0"}
    run.layers = [{"layer": "model.layers.0.q", "n": 4096, "ref_mse": 1e-4, "equal": True}]
    run.notes = ["a note"]
    p = save_run(run, tmp_path / "run.json")
    raw = json.loads(p.read_text())
    assert raw["schema"] == "macq.run" and raw["version"] == 1 and raw["metrics"]["kl"]["value"] is None
    back = load_run(p)
    assert back.to_dict() == raw
    assert back.metrics["ppl"].stderr == 0.25 and back.metric("kl") is None and back.layers[0]["equal"] is True
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_schema_rejects_bad_files(tmp_path):
    p = tmp_path / "r.json"
    d = make_run("x").to_dict()
    p.write_text(json.dumps({**d, "version": 99}))
    with pytest.raises(MacqError, match="schema version 99 is not supported"):
        load_run(p)
    p.write_text(json.dumps({**d, "schema": "other"}))
    with pytest.raises(MacqError, match="not a macq.run result"):
        load_run(p)
    bad = dict(d)
    del bad["device"]
    p.write_text(json.dumps(bad))
    with pytest.raises(MacqError, match="missing or malformed field"):
        load_run(p)
    p.write_text("{not json")
    with pytest.raises(MacqError, match="not valid JSON"):
        load_run(p)


def test_text_identity_tracks_tokens_and_windows():
    ids = np.arange(100)
    tid, h = text_identity(ids, "wiki", 64)
    assert tid == "wiki:first 100 tokens (eval split), context=64"
    assert text_identity(ids.copy(), "wiki", 64)[1] == h
    assert text_identity(ids[:-1], "wiki", 64)[1] != h            # one token fewer
    changed = ids.copy()
    changed[50] += 1
    assert text_identity(changed, "wiki", 64)[1] != h             # another tokenizer's ids
    assert text_identity(ids, "wiki", 32)[1] != h                 # other windows


def test_check_comparable():
    a, b = make_run("a", ppl=10.0), make_run("b", ppl=11.0)
    check_comparable([a, b])
    with pytest.raises(MacqError, match="model hash differs"):
        check_comparable([a, make_run("c", model_hash="sha256:bb")])
    with pytest.raises(MacqError, match="evaluation text differs"):
        check_comparable([a, make_run("d", text_hash="sha256:other")])
    check_comparable([a, make_run("bench", text_hash=None)])     # latency-only runs join any text
    with pytest.raises(MacqError, match="records no model hash"):
        check_comparable([a, make_run("e", model_hash=None)])


from tests.test_cli import run_main as run_cli  # noqa: E402  (the same in-process CLI runner)


def test_report_cli(tmp_path, monkeypatch, capsys):
    a = save_run(make_run("ref nf4", ppl=20.0, kl=0.05, bits_per_weight=4.127, size=80.0,
                          decode_tokens_per_s=30.0, prefill_tokens_per_s=300.0, decode_ms_per_token=33.3),
                 tmp_path / "a.json")
    b = save_run(make_run("macq nf4", ppl=20.0, kl=0.05, bits_per_weight=4.127, size=80.0), tmp_path / "b.json")
    c = save_run(make_run("other model", model_hash="sha256:zz", ppl=9.0), tmp_path / "c.json")
    d = save_run(make_run("other text", text_hash="sha256:zz", ppl=9.0), tmp_path / "d.json")
    out = tmp_path / "rep"
    code, stdout, err = run_cli(monkeypatch, capsys, "report", a, b, "-o", out, "--pending", "bnb-nf4 cuda=not run: no GPU lent")
    assert code == 0, err
    md = (out / "report.md").read_text()
    assert "| ref nf4 | torch | cpu: test cpu | 4.127 | 80.0 | 20.000 | 0.0500 |" in md
    assert "| bnb-nf4 cuda | not run: no GPU lent |" in md
    for png in ("speed.png", "ppl_vs_size.png", "latency_vs_bits.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "runs.json").read_text())) == 2
    for bad, msg in ((c, "model hash differs"), (d, "evaluation text differs")):
        code, _, err = run_cli(monkeypatch, capsys, "report", a, bad, "-o", tmp_path / "rep2")
        assert code == 2 and err.startswith("error: report: " + msg) and err.count("\n") == 1
        assert not (tmp_path / "rep2").exists()
    code, _, err = run_cli(monkeypatch, capsys, "report", a, "-o", out)
    assert code == 2 and "exists" in err


def test_metric_nan_and_units():
    m = Metric(math.inf, "ms/token")
    assert m.to_dict() == {"value": None, "unit": "ms/token", "stderr": None}
    with pytest.raises(MacqError, match="needs 'value' and 'unit'"):
        Metric.from_dict({"value": 1.0})
