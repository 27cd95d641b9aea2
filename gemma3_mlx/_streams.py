"""MLX work that any thread may continue: one stream for all generation, one step at a time.

Since MLX 0.31 a stream belongs to the thread that made it, and a lazy array remembers its
stream: a cache or sampler key computed in one thread and evaluated in another fails with
"There is no Stream(cpu, N) in current thread". Apps call from whichever thread they like (a
UI's main thread, a worker, a thread pool), so generation runs on one stream made with
`mx.new_thread_unsafe_stream`, which every thread may use, and a lock lets one thread at a time
use it: the "thread unsafe" part is ours to guard. The lock is held for one engine step, never
across a yield, so two conversations in two threads take turns step by step.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import mlx.core as mx

from ._signals import sigint_to_main_thread

_lock = threading.RLock()
_streams: dict = {}


@contextmanager
def any_thread():
    """Run the block on the shared generation stream of the default device, holding its lock."""
    with _lock:
        device = mx.default_device()
        key = (device.type, getattr(device, "index", 0))
        if key not in _streams:  # before MLX 0.31.2 every stream served every thread
            with sigint_to_main_thread():  # the stream's worker thread must leave Ctrl-C to the main thread
                _streams[key] = getattr(mx, "new_thread_unsafe_stream", mx.new_stream)(device)
        with mx.stream(_streams[key]):
            yield
