"""Gemma 3 tokenizer: SentencePiece encode/decode, the chat template built from ids, streamed text.

Encoding matches the Hugging Face Gemma tokenizer: control-token strings in the text
("<start_of_turn>", "<bos>", "<unused0>", ...) map to their ids, the rest goes through
SentencePiece. The chat template is Gemma 3's official one, written out in Python over ids, so a
BOS is never doubled. Like SentencePiece itself, a literal U+2581 ("▁") in the input reads as a
space. Deliberately not here: image placeholders in prompts (the vision processor expands them),
sampling, and any Jinja template engine.
"""

import codecs
import re
from pathlib import Path

import sentencepiece as spm

from .errors import ModelFileError

MAX_TOKENIZER_BYTES = 64 << 20  # Gemma's tokenizer.model is 4.7 MB
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
IMAGE_SOFT_TOKEN = "<image_soft_token>"


class Tokenizer:
    """Wraps a SentencePiece `tokenizer.model` with Gemma's special tokens and chat format."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        model_proto: bytes | None = None,
        boi_token_index: int | None = None,
        eoi_token_index: int | None = None,
        image_token_index: int | None = None,
    ):
        if (path is None) == (model_proto is None):
            raise ValueError("pass exactly one of a tokenizer.model path or model_proto bytes")
        self._sp = sp = _processor(path, model_proto)
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.eos_id = sp.pad_id(), sp.eos_id()
        self.bos_id, self.unk_id = sp.bos_id(), sp.unk_id()
        self.start_of_turn_id = sp.piece_to_id("<start_of_turn>")
        self.end_of_turn_id = sp.piece_to_id("<end_of_turn>")
        self.boi_token_index, self.eoi_token_index = boi_token_index, eoi_token_index
        self.image_token_index = image_token_index

        # Bytes each id decodes to: "▁" is a space, <0xAB> is one raw byte. Control tokens, <unk> and
        # the image ids given are "special": they decode to nothing, or to their own text when asked.
        pieces = sp.id_to_piece(list(range(self.vocab_size)))
        special = [i for i in range(self.vocab_size) if sp.is_control(i)] + [self.unk_id]
        self._bytes = [p.replace("\u2581", " ").encode("utf-8") for p in pieces]
        for i, piece in enumerate(pieces):
            if piece.startswith("<0x") and sp.is_byte(i):
                self._bytes[i] = bytes([int(piece[3:5], 16)])
        self.special_ids = frozenset(special) | {
            i for i in (boi_token_index, eoi_token_index, image_token_index) if i is not None
        }
        # HF maps every control piece's text to its id (llama.cpp's GGUF types <unk> as control too).
        self._special = {pieces[i]: i for i in special}
        if image_token_index is not None and image_token_index >= self.vocab_size:
            # The image soft token lies past the SentencePiece vocabulary; HF names it so.
            self._special[IMAGE_SOFT_TOKEN] = image_token_index
        self._special_lengths = sorted({len(s) for s in self._special}, reverse=True)
        first_chars = {s[0] for s in self._special}
        self._special_start = re.compile("[" + "".join(re.escape(c) for c in first_chars) + "]")

    @classmethod
    def from_bytes(cls, model_proto: bytes, **image_ids) -> "Tokenizer":
        return cls(model_proto=model_proto, **image_ids)

    def encode(self, text: str, add_bos: bool = True, special: bool | frozenset = True) -> list[int]:
        """Token ids; BOS is added only if not already first. Special-token strings become their ids
        (`special=True`, as HF does), only those in a set (`special={...}`), or none (False: text from
        someone else, in which a typed "<end_of_turn>" must stay text; SentencePiece spells it out)."""
        ids, start, pos = [], 0, 0
        # Leftmost-longest match of special strings, as HF's added-token splitter does.
        while special and (m := self._special_start.search(text, pos)) is not None:
            i = m.start()
            for n in self._special_lengths:
                token = self._special.get(text[i : i + n]) if i + n <= len(text) else None
                if token is not None and (special is True or text[i : i + n] in special):
                    break
            else:
                pos = i + 1
                continue
            if start < i:
                ids += self._sp.encode(text[start:i])
            ids.append(token)
            start = pos = i + n
        if start < len(text):
            ids += self._sp.encode(text[start:])
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def token_bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The UTF-8 bytes one id contributes to decoded text (a byte-fallback id gives one raw byte)."""
        if not 0 <= token_id < self.vocab_size:
            return b""  # e.g. the image soft token, which lies past the SentencePiece vocabulary
        if token_id in self.special_ids:
            return b"" if skip_special else self._sp.id_to_piece(token_id).encode("utf-8")
        return self._bytes[token_id]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text for ids. Special tokens are dropped, or kept as their text ("<bos>") with
        skip_special=False. Invalid UTF-8 from byte-fallback ids becomes U+FFFD."""
        data = b"".join(self.token_bytes(int(i), skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    def _turn(self, role: str, text: str, ids=None, special: bool | frozenset = True) -> list[int]:
        # <start_of_turn>{role}\n{text}<end_of_turn>\n ; role and text are encoded together, as HF does.
        # `ids`: a model turn's tokens as generated, which a prompt cache already holds.
        body = self.encode(f"{role}\n{text}", add_bos=False, special=special) if ids is None else [
            *self.encode(f"{role}\n", add_bos=False), *(int(i) for i in ids)]
        return [self.start_of_turn_id, *body, self.end_of_turn_id, *self.encode("\n", add_bos=False)]

    def generation_prompt_ids(self) -> list[int]:
        """<start_of_turn>model\\n: the ids that ask the model for a reply."""
        return [self.start_of_turn_id, *self.encode("model\n", add_bos=False)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, strip: bool = True,
                            special: bool | frozenset = True) -> list[int]:
        """Ids for a whole conversation, starting with the single BOS.

        Gemma has no system role: a leading system message is put before the first user message,
        followed by a blank line (not stripped, as in the official template). Other contents are
        stripped of surrounding whitespace. Roles must alternate user/model, starting with user.
        A model message may carry "ids", the tokens it was generated as: they are used instead of
        re-encoding its text, so a chat's prompt is exactly what its prompt cache holds.
        `special`: which special-token strings in the contents become ids (see `encode`).
        """
        messages = list(messages)
        prefix = ""
        if messages and messages[0].get("role") == "system":
            prefix = _content(messages[0]) + "\n\n"
            messages = messages[1:]
        if not messages:
            raise ValueError("a conversation needs at least one user message")
        ids = [self.bos_id]
        for i, message in enumerate(messages):
            role = _role(message)
            if role != ("user" if i % 2 == 0 else "model"):
                raise ValueError(
                    f"conversation roles must alternate user/model starting with user; "
                    f"message {i} has role {message.get('role')!r}"
                )
            text = _content(message).strip() if strip else _content(message)  # strip=False: already done
            turn_ids = message.get("ids") if role == "model" else None
            ids += self._turn(role, (prefix if i == 0 else "") + text, turn_ids, special)
        if add_generation_prompt:
            ids += self.generation_prompt_ids()
        return ids

    def chat_turn_ids(self, role: str, text: str, add_generation_prompt: bool = False) -> list[int]:
        """Ids of one more turn for a live conversation: no BOS, no system text.

        The turn ends with <end_of_turn>\\n. A model reply that stopped on <end_of_turn> is
        followed by "\\n" in the template, so append `encode("\\n", add_bos=False)` after it first.
        """
        role = _role({"role": role, "content": text})
        ids = self._turn(role, text.strip())
        return ids + self.generation_prompt_ids() if add_generation_prompt else ids


def _processor(path: str | Path | None, model_proto: bytes | None) -> spm.SentencePieceProcessor:
    """SentencePiece loaded from a regular file of a sane size or from bytes; ModelFileError if it cannot be."""
    name = "tokenizer.model bytes"
    if path is not None:
        p, name = Path(path), str(path)
        if not p.is_file():  # a FIFO or a device would block or never end
            raise ModelFileError(f"{name}: not a regular file")
        if p.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelFileError(f"{name}: {p.stat().st_size:,} bytes is too large for a tokenizer.model")
        model_proto = p.read_bytes()
    try:
        return spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, OSError, TypeError) as e:  # SentencePiece raises RuntimeError("INTERNAL: ...")
        raise ModelFileError(f"{name}: not a valid SentencePiece tokenizer.model ({' '.join(str(e).split())[:200]})") from None


def check_tokenizer(model_proto: bytes, vocab_size: int, what: str = "tokenizer.model") -> int:
    """The number of pieces of a serialized tokenizer, checked to load and to fit an embedding of
    `vocab_size` rows (a larger vocabulary would look up rows that do not exist)."""
    try:
        n = _processor(None, model_proto).get_piece_size()
    except ModelFileError as e:
        raise ModelFileError(f"{what}: {str(e).split(': ', 1)[1]}") from None
    if n > vocab_size:
        raise ModelFileError(f"{what} has {n:,} pieces but the model's embedding has only {vocab_size:,} rows")
    return n


def _role(message: dict) -> str:
    role = message.get("role")
    if role == "system":
        raise ValueError("a system message is only allowed as the first message")
    if role not in _ROLES:
        raise ValueError(f"unknown role {role!r}; expected system, user, assistant or model")
    return _ROLES[role]


def _content(message: dict) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"message content must be a string, got {type(content).__name__}")
    return content


class StreamingDetokenizer:
    """Turns ids into text one at a time, emitting only complete characters.

    Each id's bytes go through an incremental UTF-8 decoder, so a character split over
    byte-fallback ids (<0xF0><0x9F><0x98><0x80>) comes out whole once its last byte arrives.
    The concatenated output equals `tokenizer.decode(ids, skip_special)`, in O(total length).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text that became final with this id (often "", mid-character)."""
        return self._decoder.decode(self._tokenizer.token_bytes(int(token_id), self._skip_special))

    def finalize(self) -> str:
        """The rest: U+FFFD for a dangling partial character. The detokenizer can then be reused."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
