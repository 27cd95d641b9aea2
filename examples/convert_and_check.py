"""Convert a checkpoint to 4-bit MLX and measure what it cost against the float source.

    python examples/convert_and_check.py SOURCE OUT [GROUP_SIZE]   # a Hugging Face directory, hub id or .gguf
"""

import sys

from gemma3_mlx.convert import convert

source, out = sys.argv[1], sys.argv[2]
group_size = int(sys.argv[3]) if len(sys.argv) > 3 else 64
report = convert(source, out, bits=4, group_size=group_size, check=True, force=True)
for fmt, n in sorted(report.formats.items()):
    print(f"{n:4d} x {fmt}")
q = report.quality
print(f"{report.n_bytes / 1e6:.1f} MB, {report.bits_per_weight:.2f} bits per weight, "
      f"KL {q['kl']:.4f}, top-1 agreement {100 * q['top1']:.1f}% over {q['tokens']} tokens")
