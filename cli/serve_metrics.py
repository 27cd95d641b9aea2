"""The server's counters and gauges, and the Prometheus text /metrics serves from them.

Counters only grow: the model thread adds to them as requests start and end, the HTTP side as it
refuses one (the queue is full). Gauges are a snapshot the model thread takes after every turn
(`measure`), replaced whole, so a reader on another thread never sees half of one. Nothing here
decides anything: the queue, the pool and admission keep their own state and are only read.
"""

from __future__ import annotations

import time

import mlx.core as mx

COUNTERS = ("requests", "rejected", "errors", "cancelled", "prompt_tokens", "cached_tokens", "generated_tokens",
            "draft_tokens", "accepted_tokens", "speculative_requests")


class Metrics:
    def __init__(self):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.gauges = {"queue_depth": 0, "active_sequences": 0, "kv_bytes": 0, "pool_bytes": 0, "pool_entries": 0}

    def measure(self, engine, queue, admission, pool) -> None:
        """The gauges now (model thread): rows and caches in the engine, requests not yet in it, memory."""
        held = engine.holding()
        self.gauges = {"queue_depth": held.waiting + queue.inbox.qsize() + len(admission.waiting),
                       "active_sequences": held.active, "kv_bytes": held.kv_bytes + pool.bytes,
                       "kv_reserved_bytes": admission.reserved, "kv_budget_bytes": admission.budget,
                       "pool_bytes": pool.bytes, "pool_entries": len(pool), "time": time.time()}


def prometheus(metrics: Metrics) -> str:
    c, g = metrics.counters, metrics.gauges
    rows = [
        ("requests_total", "counter", "Requests admitted to the engine.", c["requests"]),
        ("requests_rejected_total", "counter", "Requests refused because the queue was full.", c["rejected"]),
        ("requests_failed_total", "counter", "Requests that ended in an error.", c["errors"]),
        ("requests_cancelled_total", "counter", "Requests whose client went away.", c["cancelled"]),
        ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", c["prompt_tokens"]),
        ("cached_prompt_tokens_total", "counter", "Prompt tokens that came from the cache.", c["cached_tokens"]),
        ("generated_tokens_total", "counter", "Tokens generated.", c["generated_tokens"]),
        ("speculative_requests_total", "counter", "Requests that started speculating.", c["speculative_requests"]),
        ("draft_tokens_total", "counter", "Speculative tokens proposed.", c["draft_tokens"]),
        ("draft_accepted_tokens_total", "counter", "Speculative tokens the model kept.", c["accepted_tokens"]),
        ("queue_depth", "gauge", "Requests waiting for a row in the batch.", g["queue_depth"]),
        ("active_sequences", "gauge", "Sequences in the batch.", g["active_sequences"]),
        ("kv_cache_bytes", "gauge", "KV cache memory: running sequences and the cache pool.", g["kv_bytes"]),
        ("kv_reserved_bytes", "gauge", "KV cache the admitted requests may grow to (their worst case).",
         g.get("kv_reserved_bytes", 0)),
        ("kv_budget_bytes", "gauge", "Memory for KV caches (running and pooled) on this machine.",
         g.get("kv_budget_bytes", 0)),
        ("cache_pool_bytes", "gauge", "Memory of the idle conversation caches.", g["pool_bytes"]),
        ("cache_pool_entries", "gauge", "Idle conversation caches.", g["pool_entries"]),
        ("mlx_active_memory_bytes", "gauge", "Memory MLX holds in arrays.", mx.get_active_memory()),
        ("mlx_cache_memory_bytes", "gauge", "Memory MLX keeps for reuse.", mx.get_cache_memory()),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP gemma3_{name} {help_}", f"# TYPE gemma3_{name} {kind}", f"gemma3_{name} {value}"]
    return "\n".join(out) + "\n"
