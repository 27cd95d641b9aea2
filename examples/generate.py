"""Stream a completion from the default model (Gemma 3 270M) with the Python API.

    python examples/generate.py "The capital of France is"
"""

import sys

import gemma3_mlx

prompt = sys.argv[1] if len(sys.argv) > 1 else "The capital of France is"
model, tokenizer = gemma3_mlx.load(gemma3_mlx.resolve(None))  # converts the packaged GGUF on first use
# The default model is a base (pretrained) model: give it raw text, not chat messages.
for piece in gemma3_mlx.stream_generate(model, tokenizer, prompt, max_tokens=32):
    print(piece.text, end="", flush=True)
print(f"\n[{piece.prompt_tokens} prompt tokens at {piece.prompt_tps:.0f} tok/s, "
      f"{piece.generation_tokens} generated at {piece.generation_tps:.1f} tok/s, "
      f"peak memory {piece.peak_memory_gb:.2f} GB, finish: {piece.finish_reason}]")
