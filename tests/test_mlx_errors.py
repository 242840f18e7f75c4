"""Bad input to export_mlx: a clear MacqError, raised before anything is written, and nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlx.core")

from macq.errors import MacqError  # noqa: E402
from macq.models import get_weight, quantizable_modules  # noqa: E402
from macq.qmodel import QuantizedModel  # noqa: E402
from macq.quantizers.rtn import RTNConfig, quantize_weight  # noqa: E402
from macq.record import AffineRecord, LUTRecord  # noqa: E402
from macq.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from mlx_backend import export_mlx  # noqa: E402

LAYER = "model.layers.1.mlp.down_proj"   # [64, 128]


def qm_with(record=None, arch: str = "llama", **overrides) -> QuantizedModel:
    """RTN 4-bit g32 everywhere; ``record`` (if given) replaces the one on LAYER."""
    model = tiny_model(arch, **overrides)
    cfg = RTNConfig(bits=4, group_size=32)
    recs = {n: quantize_weight(get_weight(m).detach().float(), cfg) for n, m in quantizable_modules(model).items()}
    if record is not None:
        recs[LAYER] = record
    return QuantizedModel.from_model(model, recs)


def lut_record() -> LUTRecord:
    g = torch.Generator().manual_seed(0)
    return LUTRecord(indices=torch.randint(0, 16, (64, 128), generator=g, dtype=torch.uint8),
                     lut=torch.randn(4, 16, generator=g), bits=4)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def expect_error(tmp_path: Path, qm: QuantizedModel, match: str, **kw) -> str:
    out = tmp_path / "out" / "mlx"
    with pytest.raises(MacqError, match=match) as e:
        export_mlx(qm, out, **{"tokenizer": tiny_tokenizer(), **kw})
    assert not out.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    return str(e.value)


C = torch.zeros(64, 128, dtype=torch.uint8)


@pytest.mark.parametrize("record,match", [
    (AffineRecord(codes=C, scales=torch.ones(64, 8), bits=7, group_size=16), "7-bit"),
    (AffineRecord(codes=C, scales=torch.ones(64, 8), bits=4, group_size=16), "group_size=16"),
    (AffineRecord(codes=C, scales=torch.ones(1, 1), bits=4, group_size=128, per_tensor=True), "per-tensor"),
])
def test_unrepresentable_affine_records(tmp_path, record, match):
    msg = expect_error(tmp_path, qm_with(record), match)
    assert LAYER in msg and "2,3,4,5,6,8" in msg and "32,64,128" in msg


def test_per_channel_over_unsupported_input_dim(tmp_path):
    rec = AffineRecord(codes=torch.zeros(64, 192, dtype=torch.uint8), scales=torch.ones(64, 1), bits=4,
                       group_size=192)
    msg = expect_error(tmp_path, qm_with(rec, intermediate_size=192), "per-channel")
    assert LAYER in msg and "2,3,4,5,6,8" in msg and "32,64,128" in msg


def test_per_channel_with_supported_input_dim_is_accepted(tmp_path):
    w = torch.randn(64, 128)
    rec = quantize_weight(w, RTNConfig(bits=4, group_size=0))        # per channel over in=128
    assert rec.granularity == "per_channel"
    res = export_mlx(qm_with(rec), tmp_path / "m", tokenizer=tiny_tokenizer())
    q = json.loads((res.path / "config.json").read_text())["quantization"]
    assert q[LAYER] == {"group_size": 128, "bits": 4, "mode": "affine"}


def test_lut_needs_the_flag_and_the_flag_is_recorded(tmp_path):
    msg = expect_error(tmp_path, qm_with(lut_record()), "look-up-table")
    assert LAYER in msg and "rtn, gptq, awq, awq-gptq" in msg and "requantize_lut" in msg
    res = export_mlx(qm_with(lut_record()), tmp_path / "ok", tokenizer=tiny_tokenizer(), requantize_lut=True,
                     requantize_bits=3, requantize_group_size=64)
    assert any(LAYER in n and "re-quantized" in n for n in res.notes)
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["macq"]["notes"] == res.notes
    assert cfg["quantization"][LAYER] == {"group_size": 64, "bits": 3, "mode": "affine"}


def test_unknown_architecture(tmp_path):
    qm = qm_with()
    qm.config.model_type = "falcon_mamba_x"
    expect_error(tmp_path, qm, "model_type 'falcon_mamba_x' is not supported")


def test_missing_tokenizer(tmp_path):
    expect_error(tmp_path, qm_with(), "no tokenizer", tokenizer=None)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x"
    with pytest.raises(MacqError, match="tokenizer directory"):
        export_mlx(qm_with(), out, tokenizer=tmp_path / "empty")
    assert not out.exists()


def test_bad_dtype(tmp_path):
    expect_error(tmp_path, qm_with(), "dtype 'int8'", dtype="int8")


def test_tied_lm_head_record_refused(tmp_path):
    qm = qm_with(arch="qwen2")                                       # tied embeddings
    qm.records["lm_head"] = quantize_weight(torch.randn(512, 64), RTNConfig(bits=4, group_size=32))
    expect_error(tmp_path, qm, "tied")


def test_existing_dir_needs_force_and_force_replaces(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MacqError, match="exists"):
        export_mlx(qm_with(), out, tokenizer=tiny_tokenizer())
    assert (out / "keep.txt").exists() and leftovers(tmp_path) == ["m"]
    # force replaces only what macq wrote: a user's directory survives, a macq export is replaced
    with pytest.raises(MacqError, match="not written by macq"):
        export_mlx(qm_with(), out, tokenizer=tiny_tokenizer(), force=True)
    assert (out / "keep.txt").exists() and leftovers(tmp_path) == ["m"]
    (out / "keep.txt").unlink()
    out.rmdir()
    export_mlx(qm_with(), out, tokenizer=tiny_tokenizer())
    (out / "extra.txt").write_text("x")
    export_mlx(qm_with(), out, tokenizer=tiny_tokenizer(), force=True)
    assert not (out / "extra.txt").exists() and (out / "config.json").exists() and leftovers(tmp_path) == ["m"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from macq.shards import ShardWriter

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "add", boom)
    with pytest.raises(OSError, match="disk full"):
        export_mlx(qm_with(), tmp_path / "m", tokenizer=tiny_tokenizer())
    assert leftovers(tmp_path) == []
