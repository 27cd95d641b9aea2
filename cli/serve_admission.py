"""Admission by memory: a request starts only when its worst-case KV cache fits the machine's budget.

The budget is what this machine can give the model (memory.machine_memory(), which GEMMA3_MLX_MEMORY
overrides) less the loaded weights, the runtime, a prefill chunk's activations and MLX's buffer cache
(bounded: bound_process, which the worker calls). On admission a request reserves the KV its row can
grow to: its prompt plus max_tokens, capped at the context (one without max_tokens whose context would
never fit gets what fits, and ends with "length"). The engine keeps a batch's global layers in one
array padded to the longest row and growing in steps (cache.KVCache), so what is counted is the
batch's worst case: the longest row's worst case at its grown capacity, times the rows that live at
once while one joins (batch_bytes). Idle caches in the pool go first (least recently used); a request
that still does not fit waits, in order; one that could not fit even alone is refused. `Admission` is
arithmetic over the config (cache.kv_bytes) with no threads: the worker's model thread owns one.
"""

from __future__ import annotations

import ctypes
from collections import deque

import mlx.core as mx
from mlx.utils import tree_flatten

from ..cache import KVCache, kv_bytes
from ..loader import default_dtype
from ..memory import PREFILL_CHUNK, RUNTIME_BYTES, gb, machine_memory


def activations(config, context: int) -> int:
    """A prefill chunk's largest intermediates at `context`, float32: a global layer's attention scores,
    their softmax and mask as the CPU materializes them (measured: 2.3x the scores alone), or the MLP's."""
    t = config.text
    chunk = min(context, PREFILL_CHUNK)
    return max(3 * t.num_attention_heads * chunk * context * 4, 3 * chunk * t.intermediate_size * 4) + t.vocab_size * 4


def buffer_cache(memory: int) -> int:
    """What MLX may keep of freed buffers for reuse (mx.set_cache_limit): a tenth of the memory, at most
    1 GiB. Left unbounded, a decode loop's growing and re-batched caches leave it holding gigabytes."""
    return min(memory // 10, 1 << 30)


def bound_process(memory: int) -> None:
    """Make freed memory leave the process: MLX's buffer cache bounded (buffer_cache), and on glibc a
    fixed 1 MB mmap threshold (M_MMAP_THRESHOLD), which otherwise rises to 32 MB as large blocks come
    and go, so the KV arrays of a re-batched decode loop stay in the heap after they are freed (seen:
    380 MB of RSS beyond everything MLX held)."""
    mx.set_cache_limit(buffer_cache(memory))
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS): its allocator returns large blocks already
        pass


class Admission:
    def __init__(self, config, budget: int, *, bytes_per_value: int, kv_bits: int | None = None,
                 rollback: int | None = None):
        """`budget`: bytes for every KV cache (running rows and the pool's idle caches together)."""
        self.config, self.budget = config, budget
        self.context = config.text.max_position_embeddings
        self.kv_args = {"bytes_per_value": bytes_per_value, "kv_bits": kv_bits}
        if rollback is not None:
            self.kv_args["rollback"] = rollback
        self.rows: dict[int, int] = {}  # id(job) -> its worst-case tokens
        self.waiting: deque = deque()  # (job, prepared, tokens): requests waiting for memory, in order
        self.reserved = 0  # bytes the admitted rows' batch can grow to

    @classmethod
    def for_model(cls, model, cache_args: dict, memory: int | None = None) -> "Admission":
        """The budget left on this machine once `model` is loaded (`memory`: the machine's bytes)."""
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        memory = machine_memory() if memory is None else memory
        config = model.config
        spare = buffer_cache(memory)
        budget = memory - weights - RUNTIME_BYTES - spare - activations(config, config.text.max_position_embeddings)
        return cls(config, max(budget, 0), bytes_per_value=default_dtype().size, kv_bits=cache_args.get("kv_bits"),
                   rollback=cache_args.get("rollback"))

    def _row_bytes(self, tokens: int) -> int:
        """One row's KV at its grown capacity (KVCache grows by a quarter or a step, in steps)."""
        step = KVCache.step
        grown = tokens + max(step, tokens // 4)
        cap = min(-(-grown // step) * step, max(tokens, -(-self.context // step) * step))
        return kv_bytes(self.config, cap, **self.kv_args)

    def batch_bytes(self, rows) -> int:
        """What a batch of rows with these worst-case tokens can take at its peak: while a row joins
        (cache.KVCache.merge pads and concatenates) the old batch, the new one and the joining row's
        own cache all live, so 2n + 1 rows at the longest one's size (measured on the CPU backend:
        3 rows of 2,000 tokens peaked at about 7x one row's KV in MLX's active memory)."""
        rows = list(rows)
        return (2 * len(rows) + 1) * self._row_bytes(max(rows)) if rows else 0

    def plan(self, prompt: int, max_tokens: int | None) -> int:
        """A request's worst-case tokens (prompt + max_tokens, capped at the context); a ValueError
        when max_tokens goes past the context (naming both) or when even alone it could never fit."""
        if max_tokens is not None and prompt + max_tokens > self.context:
            raise ValueError(f"max_tokens is {max_tokens} and the prompt has {prompt} tokens: together "
                             f"{prompt + max_tokens}, more than the model's context of {self.context}")
        tokens = min(prompt + (max_tokens or self.context), self.context)
        if self.batch_bytes([tokens]) <= self.budget:
            return tokens
        fits = self._fitting(prompt)
        if max_tokens is None and fits > prompt:  # no limit asked: the reply gets what memory allows
            return fits
        most = f"; ask for at most {fits - prompt} max_tokens" if fits > prompt else ""
        raise ValueError(f"this request needs up to {gb(self.batch_bytes([tokens]))} of KV cache and this server "
                         f"has {gb(self.budget)} for all requests{most}")

    def _fitting(self, prompt: int) -> int:
        """The most tokens one row can hold within the budget (>= prompt, else prompt)."""
        lo, hi = prompt, self.context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.batch_bytes([mid]) <= self.budget else (lo, mid - 1)
        return lo

    def admit(self, job, tokens: int, pool, prepared) -> bool:
        """Reserve `tokens` for `job` if nothing waits ahead of it and the batch with it fits beside
        the pool (idle caches evicted first). Else False: it waits, with `prepared` (what `ready`
        gives back with it)."""
        if self.waiting or not self._reserve(id(job), tokens, pool):
            self.waiting.append((job, prepared, tokens))
            return False
        return True

    def ready(self, pool) -> list[tuple[object, tuple]]:
        """The waiting requests that fit now, in order, reserved: [(job, (*prepared, tokens))]."""
        out = []
        while self.waiting and self._reserve(id(self.waiting[0][0]), self.waiting[0][2], pool):
            job, prepared, tokens = self.waiting.popleft()
            out.append((job, (*prepared, tokens)))
        return out

    def drop(self, job) -> bool:
        """Take a waiting request out (its client left); False if it was not waiting."""
        for i, (waiting, _, _) in enumerate(self.waiting):
            if waiting is job:
                del self.waiting[i]
                return True
        return False

    def _reserve(self, key: int, tokens: int, pool) -> bool:
        need = self.batch_bytes([*self.rows.values(), tokens])
        if need > self.budget:
            return False
        if need + pool.bytes > self.budget:
            pool.shrink(self.budget - need)
        self.rows[key] = tokens
        self.reserved = need
        return True

    def release(self, job, pool) -> None:
        """A request ended (its cache went back to the pool): its reservation goes, the pool keeps what fits."""
        if self.rows.pop(id(job), None) is not None:
            self.reserved = self.batch_bytes(self.rows.values())
        if self.reserved + pool.bytes > self.budget:
            pool.shrink(self.budget - self.reserved)

    def clear(self) -> list:
        """Forget every reservation; the requests that were waiting (to be failed by the caller)."""
        waiting = [job for job, _, _ in self.waiting]
        self.rows.clear()
        self.waiting.clear()
        self.reserved = 0
        return waiting
