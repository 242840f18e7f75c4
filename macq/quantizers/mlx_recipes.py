"""mlx_lm's mixed-precision predicates (mlx_lm.convert's quant predicates) restated, for rtn's ``--recipe``.

Kept apart from :mod:`macq.quantizers.recipes` (macq's own recipes over its formats table) so that rtn reads them
without importing the formats table, which imports rtn.
"""

from __future__ import annotations

from dataclasses import dataclass

from macq.errors import MacqError


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits(i_layer, n_layers)`` (integer division as in C)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# mlx_lm.convert's quant predicate NAME: (low bits, high bits) of its mixed_quant_predicate_builder. Its rule:
# v_proj (and MLA's v_a_proj / v_b_proj) and down_proj where use_more_bits(layer), and every lm_head, get the high
# bits; every other quantized module the low bits; all affine at one group size.
MLX_LM_RECIPES: dict[str, tuple[int, int]] = {
    "mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6),
}


@dataclass(frozen=True)
class LayerIndex:
    """How mlx_lm's predicate finds a module's layer: ``n_layers`` decoder layers, and ``location``, the position
    of the layer number among the dot-separated parts of a path (paths with fewer parts count as layer 0)."""

    n_layers: int
    location: int


def mlx_lm_recipe(name: str) -> tuple[int, int]:
    try:
        return MLX_LM_RECIPES[name]
    except KeyError:
        raise MacqError(f"--recipe {name!r}: expected one of {', '.join(MLX_LM_RECIPES)} (mlx_lm's predicates)") \
            from None


def mlx_lm_layer_index(module_names: list[str], layers_prefix: str, n_layers: int, recipe: str) -> LayerIndex:
    """mlx_lm refuses a model with no ``down_proj``; the layer number sits right after the decoder-stack prefix."""
    if not any("down_proj" in m for m in module_names):
        raise MacqError(f"--recipe {recipe}: mlx_lm's predicate needs down_proj modules (a llama-style MLP); "
                        "this model has none")
    return LayerIndex(n_layers, len(layers_prefix.split(".")))


def mlx_lm_recipe_bits(recipe: str, path: str, index: LayerIndex) -> int:
    """The bits mlx_lm's predicate gives module ``path`` (restated from its rule, including C-style ``//``)."""
    low, high = mlx_lm_recipe(recipe)
    parts = path.split(".")
    i = int(parts[index.location]) if len(parts) > index.location and parts[index.location].isdigit() else 0
    n = index.n_layers
    more = use_more_bits(i, n)
    if any(k in path for k in ("v_proj", "v_a_proj", "v_b_proj", "down_proj")) and more:
        return high
    return high if "lm_head" in path else low
