"""The Core AI target on the default model, end to end: RTN int4 g32 records → ``.aimodel`` (prefill + decode,
stateful) → read back against the records → greedy answer through the Core AI runtime.

    python scripts/coreai_default_export.py [--out /tmp/smol.aimodel] [--context 256] [--tokens 12]

Prints quantization / export / read-back times, the asset size, the export process's peak RSS, the storage
types, and the generated text with the runtime's prefill and per-token decode times (on Linux: the asset lowered
to ODIX and run on the CPU, a check of the saved program, not Apple-device latency).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=12)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from coreai_backend import CoreAIOptions, export_coreai
    from coreai_backend.readback import read_back
    from coreai_backend.runner import generate_coreai
    from macq.models import load_model
    from macq.quantizers import make_config, quantize_model

    model, tok = load_model(None)
    t = time.perf_counter()
    qm = quantize_model(model, "rtn", make_config("rtn", bits=4, group_size=32))
    print(f"quantized: {time.perf_counter() - t:.1f} s, {qm.bits_per_weight():.3f} bits/weight")
    del model
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "smol.aimodel"
    t = time.perf_counter()
    res = export_coreai(qm, out, CoreAIOptions(context=args.context, prefill_len=64, force=True))
    print(f"export: {time.perf_counter() - t:.1f} s, {res.bytes_on_disk} bytes, peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    t = time.perf_counter()
    rb = read_back(out, qm)
    print(f"read back: {time.perf_counter() - t:.1f} s, {rb.n_records} records, {rb.n_stored} stored ops "
          f"(both functions), dense fp16 copies of quantized weights: {len(rb.dense_copies)}; storage {rb.storage_types}")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    t = time.perf_counter()
    toks, tm = generate_coreai(out, ids[0].numpy(), args.tokens, eos=tok.eos_token_id)
    print(f"generate: {tok.decode(toks)!r} in {time.perf_counter() - t:.0f} s (prefill {tm.prefill_s:.0f} s for "
          f"{tm.prefill_tokens} tokens, decode {tm.decode_s / max(1, tm.decode_tokens):.1f} s/token); torch "
          f"{torch.__version__}")


if __name__ == "__main__":
    main()
