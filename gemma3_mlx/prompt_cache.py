"""Prompt caches: a model's per-layer caches plus the token ids they hold.

`prefill(ids)` reuses the longest common prefix with what is cached and processes only the
rest. `trim(k)` drops the last k tokens exactly: local layers' rings take back up to `rollback`
tokens in place; further back, the cache restores the nearest snapshot (taken at turn boundaries:
end of each prompt, end of each reply) at or before the target and re-processes only the tokens
after it. Caches save to safetensors with the model's fingerprint and the token
ids, so a cache is never loaded into a different model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import forward
from .adapters import adapter_id, resolve, select
from .cache import ROLLBACK, KVCache, QuantizedKVCache, WindowCache
from .errors import Gemma3Error, TokenIdError
from .model import image_spans_of

FORMAT = "gemma3-mlx-prompt-cache/1"


def check_ids(ids: list[int], config) -> None:
    """Every id must index the embedding table (MLX does not bounds-check a gather: an id past
    the table reads memory that is not the model's); a vision model's image soft token may lie past it."""
    vocab, image = config.text.vocab_size, config.image_token_index if config.vision is not None else None
    bad = next((t for t in ids if not 0 <= t < vocab and t != image), None)
    if bad is not None:
        raise TokenIdError(f"token id {bad:,} is outside the model's vocabulary (0 to {vocab - 1:,})")


class Prompt:
    """A prompt checked once against a model: its ids (ints, each in the vocabulary, within the context),
    the [start, end) span of each image block, one preprocessed image per block and each block's content
    key. The engine checks a request's prompt once, at submit, and hands this to the cache as it is."""

    def __init__(self, ids, config, images: list | None = None):
        self.ids = [int(t) for t in ids]
        if not self.ids:
            raise ValueError("the prompt is empty")
        check_ids(self.ids, config)
        limit = config.text.max_position_embeddings
        if len(self.ids) >= limit:
            raise ValueError(f"the prompt has {len(self.ids)} tokens: more than the model's context of {limit}")
        self.spans = image_spans_of(self.ids, config.image_token_index) if config.vision else []
        self.images = list(images or [])
        if len(self.images) != len(self.spans):
            raise ValueError(f"the prompt has {len(self.spans)} image blocks but {len(self.images)} images were given")
        self.blocks = [(a, b, _image_key(img)) for (a, b), img in zip(self.spans, self.images)]


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


def _image_key(pixels) -> str:
    a = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:24]


def _chunk_bounds(start: int, end: int, chunk: int, spans, marks=()) -> list[tuple[int, int]]:
    """Prefill chunks of about `chunk` tokens that never cut an image block in two, and end at each
    branch point in `marks` (where a snapshot is taken)."""
    bounds = []
    while start < end:
        b = min([start + chunk, end] + [m for m in marks if start < m < end])
        for a, z in spans:
            if a < b < z:
                b = z  # extend to the end of the image block
        bounds.append((start, b))
        start = b
    return bounds


def _copy(state: dict) -> dict:
    # MLX slice assignment updates an array in place: snapshots need their own arrays.
    return {k: mx.array(v) for k, v in state.items()}


class PromptCache:
    """Caches for one conversation or document, reusable across calls.

    `max_snapshots` bounds memory: each snapshot holds every local layer's window.
    """

    def __init__(self, model, *, kv_bits: int | None = None, kv_group_size: int = 64,
                 value_bits: int | None = None, max_snapshots: int = 4, rollback: int = ROLLBACK,
                 adapter: str | None = None):
        self.model = model
        self.adapter = resolve(model, adapter)  # bound for life: its KV is never another adapter's
        self.cache_args = {"kv_bits": kv_bits, "kv_group_size": kv_group_size, "value_bits": value_bits,
                           "rollback": rollback}
        self.layers = model.make_cache(**self.cache_args)
        self.tokens: list[int] = []  # what every layer holds (the one invariant: PromptCache's methods keep it)
        self._unread = 0  # tokens run by feed_unread, not yet in `tokens`
        self.snapshots: dict[int, list] = {}
        self.max_snapshots = max_snapshots
        self.reprocessed = 0  # tokens the last prefill() had to run (for stats and tests)
        self.images: list[tuple[int, int, str]] = []  # (start, end, content key) of cached image blocks
        self._encoded: dict[str, mx.array] = {}
        # Branch points: positions where the next prefill stops to snapshot (e.g. the end of a shared
        # system prompt, set by a server's pool); their snapshots are the last to be evicted.
        self.marks: frozenset[int] = frozenset()
        self.branches: set[int] = set()

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
        if n in self.marks:
            self.branches.add(n)
        while len(self.snapshots) > self.max_snapshots:  # the oldest goes; a branch point only when all are
            plain = [s for s in self.snapshots if s not in self.branches] or list(self.snapshots)
            del self.snapshots[min(plain)]
        self.branches &= self.snapshots.keys()

    def reach(self, n: int) -> int:
        """What `rewind(n)` would keep, without doing it: n itself (at most the length) when the rings
        can take the rest back, else the nearest snapshot point at or before n (0: none)."""
        if n >= len(self.tokens):
            return len(self.tokens)
        if self._rings_can(len(self.tokens) - n):
            return n
        return max((s for s in self.snapshots if s <= n), default=0)

    def _rings_can(self, drop: int) -> bool:
        return all(c.can_trim() >= drop for c in self.layers if isinstance(c, WindowCache))

    def rewind(self, n: int) -> int:
        """Roll back to at most n tokens; returns the length actually kept (`reach(n)`)."""
        if n >= len(self.tokens):
            return len(self.tokens)
        drop = len(self.tokens) - n
        if self._rings_can(drop):
            for c in self.layers:
                c.trim(drop)
            keep = n
        else:
            keep = self._restore_snapshot(n)
        self._truncate(keep)
        return keep

    def _truncate(self, keep: int) -> None:
        """The layers were put back to `keep` tokens: so are the tokens, image blocks and snapshots."""
        self.tokens = self.tokens[:keep]
        self.images = [blk for blk in self.images if blk[1] <= keep]
        self.snapshots = {s: v for s, v in self.snapshots.items() if s <= keep}

    def _restore_snapshot(self, n: int) -> int:
        """Put every layer back to the nearest snapshot at or before n (or empty); returns its length."""
        keep = max((s for s in self.snapshots if s <= n), default=0)
        if keep == 0:
            self.layers = self.model.make_cache(**self.cache_args)
        else:
            for c, saved in zip(self.layers, self.snapshots[keep][0]):
                if isinstance(c, WindowCache):
                    c.restore(_copy(saved), keep)
                else:
                    c.trim(c.offset - keep)
        return keep

    def trim(self, k: int) -> None:
        """Drop the last k tokens exactly (re-processing from a snapshot when the rings cannot)."""
        if not 0 <= k <= len(self.tokens):
            raise ValueError(f"cannot trim {k} tokens from a cache of {len(self.tokens)}")
        target = self.tokens[: len(self.tokens) - k]
        kept = self.rewind(len(target))
        if kept < len(target):
            self.feed(target[kept:], logits="none")

    def feed(self, ids: list[int], logits: str = "last", image_features: mx.array | None = None, image_spans=None):
        """Run ids through the model on top of the cache, which then holds them too: logits of the last
        position (1, V), of every position (L, V) with logits="all", or None with "none"."""
        try:
            select(self.model, [self.adapter])
            x = mx.array(ids)[None]
            if logits == "none":
                out = None
                forward.hidden(self.model, x, self.layers, image_features, image_spans)  # only the caches' updates
            else:
                out = forward.logits(self.model, x, self.layers, at=logits, features=image_features, spans=image_spans)
        except BaseException:  # e.g. Ctrl-C halfway through the layers: take back what some layers took
            self.realign()
            raise
        self.tokens.extend(int(t) for t in ids)
        if out is None:
            return None
        return out[0] if logits == "all" else out[:, -1, :]  # (L, V) for "all", else (1, V)

    def feed_unread(self, token: mx.array) -> mx.array:
        """Run one token the host has not read back yet ((1,) ints, e.g. a draft's guess) on top of the
        cache: the logits after it (1, V), queued. `settle(values)` adds the tokens once read; until then
        `tokens` lags the layers (an exception in between: `realign`)."""
        try:
            out = self.model(token[None], self.layers)[:, -1, :]
        except BaseException:
            self.realign()
            raise
        self._unread += 1
        return out

    def settle(self, values: list[int]) -> None:
        """The tokens `feed_unread` ran, read back (as many, in order): `tokens` holds what the layers hold."""
        if len(values) != self._unread:
            raise ValueError(f"{len(values)} tokens read back for {self._unread} run")
        self.tokens.extend(int(t) for t in values)
        self._unread = 0

    def hand_back(self, layers: list, tokens: list[int]) -> None:
        """Take back this cache's layers after a batch ran them (the engine's rows, batched prefill),
        holding exactly `tokens`: every layer must hold as many."""
        held = {c.offset for c in layers}
        if held != {len(tokens)}:
            raise AssertionError(f"layers holding {sorted(held)} tokens handed back for {len(tokens)} tokens")
        self.layers, self.tokens, self._unread = layers, list(tokens), 0

    def fork(self, n: int) -> "PromptCache":
        """A new cache holding the first n tokens of this one (n: a snapshot point, or within what its
        rings can take back), this one left as it is: global layers by slice, rings copied (MLX writes a
        slice in place only into the array object written to, and a fork's objects are its own)."""
        new = PromptCache(self.model, max_snapshots=self.max_snapshots, adapter=self.adapter, **self.cache_args)
        saved = self.snapshots.get(n)
        drop = len(self.tokens) - n
        for c, src, ring in zip(new.layers, self.layers, saved[0] if saved else [None] * len(self.layers)):
            if not isinstance(c, WindowCache):
                c.restore({k: v[..., :n, :] for k, v in src.state.items()}, n)
            elif saved is not None:
                c.restore(_copy(ring), n)
            else:
                c.restore(_copy(src.state), len(self.tokens))
                c.trim(drop)
        new.tokens = self.tokens[:n]
        new.images = [blk for blk in self.images if blk[1] <= n]
        new._encoded = dict(self._encoded)
        if saved is not None:  # the fork keeps the branch point (and the logits there, for a regenerated reply)
            new.snapshots[n] = saved
            new.branches.add(n)
        return new

    def realign(self) -> None:
        """Make every layer hold exactly `tokens` again after an interrupted step. A chunk longer than
        the rings can take back, interrupted halfway through the layers, sends the cache back to its
        last snapshot (a prefix of `tokens`: the next prefill re-processes the rest)."""
        n, self._unread = len(self.tokens), 0
        over = [c for c in self.layers if c.offset > n]
        if all(not isinstance(c, WindowCache) or c.can_trim() >= c.offset - n for c in over):
            for c in over:
                c.trim(c.offset - n)
            return
        self._truncate(self._restore_snapshot(n))

    def _features(self, pixels) -> mx.array:
        """Soft-token embeddings of one image block, encoded once per content (LRU of 16)."""
        key = _image_key(pixels)
        if key not in self._encoded:
            self._encoded[key] = forward.encode_images(self.model, mx.array(pixels)[None])[0]
            while len(self._encoded) > 16:
                del self._encoded[next(iter(self._encoded))]
        return self._encoded[key]

    def prefill(self, ids: list[int], chunk: int = 512, images: list | None = None) -> mx.array:
        """Make the cache hold `ids`, reusing the common prefix; the last position's logits (1, V).

        `images`: one preprocessed (H, W, 3) array per image block in `ids`, in order. A cached
        prefix is reused only up to the first image whose content differs.
        """
        for out in self.prefill_steps(ids, chunk, images):
            if out is not None:
                return out

    def prefill_steps(self, ids: list[int], chunk: int = 512, images: list | None = None):
        """`prefill` one chunk at a time (an engine interleaves them with other sequences' decoding):
        yields None after each chunk but the last, then the last position's logits (1, V)."""
        ids, start, spans, blocks, images, saved = self.begin(ids, images)
        if saved is not None:
            yield saved
            return
        bounds = _chunk_bounds(start, len(ids), chunk, spans, self.marks)
        for i, (a, b) in enumerate(bounds):
            inside = [(blk, img) for blk, img in zip(blocks, images) if a <= blk[0] < b]
            feats = mx.concatenate([self._features(img) for _, img in inside]) if inside else None
            last = i == len(bounds) - 1
            out = self.feed(ids[a:b], "last" if last else "none", feats, [(x - a, y - a) for x, y, _ in
                                                                            (blk for blk, _ in inside)])
            self.images += [blk for blk, _ in inside]
            if b in self.marks:
                self.snapshot()
            if not last:
                mx.eval([c.state for c in self.layers])  # bound the lazy graph: one chunk at a time
                yield None
        yield out

    def begin(self, prompt, images: list | None = None):
        """Roll the cache back to what it keeps of `prompt` (a Prompt, or ids and their `images`, checked
        here). Returns (ids, start, image spans, image blocks, images, logits): `logits` are the saved
        last-position logits when the whole prompt is cached (nothing to run; regenerating a reply), else
        None and ids[start:] must run."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt(prompt, self.model.config, images)
        ids, spans, blocks, images = prompt.ids, prompt.spans, prompt.blocks, prompt.images
        common = 0
        for x, y in zip(self.tokens, ids):
            if x != y:
                break
            common += 1
        for blk in blocks:  # same ids, different picture: reuse stops at that image
            if blk[0] < common and blk not in self.images:
                common = blk[0]
                break
        saved = self.snapshots.get(len(ids))
        if common == len(ids) and saved is not None and saved[1] is not None:
            self.rewind(len(ids))  # e.g. regenerating a reply: the prompt is all cached
            self.reprocessed = 0
            return ids, len(ids), spans, blocks, images, saved[1]
        common = min(common, len(ids) - 1)  # the last prompt token must run to give logits
        start = self.rewind(common)  # also drops the image blocks past `start`
        self.reprocessed = len(ids) - start
        return ids, start, spans, blocks, images, None

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
            "adapter": adapter_id(self.model, self.adapter),
        }
        mx.save_safetensors(str(path), tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model, adapter: str | None = None) -> "PromptCache":
        try:
            tensors, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError/ValueError on unreadable files
            raise PromptCacheError(f"{path}: not a readable prompt cache ({e})") from None
        if meta.get("format") != FORMAT:
            raise PromptCacheError(f"{path}: not a gemma3-mlx prompt cache")
        if meta.get("model") != fingerprint(model):
            raise PromptCacheError(f"{path}: this prompt cache was made with a different model")
        adapter = resolve(model, adapter)
        if meta.get("adapter", "") != adapter_id(model, adapter):
            raise PromptCacheError(f"{path}: this prompt cache was made with a different adapter")
        pc = cls(model, **json.loads(meta["cache_args"]), adapter=adapter)
        tokens = json.loads(meta["tokens"])
        try:
            for i, c in enumerate(pc.layers):
                prefix = f"layer.{i}."
                c.restore({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, len(tokens))
        except ValueError as e:
            raise PromptCacheError(f"{path}: {e} (saved by another version? delete it and run again)") from None
        pc.tokens = tokens
        pc.snapshot()
        return pc


__all__ = ["PromptCache", "PromptCacheError", "fingerprint", "KVCache", "QuantizedKVCache", "WindowCache"]
