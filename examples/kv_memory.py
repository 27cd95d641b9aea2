"""KV-cache memory of Gemma 3 4B and 27B at long context: every layer full vs window rings.

    python examples/kv_memory.py
"""

from gemma3_mlx.cache import kv_bytes
from gemma3_mlx.config import ModelConfig

CONFIGS = {  # the text shapes of the released checkpoints
    "4B": {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "sliding_window": 1024},
    "27B": {"hidden_size": 5376, "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
            "head_dim": 128, "sliding_window": 1024, "query_pre_attn_scalar": 168},
}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


print("| model | context | every layer full, 16-bit | gemma3-mlx 16-bit | global KV 8-bit | global KV 4-bit |")
print("|---|---|---|---|---|---|")
for name, text in CONFIGS.items():
    cfg = ModelConfig.from_dict({"model_type": "gemma3_text", **text})
    for ctx in (8192, 32768, 131072):
        row = [kv_bytes(cfg, ctx, full=True), kv_bytes(cfg, ctx), kv_bytes(cfg, ctx, kv_bits=8), kv_bytes(cfg, ctx, kv_bits=4)]
        print(f"| {name} | {ctx // 1024}K | " + " | ".join(gib(b) for b in row) + " |")
