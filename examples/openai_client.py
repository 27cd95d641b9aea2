"""Talk to `gemma3 serve` with the official `openai` client: a streamed chat reply, optionally about an image.

    gemma3 serve -m gemma-3-4b-it-mlx &          # in another terminal
    python examples/openai_client.py "What is in this picture?" --image photo.jpg

Images travel inside the request as base64 data: URLs (the server never fetches a URL).
"""

import argparse
import base64
import mimetypes
import os

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("prompt", nargs="?", default="Say hello in three languages.")
parser.add_argument("--image", help="an image file to send with the prompt")
parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key=os.environ.get("GEMMA3_API_KEY", "none"))
model = client.models.list().data[0].id  # the one model the server serves

content = [{"type": "text", "text": args.prompt}]
if args.image:
    mime = mimetypes.guess_type(args.image)[0] or "image/png"
    data = base64.b64encode(open(args.image, "rb").read()).decode()
    content.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": content}], max_tokens=args.max_tokens, temperature=0,
    stream=True, stream_options={"include_usage": True},
)
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:  # the last chunk: no choices, the token counts
        usage = chunk.usage
print(f"\n[{model}: {usage.prompt_tokens} prompt tokens, {usage.prompt_tokens_details.cached_tokens} of them "
      f"from the cache; {usage.completion_tokens} generated]")
