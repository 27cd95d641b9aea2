"""LoRA adapters (adapters.py): PEFT and mlx-lm adapters made here at random, run unmerged, against the
weights merged in numpy by the test; the fused conversion; a 4-bit base; rows with different adapters in
one batch; the server; and bad adapters refused in one line."""

import json
import math
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import gemma3_mlx
from conftest import FIXTURES
from gemma3_mlx.adapters import AdapterError, linear_shapes, read_adapter
from gemma3_mlx.engine import Engine
from gemma3_mlx.loader import load_config
from gemma3_mlx.settings import Sampling

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = {"causal": "base_model.model.model.", "v4": "base_model.model.language_model.model.",
          "v5": "base_model.model.model.language_model."}


def make_peft(out: Path, text, r: int, alpha: float, seed: int, rslora=False, prefix="causal", layers=None,
              std=0.05) -> dict:
    """A random PEFT LoRA on every linear of `layers` (all); returns {MLX module: (A (r,in), B (out,r), scale)}."""
    rng = np.random.default_rng(seed)
    tensors, made = {}, {}
    for i in layers if layers is not None else range(text.num_hidden_layers):
        for mod, (fi, fo) in linear_shapes(text).items():
            a = rng.normal(0, std, (r, fi)).astype(np.float32)
            b = rng.normal(0, std, (fo, r)).astype(np.float32)
            key = f"{PREFIX[prefix]}layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            made[f"model.layers.{i}.{mod}"] = (a, b, alpha / (math.sqrt(r) if rslora else r))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": MODULES,
        "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"}))
    return made


def make_mlx_lm(out: Path, text, r: int, scale: float, seed: int, num_layers: int, std=0.05) -> dict:
    """A random mlx-lm LoRA on the last `num_layers` layers: lora_a (in, r), lora_b (r, out)."""
    rng = np.random.default_rng(seed)
    tensors, made = {}, {}
    for i in range(text.num_hidden_layers - num_layers, text.num_hidden_layers):
        for mod, (fi, fo) in linear_shapes(text).items():
            a = rng.normal(0, std, (fi, r)).astype(np.float32)
            b = rng.normal(0, std, (r, fo)).astype(np.float32)
            tensors[f"model.layers.{i}.{mod}.lora_a"], tensors[f"model.layers.{i}.{mod}.lora_b"] = a, b
            made[f"model.layers.{i}.{mod}"] = (a.T, b.T, scale)  # as PEFT's (r, in), (out, r)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), {k: mx.array(v) for k, v in tensors.items()})
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": r, "scale": scale, "dropout": 0.0, "keys": [f"self_attn.{m}" for m in MODULES[:4]]
                            + [f"mlp.{m}" for m in MODULES[4:]]}}))
    return made


def merged_weights(model_dir: Path, made: dict) -> dict:
    """The base directory's float weights with W + scale * B @ A merged in numpy."""
    w = {k: np.asarray(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    for module, (a, b, scale) in made.items():
        w[f"{module}.weight"] = w[f"{module}.weight"] + scale * (b @ a)
    return w


def load_merged(model_dir: Path, made: dict):
    model, _ = quiet_load(model_dir)
    model.load_weights([(k, mx.array(v)) for k, v in merged_weights(model_dir, made).items()], strict=True)
    return model


def quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny fixtures have no tokenizer.model
        return gemma3_mlx.load(path, **kw)


IDS = mx.array([[2, 17, 99, 5, 250, 31, 7, 64, 300, 12, 45, 201]])


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return tiny_dirs["tiny_v5"]


@pytest.fixture(scope="module")
def text(tiny):
    return quiet_load(tiny)[0].config.text


@pytest.mark.parametrize("r, alpha, rslora, prefix", [(4, 8, False, "causal"), (8, 16, True, "v4"),
                                                     (16, 8, False, "v5"), (12, 24, True, "causal")])
def test_peft_adapter_equals_numpy_merge(tiny, text, tmp_path, r, alpha, rslora, prefix):
    made = make_peft(tmp_path / "a", text, r, alpha, seed=r, rslora=rslora, prefix=prefix)
    with_adapter, _ = quiet_load(tiny, adapter=tmp_path / "a")
    bare, _ = quiet_load(tiny)
    got, want = with_adapter(IDS), load_merged(tiny, made)(IDS)
    assert float(mx.abs(got - want).max()) < 1e-4
    assert float(mx.abs(bare(IDS) - want).max()) > 0.1  # the adapter matters: the check can fail


def test_mlx_lm_adapter_equals_numpy_merge(tiny, text, tmp_path):
    made = make_mlx_lm(tmp_path / "a", text, r=6, scale=2.0, seed=3, num_layers=5)
    got = quiet_load(tiny, adapter=tmp_path / "a")[0](IDS)
    want = load_merged(tiny, made)(IDS)
    assert float(mx.abs(got - want).max()) < 1e-4
    assert float(mx.abs(quiet_load(tiny)[0](IDS) - want).max()) > 0.1


def test_fused_conversion_gives_the_same_logits(tiny, text, tmp_path):
    """convert --adapter merges into the float weights; the quality check compares with the merged model."""
    from gemma3_mlx.convert import convert

    made = make_peft(tmp_path / "a", text, 8, 16, seed=5, std=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(FIXTURES / "tiny_v5", tmp_path / "fused", dtype="float32", adapter=tmp_path / "a")
        r8 = convert(FIXTURES / "tiny_v5", tmp_path / "fused8", bits=8, group_size=32, adapter=tmp_path / "a", check=True)
        plain8 = convert(FIXTURES / "tiny_v5", tmp_path / "plain8", bits=8, group_size=32, check=True)
    want = quiet_load(tiny, adapter=tmp_path / "a")[0](IDS)
    assert float(mx.abs(quiet_load(tmp_path / "fused")[0](IDS) - want).max()) < 1e-4
    assert float(mx.abs(load_merged(tiny, made)(IDS) - want).max()) < 1e-4
    # Against the merged float model, the 8-bit fused model is as close as 8 bits of the bare base is to it.
    assert r8.quality["kl"] < 10 * plain8.quality["kl"] + 1e-4 and r8.quality["top1"] > 0.9
    # Measured against the unmerged base instead, the KL would be far larger:
    from gemma3_mlx.convert import check
    assert check(tmp_path / "fused8", FIXTURES / "tiny_v5")["kl"] > 100 * r8.quality["kl"]


def quantized_tiny(tiny_dirs, tmp_path) -> Path:
    from gemma3_mlx.convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(FIXTURES / "tiny_v5", tmp_path / "q4", bits=4, group_size=32)
    return tmp_path / "q4"


def test_4bit_base_with_adapter_matches_merge_after_quantization(tiny_dirs, text, tmp_path):
    """QLoRA: the base stays 4-bit (QuantizedLinear), the adapter runs beside it in float. The reference
    dequantizes the 4-bit weights and merges the adapter there in numpy. Measured max |diff| of the
    logits: 2.7e-6 (logits up to 2.8; float32 rounding of the quantized kernel vs a float matmul); bound 1e-4."""
    import mlx.nn as nn

    q4 = quantized_tiny(tiny_dirs, tmp_path)
    made = make_peft(tmp_path / "a", text, 8, 16, seed=11)
    model, _ = quiet_load(q4, dequantize=False, adapter=tmp_path / "a")
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, nn.QuantizedLinear)
    got = model(IDS)
    floats, _ = quiet_load(q4, dequantize=True)  # the 4-bit weights, expanded exactly
    w = {k: np.asarray(v) for k, v in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(floats.parameters())}
    for module, (a, b, scale) in made.items():
        w[f"{module}.weight"] = w[f"{module}.weight"] + scale * (b @ a)
    floats.load_weights([(k, mx.array(v)) for k, v in w.items()], strict=True)
    diff = float(mx.abs(got - floats(IDS)).max())
    assert diff < 1e-4, diff


def test_batched_rows_with_different_adapters_equal_each_alone(tiny, text, tmp_path):
    """4 rows: 3 different adapters (ranks 4, 8, 16; PEFT and mlx-lm) and the bare base, greedy, decoding
    well past the tiny model's 6-token window; each row equals that row run alone."""
    make_peft(tmp_path / "a", text, 4, 8, seed=1, std=0.2)
    make_peft(tmp_path / "b", text, 16, 16, seed=2, rslora=True, std=0.2, layers=[0, 3, 5])
    make_mlx_lm(tmp_path / "c", text, 8, 4.0, seed=4, num_layers=4, std=0.2)
    model, _ = quiet_load(tiny, adapter={"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"})
    prompts = [[2, 17, 99, 5, 250], [2, 31, 7], [2, 64, 300, 12, 45, 201, 8], [2, 5, 6, 7]]
    names = ["a", "b", None, "c"]
    greedy = Sampling(temp=0.0, max_tokens=24)

    def run(engine, jobs):
        uids = [engine.submit(p, settings=greedy, stop_ids=(), adapter=n) for p, n in jobs]
        out = {u: [] for u in uids}
        while engine.has_work:
            for ev in engine.step():
                if ev.token is not None:
                    out[ev.uid].append(ev.token)
        return [out[u] for u in uids]

    together = run(Engine(model, max_batch=4), list(zip(prompts, names)))
    alone = [run(Engine(model, max_batch=1), [(p, n)])[0] for p, n in zip(prompts, names)]
    assert together == alone
    assert all(len(t) == 24 for t in together)
    # the adapters matter: the same prompt under each adapter and the base gives different tokens
    same = [run(Engine(model, max_batch=4), [(prompts[0], n) for n in names])][0]
    assert len({tuple(t) for t in same}) == 4


def test_prompt_caches_are_bound_to_one_adapter(tiny, text, tmp_path):
    from gemma3_mlx.cache_pool import CachePool
    from gemma3_mlx.prompt_cache import PromptCache, PromptCacheError

    make_peft(tmp_path / "a", text, 4, 8, seed=1, std=0.2)
    make_peft(tmp_path / "b", text, 4, 8, seed=2, std=0.2)
    model, _ = quiet_load(tiny, adapter={"a": tmp_path / "a", "b": tmp_path / "b"})
    ids = [2, 17, 99, 5, 250, 31, 7]
    pool = CachePool(model, 1 << 30)
    pa = pool.take(ids, adapter="a")
    la = pa.prefill(ids)
    pool.give(pa)
    pb = pool.take(ids, adapter="b")  # the same prompt, another adapter: a fresh cache, never a's
    assert pb is not pa and not pb.tokens and pb.adapter == "b"
    lb = pb.prefill(ids)
    assert float(mx.abs(la - lb).max()) > 1e-2
    assert pool.take(ids, adapter="a") is pa
    pa.save(tmp_path / "a.safetensors")
    with pytest.raises(PromptCacheError, match="different adapter"):
        PromptCache.load(tmp_path / "a.safetensors", model, adapter="b")
    back = PromptCache.load(tmp_path / "a.safetensors", model, adapter="a")
    assert back.tokens == ids
    with pytest.raises(ValueError, match="adapter"):
        Engine(model).submit(ids, cache=pb, adapter="a")
    with pytest.raises(AdapterError, match="no adapter named 'z'"):
        Engine(model).submit(ids, adapter="z")


# ---------------------------------------------------------------------- bad adapters: one line each


def cli(*args):
    from typer.testing import CliRunner

    from gemma3_mlx.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r) -> str:
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def edit_tensors(src: Path, out: Path, fn) -> Path:
    shutil.copytree(src, out)
    f = next(out.glob("*.safetensors"))
    w = {k: np.asarray(v) for k, v in mx.load(str(f)).items()}
    mx.save_safetensors(str(f), {k: mx.array(v) for k, v in fn(w).items()})
    return out


def test_bad_adapters_are_one_error_line(tiny, text, tmp_path):
    good = tmp_path / "good"
    make_peft(good, text, 4, 8, seed=1)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {}
    cases["wrong shape"] = (edit_tensors(good, tmp_path / "shape", lambda w: {
        **w, f"{q}.lora_A.weight": np.zeros((4, 48), np.float32)}), rf"{q}.lora_A.weight: shape \(4, 48\)")
    cases["layer count"] = (edit_tensors(good, tmp_path / "layers", lambda w: {
        **w, q.replace("layers.0", "layers.8") + ".lora_A.weight": np.zeros((4, 64), np.float32),
        q.replace("layers.0", "layers.8") + ".lora_B.weight": np.zeros((128, 4), np.float32)}), "layer 8, but the base has 8 layers")
    cases["vocabulary"] = (edit_tensors(good, tmp_path / "vocab", lambda w: {
        **w, "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 1000), np.float32)}),
        "lora_embedding_A: shape .* vocabulary of 384")
    cases["NaN weights"] = (edit_tensors(good, tmp_path / "nan", lambda w: {
        **w, f"{q}.lora_B.weight": np.full(w[f"{q}.lora_B.weight"].shape, np.nan, np.float32)}),
        rf"{q}.lora_B.weight: NaN")
    cases["DoRA"] = (shutil.copytree(good, tmp_path / "dora"), "DoRA")
    cfg = json.loads((good / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases["missing config"] = (shutil.copytree(good, tmp_path / "noconfig"), "no adapter_config.json")
    (tmp_path / "noconfig" / "adapter_config.json").unlink()
    cases["unknown format"] = (shutil.copytree(good, tmp_path / "unknown"), "unknown adapter format")
    (tmp_path / "unknown" / "adapter_config.json").write_text(json.dumps({"kind": "ia3"}))
    big = shutil.copytree(good, tmp_path / "big")  # 2 GB (sparse): refused from its size, never read
    with open(big / "adapter_model.safetensors", "r+b") as f:
        f.truncate(2 << 30)
    cases["2 GB"] = (big, "2,147,483,648 bytes, more than any LoRA adapter of this base")
    for what, (path, message) in cases.items():
        with pytest.raises(AdapterError, match=message):
            read_adapter(path, quiet_load(tiny)[0].config)
        line = one_error_line(cli("generate", "--raw", "x", "-m", tiny, "--adapter", path))
        assert path.name in line or "layers." in line or "embed" in line, (what, line)
    # the config must describe the tensors: target_modules (a regex here) and r
    config = quiet_load(tiny)[0].config
    for change, message in [({"target_modules": r".*\.(q_proj|k_proj)"}, "mlp.down_proj: not among the config's"),
                            ({"target_modules": "(["}, "not a valid regular expression"),
                            ({"r": 8}, r"layers.0.mlp.down_proj.lora_A.weight: rank 4, the config says 8")]:
        (tmp_path / "cfg").mkdir(exist_ok=True)
        shutil.copy(good / "adapter_model.safetensors", tmp_path / "cfg")
        (tmp_path / "cfg" / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(AdapterError, match=message):
            read_adapter(tmp_path / "cfg", config)
    # a served adapter's name with a path in it, before anything loads
    line = one_error_line(cli("serve", "-m", tiny, "--adapter", f"../x={good}", "--port", "0"))
    assert "adapter name '../x'" in line
    line = one_error_line(cli("serve", "-m", tiny, "--adapter", f"a/b={good}", "--port", "0"))
    assert "no paths" in line


def test_cli_generate_with_adapter_and_fused_convert(tiny, text, tmp_path):
    """--adapter on generate equals the fused model's output; convert --adapter is one command."""
    make_peft(tmp_path / "a", text, 8, 16, seed=9, std=0.2)
    r = cli("convert", FIXTURES / "tiny_v5", "-o", tmp_path / "fused", "--dtype", "float32", "--adapter", tmp_path / "a")
    assert r.exit_code == 0, r.output
    fused, _ = quiet_load(tmp_path / "fused")
    base, _ = quiet_load(tiny, adapter=tmp_path / "a")
    assert float(mx.abs(fused(IDS) - base(IDS)).max()) < 1e-4


# ---------------------------------------------------------------------- the server


def tiny_with_tokenizer(tokenizer_model: Path, out: Path) -> Path:
    """tiny_v5's shape with the real tokenizer's vocabulary and random weights (window 6: replies pass it)."""
    from test_server import make_tiny

    return make_tiny(tokenizer_model, out, seed=1, sliding_window=6, max_position_embeddings=1024)


def test_server_serves_adapters_by_name_in_one_batch(tokenizer_270m, tmp_path):
    import http.client
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import uvicorn

    from gemma3_mlx.cli.serve import make_app
    from gemma3_mlx.cli.serve_worker import Worker
    from test_server import free_port, wait_healthy

    base_dir = tiny_with_tokenizer(tokenizer_270m, tmp_path / "tiny-chat")
    text = load_config(base_dir).text
    make_peft(tmp_path / "alpha", text, 8, 16, seed=21, std=0.3)
    make_mlx_lm(tmp_path / "beta", text, 4, 4.0, seed=22, num_layers=6, std=0.3)
    model, tok = gemma3_mlx.load(base_dir, adapter={"alpha": tmp_path / "alpha", "beta": tmp_path / "beta"})
    worker = Worker(model, tok, max_batch=4, cache_bytes=64 << 20, max_queue=8)
    worker.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(worker, ("tiny-chat",)), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_healthy(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "alpha", "beta"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gamma", prompt="x", max_tokens=2)

        # single-process references: each adapter loaded alone, as `gemma3 generate --adapter` does
        prompt = "The lighthouse keeper wrote"
        refs = {"tiny-chat": gemma3_mlx.generate(model, tok, prompt, max_tokens=16)}
        for name in ("alpha", "beta"):
            alone, _ = gemma3_mlx.load(base_dir, adapter=tmp_path / name)
            refs[name] = gemma3_mlx.generate(alone, tok, prompt, max_tokens=16)
        assert len(set(refs.values())) == 3  # the adapters change the text: the check can fail

        def ask(name):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
            return r.model, r.choices[0].text

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, ["alpha", "tiny-chat", "beta"] * 2))
        assert got == [(n, refs[n]) for n in ["alpha", "tiny-chat", "beta"] * 2]

        # Ollama's API: the adapters are models of their own names too
        def ollama(method, path, body=None):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            c.request(method, path, body=json.dumps(body) if body else None)
            r = c.getresponse()
            return r.status, json.loads(r.read())

        assert [m["name"] for m in ollama("GET", "/api/tags")[1]["models"]] == ["tiny-chat:latest", "alpha:latest",
                                                                               "beta:latest"]
        for name in ("beta", "alpha:latest", "tiny-chat"):
            status, r = ollama("POST", "/api/generate", {"model": name, "prompt": prompt, "raw": True, "stream": False,
                                                         "options": {"temperature": 0, "num_predict": 16}})
            assert status == 200 and r["response"] == refs[name.removesuffix(":latest")], (name, r)
        assert ollama("POST", "/api/generate", {"model": "gamma", "prompt": "x"})[0] == 404

        # the conversation cache: the same conversation under another adapter reuses nothing
        messages = [{"role": "user", "content": "Tell me about the tides and the lighthouse."}]

        def chat(name):
            r = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
            return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

        a1, cached = chat("alpha")
        assert cached == 0
        b1, cached_b = chat("beta")
        base1, cached_base = chat("tiny-chat")
        assert cached_b == 0 and cached_base == 0  # alpha's keys and values were not served to beta or the base
        a2, cached_a = chat("alpha")
        assert a2 == a1 and cached_a > 0  # the same adapter's own cache is reused
        assert len({a1, b1, base1}) == 3
    finally:
        server.should_exit = True
        thread.join(10)
        worker.stop()


def test_270m_adapter_equals_numpy_merge(model_270m_dir, tmp_path):
    """One random PEFT adapter (r 16, rsLoRA, every linear of every layer) on the real 270M: the unmerged
    run against the weights merged in numpy, in the same model object (one copy of the 270M in memory)."""
    from gemma3_mlx.adapters import LoRALinear

    text = load_config(model_270m_dir).text
    made = make_peft(tmp_path / "a", text, 16, 16, seed=7, rslora=True, std=0.02)
    model, tok = gemma3_mlx.load(model_270m_dir, adapter=tmp_path / "a")
    ids = mx.array([tok.encode("The lighthouse keeper kept a ledger of every ship that passed the point.")])
    got = model(ids)
    for module, (a, b, scale) in made.items():
        _, _, i, kind, leaf = module.split(".")  # model.layers.<i>.<self_attn|mlp>.<proj>
        parent = getattr(model.model.layers[int(i)], kind)
        wrapped = getattr(parent, leaf)
        assert isinstance(wrapped, LoRALinear)
        base = wrapped.base
        base.weight = mx.array(np.asarray(base.weight) + scale * (b @ a))
        setattr(parent, leaf, base)
    model.adapters.rows = None
    want = model(ids)
    # Measured: max |diff| 1.2e-4 on logits up to about 30 in size (float32 summing in another order over
    # 18 layers: x W' vs x W + x A B); the tiny configs stay under 1e-5. Bound: 5e-4.
    diff = float(mx.abs(got - want).max())
    assert diff < 5e-4, diff
    assert mx.array_equal(mx.argmax(got, -1), mx.argmax(want, -1))

    # a 2 GB adapter for the 270M (sparse: nothing is written or read) is refused from its size alone
    big = shutil.copytree(tmp_path / "a", tmp_path / "big")
    with open(big / "adapter_model.safetensors", "r+b") as f:
        f.truncate(2 << 30)
    with pytest.raises(AdapterError, match=r"2,147,483,648 bytes, more than any LoRA adapter of this base can hold "
                                           r"\(at most 559,022,080 at full rank\)"):
        read_adapter(big, load_config(model_270m_dir))
