"""MLX export of the float modes: RTN exports equal ``mlx_lm.convert --q-mode MODE`` tensor for tensor (config
``quantization`` included), load in mlx_lm, dequantize to the records' values and generate; per-layer mixtures
of modes load too."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from macq.models import get_weight, quantizable_modules  # noqa: E402
from macq.quantizers import quantize_model  # noqa: E402
from macq.quantizers.rtn import RTNConfig, quantize_weight  # noqa: E402
from macq.record import FPRecord  # noqa: E402
from macq.tiny import save_tiny_model, tiny_model  # noqa: E402
from mlx_backend import export_mlx, generate_mlx, load_mlx, mlx_logits  # noqa: E402
from mlx_backend.layout import MLX_MODES  # noqa: E402

IDS = np.array([3, 17, 101, 7, 250, 33, 480, 12, 64, 9, 300, 2, 45, 200, 150, 99], dtype=np.int64)


def _same_tensors(a, b) -> None:
    ref, ours = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert ref.keys() == ours.keys()
    for k in ref:
        assert ref[k].dtype == ours[k].dtype, k
        assert mx.array_equal(ref[k], ours[k]).item(), k


def _quantization(d) -> dict:
    return json.loads((d / "config.json").read_text())["quantization"]


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_rtn_mode_export_is_byte_identical_to_mlx_lm_convert(tmp_path, mode):
    from mlx_lm.convert import convert

    hf = save_tiny_model(tmp_path / "hf", "llama")
    convert(str(hf), str(tmp_path / "ref"), quantize=True, q_mode=mode, dtype="float16")
    model = tiny_model("llama")
    cfg = RTNConfig(mode=mode, scale_dtype="float16", include_embeddings=True, include_lm_head=True)
    qm = quantize_model(model, "rtn", cfg)
    assert all(isinstance(r, FPRecord) for r in qm.records.values())
    export_mlx(qm, tmp_path / "ours", tokenizer=hf, dtype="float16")
    _same_tensors(tmp_path / "ref", tmp_path / "ours")
    assert _quantization(tmp_path / "ours") == _quantization(tmp_path / "ref")
    text = generate_mlx(tmp_path / "ours", "Once upon a time", max_tokens=6)
    assert isinstance(text, str) and text


def test_mixture_of_modes_loads_and_dequantizes_to_the_records(tmp_path):
    """mxfp4 base, mxfp8 down_proj, nvfp4 v_proj, affine 4-bit o_proj: one export; mlx_lm rebuilds every layer
    with its own mode and dequantizes it to the record's exact value; logits match torch on the same weights."""
    model = tiny_model("llama")
    cfg = RTNConfig(mode="mxfp4", include_embeddings=True, symmetric=False, zero_point="float",
                    overrides=("down_proj=mode:mxfp8", "v_proj=mode:nvfp4,group_size:16",
                               "o_proj=mode:affine,group_size:32"))
    qm = quantize_model(model, "rtn", cfg)
    export_mlx(qm, tmp_path / "m", dtype="float32", tokenizer=save_tiny_model(tmp_path / "hf", "llama"))
    q = _quantization(tmp_path / "m")
    assert q["mode"] == "mxfp4"
    assert q["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert q["model.layers.0.self_attn.v_proj"] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    loaded = load_mlx(tmp_path / "m")
    mlx_model = loaded[0]
    for name, rec in qm.records.items():
        mod = mlx_model
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        mode = getattr(rec, "mode", "affine")
        assert mod.mode == mode and (mod.bits, mod.group_size) == (rec.bits, rec.group_size), name
        assert MLX_MODES[mode].biases == (getattr(mod, "biases", None) is not None), name
        w = mx.dequantize(mod.weight, mod.scales, getattr(mod, "biases", None), mod.group_size, mod.bits, mode=mode,
                          dtype=mx.float32)
        np.testing.assert_array_equal(np.array(w), rec.dequantize().numpy(), err_msg=name)
    with torch.no_grad():
        lt = qm.to_torch()(torch.from_numpy(IDS)[None]).logits[0].numpy()
    lm = mlx_logits(loaded, IDS)
    assert float(np.abs(lm - lt).max() / np.abs(lt).max()) < 1e-4


def test_rtn_records_equal_mx_quantize_per_layer():
    """The per-weight path the export copies: each layer's codes and scale bytes are mx.quantize's own."""
    from macq.packing import pack_bits

    model = tiny_model("llama")
    for name, mod in quantizable_modules(model, True, True).items():
        w = get_weight(mod).detach().float()
        rec = quantize_weight(w, RTNConfig(mode="nvfp4"))
        q, s = mx.quantize(mx.array(w.numpy()).astype(mx.float16), mode="nvfp4")
        assert np.array_equal(pack_bits(rec.codes, 4).numpy(), np.array(q)), name
        assert np.array_equal(rec.scales.numpy(), np.array(s)), name


def _effective(q: dict, paths) -> dict:
    """Each module's (group, bits, mode) as mlx_lm.load resolves it: its own entry, else the global one."""
    out = {}
    for p in paths:
        e = q.get(p, q)
        out[p] = (e["group_size"] or 64, e["bits"], e.get("mode", "affine"))
    return out


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    """Ten layers (use_more_bits picks 0, 3, 6, 8, 9), stored in fp16 so mlx_lm and macq read the same values."""
    d = tmp_path_factory.mktemp("ck") / "llama10"
    model = tiny_model("llama", num_hidden_layers=10).half()
    model.save_pretrained(d, safe_serialization=True)
    from macq.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("recipe", ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
def test_recipe_export_is_byte_identical_to_mlx_lm_predicate(fp16_ckpt, tmp_path, recipe):
    from mlx_lm.convert import convert

    from macq.quantizers.mlx_recipes import MLX_LM_RECIPES

    convert(str(fp16_ckpt), str(tmp_path / "ref"), quantize=True, quant_predicate=recipe, dtype="float16")
    model = tiny_model("llama", num_hidden_layers=10).half().float()
    cfg = RTNConfig(recipe=recipe, group_size=64, symmetric=False, zero_point="float", include_embeddings=True,
                    include_lm_head=True)
    qm = quantize_model(model, "rtn", cfg)
    low, high = MLX_LM_RECIPES[recipe]
    bits = {n: r.bits for n, r in qm.records.items()}
    assert {n for n, b in bits.items() if b == high and low != high} == {"lm_head"} | {
        f"model.layers.{i}.{m}" for i in (0, 3, 6, 8, 9) for m in ("self_attn.v_proj", "mlp.down_proj")}
    export_mlx(qm, tmp_path / "ours", tokenizer=fp16_ckpt, dtype="float16")
    _same_tensors(tmp_path / "ref", tmp_path / "ours")
    ref_q, our_q = _quantization(tmp_path / "ref"), _quantization(tmp_path / "ours")
    paths = [k for k in ref_q if isinstance(ref_q[k], dict)]
    assert len(paths) == len(qm.records)
    assert _effective(our_q, paths) == _effective(ref_q, paths)


def test_cli_streamed_recipe_and_mode_exports_equal_mlx_lm(fp16_ckpt, tmp_path, capsys):
    """The command line (streamed from the checkpoint): --recipe and --mode are generated flags of export."""
    from mlx_lm.convert import convert

    from macq.cli import main

    convert(str(fp16_ckpt), str(tmp_path / "ref_r"), quantize=True, quant_predicate="mixed_3_6", dtype="float16")
    main(["export", str(fp16_ckpt), "--target", "mlx", "--method", "rtn", "--recipe", "mixed_3_6",
          "--include-embeddings", "--include-lm-head", "-o", str(tmp_path / "ours_r"), "--json"])
    capsys.readouterr()
    _same_tensors(tmp_path / "ref_r", tmp_path / "ours_r")
    convert(str(fp16_ckpt), str(tmp_path / "ref_m"), quantize=True, q_mode="nvfp4", dtype="float16")
    main(["export", str(fp16_ckpt), "--target", "mlx", "--method", "rtn", "--mode", "nvfp4",
          "--include-embeddings", "--include-lm-head", "-o", str(tmp_path / "ours_m"), "--json"])
    capsys.readouterr()
    _same_tensors(tmp_path / "ref_m", tmp_path / "ours_m")
    assert _quantization(tmp_path / "ours_m") == _quantization(tmp_path / "ref_m")


def test_recipe_refusals():
    from macq.errors import MacqError

    with pytest.raises(MacqError, match="--recipe 'q4_k_m': expected one of mixed_2_6, mixed_3_4"):
        RTNConfig(recipe="q4_k_m")
    with pytest.raises(MacqError, match="--recipe mixed_4_6: mlx_lm's predicates are affine only, not --mode mxfp4"):
        RTNConfig(recipe="mixed_4_6", mode="mxfp4")
    with pytest.raises(MacqError, match="--recipe mixed_4_6: mlx_lm's predicate needs down_proj modules"):
        quantize_model(tiny_model("gpt2"), "rtn", RTNConfig(recipe="mixed_4_6", group_size=32))


def test_core_ml_refuses_float_modes_before_any_work(tmp_path, capsys):
    """--target coreml with a float mode: one error line, exit 2, nothing written; a saved float-mode quantization
    exported to Core ML: the same refusal, from the record check that runs before conversion."""
    from macq.cli import main

    hf = save_tiny_model(tmp_path / "hf", "llama")
    for argv in (["quantize", str(hf), "--method", "rtn", "--mode", "mxfp4", "--target", "coreml"],
                 ["export", str(hf), "--method", "gptq", "--mode", "nvfp4", "--target", "coreml"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "-o", str(tmp_path / "out.mlpackage")])
        assert e.value.code == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and "--mode" in err[0] and "Core ML" in err[0] and "--target mlx" in err[0], err
        assert not (tmp_path / "out.mlpackage").exists()
    main(["quantize", str(hf), "--method", "rtn", "--mode", "mxfp8", "-o", str(tmp_path / "q")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "q"), "--target", "coreml", "--context", "64", "-o", str(tmp_path / "m.mlpackage")])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "holds mxfp8" in err[0], err
    assert not (tmp_path / "m.mlpackage").exists()
