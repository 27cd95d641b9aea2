"""Fuzz: hundreds of damaged copies of a tiny GGUF and a tiny safetensors model directory, each run
through `gemma3 convert` and `gemma3 generate -m`. Every run must end with exit 0, or exit 1 and
one `error:` line: never a signal, a traceback, more than LIMIT_S seconds or RSS_LIMIT_MB of memory.

Mutants are seeded (the same set every run): byte flips, truncations, absurd counts, lengths,
dimensions and offsets in the GGUF header, swapped block types, and edits of the safetensors
header, config.json and tokenizer.model. The runs go through tests/fuzz_driver.py, which runs the
CLI in-process job after job (a Python + MLX start per run would cost ~1 s each) and is restarted
after any job that kills it, so every crash is attributed to its mutant. A few mutants also go
through the real `gemma3` executable. `python tests/test_fuzz.py` prints the counts.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import tiny_files

HERE = Path(__file__).parent
N_GGUF, N_DIR = 170, 140
LIMIT_S, RSS_LIMIT_MB = 10, 500
PROMPT = ["-n", "3", "--raw", "hello the cat"]

# ---- GGUF layout: where the counts, lengths, types, dimensions and offsets are -------------------

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> tuple[list[tuple[int, str, str]], int]:
    """([(offset, "u32"/"u64", what)], end of the tensor table) of the well-formed tiny GGUF."""
    fields, pos = [(8, "u64", "tensor_count"), (16, "u64", "kv_count")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def u(fmt, what):
        nonlocal pos
        fields.append((pos, "u32" if fmt == "<I" else "u64", what))
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string(what):
        nonlocal pos
        n = u("<Q", what + " length")
        pos += n

    def value(vtype, what):
        nonlocal pos
        if vtype == 8:
            string(what)
        elif vtype == 9:
            item, n = u("<I", what + " item type"), u("<Q", what + " count")
            if item in _SIZES:
                if item in (4, 5, 10, 11):  # integer scalars are counts too (block_count, token ids)
                    fields.append((pos, "u32" if _SIZES[item] == 4 else "u64", what + "[0]"))
                pos += n * _SIZES[item]
            else:
                for _ in range(n):
                    value(item, what + "[]")
        else:
            if vtype in (4, 5, 10, 11):
                fields.append((pos, "u32" if _SIZES[vtype] == 4 else "u64", what))
            pos += _SIZES[vtype]

    for _ in range(n_kv):
        start = pos
        string("key")
        key = data[start + 8:pos].decode()
        value(u("<I", key + " type"), key)
    for _ in range(n_tensors):
        start = pos
        string("tensor name")
        name = data[start + 8:pos].decode()
        n_dims = u("<I", f"{name} n_dims")
        for _ in range(n_dims):
            u("<Q", f"{name} dim")
        u("<I", f"{name} tensor type")
        u("<Q", f"{name} tensor offset")
    return fields, pos


ABSURD64 = [0, 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63, 2**64 - 1]
ABSURD32 = [0, 1, 5, 13, 30, 31, 39, 40, 99, 2**31, 2**32 - 1]


def gguf_mutants(data: bytes, n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    fields, header_end = gguf_fields(data)
    out = []
    for k in range(n):
        b = bytearray(data)
        kind = ["flip", "flip", "truncate", "count", "count", "type"][k % 6]
        if kind == "flip":
            hi = header_end if rng.random() < 0.7 else len(b)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(hi)] ^= rng.randrange(1, 256)
            what = "flip"
        elif kind == "truncate":
            cut = rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(len(b))
            b, what = b[:cut], f"truncate at {cut}"
        else:
            pool = [f for f in fields if ("tensor type" in f[2] or "item type" in f[2] or f[2].endswith(" type"))] \
                if kind == "type" else fields
            pos, fmt, name = rng.choice(pool)
            old = struct.unpack_from("<I" if fmt == "u32" else "<Q", b, pos)[0]
            choices = (ABSURD32 if fmt == "u32" else ABSURD64) + [old + 1, max(old - 1, 0), old * 2 + 1]
            v = rng.choice(choices) & (0xFFFFFFFF if fmt == "u32" else 0xFFFFFFFFFFFFFFFF)
            struct.pack_into("<I" if fmt == "u32" else "<Q", b, pos, v)
            what = f"{name} = {v}"
        out.append((f"gguf-{k:03d} {kind}: {what}", bytes(b)))
    return out


# ---- safetensors directory mutants ---------------------------------------------------------------

ODD_VALUES = [0, -1, 1, 10**9, 2**40, 1e6, 0.5, -2.5, "x", "1e-6", [], [1, 2], {}, None, True, float("nan")]
CONFIG_KEYS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
               "max_position_embeddings", "rms_norm_eps", "layer_types", "rope_parameters", "architectures"]


def _st_header(raw: bytes) -> tuple[dict, int]:
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), n


def _st_with_header(raw: bytes, header: dict, n: int) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def dir_mutants(files: dict[str, bytes], n: int, rng: random.Random, bigger_tokenizer: bytes) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for k in range(n):
        files2 = dict(files)
        target = ["model.safetensors", "model.safetensors", "config.json", "config.json", "tokenizer.model"][k % 5]
        raw = files[target]
        op = rng.choice(["flip", "truncate", "edit", "edit"] if target != "tokenizer.model" else ["flip", "truncate", "swap"])
        if op == "swap":  # another model's tokenizer, with more pieces than this one's embedding has rows
            new, what = bigger_tokenizer, f"{len(bigger_tokenizer)} bytes of a larger vocabulary"
        elif op == "flip":
            b = bytearray(raw)
            hi = min(len(b), 8 + _st_header(raw)[1]) if target == "model.safetensors" and rng.random() < 0.7 else len(b)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(hi)] ^= rng.randrange(1, 256)
            new, what = bytes(b), "flip"
        elif op == "truncate":
            cut = rng.randrange(len(raw))
            new, what = raw[:cut], f"truncate at {cut}"
        elif target == "model.safetensors":
            header, hn = _st_header(raw)
            name = rng.choice([k2 for k2 in header if k2 != "__metadata__"])
            e = header[name]
            field = rng.choice(["data_offsets", "shape", "dtype", "header_length"])
            if field == "data_offsets":
                a, z = e["data_offsets"]
                e["data_offsets"] = rng.choice([[-8, z], [a, a - 2], [0, z - a], [a, 2**62], [a, z + 2], [z, a],
                                                [a, "x"], [a], None, [a + 2**63, z]])
                what = f"{name} data_offsets {e['data_offsets']}"
            elif field == "shape":
                s = list(e["shape"])
                e["shape"] = rng.choice([[0] + s[1:], [-1] + s[1:], [2**40] + s[1:], s + [1], s[::-1], [1.5], "x",
                                         [2**31, 2**31, 2**31], [s[0] * 2] + s[1:]])
                what = f"{name} shape {e['shape']}"
            elif field == "dtype":
                e["dtype"] = rng.choice(["F64", "I8", "BOOL", "F8_E4M3", "Q4", 7, None, "U32", "F32"])
                what = f"{name} dtype {e['dtype']}"
            else:
                new = struct.pack("<Q", rng.choice(ABSURD64 + [hn + 1, hn - 1])) + raw[8:]
                out.append((f"dir-{k:03d} {target} header length", {**files2, target: new}))
                continue
            new = _st_with_header(raw, header, hn)
        else:  # config.json
            config = json.loads(raw)
            key = rng.choice(CONFIG_KEYS)
            if rng.random() < 0.15:
                config.pop(key, None)
                what = f"no {key}"
            elif key == "rope_parameters" and rng.random() < 0.5:
                inner = config[key][rng.choice(["full_attention", "sliding_attention"])]
                sub = rng.choice(["rope_type", "factor", "rope_theta"])
                inner[sub] = rng.choice(ODD_VALUES + ["yarn", "linear"])
                what = f"rope {sub} = {inner[sub]!r}"
            else:
                config[key] = rng.choice(ODD_VALUES)
                what = f"{key} = {config[key]!r}"
            new = json.dumps(config).encode()
        out.append((f"dir-{k:03d} {target} {op}: {what}", {**files2, target: new}))
    return out


# ---- running them --------------------------------------------------------------------------------


def run_jobs(jobs: list[dict], work: Path) -> list[dict]:
    """Every job's outcome: the driver's result, or how the driver died while running it."""
    spec, results_file = work / "jobs.json", work / "results.jsonl"
    spec.write_text(json.dumps({"jobs": jobs, "limit_s": LIMIT_S, "rss_limit_mb": RSS_LIMIT_MB,
                                "address_space_headroom_mb": 3072}))
    results_file.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    outcomes, start = {}, 0
    while start < len(jobs):
        p = subprocess.run([sys.executable, str(HERE / "fuzz_driver.py"), str(spec), str(results_file), str(start)],
                           env=env, capture_output=True, text=True, timeout=LIMIT_S * 4 + 60 * len(jobs))
        last = None
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            if "start" in r:
                last = r["i"]
            else:
                outcomes[r["i"]] = r
        if last is None:
            raise RuntimeError(f"the fuzz driver did not start: {p.stderr[-2000:]}")
        if last not in outcomes:  # it died inside this job
            how = f"signal {-p.returncode}" if p.returncode < 0 else f"died (exit {p.returncode})"
            if "Timeout" in p.stderr:
                how = f"over {LIMIT_S} s"
            outcomes[last] = {"i": last, "code": None, "died": how, "tail": p.stderr[-600:]}
        start = last + 1
    return [outcomes[i] for i in range(len(jobs))]


def verdict(job: dict, r: dict) -> str:
    """'ok', 'error' (a clean one-line failure) or what went wrong."""
    if r.get("died"):
        return r["died"]
    log = Path(job["log"]).read_text(errors="replace")
    if r["escaped"] or "Traceback" in log:
        return f"traceback ({r['escaped'] or log.strip().splitlines()[-1]})"
    if r["seconds"] > LIMIT_S:
        return f"slow ({r['seconds']} s)"
    if r["rss_mb"] > RSS_LIMIT_MB:
        return f"memory ({r['rss_mb']} MB)"
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    if r["code"] == 0 and not errors:
        return "ok"
    if r["code"] == 1 and len(errors) == 1:
        return "error"
    return f"exit {r['code']} with {len(errors)} error lines: {log.strip()[-300:]!r}"


def check(k: int) -> list[str]:
    """The quality check (a second model load and forward pass) on every 10th conversion: the rest skip it for time."""
    return [] if k % 10 == 0 else ["--no-check"]


def make_jobs(work: Path, tokenizer_model: bytes, bigger_tokenizer: bytes) -> tuple[list[str], list[dict]]:
    """(mutant descriptions, jobs): each mutant is converted, then generated from."""
    rng = random.Random(1234)
    gguf = tiny_files.write_gguf(work / "tiny.gguf").read_bytes()
    src_dir = tiny_files.write_dir(work / "tinydir", tokenizer_model)
    files = {f.name: f.read_bytes() for f in src_dir.iterdir()}
    names, jobs = [], []
    for k, (what, data) in enumerate(gguf_mutants(gguf, N_GGUF, rng)):
        m = work / f"g{k}" / "tiny.gguf"
        m.parent.mkdir()
        m.write_bytes(data)
        names.append(what)
        jobs.append({"args": ["convert", str(m), "-o", str(m.parent / "out"), *check(k)], "log": str(m.parent / "convert.log")})
        jobs.append({"args": ["generate", "-m", str(m), *PROMPT], "log": str(m.parent / "generate.log"),
                     "env": {"GEMMA3_MLX_HOME": str(m.parent / "home")}})
    for k, (what, mutated) in enumerate(dir_mutants(files, N_DIR, rng, bigger_tokenizer)):
        d = work / f"d{k}" / "tinydir"
        d.mkdir(parents=True)
        for name, data in mutated.items():
            (d / name).write_bytes(data)
        names.append(what)
        jobs.append({"args": ["convert", str(d), "-o", str(d.parent / "out"), *check(k)], "log": str(d.parent / "convert.log")})
        jobs.append({"args": ["generate", "-m", str(d), *PROMPT], "log": str(d.parent / "generate.log"),
                     "env": {"GEMMA3_MLX_HOME": str(d.parent / "home")}})
    return names, jobs


def fuzz(work: Path) -> tuple[list[str], list[dict], list[str]]:
    names, jobs = make_jobs(work, tokenizer_model(work, tiny_files.VOCAB), tokenizer_model(work, 2 * tiny_files.VOCAB))
    results = run_jobs(jobs, work)
    verdicts = [verdict(j, r) for j, r in zip(jobs, results)]
    spent = Counter()
    for j, r, v in zip(jobs, results, verdicts):
        spent[j["args"][0], v if v in ("ok", "error") else "bad"] += r.get("seconds") or 0
    print("seconds by command and outcome:", {k: round(v, 1) for k, v in sorted(spent.items())})
    done = [r for r in results if not r.get("died")]
    print(f"slowest run {max(r['seconds'] for r in done)} s, peak RSS {max(r['rss_mb'] for r in done)} MB, "
          f"driver processes: {1 + sum(1 for r in results if r.get('died'))}")
    return names, jobs, verdicts


def tokenizer_model(work: Path, pieces: int) -> bytes:
    """A tiny SentencePiece tokenizer.model of `pieces` pieces (the tiny model's embedding has VOCAB rows)."""
    from gemma3_mlx.convert.gguf_file import GGUFFile
    from gemma3_mlx.convert.gguf_tokenizer import sentencepiece_model_from_gguf

    return sentencepiece_model_from_gguf(GGUFFile(tiny_files.write_gguf(work / f"tok{pieces}.gguf", vocab=pieces)))


@pytest.mark.slow  # hundreds of conversions and runs, in processes
def test_fuzz(tmp_path):
    t0 = time.perf_counter()
    names, jobs, verdicts = fuzz(tmp_path)
    bad = [f"{names[i // 2]} | {jobs[i]['args'][0]}: {v}" for i, v in enumerate(verdicts) if v not in ("ok", "error")]
    counts = Counter(v if v in ("ok", "error") else "bad" for v in verdicts)
    print(f"{len(names)} mutants, {len(jobs)} runs: {dict(counts)} in {time.perf_counter() - t0:.1f} s")
    assert len(names) >= 300
    assert counts["error"] > len(jobs) // 2  # most damage is noticed, not converted as if nothing happened
    assert not bad, "\n".join(bad[:40])


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        names, jobs, verdicts = fuzz(work)
        counts = Counter(v if v in ("ok", "error") else "bad" for v in verdicts)
        print(f"{len(names)} mutants, {len(jobs)} runs in {time.perf_counter() - t0:.1f} s: {dict(counts)}")
        bad_mutants = {i // 2 for i, v in enumerate(verdicts) if v not in ("ok", "error")}
        print(f"mutants with a bad outcome: {len(bad_mutants)}")
        kinds = Counter(v.split(" (")[0].split(":")[0] for v in verdicts if v not in ("ok", "error"))
        print(dict(kinds))
        for i, v in enumerate(verdicts):
            if v not in ("ok", "error"):
                print(f"{names[i // 2]} | {jobs[i]['args'][0]}: {v[:300]}")
