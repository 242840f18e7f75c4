"""Checks of a request's inputs that need no weights, run by the planner before any work.

* :func:`check_tokenizer`: the tokenizer loads, and every id it can produce has a row in the embedding
  (``len(tokenizer) <= vocab_size``). A truncated, garbled or missing ``tokenizer.json`` used to surface
  only when eval tokenized its text, or never: the streamed writers copied the file as it was.
* :func:`check_selection`: every ``--skip`` / ``--override`` / ``--layers`` value selects at least one
  module. A pattern that matches nothing (a typo, another architecture's module names) used to be accepted
  and silently change nothing. The matching rules are exactly the ones the quantizers apply:

  - ``--skip S``: ``S`` is a **substring** of the module name (:func:`macq.models.quantizable_modules`;
    comma lists are split by :func:`macq.options.given_method_options`, empty parts dropped);
  - ``--override PATTERN=field:value``: ``re.search(PATTERN, name)``, the **first** matching override wins
    (:meth:`macq.quantizers.base.QuantConfig.for_module`), so one whose every match is taken by an earlier
    one is as dead as one that matches nothing; overrides apply to modules that ``--skip`` leaves quantized;
  - ``--layers I,J``: decoder-layer **indices** (:func:`macq.studies._layers`): ``I`` selects the modules
    under ``{layers container}.I.``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from macq.errors import MacqError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ----------------------------------------------------------------------------------------- tokenizer
def _vocab_rows(config: Any) -> int | None:
    """The embedding's row count from the HF config (multimodal configs keep it in the text config)."""
    for c in (config, getattr(config, "get_text_config", lambda: None)()):
        v = getattr(c, "vocab_size", None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _check_tokenizer_json(path: Path) -> None:
    """``tokenizer.json`` parses as a tokenizers document: the one-line error names the file and the byte,
    which the library's own error (raised deep inside Rust) does not."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise MacqError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MacqError(f"{path}: not valid JSON, truncated or garbled ({e!s:.120})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise MacqError(f"{path}: not a tokenizers file (no 'model' object)")


def load_tokenizer_checked(where: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` from a local model directory or ``.gguf`` file, every failure one line naming the file."""
    from transformers import AutoTokenizer

    p = Path(where)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MacqError(f"tokenizer: {p} does not exist")
        kw["gguf_file"], src = p.name, p.parent
    elif p.is_dir():
        src = p
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise MacqError(f"tokenizer: {p} has none of {', '.join(TOKENIZER_FILES)}")
        if (p / "tokenizer.json").is_file():
            _check_tokenizer_json(p / "tokenizer.json")
    elif p.exists() or str(where).startswith((".", "/", "~")):
        raise MacqError(f"tokenizer: {where} is not a model directory or a .gguf file")
    else:
        src = p  # a hub id: transformers resolves it (offline: its own error, made one line below)
    try:
        return AutoTokenizer.from_pretrained(str(src), **kw)
    except Exception as e:  # noqa: BLE001 - any library failure on the user's files is one line naming them
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        name = src / "tokenizer.json" if (src / "tokenizer.json").is_file() else src
        raise MacqError(f"{name}: cannot load the tokenizer ({first})") from None


def check_tokenizer(tokenizer_or_dir: Any, config: Any, trust_remote_code: bool = False):
    """Load (if given a directory or ``.gguf``) and check the tokenizer against the model config; returns it.

    Refused: no tokenizer files, a ``tokenizer.json`` that is not valid JSON or not a tokenizer, any load
    failure, and a vocabulary larger than the embedding (``len(tokenizer) > vocab_size``: ids past the last
    row would index out of the embedding, or in an export read another row's memory). Fewer tokens than rows
    is normal (padded embeddings)."""
    if isinstance(tokenizer_or_dir, (str, Path)):
        tok = load_tokenizer_checked(tokenizer_or_dir, trust_remote_code)
        where = str(tokenizer_or_dir)
    elif tokenizer_or_dir is None:
        raise MacqError("tokenizer: none given (the model directory has no tokenizer files)")
    else:
        tok, where = tokenizer_or_dir, type(tokenizer_or_dir).__name__
    try:
        n = len(tok)
    except Exception as e:  # noqa: BLE001
        raise MacqError(f"tokenizer {where}: cannot count its vocabulary ({e!s:.120})") from None
    rows = _vocab_rows(config)
    if rows is None:
        raise MacqError("config.json: no vocab_size, so the tokenizer cannot be checked against the embedding")
    if n > rows:
        raise MacqError(f"tokenizer {where}: {n} tokens, but the model's embedding has {rows} rows (vocab_size): "
                        f"ids {rows}..{n - 1} have no embedding; is it the tokenizer of another model?")
    return tok


# ----------------------------------------------------------------------------------------- files
def check_safetensors_dir(directory: str | Path, stem: str = "model") -> None:
    """Every ``{stem}*.safetensors`` of a directory (an MLX export, an HF checkpoint) has a sound header and the
    size / SHA-256 its index records, if it records them: call before handing the directory to a library whose
    own error on a damaged file names neither the file nor the problem (mlx's JSON parser, for one)."""
    from macq.shards import TensorStore

    d = Path(directory)
    if not TensorStore.exists(d, stem):
        raise MacqError(f"{d}: neither {stem}.safetensors.index.json nor {stem}.safetensors")
    TensorStore.open(d, stem)                      # headers parsed, sizes checked, checksums verified
    from macq.shards import SafetensorsFile

    for f in sorted(d.glob(f"{stem}*.safetensors")):   # shards the index does not list are read by mlx_lm too
        SafetensorsFile(f)


# ----------------------------------------------------------------------------------------- selections
def _flag(key: str) -> str:
    k = key.strip().lstrip("-").replace("_", "-")
    return {"overrides": "--override", "override": "--override", "skip": "--skip", "layers": "--layers"}.get(k, "--" + k)


def _layer_index(name: str, prefix: str | None) -> int | None:
    if prefix is not None:
        if not name.startswith(prefix + "."):
            return None
        head = name[len(prefix) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:2])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > 2 else shown or "none"


def check_selection(patterns: Mapping[str, Iterable[str]], module_names: Iterable[str], *,
                    layers_prefix: str | None = None) -> None:
    """Refuse a selection value that selects no module, naming the flag and the value.

    ``patterns``: ``{flag: values}`` for ``--skip`` (substrings), ``--override`` (the whole
    ``PATTERN=field:value`` spec as typed; ``PATTERN`` is a regex, first match wins) and ``--layers``
    (decoder-layer indices; comma lists are split here too). Flags may be spelled ``skip`` / ``--skip`` /
    ``overrides``. ``module_names``: every module the selection could apply to (for a quantizer: its
    candidates *before* ``--skip``). ``layers_prefix``: the decoder-layer container (``model.layers``);
    default: a module's first all-digit name component is its layer index."""
    names = list(module_names)
    by_flag = {_flag(k): [str(v) for v in vals] for k, vals in patterns.items() if vals}
    unknown = sorted(set(by_flag) - {"--skip", "--override", "--layers"})
    if unknown:
        raise MacqError(f"check_selection: unknown selection flag {unknown[0]} (expected --skip, --override, --layers)")
    skips = [s for s in by_flag.get("--skip", []) if s]
    for s in skips:
        if not any(s in n for n in names):
            raise MacqError(f"--skip {s!r}: matches no module (a substring of module names such as {_examples(names)})")
    kept = [n for n in names if not any(s in n for s in skips)]
    taken: set[str] = set()
    for spec in by_flag.get("--override", []):
        pat = spec.partition("=")[0]
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise MacqError(f"--override {spec!r}: bad pattern ({e})") from None
        hits = [n for n in kept if rx.search(n)]
        if not hits:
            also = " (only modules that --skip keeps float)" if any(rx.search(n) for n in names) else ""
            raise MacqError(f"--override {spec!r}: pattern {pat!r} matches no quantized module{also}; "
                            f"it is a regex searched in names such as {_examples(kept)}")
        if all(n in taken for n in hits):
            raise MacqError(f"--override {spec!r}: every module it matches ({_examples(hits)}) is taken by an earlier "
                            "--override (the first matching pattern wins)")
        taken.update(hits)
    indices = sorted({i for n in names if (i := _layer_index(n, layers_prefix)) is not None})
    for text in by_flag.get("--layers", []):
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if not part.isdigit():
                raise MacqError(f"--layers {text!r}: {part!r} is not a decoder layer index")
            if int(part) not in indices:
                have = f"0..{indices[-1]}" if indices else "none"
                raise MacqError(f"--layers {text!r}: no decoder layer {part} (the model's layers: {have})")


def check_config_selection(cfg: Any, candidates: Iterable[str]) -> None:
    """:func:`check_selection` for a method config's ``skip`` and ``overrides`` against ``candidates``, the
    modules the method would quantize without ``--skip``."""
    pats = {"--skip": tuple(getattr(cfg, "skip", ()) or ()), "--override": tuple(getattr(cfg, "overrides", ()) or ())}
    if any(pats.values()):
        check_selection(pats, candidates)
