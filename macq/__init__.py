"""macq: post-training quantization of causal LMs for Apple silicon (Core ML and MLX)."""

__version__ = "0.1.0"
