"""Text for evaluation and calibration: bundled samples, local files, or HF datasets when online.

Evaluation reads the *first half* of a text and calibration samples windows from the *second half*,
so calibrating and evaluating on the same bundled text never share tokens (held-out evaluation).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import torch

from macq.errors import MacqError

BUNDLED = ("wiki", "c4", "tinystories")


def load_text(dataset: str) -> str:
    """``wiki`` | ``c4`` | ``tinystories`` (bundled), a ``.txt`` / ``.jsonl`` file, or ``hf:NAME[:CONFIG[:SPLIT]]``."""
    if dataset in BUNDLED:
        text = resources.files("macq").joinpath("corpora", f"{dataset}.txt").read_text(encoding="utf-8")
    elif dataset.startswith("hf:"):
        text = _load_hf_dataset(dataset[3:])
    else:
        p = Path(dataset)
        if not p.is_file():
            raise MacqError(f"dataset: {dataset!r} is neither a bundled sample ({', '.join(BUNDLED)}), "
                            "an existing .txt/.jsonl file, nor hf:NAME")
        raw = p.read_bytes()
        if b"\x00" in raw[:65536]:
            raise MacqError(f"dataset: {dataset!r} is a binary file, not text")
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MacqError(f"dataset: {dataset!r} is not UTF-8 text (bad byte at offset {e.start})") from None
        text = "\n\n".join(_jsonl_texts(p)) if p.suffix == ".jsonl" else decoded
    if not text.strip():
        raise MacqError(f"dataset: {dataset!r} contains no text")
    return text


def _jsonl_texts(p: Path) -> list[str]:
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise MacqError(f"dataset: {p}:{i + 1} is not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise MacqError(f"dataset: {p}:{i + 1} has no string field 'text'")
        out.append(obj["text"])
    return out


def _load_hf_dataset(spec: str) -> str:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "test"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise MacqError("dataset: hf:... needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network or name errors: one line
        raise MacqError(f"dataset: cannot load hf:{spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return "\n\n".join(t for t in ds["text"] if t)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids for the whole text (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_tokens(tokenizer, dataset: str, max_tokens: int | None = None) -> torch.Tensor:
    """Tokens of the first half of the text (the evaluation split), at most ``max_tokens``."""
    text = load_text(dataset)
    half = text[: max(len(text) // 2, 1)]
    if max_tokens is not None:
        # Tokenize only what is needed (about 6 characters per token is generous for English).
        half = half[: max_tokens * 8]
    ids = tokenize(tokenizer, half)
    if ids.numel() < 2:
        raise MacqError(f"dataset: {dataset!r} yields fewer than 2 tokens")
    return ids[:max_tokens] if max_tokens is not None else ids


def calibration_samples(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[n_samples, seq_len]`` windows drawn with a seeded generator from the second half of the text.

    Windows never overlap when the text holds ``n_samples * seq_len`` tokens: overlapping windows repeat
    tokens, so the calibration statistics (Hessians, activation scales) would count them twice while the
    user believes they asked for that many distinct tokens. When the text is shorter, the windows are spread
    evenly (least overlap) and one warning line on stderr says so.
    """
    if n_samples < 1 or seq_len < 2:
        raise MacqError(f"calibration: --n-calib {n_samples}, --seq-len {seq_len}: expected n >= 1 and seq_len >= 2")
    text = load_text(dataset)
    ids = tokenize(tokenizer, text[len(text) // 2:])
    if ids.numel() < seq_len:
        raise MacqError(f"calibration: {dataset!r} has {ids.numel()} tokens in its calibration half, "
                        f"fewer than --seq-len {seq_len}")
    starts = window_starts(ids.numel(), n_samples, seq_len, seed)
    if n_samples * seq_len > ids.numel():
        sys.stderr.write(f"warning: calibration: {dataset!r} holds {ids.numel()} tokens in its calibration half, "
                         f"fewer than --n-calib {n_samples} x --seq-len {seq_len} = {n_samples * seq_len}; "
                         "windows overlap\n")
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def window_starts(n_tokens: int, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Start offsets of ``n`` windows of ``length`` tokens in ``n_tokens``, in random order.

    If they fit (``n * length <= n_tokens``), they are disjoint and uniformly placed: the free space
    ``n_tokens - n * length`` is split into ``n + 1`` random gaps (sorted uniform draws), window ``i``
    starts after ``i`` windows plus the first ``i + 1`` gaps. Otherwise they are evenly spaced from the
    first to the last possible start, so that overlap is as small as it can be."""
    g = torch.Generator().manual_seed(seed)
    free = n_tokens - n * length
    if free >= 0:
        cuts = torch.sort(torch.randint(0, free + 1, (n,), generator=g)).values
        starts = cuts + torch.arange(n) * length
    else:
        starts = torch.linspace(0, n_tokens - length, n).round().long()
    return starts[torch.randperm(n, generator=g)]
