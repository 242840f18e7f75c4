"""``macq export CKPT --method gptq|awq|...`` on a local checkpoint: streamed quantization into a temporary dir,
then the export of its records (a calibrated export of a real-size model never holds the float model).
The result must equal the two-step recipe (``quantize --stream``, then ``export Q``) byte for byte."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from macq.cli import main
from macq.shards import TensorStore
from macq.tiny import save_tiny_model

CAL = ["--calib-dataset", "tinystories", "--n-calib", "4", "--seq-len", "32", "--group-size", "32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ck") / "llama", "llama")


def _run(capsys, *args) -> dict:
    main([*map(str, args), "--json"])
    return json.loads(capsys.readouterr().out)


def _no_leftovers(parent, name):
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_mlx_export_streams_and_equals_two_steps(ckpt, tmp_path, capsys, method):
    res = _run(capsys, "export", ckpt, "--target", "mlx", "--method", method, *CAL, "-o", tmp_path / "one")
    assert res["quantization"]["streamed"] is True and res["method"] == method
    assert res["quantization"]["timings"]["total_s"] > 0 and res["memory"]["peak_rss_bytes"] > 0
    _run(capsys, "quantize", ckpt, "--method", method, *CAL, "--no-stream", "-o", tmp_path / "q")
    _run(capsys, "export", tmp_path / "q", "--target", "mlx", "-o", tmp_path / "two")
    one, two = TensorStore.open(tmp_path / "one"), TensorStore.open(tmp_path / "two")
    assert set(one) == set(two)
    for k in two:
        assert torch.equal(one[k], two[k]), k
    _no_leftovers(tmp_path, "one")


def test_coreml_export_streams_and_equals_two_steps(ckpt, tmp_path, capsys):
    """Core ML: the same weight blob as exporting the in-memory quantization (records placed as they are)."""
    res = _run(capsys, "export", ckpt, "--target", "coreml", "--method", "gptq", *CAL, "-o", tmp_path / "one.mlpackage")
    assert res["quantization"]["streamed"] is True
    _run(capsys, "quantize", ckpt, "--method", "gptq", *CAL, "--no-stream", "-o", tmp_path / "q")
    _run(capsys, "export", tmp_path / "q", "--target", "coreml", "-o", tmp_path / "two.mlpackage")
    blobs = [sorted(p.rglob("weight.bin")) for p in (tmp_path / "one.mlpackage", tmp_path / "two.mlpackage")]
    assert len(blobs[0]) == len(blobs[1]) >= 1
    for a, b in zip(*blobs):
        assert a.read_bytes() == b.read_bytes()
    _no_leftovers(tmp_path, "one.mlpackage")


def test_failed_streamed_export_leaves_nothing(ckpt, tmp_path, capsys):
    """A NaN in the last layer is found mid-quantization: exit 2 with the one-line error, no output, no temp dir."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    store = TensorStore.open(bad)
    tensors = {k: store[k] for k in store}
    last = sorted(k for k in tensors if k.endswith("mlp.down_proj.weight"))[-1]
    tensors[last][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "m"
    with pytest.raises(SystemExit) as e:
        main(["export", str(bad), "--target", "mlx", "--method", "gptq", *CAL, "-o", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]     # (progress lines come before it)
    assert e.value.code == 2 and errors == [f"error: model: tensor {last} holds NaN or inf values"], err
    assert not out.exists()
    _no_leftovers(out.parent, "m")


def test_max_memory_applies_to_a_streamed_export(ckpt, tmp_path, capsys):
    res = _run(capsys, "export", ckpt, "--target", "mlx", "--method", "gptq", *CAL, "--max-memory", "4KiB",
               "-o", tmp_path / "e")
    assert res["quantization"]["activations"]["spilled_batches"] > 0
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--target", "mlx", "--method", "gptq", *CAL, "--max-memory", "4KiB", "--no-stream",
              "-o", str(tmp_path / "f")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --max-memory applies to the streamed path")


def test_whole_model_options_export_in_memory_or_refuse_stream(ckpt, tmp_path, capsys):
    """mixed's KL sensitivities are measured on the whole model: an explicit --stream is a one-line error before
    any work (the output stays absent). learned's logits stage streams, like every layer."""
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--target", "coreml", "--method", "mixed", "--sensitivity", "kl", "--stream", *CAL[:6],
              "-o", str(tmp_path / "k.mlpackage")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --stream: ") and "sensitivity" in err and err.count("\n") == 1
    assert not (tmp_path / "k.mlpackage").exists()
    res = _run(capsys, "export", ckpt, "--target", "mlx", "--method", "learned", "--kl-steps", "2", "--bits", "4",
               *CAL, "-o", tmp_path / "l")
    assert res["method"] == "learned" and res.get("streamed") is True
