"""The Core AI export's memory: it converts from the same placeholder-built chunk as the Core ML target, whose
weights are swapped for the records' compressed buffers, so no dense copy of a quantized weight is ever made.

Measured like the Core ML target's bound (tests/test_coreml_ane_memory.py): a fresh process exports one decoder
layer of a mid-size Llama (hidden 1024, intermediate 4096: 16M weights) after a warm-up export, and reports its
peak RSS growth per weight. Measured 3.6 bytes/weight on 2026-12-06 (Core ML target's probe: 9.1); the bound
is the Core ML test's, 12.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent('''
import gc, tempfile, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import dataclasses
from converters.ane_model import ane_shape
from converters.chunks import plan_chunks
from converters.synthetic import affine_record
from coreai_backend.export import export_chunk, FORMAT
from coreai_backend.options import CoreAIOptions
from converters.chunks import Manifest
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

def qm_of(**kw):
    model = tiny_model("llama", seed=0, **kw)
    recs = {}
    for n, m in quantizable_modules(model).items():
        r = affine_record(get_weight(m).detach().float(), 4, 32, "asym")
        recs[n] = dataclasses.replace(r, scales=r.scales.half().float())
    return QuantizedModel.from_model(model, recs, source="probe")

def status(key):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key))

def export(qm, d, name):
    plan = dataclasses.replace(plan_chunks(qm, 2, None)[1], path=name)   # layer 0 alone
    s = ane_shape(qm)
    m = Manifest(context=64, prefill_len=16, hidden=s.hidden, vocab_parts=[], functions=[], chunks=[plan], format=FORMAT)
    export_chunk(qm, plan, CoreAIOptions(context=64, prefill_len=16), s, Path(d) / name, m)

with tempfile.TemporaryDirectory() as d:
    export(qm_of(), d, "warm.aimodel")
    qm = qm_of(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    gc.collect()
    n = sum(r.shape[0] * r.shape[1] for k, r in qm.records.items() if ".layers.0." in k)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    export(qm, d, "big.aimodel")
    print("BYTES_PER_WEIGHT", n, (status("VmHWM") - base) / n)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux) for the peak RSS")
def test_chunk_conversion_peak_stays_within_the_coreml_bound():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    line = [x for x in out.stdout.splitlines() if x.startswith("BYTES_PER_WEIGHT")]
    assert out.returncode == 0 and line, out.stderr[-2000:]
    n, per_weight = int(line[0].split()[1]), float(line[0].split()[2])
    assert n == 2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 4096   # q, o 1024²; k, v 1024×512; 3 MLP linears
    assert per_weight < 12.0, f"{per_weight:.1f} bytes/weight of peak RSS growth (Core ML target's bound: 12)"
