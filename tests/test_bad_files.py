"""Crafted bad inputs, one named case for each way issue 11 says a file or an id can be wrong.

Each case is a `gemma3` command line (or a Python API call) on a damaged copy of the tiny GGUF or
the tiny safetensors directory (tiny_files.py). All of them run in one fuzz_driver process (see
test_fuzz.py), each must end with one `error:` line (an API call: a Gemma3Error) whose text names
the problem, within its CPU-time limit. Three cases also run through the real `gemma3` executable
and a fresh Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_files
from test_fuzz import _st_header, _st_with_header, gguf_fields, run_jobs, tokenizer_model, verdict

T = tiny_files.T
# Ids 605 and 635 in the 640-piece vocabulary (past the 320-row embedding); bytes in the 320-piece one.
PROMPT = ["-n", "2", "--raw", f"hello {chr(tiny_files.FILLER + 300)}{chr(tiny_files.FILLER + 330)}"]

# name -> (the error must match this, at most this many CPU seconds)
EXPECT: dict[str, tuple[str, float]] = {}
CASES: dict[str, dict] = {}


def _case(name: str, job: dict, pattern: str, seconds: float = 5.0) -> None:
    CASES[name], EXPECT[name] = job, (pattern, seconds)


def _patch_gguf(data: bytes, label: str, value: int) -> bytes:
    """The GGUF with the count, type, length or offset field `label` (see gguf_fields) set to `value`."""
    pos, fmt, _ = next(f for f in gguf_fields(data)[0] if f[2] == label)
    b = bytearray(data)
    struct.pack_into("<I" if fmt == "u32" else "<Q", b, pos, value)
    return bytes(b)


def build(work: Path) -> None:
    """Every case's files under `work`, and its job in CASES."""
    from gemma3_mlx.convert.gguf_file import GGUFFile

    CASES.clear(), EXPECT.clear()
    tok320, tok640 = tokenizer_model(work, tiny_files.VOCAB), tokenizer_model(work, 2 * tiny_files.VOCAB)
    base_dir = tiny_files.write_dir(work / "base", tok320)
    good = tiny_files.write_gguf(work / "good.gguf").read_bytes()

    def convert(path: Path, name: str) -> dict:
        return {"args": ["convert", str(path), "-o", str(work / f"{name}.out"), "--no-check"],
                "log": str(work / f"{name}.log")}

    def generate(path, name: str, *extra) -> dict:
        return {"args": ["generate", "-m", str(path), *extra, *PROMPT], "log": str(work / f"{name}.log"),
                "env": {"GEMMA3_MLX_HOME": str(work / f"{name}.home")}}

    def gguf_case(name, pattern, data=None, seconds=5.0, **options):
        path = work / f"{name}.gguf"
        path.write_bytes(data) if data is not None else tiny_files.write_gguf(path, **options)
        _case(name, convert(path, name), pattern, seconds)
        _case(name + "_generate", generate(path, name + "_generate"), pattern, seconds)

    # ---- GGUF: bounded reading, types, layout, metadata ---------------------------------------------
    gguf_case("gguf_array_claims_2_40", r"claims 1,099,511,627,776 strings",
              _patch_gguf(good, "tokenizer.ggml.tokens count", 2**40), seconds=0.5)
    gguf_case("gguf_kv_count_absurd", r"claims 9,223,372,036,854,775,808 metadata entries",
              _patch_gguf(good, "kv_count", 2**63), seconds=0.5)
    gguf_case("gguf_string_length_absurd", r"claims to be 1,099,511,627,776 bytes long",
              _patch_gguf(good, "general.name length", 2**40), seconds=0.5)
    gguf_case("gguf_block_count_1e6", r"gemma3\.block_count is 1,000,000", meta={"gemma3.block_count": 10**6},
              seconds=0.5)
    gguf_case("gguf_no_block_count", r"no gemma3\.block_count", meta={"gemma3.block_count": None})
    gguf_case("gguf_no_embedding_length", r"no gemma3\.embedding_length", meta={"gemma3.embedding_length": None})
    gguf_case("gguf_head_count_0", r"gemma3\.attention\.head_count is 0", meta={"gemma3.attention.head_count": 0})
    gguf_case("gguf_string_rms_eps", r"gemma3\.attention\.layer_norm_rms_epsilon must be a number",
              meta={"gemma3.attention.layer_norm_rms_epsilon": "1e-6"})
    gguf_case("gguf_other_architecture", r"'llama', not Gemma 3", arch="llama")
    for qtype in (T.IQ2_XXS, T.TQ1_0):
        gguf_case(f"gguf_type_{qtype.name}", rf"blk\.0\.ffn_down\.weight has block type {qtype.name}, which cannot be converted",
                  types={"blk.0.ffn_down.weight": qtype})
    for qtype in (T.I8, T.F64):
        gguf_case(f"gguf_type_{qtype.name}", rf"blk\.0\.ffn_norm\.weight has block type {qtype.name}, which cannot be converted",
                  types={"blk.0.ffn_norm.weight": qtype})
    gguf_case("gguf_type_unknown", r"blk\.0\.attn_k\.weight has unknown block type 99",
              _patch_gguf(good, "blk.0.attn_k.weight tensor type", 99))
    # Swapped types: a Q4_0 tensor said to be Q8_0 (larger), a Q8_0 one said to be Q4_0 (smaller), and
    # Q4_0 said to be IQ4_NL (the same size, a type we cannot read).
    gguf_case("gguf_swapped_larger", r"blk\.0\.attn_k\.weight \(Q8_0, .* overlaps",
              _patch_gguf(good, "blk.0.attn_k.weight tensor type", T.Q8_0))
    gguf_case("gguf_swapped_smaller", r"blk\.0\.attn_v\.weight \(Q4_0, .* unexplained",
              _patch_gguf(good, "blk.0.attn_v.weight tensor type", T.Q4_0))
    gguf_case("gguf_swapped_same_size", r"blk\.0\.attn_k\.weight has block type IQ4_NL",
              _patch_gguf(good, "blk.0.attn_k.weight tensor type", T.IQ4_NL))
    f = GGUFFile(work / "good.gguf")
    offsets = {t.name: t.offset for t in f.tensors}
    gguf_case("gguf_overlapping_offsets", r"overlaps", _patch_gguf(good, "blk.0.attn_k.weight tensor offset",
                                                                  offsets["blk.0.attn_q.weight"]))
    gguf_case("gguf_tensor_past_end", r"truncated: tensor blk\.0\.attn_k\.weight needs bytes up to",
              _patch_gguf(good, "blk.0.attn_k.weight tensor offset", 2**40))
    gguf_case("gguf_absurd_dimension", r"blk\.0\.attn_k\.weight has an impossible shape",
              _patch_gguf(good, "blk.0.attn_k.weight dim", 2**62))
    last = max(f.tensors, key=lambda t: t.offset)
    end, cut = f.data_start + last.offset + last.n_bytes, f.data_start + last.offset + last.n_bytes // 2
    gguf_case("gguf_truncated", re.escape(f"truncated: tensor {last.name} needs bytes up to {end:,}, the file has {cut:,}"),
              good[:cut])
    gguf_case("gguf_tokenizer_larger_than_embedding", r"640 pieces but the model's embedding has only 320 rows",
              vocab=2 * tiny_files.VOCAB)
    gguf_case("gguf_bos_id_out_of_range", r"tokenizer\.ggml\.bos_token_id is 1000000",
              meta={"tokenizer.ggml.bos_token_id": 10**6})

    # ---- safetensors directories: configs, headers, tokenizers ------------------------------------------
    def dir_case(name, pattern, config=None, header=None, files=None):
        d = work / name
        shutil.copytree(base_dir, d)
        if config is not None:
            c = json.loads((d / "config.json").read_text())
            c.update(config)
            (d / "config.json").write_text(json.dumps(c))
        if header is not None:
            raw = (d / "model.safetensors").read_bytes()
            h, n = _st_header(raw)
            header(h)
            (d / "model.safetensors").write_bytes(_st_with_header(raw, h, n))
        for fname, content in (files or {}).items():
            (d / fname).unlink(missing_ok=True)
            content(d / fname) if callable(content) else (d / fname).write_bytes(content)
        _case(name, generate(d, name), pattern)
        _case(name + "_convert", convert(d, name + "_convert"), pattern)

    dir_case("config_other_architecture", r"not a Gemma 3 checkpoint \(model_type 'llama'\)", {"model_type": "llama"})
    dir_case("config_hidden_size_0", r"hidden_size is 0, outside", {"hidden_size": 0})
    dir_case("config_negative_intermediate", r"intermediate_size is -5, outside", {"intermediate_size": -5})
    dir_case("config_absurd_vocab", r"vocab_size is 1,099,511,627,776, outside", {"vocab_size": 2**40})
    dir_case("config_layers_1e9", r"num_hidden_layers is 1,000,000,000, outside", {"num_hidden_layers": 1e9})
    dir_case("config_heads_0", r"num_attention_heads is 0, outside", {"num_attention_heads": 0})
    dir_case("config_window_past_context", r"sliding_window 1,000,000 is larger than max_position_embeddings 256",
             {"sliding_window": 1_000_000})  # each local layer would allocate a million slots
    dir_case("config_string_rms_eps", r"rms_norm_eps must be a number, got '1e-6'", {"rms_norm_eps": "1e-6"})
    dir_case("config_rope_parameters_list", r"rope_parameters must be an object", {"rope_parameters": [1, 2]})
    dir_case("config_rope_linear_without_factor", r"full_attention: rope_type 'linear' needs a factor",
             {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                  "full_attention": {"rope_type": "linear", "rope_theta": 1e6}}})
    dir_case("config_quantization_string", r"quantization must be an object", {"quantization": "q4"})
    dir_case("config_deeply_nested", r"config\.json: not valid JSON \(nested too deeply\)",
             files={"config.json": b"[" * 100_000 + b"]" * 100_000})
    dir_case("config_huge", r"too large for a config\.json", files={"config.json": b" " * (2 << 20) + b"{}"})
    dir_case("config_is_dev_zero", r"not a regular file", files={"config.json": lambda p: p.symlink_to("/dev/zero")})

    def first(h):
        return next(k for k in h if k != "__metadata__")

    dir_case("safetensors_negative_offsets", r"impossible data_offsets \[-8,",
             header=lambda h: h[first(h)].update(data_offsets=[-8, h[first(h)]["data_offsets"][1]]))

    def overlap(h):  # k_proj and v_proj have the same shape: point one at the other's bytes
        h["model.layers.0.self_attn.v_proj.weight"]["data_offsets"] = h["model.layers.0.self_attn.k_proj.weight"]["data_offsets"]

    dir_case("safetensors_overlapping_offsets", r"the data of tensors .* overlap", header=overlap)

    def past_end(h):
        e = max((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][1])
        e["data_offsets"] = [e["data_offsets"][0] + 2**20, e["data_offsets"][1] + 2**20]

    dir_case("safetensors_tensor_past_end", r"truncated: tensor \S+ needs bytes up to [\d,]+, the file has [\d,]+",
             header=past_end)
    dir_case("safetensors_shape_mismatch", r"do not hold a BF16 tensor of shape",
             header=lambda h: h[first(h)].update(shape=[2**40, 64]))
    raw = (base_dir / "model.safetensors").read_bytes()
    dir_case("safetensors_header_length_absurd", r"header claims 9,223,372,036,854,775,808 bytes",
             files={"model.safetensors": struct.pack("<Q", 2**63) + raw[8:]})
    dir_case("safetensors_index_escapes", r"malformed index",
             files={"model.safetensors.index.json": json.dumps({"weight_map": {"a": "../../etc/passwd"}}).encode()})
    dir_case("tokenizer_larger_than_embedding", r"640 pieces, but the model's embedding has only 320 rows|"
             r"640 pieces but the model's embedding has only 320 rows", files={"tokenizer.model": tok640})
    dir_case("tokenizer_garbage", r"not a valid SentencePiece tokenizer\.model",
             files={"tokenizer.model": b"\x0a\xff" * 500})

    # ---- token ids through the Python API ----------------------------------------------------------
    load = f"import gemma3_mlx\nm, t = gemma3_mlx.load({str(base_dir)!r})\n"
    for name, call, pattern in [
        ("api_generate_id_past_vocab", "gemma3_mlx.generate(m, t, [2, 10**6], max_tokens=2)", r"token id 1,000,000 is outside"),
        ("api_generate_negative_id", "gemma3_mlx.generate(m, t, [2, -1], max_tokens=2)", r"token id -1 is outside"),
        ("api_batch_id_past_vocab", "gemma3_mlx.batch_generate(m, t, [[2, 5], [2, 320]], max_tokens=2)",
         r"token id 320 is outside"),
        ("api_prefill_id_past_vocab", "gemma3_mlx.PromptCache(m).prefill([2, 320])", r"token id 320 is outside"),
    ]:
        _case(name, {"code": load + call, "log": str(work / f"{name}.log")}, pattern)

    # ---- --image paths: size-capped and checked before a byte is read ----------------------------------
    sparse = work / "huge.png"
    with open(sparse, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GB, sparse: nothing is written
    fifo = work / "fifo.png"
    os.mkfifo(fifo)
    for name, path, pattern in [("image_3gb_file", sparse, r"3,221,225,472 bytes is too large"),
                                ("image_dev_zero", "/dev/zero", r"not an image file: /dev/zero"),
                                ("image_fifo", fifo, r"not an image file: .*fifo\.png"),
                                ("image_directory", work, r"not an image file")]:
        _case(name, generate(base_dir, name, "--image", str(path)), pattern, seconds=0.5)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bad_files")
    build(work)
    results = run_jobs(list(CASES.values()), work)
    return {name: r for name, r in zip(CASES, results)}


def _check(name: str, r: dict) -> None:
    job, (pattern, seconds) = CASES[name], EXPECT[name]
    assert not r.get("died"), f"{name}: {r['died']} {r.get('tail', '')}"
    if "code" in job:
        assert r["user_error"] and re.search(pattern, r["escaped"]), f"{name}: {r['escaped']}"
    else:
        v = verdict(job, r)
        error = next((line for line in Path(job["log"]).read_text().splitlines() if line.startswith("error:")), "")
        assert v == "error", f"{name}: {v}"
        assert re.search(pattern, error), f"{name}: {error}"
    # CPU time: the machine may be busy, and what is asserted is how much work the file caused.
    assert r["cpu_seconds"] <= seconds, f"{name}: {r['cpu_seconds']} s of CPU"


# The case names, listed so that pytest can name each test before the files are built.
_GGUF = ["gguf_array_claims_2_40", "gguf_kv_count_absurd", "gguf_string_length_absurd", "gguf_block_count_1e6",
         "gguf_no_block_count", "gguf_no_embedding_length", "gguf_head_count_0", "gguf_string_rms_eps",
         "gguf_other_architecture", "gguf_type_IQ2_XXS", "gguf_type_TQ1_0", "gguf_type_I8", "gguf_type_F64",
         "gguf_type_unknown", "gguf_swapped_larger", "gguf_swapped_smaller", "gguf_swapped_same_size",
         "gguf_overlapping_offsets", "gguf_tensor_past_end", "gguf_absurd_dimension", "gguf_truncated",
         "gguf_tokenizer_larger_than_embedding", "gguf_bos_id_out_of_range"]
_DIR = ["config_other_architecture", "config_hidden_size_0", "config_negative_intermediate", "config_absurd_vocab",
        "config_layers_1e9", "config_heads_0", "config_window_past_context", "config_string_rms_eps", "config_rope_parameters_list",
        "config_rope_linear_without_factor", "config_quantization_string", "config_deeply_nested", "config_huge",
        "config_is_dev_zero", "safetensors_negative_offsets", "safetensors_overlapping_offsets",
        "safetensors_tensor_past_end", "safetensors_shape_mismatch", "safetensors_header_length_absurd",
        "safetensors_index_escapes", "tokenizer_larger_than_embedding", "tokenizer_garbage"]
_OTHER = ["api_generate_id_past_vocab", "api_generate_negative_id", "api_batch_id_past_vocab", "api_prefill_id_past_vocab",
          "image_3gb_file", "image_dev_zero", "image_fifo", "image_directory"]


@pytest.mark.parametrize("name", _GGUF + [n + "_generate" for n in _GGUF])
def test_gguf(outcomes, name):
    _check(name, outcomes[name])


@pytest.mark.parametrize("name", _DIR + [n + "_convert" for n in _DIR])
def test_model_directory(outcomes, name):
    _check(name, outcomes[name])


@pytest.mark.parametrize("name", _OTHER)
def test_ids_and_images(outcomes, name):
    _check(name, outcomes[name])


def test_every_case_is_tested(outcomes):
    assert set(outcomes) == set(_GGUF) | {n + "_generate" for n in _GGUF} | set(_DIR) | {n + "_convert" for n in _DIR} \
        | set(_OTHER)


def test_real_executable(outcomes, tmp_path):
    """A few cases through the installed `gemma3` and a fresh Python, as a user meets them: a tokenizer
    larger than the embedding, a hostile header, and the API call that used to exit 139 (SIGSEGV)."""
    exe = Path(sys.executable).parent / "gemma3"
    exe = exe if exe.exists() else Path(shutil.which("gemma3") or exe)
    names = ["tokenizer_larger_than_embedding", "gguf_array_claims_2_40", "api_generate_id_past_vocab"]
    procs = {}
    for name in names[:2]:
        job = CASES[name]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", **job.get("env", {})}
        procs[name] = subprocess.Popen([str(exe), *job["args"]], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    job = CASES[names[2]]
    procs[names[2]] = subprocess.Popen([sys.executable, "-c", job["code"]], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        if name == names[2]:  # an API call: a Gemma3Error's traceback, not a signal
            assert p.returncode == 1 and "TokenIdError" in err, (name, p.returncode, err[-500:])
            continue
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in err, (name, p.returncode, err[-500:])
        assert re.search(EXPECT[name][0], errors[0]), errors[0]


def test_hostile_header_fails_in_milliseconds(tmp_path):
    """The reader itself, without the CLI around it: a count of 2^40 is refused before any entry is read."""
    import time

    from gemma3_mlx.convert.gguf_file import GGUFFile
    from gemma3_mlx.errors import ModelFileError

    good = tiny_files.write_gguf(tmp_path / "good.gguf").read_bytes()
    for label in ("tokenizer.ggml.tokens count", "kv_count", "tensor_count", "general.name length"):
        path = tmp_path / "bad.gguf"
        path.write_bytes(_patch_gguf(good, label, 2**40))
        t0 = time.process_time()
        with pytest.raises(ModelFileError, match="1,099,511,627,776"):
            GGUFFile(path)
        assert time.process_time() - t0 < 0.05, label


def test_opening_the_270m_gguf_reads_only_its_header(gguf_270m):
    """Config and tensor table of the real file in well under a second (the gguf package's reader
    decoded all 262,144 vocabulary strings first: ~20 s), so `convert` can refuse at once."""
    import time

    from gemma3_mlx.convert.gguf import GGUFSource

    t0 = time.process_time()
    src = GGUFSource(gguf_270m)
    assert time.process_time() - t0 < 1.0
    assert src.config().text.num_hidden_layers == 18 and src.tensor_count() == 236
