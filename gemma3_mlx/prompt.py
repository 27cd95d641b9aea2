"""Prompts with images: Gemma's chat format, each image expanded into its soft-token block.

Each `<start_of_image>` marker in a message becomes, as in the reference processor,
"\\n\\n<start_of_image>" + mm_tokens_per_image soft tokens + "<end_of_image>\\n\\n"; with pan &
scan, the reference's wording around the original image and its crops. Images without a marker
go before the text of the last user message. Returns the ids and one pixel array per block.

Chat messages are text from people, not prompt syntax: a "<start_of_turn>" or "<end_of_turn>"
typed in a message stays text (SentencePiece spells it out), so a message cannot forge a turn;
only the image strings are read as such, and only when images are given. `control_tokens=True`
reads every special-token string as its token. Raw text prompts are the caller's own format:
their special strings always become tokens, as in Hugging Face.
"""

from __future__ import annotations

import numpy as np

from .image import preprocess_image, image_prompt_text
from .tokenizer import IMAGE_SOFT_TOKEN

MARKER = "<start_of_image>"
IMAGE_STRINGS = frozenset({MARKER, "<end_of_image>", IMAGE_SOFT_TOKEN})  # what an image block is spelt with


def image_block_text(tokens_per_image: int) -> str:
    return f"\n\n{MARKER}{IMAGE_SOFT_TOKEN * tokens_per_image}<end_of_image>\n\n"


def prompt_ids(tokenizer, config, prompt, images=None, pan_and_scan: bool = False,
               control_tokens: bool = False) -> tuple[list[int], list | None]:
    """(ids, image blocks or None) for raw text (BOS added), token ids, or chat messages: the one
    place a prompt of any kind becomes ids. `control_tokens`: read special-token strings typed in
    chat messages as tokens (off: they stay text)."""
    if images:
        return build_prompt(tokenizer, prompt, config, images, pan_and_scan, control_tokens=control_tokens)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), None
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, special=control_tokens), None
    return [int(t) for t in prompt], None


def build_prompt(tokenizer, prompt, config, images=(), pan_and_scan: bool = False, control_tokens: bool = False,
                 **pan_and_scan_args):
    """(ids, image blocks) for raw text or chat messages, and images (paths, bytes or PIL images)."""
    if config.vision is None and images:
        raise ValueError("this model cannot see images (a text-only Gemma 3)")
    blocks, texts = [], []
    for img in images:
        pixels, n = preprocess_image(img, config, pan_and_scan=pan_and_scan, **pan_and_scan_args)
        blocks += list(np.asarray(pixels))
        texts.append(image_prompt_text(n, MARKER).replace(MARKER, image_block_text(config.mm_tokens_per_image)))
    if isinstance(prompt, str):
        return tokenizer.encode(_expand(prompt, texts, prepend=True)), blocks
    messages = [dict(m) for m in prompt]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    markers = sum(str(m.get("content", "")).count(MARKER) for m in messages)
    if markers > len(texts):
        raise ValueError(f"the prompt marks {markers} images but {len(texts)} were given")
    if last_user is not None and markers < len(texts):
        missing = len(texts) - markers
        messages[last_user]["content"] = MARKER * missing + str(messages[last_user]["content"]).strip()
    for m in messages:
        if m.get("role") != "system" and isinstance(m.get("content"), str):
            n = m["content"].count(MARKER)
            m["content"], texts = _expand(m["content"].strip(), texts[:n]), texts[n:]
    return tokenizer.apply_chat_template(messages, strip=False, special=True if control_tokens else IMAGE_STRINGS), blocks


def _expand(text: str, image_texts: list[str], prepend: bool = False) -> str:
    if prepend and text.count(MARKER) < len(image_texts):
        text = MARKER * (len(image_texts) - text.count(MARKER)) + text
    parts = text.split(MARKER)
    if len(parts) - 1 != len(image_texts):
        raise ValueError(f"the prompt marks {len(parts) - 1} images but {len(image_texts)} were given")
    return parts[0] + "".join(t + rest for t, rest in zip(image_texts, parts[1:]))
