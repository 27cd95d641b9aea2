"""Batched prefill (prefill.py, engine._prefill): several prompts in one forward pass, each row at its
own position, shorter rows padded by a few tokens that the caches take back. Each prompt must give
what it gives alone: its logits and caches (to float tolerance), and its greedy tokens exactly."""

import mlx.core as mx
import pytest

import gemma3_mlx.engine as engine_mod
from gemma3_mlx.cache import WindowCache
from gemma3_mlx.engine import Engine
from gemma3_mlx.prefill import Fill, plan, run_rows
from gemma3_mlx.prompt_cache import PromptCache
from test_engine import prompts_for, tiny_model

LENGTHS = [5, 7, 9, 40, 41, 44, 100, 300]  # near-equal ones share a pass with padding; 300 is far past the window


@pytest.fixture(scope="module")
def model():
    return tiny_model(window=16)


def test_plan_pads_at_most_max_pad():
    assert plan([40, 41, 44, 100], 4) == 44  # 40 and 41 are padded (by 4 and 3), 100 takes 44
    assert plan([40, 45, 100], 4) == 40  # 45 is more than 4 past 40: it takes 40 now
    assert plan([7], 4) == 7


def test_rows_of_one_pass_equal_each_prompt_alone(model):
    prompts = prompts_for(model, LENGTHS, seed=1)
    alone = []
    for p in prompts:
        pc = PromptCache(model)
        alone.append((pc.prefill(p, chunk=64), pc))
    caches = [PromptCache(model) for _ in prompts]
    for pc, p in zip(caches[:3], prompts[:3]):
        pc.prefill(p[:3])  # some rows already hold part of their prompt: offsets differ from the start
    fills = [Fill(pc, p) for pc, p in zip(caches, prompts)]
    got = [None] * len(fills)
    passes = []
    while not all(f.done for f in fills):
        live = [i for i, f in enumerate(fills) if not f.done]
        length = plan([fills[i].need(64) for i in live], 4)
        passes.append((len(live), length))
        for i, out in zip(live, run_rows(model, [fills[i] for i in live], length)):
            if out is not None:
                got[i] = out
    assert passes[0][0] == 8 and len(passes) < len(LENGTHS) + 6  # batched, with padding merging near-equal rows
    for (want, ref), logits, pc in zip(alone, got, caches):
        assert pc.tokens == ref.tokens
        assert mx.allclose(logits, want, atol=1e-4, rtol=1e-4)
        for c, r in zip(pc.layers, ref.layers):  # what the caches hold equals the prompt alone's
            assert c.offsets == r.offsets
            if isinstance(c, WindowCache):
                assert c.can_trim() >= c.rollback // 2  # the pads cost at most half the rollback
            for k, v in r.state.items():
                if isinstance(c, WindowCache):  # only the slots a next query sees (a pad may fill the others)
                    if k == "furthest":
                        continue
                    n = c.offset
                    slots = mx.array([p % c.size for p in range(max(0, n - c.window + 1), n)])
                    v, mine = v[:, :, slots], c.state[k][:, :, slots]
                else:
                    mine = c.state[k]
                assert mx.allclose(mine, v, atol=1e-4, rtol=1e-4), k
        a, b = pc.feed([3, 4, 5]), ref.feed([3, 4, 5])  # and they go on alike
        assert mx.allclose(a, b, atol=1e-4, rtol=1e-4)


def _run(engine, prompts, max_tokens=12, submit_later=()):
    uids = {engine.submit(p, max_tokens=max_tokens): i for i, p in enumerate(prompts)}
    out = {i: [] for i in range(len(prompts) + len(submit_later))}
    steps = 0
    while engine.has_work:
        if steps == 3:
            for j, p in enumerate(submit_later):
                uids[engine.submit(p, max_tokens=max_tokens)] = len(prompts) + j
        for ev in engine.step():
            if ev.token is not None:
                out[uids[ev.uid]].append(ev.token)
        steps += 1
    return [out[i] for i in range(len(out))]


def _alone(model, prompts, max_tokens=12):
    return [_run(Engine(model, max_batch=1, prefill_chunk=64), [p], max_tokens)[0] for p in prompts]


def test_eight_prompts_prefilled_together_each_equal_their_run_alone(model, monkeypatch):
    prompts = prompts_for(model, LENGTHS, seed=2)
    sizes = []

    def counting(m, fills, length):
        sizes.append(len(fills))
        return run_rows(m, fills, length)

    monkeypatch.setattr(engine_mod, "run_rows", counting)
    together = _run(Engine(model, max_batch=8, prefill_chunk=96), prompts)
    assert sizes[0] == 8 and sum(sizes) > len(sizes)  # one pass took all eight (72 tokens: within a chunk)
    assert together == _alone(model, prompts)


def test_prompts_joining_while_others_decode_equal_their_run_alone(model):
    first = prompts_for(model, [30, 200], seed=3)
    later = prompts_for(model, [6, 8, 90, 91, 150], seed=4)
    together = _run(Engine(model, max_batch=8, prefill_chunk=64), first, submit_later=later)
    assert together == _alone(model, first + later)
