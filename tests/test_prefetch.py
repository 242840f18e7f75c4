"""The read-ahead thread of streamed exports (``macq.prefetch``) and its use by ``macq.streaming``."""

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import macq.streaming as streaming
from macq.errors import MacqError
from macq.prefetch import prefetched
from macq.quantizers import make_config
from macq.tiny import save_tiny_model


class Reads:
    """``n`` reads of ``size`` bytes each that record how many pieces were read and not yet consumed."""

    def __init__(self, n: int, size: int, delay: float = 0.0, fail_at: int | None = None):
        self.n, self.size, self.delay, self.fail_at = n, size, delay, fail_at
        self.started = 0
        self.consumed = 0
        self.max_ahead = 0
        self.lock = threading.Lock()

    def read(self, i: int) -> int:
        if i == self.fail_at:
            raise MacqError(f"model: piece {i} is corrupt")
        time.sleep(self.delay)
        with self.lock:
            self.started += 1
            self.max_ahead = max(self.max_ahead, self.started - self.consumed)
        return i

    def __iter__(self):
        for i in range(self.n):
            yield self.size, (lambda i=i: self.read(i))

    def take(self, it, pause: float = 0.0) -> list[int]:
        out = []
        for x in it:
            with self.lock:
                self.consumed += 1
            out.append(x)
            time.sleep(pause)
        return out


@pytest.mark.parametrize("budget", [0, 10, 25, 10**9])
def test_order_and_values_kept(budget):
    r = Reads(40, 10)
    assert r.take(prefetched(r, budget)) == list(range(40))


def test_reads_run_ahead_within_the_budget():
    """A slow consumer lets the reader fill the budget exactly: 25 bytes hold two 10-byte pieces, not three
    (the one the consumer holds counts as taken)."""
    r = Reads(12, 10)
    r.take(prefetched(r, 25), pause=0.03)
    assert r.max_ahead == 2


def test_piece_larger_than_the_budget_is_read_alone():
    r = Reads(6, 100)
    r.take(prefetched(r, 25), pause=0.03)
    assert r.max_ahead == 1


def test_reads_overlap_the_consumer():
    """Ten 40 ms reads and ten 40 ms steps of work: 0.8 s one after the other, ~0.44 s overlapped (sleeps:
    no CPU needed, so a loaded machine does not change this)."""
    r = Reads(10, 1, delay=0.04)
    t0 = time.perf_counter()
    r.take(prefetched(r, 4), pause=0.04)
    assert time.perf_counter() - t0 < 0.65
    t0 = time.perf_counter()
    r2 = Reads(10, 1, delay=0.04)
    r2.take(prefetched(r2, 0), pause=0.04)
    assert time.perf_counter() - t0 > 0.78


def test_reader_error_reaches_the_consumer_in_place():
    r = Reads(10, 1, fail_at=6)
    got = []
    with pytest.raises(MacqError, match="model: piece 6 is corrupt"):
        for x in prefetched(r, 3):
            got.append(x)
    assert got == [0, 1, 2, 3, 4, 5]


def test_closing_early_stops_the_reader():
    r = Reads(1000, 1)
    it = prefetched(r, 5)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not any(t.name == "macq-prefetch" for t in threading.enumerate())
    assert r.started <= 3 + 5 + 1


def test_streamed_nan_in_a_late_tensor_is_refused_and_nothing_written(tmp_path):
    """The reader thread finds the NaN; the export stops with the one-line error and leaves no output."""
    src = save_tiny_model(tmp_path / "m", "llama")
    store = streaming.TensorStore.open(src)
    late = [k for k in store if k.endswith("mlp.down_proj.weight")][-1]
    tensors = {k: store[k] for k in store}
    tensors[late][3, 5] = float("nan")
    (src / "model.safetensors").unlink()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MacqError, match=f"model: tensor {late} holds NaN or inf values"):
        streaming.stream_quantize(src, tmp_path / "q", "rtn", make_config("rtn", bits=4, group_size=32))
    assert not (tmp_path / "q").exists()
    assert not any(t.name == "macq-prefetch" for t in threading.enumerate())


def test_streamed_records_equal_without_prefetch(tmp_path, monkeypatch):
    """Row blocks (a block smaller than a tensor) and whole tensors arrive in the order the quantizer takes them."""
    src = save_tiny_model(tmp_path / "m", "qwen2")
    monkeypatch.setattr(streaming, "ROW_BLOCK_ELEMS", 2048)
    cfg = make_config("rtn", bits=3, group_size=32, include_embeddings=True)
    outs = {}
    for budget in (0, 3000, 1 << 30):
        monkeypatch.setattr(streaming, "PREFETCH_BYTES", budget)
        plan = streaming.plan_stream(src, cfg)
        outs[budget] = list(streaming.iter_quantized(plan, "rtn", cfg))
    ref = outs[0]
    assert any(kind == "record" and rec.shape[0] * rec.shape[1] > 2048 for kind, _, rec in ref)
    for got in outs.values():
        assert [(k, n) for k, n, _ in got] == [(k, n) for k, n, _ in ref]
        for (kind, _, a), (_, _, b) in zip(got, ref):
            if kind == "record":
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
            else:
                assert torch.equal(a, b)


def test_one_handle_per_file_for_sequential_reads(tmp_path, monkeypatch):
    """Row blocks of a tensor are read through one kept handle (the kernel's readahead state lives in it), with
    the same bytes as a fresh read; close() drops it and a later read reopens."""
    from macq.shards import SafetensorsFile

    t = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48).to(torch.bfloat16)
    save_file({"w": t, "b": torch.ones(5)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    blocks = [f.get_rows("w", r, r + 7) for r in range(0, 64, 7)]
    assert torch.equal(torch.cat(blocks), t) and torch.equal(f.get("b"), torch.ones(5))
    assert len(opened) == 1
    f.close()
    assert torch.equal(f.get("w"), t) and len(opened) == 2
