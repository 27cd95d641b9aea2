"""Prompt caches: a model's per-layer caches plus the token ids they hold.

`prefill(ids)` reuses the longest common prefix with what is cached and processes only the
rest. Local layers are ring buffers that cannot roll back, so the cache snapshots their state
at turn boundaries (end of each prompt, end of each reply); rolling back (regenerate or edit
the last turn) restores the nearest snapshot at or before the common prefix and re-processes
only the tokens after it. Caches save to safetensors with the model's fingerprint and the token
ids, so a cache is never loaded into a different model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from .cache import KVCache, QuantizedKVCache, WindowCache
from .errors import Gemma3Error

FORMAT = "gemma3-mlx-prompt-cache/1"


class PromptCacheError(Gemma3Error):
    """A prompt cache file that is unreadable or belongs to another model."""


def fingerprint(model) -> str:
    """Identity of a model: its config (quantization included) and a sample of its embedding."""
    cached = getattr(model, "_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    emb = model.model.embed_tokens(mx.arange(0, model.config.text.vocab_size, 4099)).astype(mx.float32)
    h.update(memoryview(mx.round(emb * 1e4).astype(mx.int32)))  # tolerant of nothing but the weights
    model._fingerprint = h.hexdigest()[:32]
    return model._fingerprint


def _copy(state: dict) -> dict:
    # MLX slice assignment updates an array in place: snapshots need their own arrays.
    return {k: mx.array(v) for k, v in state.items()}


class PromptCache:
    """Caches for one conversation or document, reusable across calls.

    `max_snapshots` bounds memory: each snapshot holds every local layer's window.
    """

    def __init__(self, model, *, kv_bits: int | None = None, kv_group_size: int = 64,
                 value_bits: int | None = None, max_snapshots: int = 4):
        self.model = model
        self.cache_args = {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "value_bits": value_bits}
        self.layers = model.make_cache(**self.cache_args)
        self.tokens: list[int] = []
        self.snapshots: dict[int, list] = {}
        self.max_snapshots = max_snapshots
        self.reprocessed = 0  # tokens the last prefill() had to run (for stats and tests)

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def snapshot(self, logits: mx.array | None = None) -> None:
        """Remember the local layers' state at the current length (a turn boundary), and the
        last position's logits when given, so the same prompt again runs nothing."""
        n = len(self.tokens)
        self.snapshots[n] = ([_copy(c.state) if isinstance(c, WindowCache) else None for c in self.layers], logits)
        while len(self.snapshots) > self.max_snapshots:
            del self.snapshots[min(self.snapshots)]

    def rewind(self, n: int) -> int:
        """Roll back to at most n tokens; returns the length actually kept (a snapshot point)."""
        if n >= len(self.tokens):
            return len(self.tokens)
        keep = max((s for s in self.snapshots if s <= n), default=0)
        if keep == 0:
            self.layers = self.model.make_cache(**self.cache_args)
        else:
            for c, saved in zip(self.layers, self.snapshots[keep][0]):
                if isinstance(c, WindowCache):
                    c.restore(_copy(saved), keep)
                else:
                    c.trim(keep)
        self.tokens = self.tokens[:keep]
        self.snapshots = {s: v for s, v in self.snapshots.items() if s <= keep}
        return keep

    def feed(self, ids: list[int], logits: str = "last"):
        """Run ids through the model on top of the cache; logits of the last position or None."""
        out = self.model(mx.array(ids)[None], self.layers, logits=logits)
        self.tokens.extend(int(t) for t in ids)
        return None if out is None else out[:, -1, :]

    def prefill(self, ids: list[int], chunk: int = 512) -> mx.array:
        """Make the cache hold `ids`, reusing the common prefix; the last position's logits (1, V)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        saved = self.snapshots.get(len(ids))
        if common == len(ids) and saved is not None and saved[1] is not None:
            self.rewind(len(ids))  # e.g. regenerating a reply: the prompt is all cached
            self.reprocessed = 0
            return saved[1]
        common = min(common, len(ids) - 1)  # the last prompt token must run to give logits
        start = self.rewind(common)
        rest = ids[start:]
        self.reprocessed = len(rest)
        for i in range(0, len(rest) - chunk, chunk):
            self.feed(rest[i : i + chunk], logits="none")
            mx.eval([c.state for c in self.layers])  # bound the lazy graph: one chunk at a time
        last = ((len(rest) - 1) // chunk) * chunk
        return self.feed(rest[last:])

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        tensors, kinds = {}, []
        for i, c in enumerate(self.layers):
            kinds.append(type(c).__name__)
            for k, v in c.state.items():
                tensors[f"layer.{i}.{k}"] = v
        meta = {
            "format": FORMAT,
            "model": fingerprint(self.model),
            "tokens": json.dumps(self.tokens),
            "kinds": json.dumps(kinds),
            "cache_args": json.dumps(self.cache_args),
        }
        mx.save_safetensors(str(path), tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model) -> "PromptCache":
        try:
            tensors, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError on unreadable files
            raise PromptCacheError(f"{path}: not a readable prompt cache ({e})") from None
        if meta.get("format") != FORMAT:
            raise PromptCacheError(f"{path}: not a gemma3-mlx prompt cache")
        if meta.get("model") != fingerprint(model):
            raise PromptCacheError(f"{path}: this prompt cache was made with a different model")
        pc = cls(model, **json.loads(meta["cache_args"]))
        tokens = json.loads(meta["tokens"])
        for i, c in enumerate(pc.layers):
            prefix = f"layer.{i}."
            c.restore({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, len(tokens))
        pc.tokens = tokens
        pc.snapshot()
        return pc


__all__ = ["PromptCache", "PromptCacheError", "fingerprint", "KVCache", "QuantizedKVCache", "WindowCache"]
