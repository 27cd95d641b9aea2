"""Describe a picture with a Gemma 3 vision model (4B, 12B or 27B) through the Python API.

    python examples/describe_image.py MODEL IMAGE [--pan-and-scan]
    python examples/describe_image.py google/gemma-3-4b-it photo.jpg

MODEL is a converted directory, a .gguf file, or a hub id (fetched and converted once).

Pan & scan adds up to 4 crops of a wide or large picture (small text, receipts, screenshots).
"""

import sys

import gemma3_mlx

if len(sys.argv) < 3:
    sys.exit(__doc__)
model_name, image = sys.argv[1], sys.argv[2]
pan_and_scan = "--pan-and-scan" in sys.argv[3:]
try:
    gemma3_mlx.load_image(image)  # check the file before loading the model
except gemma3_mlx.ImageError as e:  # missing, not an image, truncated, tiny: one line, exit 1
    sys.exit(f"error: {e}")
model, tokenizer = gemma3_mlx.load(gemma3_mlx.resolve(model_name))
messages = [{"role": "user", "content": "Describe this image in two sentences."}]
for piece in gemma3_mlx.stream_generate(model, tokenizer, messages, images=[image], pan_and_scan=pan_and_scan,
                                        max_tokens=64):
    print(piece.text, end="", flush=True)
print(f"\n[{piece.prompt_tokens} prompt tokens at {piece.prompt_tps:.0f} tok/s, "
      f"{piece.generation_tokens} generated, finish: {piece.finish_reason}]")
