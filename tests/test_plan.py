"""The planner decides once (route, config, target options) for every entry point; the target table is the one
place that says what a target holds; the output guard never lets a write touch an input or a user's file; and the
CLI's error boundary turns every failure into one line."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from macq.atomic import guard_output, macq_file, write_marker
from macq.errors import MacqError
from macq.plan import Request, make_plan, run
from macq.qmodel import QuantizedModel
from macq.tiny import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("plan") / "tiny", "llama")


def _same_records(a: QuantizedModel, b: QuantizedModel) -> None:
    assert set(a.records) == set(b.records)
    for k in a.records:
        ta, tb = a.records[k].to_tensors(), b.records[k].to_tensors()
        assert set(ta) == set(tb) and all(torch.equal(ta[f], tb[f]) for f in ta), k


def test_routes_are_decided_from_source_method_and_flag(tiny, tmp_path):
    q = tmp_path / "q"
    run(Request(str(tiny), q, method="rtn", options={"bits": 4, "group_size": 32}))
    cases = [(Request(str(tiny), tmp_path / "a", method="rtn"), "stream"),
             (Request(str(tiny), tmp_path / "a", method="rtn", stream=False), "memory"),
             (Request(str(tiny), tmp_path / "a", method="gptq"), "stream-layers"),
             (Request(str(tiny), tmp_path / "a", method="dkm"), "memory"),
             (Request(str(tiny), tmp_path / "a", method="kmeans-cal"), "stream-layers"),   # Fisher streamed too
             (Request(str(tiny), tmp_path / "a", method="mixed", options={"sensitivity": "kl"}), "memory"),
             (Request(str(q), tmp_path / "a.mlpackage", target="coreml"), "read")]
    for req, route in cases:
        assert make_plan(req).route == route, (req.method, req.stream)
    assert not (tmp_path / "a").exists()


def test_library_call_equals_cli(tiny, tmp_path, capsys):
    """Same options, same records: the library fills the automatic group size and the target's defaults exactly
    as the CLI does, because both follow one plan."""
    from macq.cli import main
    from macq.pipeline import load_quantized_or_model, quantize

    main(["quantize", str(tiny), "--bits", "3", "--target", "mlx", "-o", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert out.startswith("plan: rtn on ") and "note: --group-size 64" in out
    res = run(Request(str(tiny), tmp_path / "lib", runtime="mlx", method="rtn", options={"bits": 3}))
    assert res["plan"]["config"]["group_size"] == 64 and res["plan"]["config"]["zero_point"] == "float"
    _same_records(QuantizedModel.load(tmp_path / "cli"), QuantizedModel.load(tmp_path / "lib"))
    _, fp, tok = load_quantized_or_model(str(tiny))
    mem = quantize(fp, tok, "rtn", {"bits": 3, "symmetric": False, "zero_point": "float"})
    assert mem.method["group_size"] == 64      # the in-memory library call gets the automatic group size too
    _same_records(QuantizedModel.load(tmp_path / "cli"), mem)


def test_target_table_drives_checks_and_options(tiny, tmp_path):
    from macq.targets import OPTIONS, TARGETS, target_options

    assert TARGETS["mlx"].holds.affine_bits == (2, 3, 4, 5, 6, 8)
    from converters.weights import LUT_BITS
    from mlx_backend.layout import MLX_BITS

    assert MLX_BITS is TARGETS["mlx"].holds.affine_bits and LUT_BITS is TARGETS["coreml"].holds.lut_bits
    with pytest.raises(MacqError, match=r"--group-size 16: MLX affine holds groups of 32, 64, 128"):
        make_plan(Request(str(tiny), tmp_path / "m", target="mlx", method="rtn", options={"group_size": 16}))
    with pytest.raises(MacqError, match=r"--bits 5: Core ML LUT indices hold 1, 2, 3, 4, 6, 8 bits"):
        make_plan(Request(str(tiny), tmp_path / "c.mlpackage", target="coreml", method="kmeans", options={"bits": 5}))
    with pytest.raises(MacqError, match="writes look-up-table codes, which MLX cannot hold"):
        make_plan(Request(str(tiny), tmp_path / "m", target="mlx", method="nf4"))
    with pytest.raises(MacqError, match=r"--chunks does not apply to --target mlx \(it is an option of coreml, coreai\)"):
        target_options(TARGETS["mlx"], {"chunks": 2})
    with pytest.raises(MacqError, match=r"--graph 'x': expected one of ane, hf"):
        target_options(TARGETS["coreml"], {"graph": "x"})
    with pytest.raises(MacqError, match=r"--max-chunk-mb 0: expected a value >= 1e-09"):
        target_options(TARGETS["coreml"], {"max_chunk_mb": 0})
    every = {o for t in TARGETS.values() for o in t.options}
    assert every == set(OPTIONS)               # no option without a target, no target option outside the table


def test_guard_refuses_inputs_links_and_user_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, rel in ((model, "is"), (model / "sub", "lies inside"), (tmp_path, "contains")):
        for force in (False, True):
            with pytest.raises(MacqError, match=f"--output {out}: {rel} the input"):
                guard_output(out, force, inputs=[model])
    with pytest.raises(MacqError, match="--out .*config.json exists and is not a file macq wrote"):
        guard_output(model / "config.json", True, kind="file", flag="--out")
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(MacqError, match="is a symbolic link"):
        guard_output(tmp_path / "link", True)
    user = tmp_path / "user"
    user.mkdir()
    with pytest.raises(MacqError, match="was not written by macq"):
        guard_output(user, True)
    write_marker(user, "bench")
    guard_output(user, False, resume="bench")       # a bench dir macq wrote resumes without --force
    with pytest.raises(MacqError, match="exists \\(pass --force"):
        guard_output(user, False)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"schema": "macq.run", "version": 1}))
    assert macq_file(run_file)
    with pytest.raises(MacqError, match="exists \\(pass --force to replace it\\)"):
        guard_output(run_file, False, kind="file")
    guard_output(run_file, True, kind="file")


def test_macq_png_is_recognised(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from macq.atomic import PNG_SOFTWARE

    fig = plt.figure()
    fig.savefig(tmp_path / "ours.png", metadata={"Software": PNG_SOFTWARE})
    fig.savefig(tmp_path / "theirs.png")
    plt.close(fig)
    assert macq_file(tmp_path / "ours.png") and not macq_file(tmp_path / "theirs.png")


def _main_exit(argv: list[str], capsys) -> tuple[int, str]:
    from macq.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_error_boundary_one_line_and_debug(tiny, tmp_path, capsys, monkeypatch):
    import macq.plan

    def boom(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(macq.plan, "run_plan", boom)
    code, err = _main_exit(["quantize", str(tiny), "-o", str(tmp_path / "q")], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'x'}: no space left on the device\n"

    def bug(*a, **k):
        raise KeyError("weights")

    monkeypatch.setattr(macq.plan, "run_plan", bug)
    code, err = _main_exit(["quantize", str(tiny), "-o", str(tmp_path / "q")], capsys)
    assert code == 2 and err.startswith("error: KeyError: 'weights' (run with --debug") and err.count("\n") == 1
    from macq.cli import main

    with pytest.raises(KeyError, match="weights"):
        main(["quantize", str(tiny), "-o", str(tmp_path / "q"), "--debug"])
    monkeypatch.setenv("MACQ_DEBUG", "1")
    with pytest.raises(KeyError, match="weights"):
        main(["quantize", str(tiny), "-o", str(tmp_path / "q")])


def test_interrupt_exits_130_once(tiny, tmp_path, capsys, monkeypatch):
    """SIGINT during the run: exit 130 and one line, a second press while unwinding changes nothing, and the
    output is absent (the writer's temp dir is gone)."""
    import macq.qmodel

    real = macq.qmodel.QuantDirWriter.add_record

    def pressed_twice(self, name, rec):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(0.2)
        return real(self, name, rec)

    monkeypatch.setattr(macq.qmodel.QuantDirWriter, "add_record", pressed_twice)
    before = signal.getsignal(signal.SIGINT)   # Python's handler, or SIG_IGN when started in the background
    code, err = _main_exit(["quantize", str(tiny), "-o", str(tmp_path / "q")], capsys)
    assert code == 130 and err == "error: interrupted by SIGINT; no output was written\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is before                # the handler is given back
