"""The GEMM-rate probe and the per-stage operation counts (macq.perf, macq.progress.StageTimes).

References: hand formulas for the products of a tiny layer (a linear's ``2·tokens·in·out``, attention's
``4·b·heads·s²·head_dim``, the Gram ``2·n·t·n``, GPTQ's lazy blocks summed by an explicit loop over columns),
and a timed float32 matmul measured here for the probe's order of magnitude."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from macq.perf import gemm_rate, matmul_flops, module_flops
from macq.progress import StageTimes, add_flops, stage, with_backward
from macq.quantizers.gptq import GPTQConfig, gptq_block_flops, gptq_quantize
from macq.quantizers.hessian import HessianAccumulator


def test_probe_rate_is_positive_cached_and_near_a_plain_matmul():
    r = gemm_rate("cpu")
    assert r > 0.5                                   # GFLOP/s: any CPU since 2005 does more than this
    t0 = time.perf_counter()
    assert gemm_rate("cpu") == r                      # cached: the second call measures nothing
    assert time.perf_counter() - t0 < 0.01
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.perf_counter()
    a @ b
    plain = matmul_flops(1024, 1024, 1024) / (time.perf_counter() - t0) / 1e9
    assert plain / 20 < r < plain * 20               # same library, same thread: same order of magnitude


def test_linear_and_attention_counts_from_shapes():
    from macq.tiny import tiny_model

    model = tiny_model("llama")
    layer = model.model.layers[0]
    cfg = model.config
    b, s, d = 2, 7, cfg.hidden_size
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else d // cfg.num_attention_heads
    lin = nn.Linear(5, 3)
    assert module_flops(lin, (torch.zeros(4, 6, 5),), None) == 2 * 24 * 5 * 3
    hand = 2 * b * s * sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
    hand += 4 * b * cfg.num_attention_heads * s * s * hd
    timer = StageTimes("cpu")
    x = torch.randn(b, s, d)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    emb = model.model.rotary_emb(x, pos)
    with timer, stage("forward"), torch.no_grad():
        layer(x, position_embeddings=emb, attention_mask=None)
    assert timer.flops["forward"] == hand
    with torch.no_grad():                             # outside a timer nothing is counted (no hook left behind)
        layer(x, position_embeddings=emb, attention_mask=None)
    assert timer.flops["forward"] == hand


def test_backward_count_equals_torch_flop_counter_over_the_autograd_call():
    """A recomputed layer forward plus its backward (input and every weight differentiated, as the streamed
    Fisher pass does): the forward hook's count plus ``with_backward``'s must equal torch's own FlopCounterMode
    over the same forward and backward (it counts the aten matmuls actually run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from macq.tiny import tiny_model

    model = tiny_model("llama").float()
    model.config._attn_implementation = "eager"       # attention as explicit matmuls, so torch counts them
    layer = model.model.layers[0]
    b, s = 1, 9
    x = torch.randn(b, s, model.config.hidden_size, requires_grad=True)
    emb = model.model.rotary_emb(x, torch.arange(s).unsqueeze(0))
    ws = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]
    timer = StageTimes("cpu")
    with timer, stage("backward"), with_backward():
        out = layer(x, position_embeddings=emb, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, [x, *ws], torch.ones_like(out))
    ref = FlopCounterMode(display=False)
    with ref:                                         # .backward: its module tracker refuses autograd.grad
        out = layer(x, position_embeddings=emb, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    assert ref.get_total_flops() > 0
    assert timer.flops["backward"] == ref.get_total_flops()


def test_palettize_counts_its_products():
    """kmeans-cal's palettize work: the feedback assignment's lazy blocks (GPTQ's count, float32), the output
    error's products with H's lower triangle (float32) and the refit's products with the one-hot rows (float32, counted as
    computed: 1/K of their terms are nonzero)."""
    from macq.quantizers.kmeans_cal import lut_gptq, lut_hinv, output_error, refit_lut

    out, n, k, bs = 32, 48, 16, 16
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(out, n, generator=g), torch.randn(200, n, generator=g)
    H = (x.T @ x / 200).double()
    lut = torch.sort(torch.randn(out // 16, k, generator=g), 1).values
    rows = lut.repeat_interleave(16, 0)
    timer = StageTimes("cpu")
    with timer:
        with stage("assign"):
            idx = lut_gptq(w, H, rows, block_size=bs, hinv=lut_hinv(H, 0.01))   # the factor: its own count
        with stage("error"):
            output_error(w, w + 0.01, H)
        with stage("refit"):
            refit_lut(w, H, idx, lut)
    factor = 2 * n ** 3 / 3                           # potrf + trtri, as GPTQ's cholesky stage counts them
    assert timer.flops["assign"] == factor + sum(gptq_block_flops(out, bs, n - i2) for i2 in range(bs, n + 1, bs))
    assert timer.run["assign"].flops64 == 0
    # the output error: ΔW times the triangle's 8 row blocks of 6 (block j: its first 6·j columns), float32
    assert timer.flops["error"] == sum(2 * out * (6 * j) * 6 for j in range(1, 9)) == 9 / 16 * 2 * out * n * n
    assert timer.run["error"].flops64 == 0
    # the refit: H w_r (2·n·n per row), then the lower triangle T times the one-hot rows in 8 row blocks of 6
    # (block j: 6 rows by its first 6·j columns), then per row A_rᵀ (T A_r), A_rᵀ diag H and A_rᵀ (H w_r); float32
    tri = sum(2 * 6 * (6 * j) * out * k for j in range(1, 9))
    assert tri == pytest.approx(9 / 16 * 2 * n * n * out * k)            # (8 + 1) / 16 of the full H·A product
    assert timer.flops["refit"] == 2 * n * n * out + tri + 2 * out * k * n * k + 2 * (2 * out * k * n)
    assert timer.run["refit"].flops64 == 0


def test_hessian_and_gptq_column_counts_match_hand_sums():
    out, n, t, bs = 6, 16, 40, 8
    timer = StageTimes("cpu")
    x = torch.randn(t, n)
    with timer:
        with stage("hessian"):
            acc = HessianAccumulator(n, torch.device("cpu"))
            acc.add(x)
            acc.add(x[:4])
        with stage("columns"):
            gptq_quantize(torch.randn(out, n), acc.H, GPTQConfig(bits=4, group_size=8, block_size=bs,
                                                              mse_clip=False))
    assert timer.flops["hessian"] == t * n * (n + 1) + 4 * n * (n + 1)   # syrk: one triangle and the diagonal
    # column j updates the columns after it in its block (2·out each), then the block updates all later columns
    # (2·out·b·rest), all in float32 (the default precision)
    per_col = sum(2 * out * (min((j // bs + 1) * bs, n) - j) for j in range(n))
    deferred = sum(2 * out * bs * (n - i2) for i2 in range(bs, n + 1, bs))
    assert timer.flops["columns"] == pytest.approx(per_col + deferred)
    assert timer.run["columns"].flops64 == 0 and timer.run["hessian"].flops64 == 0
    assert timer.flops["cholesky"] == pytest.approx(n ** 3 / 3 + n ** 3 / 3)  # potrf, trtri (its own nested stage)
    assert gptq_block_flops(out, bs, n - bs) == sum(2 * out * (bs - i) for i in range(bs)) + 2 * out * bs * (n - bs)


@pytest.mark.parametrize("n", [5, 1024, 2500])   # one block of rows, exactly one, three with a ragged last
def test_gram_from_one_triangle_equals_the_float64_product(n, monkeypatch):
    import macq.quantizers.hessian as hz

    monkeypatch.setattr(hz, "ROWS", 1024 if n > 5 else 2)
    g = torch.Generator().manual_seed(n)
    x, x2 = torch.randn(300, n, generator=g), torch.randn(7, n, generator=g)
    acc = HessianAccumulator(n, torch.device("cpu"))
    acc.add(x)
    acc.add(x2)
    xd = torch.cat([x, x2]).double()
    ref = 2 / 307 * xd.T @ xd
    assert acc.H.dtype == torch.float64 and torch.equal(acc.H, acc.H.T)
    torch.testing.assert_close(acc.H, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    acc32 = HessianAccumulator(n, torch.device("cpu"), torch.float32)
    acc32.add(x)
    acc32.add(x2)
    assert acc32.H.dtype == torch.float32 and torch.equal(acc32.H, acc32.H.T)   # summed in place, mirrored once
    torch.testing.assert_close(acc32.H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    acc32.add(x)                                    # a batch after a read: the upper triangle is made again
    ref = (2 / 607) * (xd.T @ xd + x.double().T @ x.double())
    assert torch.equal(acc32.H, acc32.H.T)
    torch.testing.assert_close(acc32.H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    H0 = torch.randn(n, n, generator=g, dtype=torch.float64)
    H0 = H0 + H0.T
    H = H0.clone()
    hz.gram_into(H, x, 0.5)                         # the whole matrix: a float64 sum of float32 products
    torch.testing.assert_close(H, H0 + 0.5 * x.double().T @ x.double(), rtol=1e-5, atol=1e-4 * n ** 0.5)


def test_rates_and_layer_text_report_against_the_probe():
    timer = StageTimes("cpu", probe=True)
    with timer:
        with stage("hessian"):
            add_flops(4e9)
            time.sleep(0.05)
        with stage("io"):
            time.sleep(0.01)
        with stage("columns"):
            add_flops(1e9, float64=True)
            add_flops(1e9)
            time.sleep(0.05)
    r = timer.rates()
    assert r["probe_gflop_s"] > 0 and r["probe_f64_gflop_s"] > 0 and set(r["stages"]) == {"hessian", "columns"}
    assert set(r["unrated"]) == {"io"} and r["unrated"]["io"]["seconds"] >= 0.01
    h, c = r["stages"]["hessian"], r["stages"]["columns"]
    assert h["gflop"] == 4.0 and 4.0 / h["seconds"] == pytest.approx(h["gflop_s"], rel=0.01)
    assert h["of_probe"] == pytest.approx(h["gflop_s"] / r["probe_gflop_s"], rel=0.01) == h["of_machine"]
    ideal = 1 / r["probe_gflop_s"] + 1 / r["probe_f64_gflop_s"]      # seconds at the probes' rates
    assert c["gflop_f64"] == 1.0 and c["of_machine"] == pytest.approx(ideal / c["seconds"], rel=0.01)
    assert h["cpu_seconds"] < h["seconds"]                              # asleep: no CPU time
    text = timer.take_layer()
    assert "hessian" in text and "GFLOP/s" in text and "%" in text and "io" in text


def test_cli_json_and_progress_lines_carry_the_rates(tmp_path, capsys):
    """The CLI's outputs (in-process: the subprocess boundary is covered by the streamed-CLI tests)."""
    from macq.tiny import save_tiny_model
    from tests.test_stream_calib import _main

    src = save_tiny_model(tmp_path / "ck", "llama")
    r = _main(capsys, "quantize", src, "--method", "gptq", "--calib-dataset", "tinystories", "--n-calib", "4",
              "--seq-len", "32", "--group-size", "32", "--stream", "--json", "-o", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["gemm"]
    assert g["probe_gflop_s"] > 0 and g["threads"] >= 1
    assert g["probe_f64_gflop_s"] is None     # float32 solve: no float64 products, so no float64 probe
    assert {"hessian", "cholesky", "columns", "forward"} <= set(g["stages"])
    for st in g["stages"].values():
        assert st["gflop"] > 0 and st["gflop_s"] > 0 and st["of_probe"] == pytest.approx(
            st["gflop_s"] / g["probe_gflop_s"], rel=0.02, abs=1e-3)
    r = _main(capsys, "quantize", src, "--method", "gptq", "--precision", "float64", "--calib-dataset", "tinystories",
              "--n-calib", "4", "--seq-len", "32", "--group-size", "32", "--stream", "--json", "-o", tmp_path / "q64")
    g = json.loads(r.stdout)["gemm"]
    assert g["probe_f64_gflop_s"] > 0 and g["stages"]["cholesky"]["gflop_f64"] == g["stages"]["cholesky"]["gflop"]
    r = _main(capsys, "quantize", src, "--method", "awq", "--calib-dataset", "tinystories", "--n-calib", "4",
              "--seq-len", "32", "--group-size", "32", "--stream", "-o", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("awq (streamed) layer:")]
    assert lines and all("search" in ln and "GFLOP/s" in ln for ln in lines), r.stderr


def test_palettize_probe_refuses_bad_input_before_work_and_never_replaces_a_foreign_file(tmp_path):
    """The benchmark's bad shape and a --json path it did not write: one ``error:`` line, exit 2, the file as it
    was; its own file is replaced only with --force."""
    def run(*args):
        return _script("palettize_probe", *args)

    foreign = tmp_path / "user.json"
    foreign.write_text('{"mine": 1}')
    _refused(run, [(("--shapes", "12xq"), "error: --shapes '12xq': expected OUTxIN"),
                   (("--json", str(foreign), "--force"), f"error: --json {foreign} exists and is not a file macq")])
    assert foreign.read_text() == '{"mine": 1}'
    mine = tmp_path / "probe.json"
    assert run("--shapes", "16x32", "--json", str(mine)).returncode == 0
    assert json.loads(mine.read_text())["linears"][0]["shape"] == [16, 32]
    r = run("--shapes", "16x32", "--json", str(mine))
    assert r.returncode == 2 and "pass --force to replace it" in r.stderr


def _script(name: str, *args: str):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmarks" / f"{name}.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def _refused(run, cases) -> None:
    """Each ``(args, message)``: exit 2 with exactly one ``error:`` line, starting with the message."""
    for args, msg in cases:
        r = run(*args)
        err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith(msg), r.stderr


def test_bench_realsize_refuses_outputs_it_did_not_write_before_work(tmp_path):
    """The real-size benchmark deletes each row's files under --out and writes --json: a checkpoint without a
    config, a --json file it did not write, a --out directory it did not make are refused in one line, exit 2,
    before any tool runs, and are left as they were."""
    from macq.tiny import save_tiny_model

    ckpt = save_tiny_model(tmp_path / "ckpt", "llama")
    foreign, theirs = tmp_path / "user.json", tmp_path / "their-dir"
    foreign.write_text('{"mine": 1}')
    (theirs / "macq-gptq").mkdir(parents=True)
    (theirs / "macq-gptq" / "keep.txt").write_text("x")

    def run(*args):
        return _script("bench_realsize", *args)

    _refused(run, [((str(tmp_path),), f"error: checkpoint {tmp_path}: no config.json"),
                   ((str(ckpt), "--json", str(foreign), "--force"), f"error: --json {foreign} exists and is not a file"),
                   ((str(ckpt), "--out", str(theirs)), f"error: --out {theirs} exists and is not a scratch directory"),
                   ((str(ckpt), "--out", str(ckpt / "s")), f"error: --out {ckpt / 's'}: lies inside the input {ckpt}")])
    assert foreign.read_text() == '{"mine": 1}' and (theirs / "macq-gptq" / "keep.txt").read_text() == "x"
