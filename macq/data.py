"""Text for evaluation and calibration: bundled samples, local files, or HF datasets when online.

Evaluation reads the *first half* of a text and calibration samples windows from the *second half*,
so calibrating and evaluating on the same bundled text never share tokens (held-out evaluation).
"""

from __future__ import annotations

import json
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
        if p.suffix == ".jsonl":
            text = "\n\n".join(_jsonl_texts(p))
        else:
            text = p.read_text(encoding="utf-8", errors="replace")
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
    """``[n_samples, seq_len]`` windows drawn with a seeded generator from the second half of the text."""
    if n_samples < 1 or seq_len < 2:
        raise MacqError(f"calibration: n_samples={n_samples}, seq_len={seq_len}: expected n >= 1 and seq_len >= 2")
    text = load_text(dataset)
    ids = tokenize(tokenizer, text[len(text) // 2:])
    if ids.numel() <= seq_len:
        raise MacqError(f"calibration: {dataset!r} has {ids.numel()} tokens in its calibration half, "
                        f"fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
