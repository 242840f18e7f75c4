"""Fixed llama.cpp-style mixed recipes, as data: which layers get more bits, with no calibration at all.

llama.cpp's K-quant "mixes" (``llama_tensor_get_type``) spend extra bits on the tensors that hurt most:
``attn_v`` and ``ffn_down`` in a subset of layers chosen by ``use_more_bits``
(first eighth, last eighth, and every third layer in between) and the output head. Recipes here restate
those rules on MLX affine formats at group 64, the nearest in cost to the K-quants (Q3_K 3.44 → a3g64b 3.5,
Q4_K 4.5 → a4g64b 4.5, Q5_K 5.5 → a5g64b 5.5, Q6_K 6.56 → a6g64b 6.5 bpw). They are "-like": same layer
selection, not llama.cpp's super-block formats. A recipe's bpw depends on the model's shapes and is always
computed (:func:`recipe_bpw`), never assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from macq.errors import MacqError
from macq.quantizers.formats import Format
from macq.quantizers.mlx_recipes import use_more_bits  # noqa: F401  (re-exported: llama.cpp's rule)


# Layer predicates by name: "all", "more_bits", "first:K" (i < K), "first_frac:D" (i < n // D).
def _layer_ok(rule: str, i: int | None, n: int) -> bool:
    if rule == "all":
        return True
    if i is None:            # outside the decoder stack: only "all" rules apply
        return False
    if rule == "more_bits":
        return use_more_bits(i, n)
    kind, _, arg = rule.partition(":")
    if kind == "first":
        return i < int(arg)
    if kind == "first_frac":
        return i < n // int(arg)
    raise MacqError(f"recipe layer rule {rule!r}: expected all, more_bits, first:K or first_frac:D")


@dataclass(frozen=True)
class Rule:
    pattern: str             # regex searched in the module path (e.g. r"v_proj$|c_attn$")
    fmt: str                 # format name (see Format.parse)
    layers: str = "all"


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str                # format of every module no rule matches
    rules: tuple[Rule, ...]  # first match wins
    description: str


_HEAD = r"(^|\.)(lm_head|embed_tokens|wte)$"
_V = r"\.(v_proj)$"
_DOWN = r"\.(down_proj|c_proj)$"      # GPT-2's mlp.c_proj is the down projection; attn.c_proj excluded below
_O = r"\.(o_proj)$|attn\.c_proj$"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("q4_k_m-like", "a4g64b",
           (Rule(_HEAD, "a6g64b"), Rule(_V, "a6g64b", "more_bits"), Rule(r"mlp" + _DOWN, "a6g64b", "more_bits")),
           "Q4_K_M: 4-bit everywhere; 6-bit v_proj/down_proj where use_more_bits; 6-bit output/embeddings"),
    Recipe("q5_k_m-like", "a5g64b",
           (Rule(_HEAD, "a6g64b"), Rule(_V, "a6g64b", "more_bits"), Rule(r"mlp" + _DOWN, "a6g64b", "more_bits")),
           "Q5_K_M: 5-bit everywhere; 6-bit v_proj/down_proj where use_more_bits; 6-bit output/embeddings"),
    Recipe("q3_k_m-like", "a3g64b",
           (Rule(_HEAD, "a6g64b"), Rule(_V, "a5g64b", "first:2"), Rule(_V, "a4g64b"),
            Rule(r"mlp" + _DOWN, "a5g64b", "first_frac:16"), Rule(r"mlp" + _DOWN, "a4g64b"), Rule(_O, "a4g64b")),
           "Q3_K_M: 3-bit; v_proj 5-bit in layers 0-1 else 4-bit; down_proj 5-bit in the first 1/16 else "
           "4-bit; o_proj 4-bit; 6-bit output/embeddings"),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise MacqError(f"--recipe {name!r}: expected one of {', '.join(RECIPES)}") from None


def recipe_assignment(name: str, modules: list[str], layers_prefix: str, n_layers: int) -> dict[str, Format]:
    """The format of every module path under recipe ``name``."""
    recipe = get_recipe(name)
    pat = re.compile(re.escape(layers_prefix) + r"\.(\d+)\.")
    out: dict[str, Format] = {}
    for m in modules:
        hit = pat.match(m)
        i = int(hit.group(1)) if hit else None
        fmt = recipe.base
        for rule in recipe.rules:
            if re.search(rule.pattern, m) and _layer_ok(rule.layers, i, n_layers):
                fmt = rule.fmt
                break
        out[m] = Format.parse(fmt)
    return out


def recipe_bpw(assignment: dict[str, Format], shapes: dict[str, tuple[int, int]]) -> float:
    """Average stored bits per weight of an assignment on these shapes (exact storage rule)."""
    bits = 0.0
    for m, f in assignment.items():
        b = f.storage_bits(shapes[m])
        if b is None:
            raise MacqError(f"recipe format {f.name} does not fit {m} of shape {shapes[m]}")
        bits += b
    return bits / sum(shapes[m][0] * shapes[m][1] for m in assignment)
