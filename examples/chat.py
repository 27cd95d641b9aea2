"""A two-turn chat with the Python API: only the new turn is processed each time.

    python examples/chat.py [MODEL_DIR]
"""

import sys

import gemma3_mlx

model, tokenizer = gemma3_mlx.load(gemma3_mlx.resolve(sys.argv[1] if len(sys.argv) > 1 else None))
chat = gemma3_mlx.ChatSession(model, tokenizer, system="Answer in one sentence.", max_tokens=24)
for question in ("What is the capital of France?", "And of Italy?"):
    print(f"> {question}")
    for piece in chat.send(question):
        print(piece.text, end="", flush=True)
    r = chat.last
    print(f"\n[{r.prompt_tokens} prompt tokens, {r.prefill_tokens} processed this turn]")
