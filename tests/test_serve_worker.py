"""The server's model thread (cli/serve_worker.py and its pieces).

When something fails (serve_running.py): a step that fails ends the jobs the engine let go with a 500
naming the error, an error outside any request fails every job, and either way the worker keeps
serving, with its count of requests in flight back to zero. In-process, without HTTP: the tiny model
with the real tokenizer (test_server.make_tiny), jobs sent straight to a Worker (test_admission.Jobs),
failures injected by replacing one engine or worker method for one call.

Across ranks (serve_queue.py), without MLX's collectives: two RequestQueues over a stand-in channel,
rank 0's requests rebuilt on rank 1 field for field, and rank 1's idle pacing turn by turn. The real
two-rank server is test_distributed.test_serve_on_two_ranks_answers_what_one_process_answers.
"""

import re
import time

import pytest

import gemma3_mlx
from gemma3_mlx.cli import serve_queue
from gemma3_mlx.cli.serve_metrics import Metrics
from gemma3_mlx.cli.serve_queue import IDLE_TICK, PACE_AFTER, PACE_MARGIN, RequestQueue
from gemma3_mlx.cli.serve_worker import Job, Worker
from gemma3_mlx.constrain import Constraint
from gemma3_mlx.settings import Sampling
from test_admission import Jobs
from test_server import make_tiny


@pytest.fixture(scope="module")
def worker(tokenizer_270m, tmp_path_factory):
    model, tokenizer = gemma3_mlx.load(make_tiny(tokenizer_270m, tmp_path_factory.mktemp("worker") / "tiny-chat"))
    worker = Worker(model, tokenizer, max_batch=4, cache_bytes=64 << 20, max_queue=8)
    worker.start()
    yield worker
    worker.stop()


def once(obj, name: str, before=None):
    """Make obj.name raise RuntimeError("boom") on its next call (after calling `before`), then be itself again."""
    def failing(*a, **kw):
        del obj.__dict__[name]
        if before is not None:
            before()
        raise RuntimeError("boom")

    setattr(obj, name, failing)


def until(condition, timeout: float = 30) -> None:
    """Wait for what the model thread does right after its last message to a client."""
    end = time.time() + timeout
    while not condition():
        assert time.time() < end
        time.sleep(0.002)


def served(worker, jobs: Jobs, i: int) -> None:
    """A short request after the failure: answered in full, and nothing left in flight."""
    assert jobs.submit(i, "Are you still there?", max_tokens=4)[0]
    jobs.wait([i])
    assert jobs.end(i)[:2] == ("done", "length")
    until(lambda: worker.queue.in_flight == 0)


def test_a_failed_step_ends_the_jobs_the_engine_let_go_with_a_500(worker):
    jobs, before = Jobs(worker), dict(worker.metrics.counters)
    assert jobs.submit(0, "Tell me everything.", max_tokens=1500)[0]
    until(lambda: jobs.answers[0])
    assert jobs.answers[0][0][0] == "accepted"
    engine = worker.engine
    once(engine, "step", before=engine.close)  # the step drops every sequence, then fails
    jobs.wait([0])
    assert jobs.end(0) == ("error", 500, "RuntimeError: boom")
    assert worker.engine is engine  # a failed step is not a failed loop: the engine stays
    assert worker.metrics.counters["errors"] - before["errors"] == 1
    served(worker, jobs, 1)


def test_a_failed_step_that_dropped_nothing_leaves_its_jobs_running(worker):
    jobs = Jobs(worker)
    assert jobs.submit(0, "Tell me everything.", max_tokens=200)[0]
    until(lambda: jobs.answers[0])
    engine = worker.engine
    once(engine, "step")
    jobs.wait([0])
    assert "step" not in vars(engine)  # it failed once, while the job ran
    assert jobs.end(0)[:2] == ("done", "length") and jobs.end(0)[2]["completion_tokens"] == 200
    until(lambda: worker.queue.in_flight == 0)


def test_an_error_outside_any_request_fails_every_job_and_a_new_engine_keeps_the_settings(worker):
    """The loop's last resort (Running.fail_all): every job gets the error; when closing the engine
    fails too, a new engine takes its place with the same batch, caches and tokenizer (a constrained
    request needs the tokenizer), and the requests after it are served."""
    jobs, old = Jobs(worker), worker.engine
    served(worker, jobs, 9)  # a conversation in the pool
    for i in range(2):
        assert jobs.submit(i, "Tell me everything.", max_tokens=1500)[0]
    until(lambda: jobs.answers[0] and jobs.answers[1])
    assert len(worker.pool) > 0
    once(old, "close")
    once(worker.starter, "start_ready")  # the first thing of every turn
    jobs.wait([0, 1])
    assert [jobs.end(i) for i in range(2)] == [("error", 500, "internal error: RuntimeError: boom")] * 2
    new = worker.engine
    assert new is not old and worker.running.engine is new and not new.has_work
    assert (new.tokenizer, new.max_batch, new.prefill_chunk, new.cache_args) == \
           (old.tokenizer, old.max_batch, old.prefill_chunk, old.cache_args)
    until(lambda: len(worker.pool) == 0)  # emptied, last
    assert worker.admission.reserved == 0 and not worker.admission.waiting
    served(worker, jobs, 2)
    answers = []
    assert worker.submit(Job(answers.append, messages=[{"role": "user", "content": "Code?"}],
                             settings=Sampling(constraint=Constraint.regex("[0-9]{3}-[a-z]{2}"))))
    jobs.answers[3] = answers
    jobs.wait([3])
    assert jobs.end(3)[:2] == ("done", "stop")
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", "".join(a[1] for a in answers if a[0] == "delta"))


# ---------------------------------------------------------------------- the queue across ranks


class Rank:
    """A stand-in for one rank's distributed group and Channel: what rank 0 posts, every rank takes."""

    def __init__(self, rank: int, wire: list):
        self._rank, self.wire = rank, wire

    def rank(self) -> int:
        return self._rank

    def post(self, data) -> None:
        if self._rank == 0:
            self.wire[:] = [data]

    def take(self):
        return self.wire[0] if self.wire else None


def queue_on(rank: int, wire: list) -> RequestQueue:
    q = RequestQueue(2, Metrics(), group=Rank(rank, wire))  # at most 2 in flight
    q.channel = q.channel.group  # the stand-in posts and takes itself
    return q


def test_rank_0s_requests_and_cancels_are_rebuilt_on_the_other_ranks():
    wire = []
    q0, q1 = queue_on(0, wire), queue_on(1, wire)
    job = Job(print, messages=[{"role": "user", "content": "What is this?\n<start_of_image>"}], images=[b"\x89PNG\x00\xff"],
              max_tokens=7, settings=Sampling(temp=0.5, top_k=3, seed=11, stop=("END",)), logprobs=2,
              speculative="off", adapter="tuned", context=512)
    assert q0.submit(job) and q0.submit(Job(print, prompt=[2, 9, 9])) and not q0.submit(Job(print, prompt="x"))
    q0.cancel(job)
    assert q0.take(idle=True) == [] and q1.take(idle=True) == []  # nothing posted yet
    q0.post(idle=False)
    q1.post(idle=False)
    mine, theirs = q0.take(idle=False), q1.take(idle=False)
    assert [k for k, _ in mine] == [k for k, _ in theirs] == ["submit", "submit", "cancel"]
    assert mine[0][1] is job and mine[2][1] is job and [j.number for _, j in mine] == [0, 1, 0]
    copy = theirs[0][1]
    assert theirs[2][1] is copy and copy is not job and theirs[1][1].prompt == [2, 9, 9]
    for name in ("messages", "images", "max_tokens", "settings", "logprobs", "speculative", "adapter", "context",
                 "number"):
        assert getattr(copy, name) == getattr(job, name), name
    assert copy.send is not print and q0.in_flight == 2 and q0.metrics.counters["rejected"] == 1
    q1.ended(copy)  # over on rank 1 (and on rank 0, alike): a late cancel of it is dropped there
    q0.cancel(job)
    q0.post(idle=True)
    q1.post(idle=True)
    assert q0.take(idle=True) == [("cancel", job)] and q1.take(idle=True) == []


def test_the_other_ranks_nap_only_after_idle_turns_in_a_row(monkeypatch):
    naps = []
    monkeypatch.setattr(serve_queue.time, "sleep", naps.append)
    wire = []
    q1 = queue_on(1, wire)

    def turn(idle: bool, posted=None) -> bool:
        """One turn on rank 1 after rank 0 posted `posted`; whether it napped before its own post."""
        wire[:] = [posted]
        before = len(naps)
        q1.take(idle)
        q1.post(idle)
        assert naps[before:] in ([], [IDLE_TICK - PACE_MARGIN])
        return len(naps) > before

    assert [turn(idle=True) for _ in range(PACE_AFTER + 2)] == [False] * (PACE_AFTER - 1) + [True] * 3
    assert not turn(idle=True, posted=b'[{"op": "stop", "n": null}]')  # something came: count again
    assert not turn(idle=False)  # busy: no turn counts
    assert [turn(idle=True) for _ in range(PACE_AFTER)] == [False] * (PACE_AFTER - 1) + [True]
