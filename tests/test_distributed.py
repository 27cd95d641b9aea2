"""Tensor and pipeline parallel over MLX's ring backend on 127.0.0.1: 2 and 4 local processes started
by `mlx.launch` give token for token what one process gives, and each rank holds only its share.

Every configuration runs inside one launch per group size (tests/distributed_worker.py loops over
them and writes a JSON file); the single-process references are computed here.
"""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from distributed_worker import run_case
from gemma3_mlx.loader import load_model
from gemma3_mlx.chat import ChatSession
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.generate import stream_generate
from gemma3_mlx.model import Model
from gemma3_mlx.memory import needs
from gemma3_mlx.shard import OnPaper, Plan, kv_heads, split_layers, traffic

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
LAUNCH = [str(BIN / "mlx.launch"), "--backend", "ring"]
VLM = "tests/fixtures/tiny_vlm"
# (query heads, kv heads, head_dim) of the real models: 270M/1B, 4B, 12B, 27B
LAYOUTS = [(4, 1, 256), (8, 4, 256), (16, 8, 256), (32, 16, 128)]


def tiny_dir(root: Path, heads: int, kv: int, hd: int, bits: int | None) -> str:
    """A random Gemma 3 with a real head layout: 7 layers (5 local, window 8), vocabulary 512."""
    d = {"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256,
         "num_hidden_layers": 7, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
         "query_pre_attn_scalar": hd, "sliding_window": 8, "max_position_embeddings": 512}
    mx.random.seed(heads + 100 * kv + hd)
    model = Model(ModelConfig.from_dict(d))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        d["quantization"] = {"group_size": 64, "bits": bits}
    out = root / f"h{heads}_{kv}_{hd}_{bits or 'f'}"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(d))
    return str(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {(h, kv, hd, bits): tiny_dir(root, h, kv, hd, bits) for h, kv, hd in LAYOUTS for bits in (None, 4)}


# 15 prompt tokens in chunks of 8, then 3 more: past the window of 8. Few steps and cases: MLX's ring
# backend spins while it waits, so with more ranks than this machine's 2 cores every collective (~17 a
# step for tensor parallel) waits for the other processes to be scheduled.
PROMPT = [2] + list(range(10, 24))
BATCH = [PROMPT, [2] + list(range(40, 46))]  # two rows at different positions


def cases_for(dirs, modes, **kw):
    return [{"dir": d, "mode": m, "dequantize": False, "prompts": [PROMPT], "n": 3, "chunk": 8, **kw}
            for d in dirs for m in modes]


def launch(n: int, cases: list, tmp: Path, timeout: int = 400) -> list:
    (tmp / "cases.json").write_text(json.dumps(cases))
    out = tmp / "results.json"
    p = subprocess.run(LAUNCH + ["-n", str(n), "--python", sys.executable, "tests/distributed_worker.py",
                                 str(tmp / "cases.json"), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0 and out.exists(), p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def param_bytes(model, pattern: str) -> int:
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if re.search(pattern, k))


def check(case: dict, got: dict, n: int, model=None) -> None:
    """The same tokens as one process; per-rank parameter and KV bytes printed, and bounded by each
    rank's share."""
    model = model or load_model(case["dir"], "float32", case.get("dequantize"))
    ref = run_case(model, case)
    assert got["tokens"] == ref["tokens"], case
    t = model.config.text
    for r in range(n):  # the fit check's arithmetic, from the headers alone, is what each rank loaded
        plan = Plan(model.config, OnPaper(r, n), case["mode"], case.get("weights"))
        want = needs(case["dir"], dtype=mx.float32, dequantize=case.get("dequantize"), config=model.config, plan=plan)
        assert want.weights == got["params"][r], (case, r)
    total = param_bytes(model, ".")
    vision = param_bytes(model, "^(vision_tower|multi_modal_projector)")
    print(f"{Path(case['dir']).name} {case['mode']} x{n}: parameters {total} -> {got['params']}, "
          f"KV {ref['kv']} -> {got['kv']}")
    if case["mode"] == "tensor":
        repl = param_bytes(model, "norm") + vision
        if t.num_key_value_heads % n:
            repl += param_bytes(model, r"\.(k_proj|v_proj)\.")
        for r in range(n):
            assert got["params"][r] <= total / n + repl
            lo, hi = kv_heads(t.num_attention_heads, t.num_key_value_heads, r, n)
            assert got["kv"][r] == ref["kv"] * (hi - lo) // t.num_key_value_heads
    else:
        ranges = split_layers(t.is_local, case.get("weights") or [1] * n)
        embed = param_bytes(model, "^model\\.(embed_tokens|norm)\\.")
        for r, (a, b) in enumerate(ranges):
            mine = param_bytes(model, r"^model\.layers\.(" + "|".join(map(str, range(a, b))) + r")\.")
            assert got["params"][r] <= mine + embed + (vision if r == n - 1 else 0)
        assert sum(got["kv"]) == ref["kv"]


def test_split_layers_kv_heads_and_traffic():
    assert split_layers([True] * 5 + [False], [1, 1]) == [(3, 6), (0, 3)]  # rank 1 runs the first layers
    assert split_layers([True] * 5 + [False] + [True] * 6, [3, 1]) == [(3, 12), (0, 3)]  # 3:1 memory
    with pytest.raises(ValueError, match="no sliding-window layer"):
        split_layers([True, False, False, True], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="at least 4 layers"):
        split_layers([True] * 3, [1] * 4)
    assert [kv_heads(4, 1, r, 2) for r in range(2)] == [(0, 1), (0, 1)]  # one KV head: replicated
    assert [kv_heads(32, 16, r, 4) for r in range(4)] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert [kv_heads(8, 4, r, 8) for r in range(8)] == [(r // 2, r // 2 + 1) for r in range(8)]  # shared
    # The README's 27B figures: bytes each Mac sends per token (bfloat16), collectives per token.
    t = ModelConfig.from_dict({"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 5376,
                               "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
                               "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168}).text
    assert traffic(t, "tensor", 2) == (1606212, 127) and traffic(t, "tensor", 4)[0] == 2409318
    assert traffic(t, "pipeline", 2) == (10756, 2)


@pytest.mark.slow  # 2 and 4 ranks under mlx.launch
def test_two_ranks_match_one_process(tiny, tmp_path):
    # Tensor parallel splits heads: every layout, float and 4-bit. A pipeline splits layers: two layouts.
    cases = cases_for(tiny.values(), ["tensor"])
    cases += cases_for([d for (h, kv, hd, bits), d in tiny.items() if h in (4, 32)], ["pipeline"])
    cases += cases_for([tiny[(16, 8, 256, 4)]], ("tensor", "pipeline"), prompts=BATCH, n=6)
    cases += [{"dir": VLM, "mode": mode, "image": "one_image", "prompts": [], "n": 3} for mode in ("tensor", "pipeline")]
    # Uneven memory (3:1), sampled: rank 0 samples for both.
    cases += cases_for([tiny[(8, 4, 256, None)]], ["pipeline"], weights=[3, 1], temp=0.8, seed=5, n=8)
    got = launch(2, cases, tmp_path)
    for case, g in zip(cases, got):
        check(case, g, 2)


@pytest.mark.slow  # 2 and 4 ranks under mlx.launch
def test_four_ranks_match_one_process(tiny, tmp_path):
    # One query head per rank with the kv head replicated (4/1), one kv head per rank (8/4, 4-bit),
    # a 4-stage pipeline (batched), an image.
    cases = cases_for([tiny[(4, 1, 256, None)], tiny[(8, 4, 256, 4)]], ["tensor"], n=3)
    cases += cases_for([tiny[(32, 16, 128, None)]], ["pipeline"], prompts=BATCH, n=3)
    cases += [{"dir": VLM, "mode": "tensor", "image": "one_image", "prompts": [], "n": 2}]
    got = launch(4, cases, tmp_path)
    for case, g in zip(cases, got):
        check(case, g, 4)


def gemma3(*args, n: int = 0, env=None, stdin=None, timeout=300):
    """The gemma3 command, alone (n=0) or on n local ranks under mlx.launch."""
    cmd = ([*LAUNCH, "-n", str(n), "--"] if n else []) + [str(BIN / "gemma3"), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "NO_COLOR": "1", **(env or {})})


def test_chat_on_two_ranks_prints_what_one_process_prints(model_270m_dir, model_270m):
    turns = ["What is the capital of France?", "And of Italy?"]
    session = ChatSession(*model_270m, max_tokens=5)  # what `gemma3 chat` alone prints: each reply, a newline
    alone = "".join("".join(r.text for r in session.send(t)) + "\n" for t in turns)
    stdin = "\n".join(turns) + "\n/quit\n"  # mlx.launch never passes on the end of input
    split = gemma3("chat", "-m", str(model_270m_dir), "-n", "5", "--parallel", "pipeline", n=2, stdin=stdin)
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == alone and split.stderr.count("loading gemma-3-270m-f32 ...") == 1


def test_generate_on_two_ranks_reports_each_ranks_bytes(model_270m_dir, model_270m):
    prompt = "The capital of France is"
    pieces = list(stream_generate(*model_270m, prompt, max_tokens=4))  # what `gemma3 generate --raw` alone prints
    # 1000 MB a machine: the float32 270M (1.28 GB to load) does not fit one, its halves (0.76 GB) fit two
    small = {"GEMMA3_MLX_MEMORY": "1000M"}
    alone = gemma3("generate", "--raw", "-m", str(model_270m_dir), "-n", "4", prompt, env=small)
    assert alone.returncode == 1 and "needs about 1.28 GB to load" in alone.stderr, alone.stderr
    split = gemma3("generate", "--raw", "-m", str(model_270m_dir), "-n", "4", "--stats", "--parallel", "tensor",
                   prompt, n=2, env=small)
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == "".join(r.text for r in pieces) + "\n"
    ranks = re.findall(r"rank (\d): parameters ([\d.]+) MB, KV cache ([\d.]+) MB", split.stderr)
    assert [r for r, _, _ in ranks] == ["0", "1"], split.stderr
    print(split.stderr)
    single_kv = pieces[-1].kv_bytes / 1e6
    for _, params, kv in ranks:  # float32 270M: 1,072 MB alone; the 262K embedding and the MLP split in two
        assert float(params) < 0.55 * 1072 and abs(float(kv) - single_kv) < 0.1  # one KV head: replicated
    # 600 MB a machine: not even half fits; rank 0 says so in one line, before anything is read
    short = gemma3("generate", "--raw", "-m", str(model_270m_dir), "--parallel", "tensor", prompt, n=2,
                   env={"GEMMA3_MLX_MEMORY": "600M"})
    line = [x for x in short.stderr.splitlines() if x.startswith("error:")]
    assert short.stdout == "" and len(line) == 1, short.stderr  # (mlx.launch itself exits 0 when a rank fails)
    assert line[0].startswith("error: gemma-3-270m-f32: rank 0 needs about 0.76 GB to load its share of the "
                               "model (1.28 GB in all) and has 0.63 GB: add ranks")


@pytest.mark.slow  # two gemma3 processes
def test_a_rank_that_never_comes_fails_in_one_line(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:39611"], ["127.0.0.1:39612"]]))
    t = time.time()
    p = gemma3("generate", "-m", VLM, "--parallel", "tensor", "hi",
               env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "GEMMA3_MLX_CLUSTER_TIMEOUT": "3"}, timeout=60)
    assert time.time() - t < 30 and p.returncode != 0
    assert p.stdout == "" and p.stderr.strip().count("\n") == 0 and "did not come up within 3 s" in p.stderr
    with socket.socket() as taken:  # rank 0's port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        hosts.write_text(json.dumps([[f"127.0.0.1:{taken.getsockname()[1]}"], ["127.0.0.1:39613"]]))
        p = gemma3("generate", "-m", VLM, "--parallel", "tensor", "hi",
                   env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "GEMMA3_MLX_CLUSTER_TIMEOUT": "20"}, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "in use" in p.stderr, p.stderr


@pytest.mark.slow  # two gemma3 processes
def test_ranks_with_different_models_fail_in_one_line(tiny, tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:39621"], ["127.0.0.1:39622"]]))
    procs = [subprocess.Popen([str(BIN / "gemma3"), "generate", "-m", tiny[(4, 1, 256, r and 4 or None)],
                               "--parallel", "tensor", "hi"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert outs[1] == ("", "")  # rank 1 says nothing: rank 0 speaks for the cluster
    assert outs[0][1].count("\n") == 1 and "the ranks do not agree on the model" in outs[0][1], outs[0][1]


# ---------------------------------------------------------------------- gemma3 serve on two ranks

def _serve(model_dir: Path, n: int, *extra: str):
    """`gemma3 serve` alone (n=0) or on n local ranks; (process, port) once it answers /health. The
    launcher's standard input is a pipe left open: at end of input mlx.launch spins a core."""
    from test_server import free_port, wait_healthy

    port = free_port()
    cmd = ([*LAUNCH, "-n", str(n), "--"] if n else []) + [str(BIN / "gemma3"), "serve", "-m", str(model_dir),
                                                          "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        wait_healthy(port, proc, timeout=240)
    except BaseException:
        proc.kill()
        raise
    return proc, port


def _ctrl_c(proc) -> tuple[str, str]:
    """Ctrl-C as a terminal sends it to the server (every rank; not to mlx.launch, whose own handling
    is not ours to test); the output once everything exited."""
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in ranks or [str(proc.pid)]:
        os.kill(int(pid), signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return out, err, ranks


def _conversation(port: int, name: str) -> list:
    """Two turns past the window (the second from the pool's cache), three requests at once (one sampled,
    one with logprobs), a client that leaves mid-stream, and one more request: what the server answered."""
    import threading

    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    out = []
    messages = [{"role": "user", "content": "Tell me about the sea, the sky and the wind over the hills."}]
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)
    out.append(("turn 1", r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens))
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "And the mountains?"}]
    text, usage = [], None
    for chunk in client.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    out.append(("turn 2", "".join(text), usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))

    together = [None] * 3

    def ask(i):
        if i == 0:
            c = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Count to ten."}],
                                               max_tokens=16, temperature=0)
            together[i] = c.choices[0].message.content
        elif i == 1:
            c = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "A poem?"}],
                                               max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
            together[i] = c.choices[0].message.content
        else:
            c = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, logprobs=3,
                                          temperature=0)
            lp = c.choices[0].logprobs
            together[i] = (c.choices[0].text, lp.tokens, lp.token_logprobs)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    out.append(("together", together[:2], together[2][:2]))
    out.append(("logprobs", together[2][2]))

    png = "data:image/png;base64," + base64.b64encode((ROOT / "tests/fixtures/images/wide.png").read_bytes()).decode()
    r = client.chat.completions.create(model=name, max_tokens=12, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": png}}]}])
    out.append(("an image", r.choices[0].message.content, r.usage.prompt_tokens))
    try:  # an image that does not decode: refused by every rank alike
        client.chat.completions.create(model=name, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    except openai.BadRequestError as e:
        out.append(("not an image", e.status_code))
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Go on and on."}],
                                            max_tokens=200, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client leaves: every rank drops the row at the same step
    try:  # refused by every rank alike (the prompt is past the context of 2048)
        client.completions.create(model=name, prompt=" sea" * 2100, max_tokens=4)
    except openai.BadRequestError as e:
        out.append(("refused", e.status_code, "more than the model's context" in str(e)))
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Last one."}],
                                       max_tokens=12, temperature=0)
    out.append(("after a disconnect", r.choices[0].message.content))
    client.close()
    return out


@pytest.mark.slow  # three servers, two of them on 2 ranks
def test_serve_on_two_ranks_answers_what_one_process_answers(tokenizer_270m, tmp_path):
    from conftest import give_eyes
    from test_server import make_tiny

    text = make_tiny(tokenizer_270m, tmp_path / "tiny-chat")  # window 32
    model_dir = give_eyes(text, tmp_path / "tiny-eyes")  # with the tiny SigLIP tower: images travel too
    answers = {}
    for mode in ("one", "tensor", "pipeline"):
        n = 0 if mode == "one" else 2
        proc, port = _serve(model_dir, n, *(("--parallel", mode) if n else ()))
        try:
            answers[mode] = _conversation(port, model_dir.name)
        finally:
            out, err, ranks = _ctrl_c(proc)
        assert "Traceback" not in err, err[-2000:]
        if n:
            assert len(ranks) == 2 and f"on 2 ranks ({mode} parallel)" in err and err.count("serving tiny-eyes") == 1
            left = subprocess.run(["ps", "-o", "pid=", "-p", ",".join(ranks)], capture_output=True, text=True)
            assert left.stdout.strip() == "", f"ranks left running: {left.stdout}"
    one = answers.pop("one")
    print(*one, sep="\n")
    assert one[1][3] > 0.9 * one[0][3]  # turn 2 reused turn 1's cache
    assert one[4][1] and one[5] == ("not an image", 400) and one[6] == ("refused", 400, True)
    lp1 = one.pop(3)[1]
    for mode, got in answers.items():
        assert np.allclose(got.pop(3)[1], lp1, atol=1e-4), mode
        assert got == one, mode
