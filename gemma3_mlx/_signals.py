"""Signals: Ctrl-C always reaches the main thread; SIGTERM can run cleanups.

The kernel hands a process-wide SIGINT to any thread that does not block it. OpenBLAS and MLX
start worker threads when loaded and at the first evaluation; if Ctrl-C lands in one of them
while the main thread waits in a blocking call (readline's prompt in `gemma3 chat`, an app's
event loop), Python only notices at the next key press. Threads inherit their creator's signal
mask, so starting those threads with SIGINT blocked, then unblocking it in the main thread,
sends every Ctrl-C where Python can act on it.
"""

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_to_main_thread():
    """Threads started inside this block never receive SIGINT (main thread, POSIX only)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP as an exception: `finally` blocks and cleanups run (temporary files go),
    and the process exits with 128 + the signal's number. Not a KeyboardInterrupt, so code that
    turns Ctrl-C into "stop this reply" does not keep running."""


def raise_on_terminate() -> None:
    """Make SIGTERM and SIGHUP raise Terminated in the main thread: a program's choice (the CLI's),
    never made by the library on import."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
