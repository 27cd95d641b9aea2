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

A base model (not instruction-tuned) never learnt Gemma's turns: chat messages to it are written
as a transcript instead (`transcript=True`): a one-line preamble, then "User: ...\nAssistant: ..."
lines, the reply ending where the model starts the next "User:" (`TRANSCRIPT_STOP`, a stop string).
"""

from __future__ import annotations

import numpy as np

from .image import preprocess_image, image_prompt_text
from .tokenizer import IMAGE_SOFT_TOKEN

MARKER = "<start_of_image>"
IMAGE_STRINGS = frozenset({MARKER, "<end_of_image>", IMAGE_SOFT_TOKEN})  # what an image block is spelt with


# The second sentence is for the smallest models: without it the base 270M answers "And of Italy?"
# (after Paris) with "Yes, of Italy."; with it, "Of Italy is Rome."
PREAMBLE = ("The following is a conversation between a user and a helpful assistant. "
            "The assistant answers each question with a complete sentence.")
TRANSCRIPT_STOP = "User:"  # a base model's reply ends where it goes on to write the user's next line


def uses_transcript(config) -> bool:
    """Chat with this model as a transcript: a base model (an unknown kind keeps Gemma's chat format)."""
    return config.instruction_tuned is False


def image_block_text(tokens_per_image: int) -> str:
    return f"\n\n{MARKER}{IMAGE_SOFT_TOKEN * tokens_per_image}<end_of_image>\n\n"


def prompt_ids(tokenizer, config, prompt, images=None, pan_and_scan: bool = False,
               control_tokens: bool = False, transcript: bool = False) -> tuple[list[int], list | None]:
    """(ids, image blocks or None) for raw text (BOS added), token ids, or chat messages: the one
    place a prompt of any kind becomes ids. `control_tokens`: read special-token strings typed in
    chat messages as tokens (off: they stay text). `transcript`: chat messages as a transcript
    (for a base model, see `uses_transcript`) rather than Gemma's chat format."""
    if images:
        return build_prompt(tokenizer, prompt, config, images, pan_and_scan, control_tokens=control_tokens,
                            transcript=transcript)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), None
    if prompt and isinstance(prompt[0], dict):
        render = transcript_ids if transcript else _chat_ids
        return render(tokenizer, prompt, special=control_tokens), None
    return [int(t) for t in prompt], None


def build_prompt(tokenizer, prompt, config, images=(), pan_and_scan: bool = False, control_tokens: bool = False,
                 transcript: bool = False, **pan_and_scan_args):
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
    render = transcript_ids if transcript else _chat_ids
    return render(tokenizer, messages, strip=False, special=True if control_tokens else IMAGE_STRINGS), blocks


def _chat_ids(tokenizer, messages, strip: bool = True, special=False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, strip=strip, special=special)


def transcript_ids(tokenizer, messages, strip: bool = True, special=False) -> list[int]:
    """Ids of chat messages as a transcript, asking for the assistant's next line:
    "<bos>{PREAMBLE}\n{system}\n\nUser: {text}\nAssistant: {reply}\nUser: {text}\nAssistant:".
    An assistant message with "ids" (its tokens as generated, up to the stop string) uses them, so
    the prompt is what a chat's prompt cache holds. `special`: as in `Tokenizer.encode`, for the texts."""
    messages = list(messages)
    head = PREAMBLE
    if messages and messages[0].get("role") == "system":
        head += "\n" + str(messages.pop(0).get("content") or "").strip()
    if not messages:
        raise ValueError("a conversation needs at least one user message")
    ids = tokenizer.encode(head + "\n\n", special=special)
    for i, m in enumerate(messages):
        role = {"user": "user", "assistant": "assistant", "model": "assistant"}.get(m.get("role"))
        if role != ("user" if i % 2 == 0 else "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"conversation roles must alternate user/assistant starting with user, with text "
                             f"contents; message {i} has role {m.get('role')!r}")
        text = m["content"].strip() if strip else m["content"]
        if role == "user":
            ids += tokenizer.encode(f"User: {text}\nAssistant:", add_bos=False, special=special)
        elif m.get("ids") is not None:
            ids += [int(t) for t in m["ids"]]
            if not tokenizer.decode(m["ids"]).endswith("\n"):
                ids += tokenizer.encode("\n", add_bos=False)
        else:
            ids += tokenizer.encode(" " + text + "\n", add_bos=False, special=special)
    return ids


def _expand(text: str, image_texts: list[str], prepend: bool = False) -> str:
    if prepend and text.count(MARKER) < len(image_texts):
        text = MARKER * (len(image_texts) - text.count(MARKER)) + text
    parts = text.split(MARKER)
    if len(parts) - 1 != len(image_texts):
        raise ValueError(f"the prompt marks {len(parts) - 1} images but {len(image_texts)} were given")
    return parts[0] + "".join(t + rest for t, rest in zip(image_texts, parts[1:]))
