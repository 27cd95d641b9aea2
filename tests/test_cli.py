"""The `gemma3` command end to end: streaming output, and bad input handled cleanly. Most runs are in this
process (conftest.gemma3: the console script's entry point with its own streams); the real executable runs
where the process boundary is what is tested: streaming into a pipe, stdin, exit statuses."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, gemma3

GEMMA3 = [sys.executable, "-m", "gemma3_mlx.cli.main"]


def run(args, home=None, input=None):
    return gemma3(args, home=home, input=input)


def run_process(args, home=None, timeout=300, **kw):
    env = {**os.environ, "GEMMA3_MLX_HOME": str(home)} if home else None
    return subprocess.run(GEMMA3 + args, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def assert_clean_failure(r, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name] == []


def test_generate_streams_what_the_api_generates(gemma3_home, default_model):
    import json

    import gemma3_mlx

    meta = json.loads((FIXTURES / "ref_270m.json").read_text())
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home)}
    proc = subprocess.Popen(GEMMA3 + ["generate", "--raw", meta["greedy_prompt"], "--max-tokens", "24"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    first = proc.stdout.read(1)  # arrives while the process is still generating
    running_at_first_byte = proc.poll() is None
    rest, err = proc.communicate(timeout=300)
    out = (first + rest).decode()
    assert proc.returncode == 0, err
    assert running_at_first_byte
    model, tok = default_model
    assert out == gemma3_mlx.generate(model, tok, meta["greedy_prompt"], max_tokens=24) + "\n"
    # The default model (GGUF blocks at their own bits) starts like the float reference.
    assert out.startswith(" the capital of the country of France.") and meta["greedy_text"].startswith(out[:38])


def test_generate_chat_template_path_runs(gemma3_home):
    r = run(["generate", "Say hi", "-n", "4", "--temp", "0.7", "--seed", "1"], home=gemma3_home)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args", [["generate", "hello", "--temp", "-1"], ["generate", "hello", "--top-p", "1.5"],
                                  ["generate", "hello", "--max-tokens", "0"], ["generate", "hello", "--top-k", "-3"],
                                  ["chat", "--min-p", "abc"], ["chat", "--bogus"], ["generate"]])
def test_bad_flag_values_are_one_error_line(args, tmp_path):
    r = run(args, home=tmp_path)
    assert_clean_failure(r, code=2)  # one line, no box
    assert r.stdout == "" and f" {args[0]} --help)" in r.stderr  # where to look


def test_the_real_executable_exits_2_on_usage_and_1_on_a_user_error(tmp_path):
    r = run_process(["generate", "hello", "--temp", "-1"], home=tmp_path)
    assert_clean_failure(r, code=2)
    assert r.stderr.startswith("error: invalid value for '--temp'") and r.stdout == ""
    assert_clean_failure(run_process(["generate", "hi", "-m", str(tmp_path / "nope")], home=tmp_path))


def test_generate_unknown_model(tmp_path):
    assert_clean_failure(run(["generate", "hi", "-m", str(tmp_path / "nope")], home=tmp_path))


def test_generate_corrupted_model_dir(tiny_dirs, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_dirs["tiny_v5"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_failure(run(["generate", "hi", "-m", str(d)], home=tmp_path))


def test_convert_missing_source(tmp_path):
    r = run(["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert_clean_failure(r)
    assert not (tmp_path / "out").exists()


def test_convert_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(run(["convert", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]))
    assert no_leftovers(tmp_path, "out")


def test_convert_non_gemma_config(tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(FIXTURES / "tiny_v4", src)
    (src / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    r = run(["convert", str(src), "-o", str(tmp_path / "out")])
    assert_clean_failure(r)
    assert "not a Gemma 3" in r.stderr and no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_convert_damaged_safetensors(tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_v5", src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000] if damage == "truncate" else b"\xff" * 64 + data[64:])
    before = f.read_bytes()
    assert_clean_failure(run(["convert", str(src), "-o", str(tmp_path / "out")]))
    assert no_leftovers(tmp_path, "out")
    assert f.read_bytes() == before  # the source is never touched


def test_convert_truncated_gguf(gguf_270m, tmp_path):
    src = tmp_path / "cut.gguf"
    with open(gguf_270m, "rb") as f:
        src.write_bytes(f.read(40_000_000))
    r = run(["convert", str(src), "-o", str(tmp_path / "out")])
    assert_clean_failure(r)
    assert no_leftovers(tmp_path, "out")


def test_convert_gguf_of_another_architecture(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run(["convert", str(path), "-o", str(tmp_path / "out")])
    assert_clean_failure(r)
    assert "llama" in r.stderr and no_leftovers(tmp_path, "out")


def test_convert_garbage_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file" * 100)
    assert_clean_failure(run(["convert", str(path), "-o", str(tmp_path / "out")]))


def test_convert_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(out)])
    assert_clean_failure(r)
    assert "--force" in r.stderr and (out / "keep.txt").read_text() == "mine"
    r = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(out), "--force"])  # not a model of ours: kept
    assert_clean_failure(r)
    assert "keep.txt" in r.stderr and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # empty now: nothing to lose
    r = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(out), "--force"])
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists()
    assert "warning: " in r.stderr and "Traceback" not in r.stderr  # no tokenizer in the tiny fixture
    r = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(out), "--force", "--bits", "8", "--group-size", "32"])
    assert r.returncode == 0 and "quantization" in (out / "config.json").read_text()  # ours: replaced


def test_interrupted_conversion_leaves_nothing(tmp_path):
    from gemma3_mlx.convert import convert

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):
        convert(FIXTURES / "tiny_v5", tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_reports_size(tmp_path):
    r = run(["convert", str(FIXTURES / "tiny_v4"), "-o", str(tmp_path / "out"), "--dtype", "float32"])
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stdout and "32.00" in r.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_models_info_and_bench(gemma3_home):
    r = run(["models"], home=gemma3_home)
    assert r.returncode == 0 and "gemma-3-270m" in r.stdout and "-bit" in r.stdout
    r = run(["info"], home=gemma3_home)
    assert r.returncode == 0, r.stderr
    assert "LLLLLGLLLLLGLLLLLG" in r.stdout and "window 512" in r.stdout and r.stdout.count("KV at") == 2
    r = run(["bench", "--prompt-tokens", "40", "--gen-tokens", "3", "--repeats", "2"], home=gemma3_home)
    assert r.returncode == 0, r.stderr
    for label in ("prefill tok/s", "decode tok/s", "first token s", "peak memory GB", "KV cache MB"):
        assert label in r.stdout
    figures = {line[:16].strip(): [float(x) for x in line[16:].split(" / ")] for line in r.stdout.splitlines()
               if line[:16].strip() in ("prefill tok/s", "decode tok/s", "first token s")}  # best / median
    assert figures["prefill tok/s"][0] >= figures["prefill tok/s"][1] and figures["decode tok/s"][0] >= figures["decode tok/s"][1]
    assert figures["first token s"][0] <= figures["first token s"][1]
    kv = float(r.stdout.split("KV cache MB")[1].split()[0])
    deep = run(["bench", "--prompt-tokens", "40", "--gen-tokens", "3", "--repeats", "1", "--context", "600"],
               home=gemma3_home)
    assert deep.returncode == 0, deep.stderr
    assert "after 600 tokens of context" in deep.stdout and float(deep.stdout.split("KV cache MB")[1].split()[0]) > kv
    assert_clean_failure(run(["bench", "--context", "40000"], home=gemma3_home))


def test_quiet_prints_only_the_output(tmp_path):
    r = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(tmp_path / "q"), "--bits", "8", "--group-size", "32",
             "--quiet"])
    assert r.returncode == 0 and r.stderr == ""  # no progress bar, no "no tokenizer" warning
    assert r.stdout.splitlines()[0].endswith("bits per weight") and " x " not in r.stdout
    loud = run(["convert", str(FIXTURES / "tiny_v5"), "-o", str(tmp_path / "l"), "--bits", "8", "--group-size", "32"])
    assert loud.returncode == 0 and "warning: " in loud.stderr and "\x1b[" not in loud.stderr  # no colours in a pipe


@pytest.mark.parametrize("command", ["generate", "convert", "chat", "check", "bench", "models", "info", "rm"])
def test_every_command_has_help_with_an_example(command):
    r = run([command, "--help"])
    assert r.returncode == 0 and "Example" in r.stdout
    import re

    assert not re.search(r"<(str|int|float|bool|path)[a-z ]*>|\{[a-z_]+\}|[│╭╰]", r.stdout)  # no type tags, no boxes
    if command in ("generate", "convert"):
        assert "[OPTIONS] " + {"generate": "PROMPT", "convert": "SOURCE"}[command] in r.stdout


def test_generate_reads_stdin_and_prints_stats(gemma3_home):
    r = run_process(["generate", "-", "--raw", "-n", "4", "--stats"], home=gemma3_home, input="The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" the capital") and "tok/s" in r.stderr and "KV cache" in r.stderr


def test_prompt_longer_than_the_context_is_one_line(tiny_dirs, tmp_path):
    import json

    d = tmp_path / "short"
    shutil.copytree(tiny_dirs["tiny_v5"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    import gemma3_mlx
    from gemma3_mlx.prompt_cache import PromptCache

    model = gemma3_mlx.load_model(d, "float32")
    with pytest.raises(ValueError, match="context of 16"):
        PromptCache(model).prefill(list(range(2, 40)))


def test_generate_system_prompt_is_the_chat_format(gemma3_home, default_model):
    import gemma3_mlx

    r = run(["generate", "--system", "Answer in French.", "What is the sea?", "-n", "8"], home=gemma3_home)
    assert r.returncode == 0, r.stderr
    model, tok = default_model
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is the sea?"}]
    assert r.stdout == gemma3_mlx.generate(model, tok, messages, max_tokens=8) + "\n"
    assert r.stdout != gemma3_mlx.generate(model, tok, messages[1:], max_tokens=8) + "\n"  # the system text counts


def test_base_or_instruction_tuned_is_recorded_shown_and_warned_about(gemma3_home, default_model_dir, tmp_path):
    import json

    from gemma3_mlx.convert import convert

    assert json.loads((default_model_dir / "config.json").read_text())["instruction_tuned"] is False  # from the GGUF
    r = run(["generate", "--raw", "Once upon a time", "-n", "2"], home=gemma3_home)
    assert r.returncode == 0 and r.stderr == ""  # the README's first command: no warning
    r = run(["generate", "Hi", "-n", "2"], home=gemma3_home)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert r.returncode == 0 and len(warnings) == 1
    assert "gemma-3-270m is a base model" in warnings[0] and "--raw" in warnings[0] and "gemma-3-270m-it" in warnings[0]
    assert "kind            base (plain continuation" in run(["info"], home=gemma3_home).stdout
    assert " base " in next(x for x in run(["models"], home=gemma3_home).stdout.splitlines() if "gemma-3-270m" in x)
    # A transformers checkpoint: by its name, else by a chat template beside its weights.
    for name, template, tuned in [("tiny-a", False, False), ("tiny-b", True, True), ("gemma-3-tiny-it", False, True)]:
        src = tmp_path / name
        shutil.copytree(FIXTURES / "tiny_v5", src)
        if template:
            (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
        with pytest.warns(UserWarning):  # no tokenizer.model in the fixture
            convert(src, tmp_path / f"{name}-out")
        assert json.loads((tmp_path / f"{name}-out" / "config.json").read_text())["instruction_tuned"] is tuned, name


def test_models_shows_the_cache_and_rm_deletes_from_it(tiny_dirs, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_dirs["tiny_v5"], home / "models" / "tiny-one")
    r = run(["models"], home=home)
    assert r.returncode == 0 and r.stdout.startswith("tiny-one ")
    assert "1 model, " in r.stdout and str(home / "models") in r.stdout and "GEMMA3_MLX_HOME" in r.stdout
    assert "gemma3 rm NAME" in r.stdout
    for bad in ("nope", "..", "../home"):
        r = run(["rm", bad], home=home)
        assert_clean_failure(r)
        assert "gemma3 models lists them" in r.stderr
    r = run(["rm", "tiny-one"], home=home)
    assert r.returncode == 0 and r.stdout.startswith("removed tiny-one (") and r.stdout.strip().endswith("MB)")
    assert not (home / "models" / "tiny-one").exists() and (home / "models").is_dir()
    assert "no converted models in " in run(["models"], home=home).stdout


def test_a_gguf_is_converted_once_per_content(tmp_path, monkeypatch, tiny_dirs):
    """Another path to the same GGUF (or a copy) finds the conversion already made: no second copy."""
    from gemma3_mlx import models

    monkeypatch.setenv("GEMMA3_MLX_HOME", str(tmp_path / "home"))
    made = []

    def fake_convert(source, out, progress, note=None, **options):  # the conversion itself is tested elsewhere
        made.append(Path(source))
        shutil.copytree(tiny_dirs["tiny_v5"], out)  # a whole model: the cache checks what it finds
        return out

    monkeypatch.setattr(models, "_convert_into", fake_convert)
    a = tmp_path / "a" / "model.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    b = tmp_path / "b" / "renamed.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    first = models.resolve(a)
    assert models.resolve(b) == first and models.resolve(str(a)) == first and len(made) == 1
    assert first.parent == tmp_path / "home" / "models" and first.name.startswith("model-")
    b.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 100)  # other content: its own conversion
    assert models.resolve(b) != first and len(made) == 2
