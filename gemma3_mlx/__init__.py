"""gemma3-mlx: Gemma 3 on MLX."""
