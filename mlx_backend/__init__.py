"""MLX backend: write macq's quantized records in the exact on-disk format ``mlx_lm.load`` reads, and run
the result through mlx_lm (logits, generation, perplexity, speed).

mlx / mlx_lm are imported lazily, inside the functions that need them, so importing this package is cheap.
"""

from mlx_backend.export import ExportResult, export_mlx
from mlx_backend.layout import MLX_BITS, MLX_GROUPS, mlx_quantize_record
from mlx_backend.runner import eval_mlx, generate_mlx, load_mlx, mlx_logits

__all__ = ["ExportResult", "export_mlx", "MLX_BITS", "MLX_GROUPS", "mlx_quantize_record", "eval_mlx",
           "generate_mlx", "load_mlx", "mlx_logits"]
