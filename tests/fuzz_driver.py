"""Run many `gemma3` command lines in one process and report how each ended (the fuzz tests' engine).

    python tests/fuzz_driver.py JOBS.json RESULTS.jsonl START

Starting Python and MLX costs about a second, so one process runs the CLI's entry point for job
after job, as `gemma3 ARGS...` would: stdout and stderr (file descriptors 1 and 2, so C++ output is
caught too) go to a file per job, SystemExit gives the exit code, and an exception that escapes is
what the real command would print as a traceback. Each job gets `limit_s` (faulthandler ends the
process if it hangs, even inside C++) and the address space is capped, so a blow-up fails instead
of swapping. A job with "code" instead of "args" runs that Python (an API call) and records
whether it raised a Gemma3Error. Before each job a "start" line is written and flushed: if the process dies (a signal,
the time limit), the caller knows which job did it and starts a new driver after it. A job that
pushes the peak RSS over `rss_limit_mb` ends the driver too, so the next job's peak is its own.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import resource
import sys
import time


def _cap_address_space(headroom: int) -> None:
    """Let the process map at most `headroom` more bytes (Linux: /proc gives the current size)."""
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.RLIM_INFINITY))
    except (OSError, ValueError, StopIteration):  # macOS: no /proc, and RLIMIT_AS is not enforced
        pass


def _peak_rss_mb() -> float:
    """This process's own peak. On Linux, VmHWM: ru_maxrss survives fork and exec, so a driver started by a
    pytest worker that already holds models (2.6 GB in a full run) would report the worker's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def main(jobs_file: str, results_file: str, start: int) -> None:
    jobs = json.load(open(jobs_file))
    import mlx.core as mx
    import typer.main

    from gemma3_mlx.cli.main import app
    from gemma3_mlx.errors import Gemma3Error

    # Typer rebuilds its click command, pydantic adapters and all, on every call (~75 ms): build it once.
    built, get_command = {}, typer.main.get_command
    typer.main.get_command = lambda t: built[id(t)] if id(t) in built else built.setdefault(id(t), get_command(t))
    typer.main.get_command(app)  # now, not inside the first job

    import gemma3_mlx.convert  # noqa: F401  imported by the first conversion anyway: not charged to one job

    out = os.open(results_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _cap_address_space(int(jobs["address_space_headroom_mb"]) << 20)
    saved = os.dup(1), os.dup(2)
    for i in range(start, len(jobs["jobs"])):
        job = jobs["jobs"][i]
        os.write(out, (json.dumps({"i": i, "start": True}) + "\n").encode())
        os.environ.update(job.get("env", {}))
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log, 1), os.dup2(log, 2)
        faulthandler.dump_traceback_later(jobs["limit_s"], exit=True, file=saved[1])
        t0, cpu0, code, escaped, user_error = time.perf_counter(), time.process_time(), 0, None, None
        try:
            if "code" in job:  # a Python API call: it must raise a Gemma3Error, never crash
                exec(job["code"], {})
            else:
                app(job["args"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # what `gemma3` would print as a traceback
            code, escaped = 1, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            user_error = isinstance(e, Gemma3Error)
        faulthandler.cancel_dump_traceback_later()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(log)
        rss_mb = _peak_rss_mb()
        result = {"i": i, "code": code, "escaped": escaped, "user_error": user_error, "seconds": round(elapsed, 3),
                  "cpu_seconds": round(cpu, 3), "rss_mb": round(rss_mb)}
        os.write(out, (json.dumps(result) + "\n").encode())
        mx.clear_cache()
        if i % 50 == 49:  # a full collection costs ~75 ms: not after every job
            gc.collect()
        if rss_mb > jobs["rss_limit_mb"]:
            os._exit(3)  # start afresh, so the next job's peak is its own
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
