"""Calibration for quantization: each matrix's input statistics, from the float model on real text.

`calibrate(src)` runs the float text model block by block over calibration text and keeps, for
every matrix the converter quantizes, H = X^T X / N of its inputs X (N tokens, cols): q/k/v share
the attention norm's output, gate/up the feed-forward norm's, and the tied embedding's H is that
of the final hidden states it multiplies as the output head. `Calibration.quantize` then rounds
a matrix with quantize.quantize_gptq on its H.

Bounded cost: only one block's weights, the calibration set's hidden states (N x hidden) and one
block's Hessians are in memory at a time; the Hessians wait on disk (a temporary directory) until
their matrix is quantized. Safetensors sources are read in place one tensor at a time; a GGUF's
text tensors are dequantized once into float32 .npy files there (its order is not the layers'). It does not quantize activations, choose bits per layer, or calibrate the vision tower.

Data: the package's built-in calibration.txt (original texts of several kinds; chat-formatted for
instruction-tuned models), or a user's file: plain text, or JSONL with "text", "messages" (a chat)
or "prompt"/"completion" per line. quality.TEXT, the conversion report's text, is not in it.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..cache import KVCache, WindowCache
from ..errors import ConversionError
from ..model import DecoderLayer
from ..norm import RMSNorm
from ..tokenizer import Tokenizer
from ..weights import sanitize_name
from .quality import TEXT
from .quantize import quantize_gptq

BUILTIN = Path(__file__).with_name("calibration.txt")
TOKENS = 8192  # default calibration tokens (the built-in text holds about 9,000; 10,000 as chats)
SEQUENCE = 512  # tokens per sequence: the 270M/1B local window
# The tied embedding is also the input lookup table, whose error no output Hessian sees: its H gets
# this fraction of its mean diagonal added, pulling GPTQ towards plain weight error (measured).
EMBED_IDENTITY = 0.1


@dataclass
class Calibration:
    """Per-matrix input Hessians on disk, and what gathering them cost."""

    directory: tempfile.TemporaryDirectory
    sites: dict[str, str] = field(default_factory=dict)  # weight name -> Hessian file name
    tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    held_out: bool = True  # the report's text (quality.TEXT) is not in the calibration data
    source: str = "built-in text"

    def quantize(self, name: str, w, bits: int, group_size: int):
        """(weight, scales, biases) for a calibrated matrix, or None for one without statistics."""
        site = self.sites.get(name)
        if site is None or w.ndim != 2:
            return None
        h = np.load(Path(self.directory.name) / site)
        return quantize_gptq(w, h, bits, group_size)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "sequences": self.sequences, "seconds": self.seconds,
                "peak_rss_mb": self.peak_rss_mb, "held_out": self.held_out, "source": self.source}

    def close(self) -> None:
        self.directory.cleanup()


def calibrate(src, data: str | Path | None = None, tokens: int = TOKENS, seed: int = 0, progress=None) -> Calibration:
    """Gather the input Hessians of every text-model matrix of `src` (a converter source)."""
    t0 = time.perf_counter()
    if tokens < 16:
        raise ConversionError(f"--calibration-tokens {tokens}: too few (at least 16)")
    config = src.config()
    text = config.text
    proto = src.tokenizer_model()
    tok = Tokenizer(model_proto=proto) if proto is not None else None
    chat = bool(config.instruction_tuned)
    if tok is None:  # test models without a tokenizer: seeded random ids, as quality.eval_ids
        if data is not None:
            documents(data)  # a bad file is still reported as such
            raise ConversionError("--calibration-data needs the source's tokenizer.model")
        sequences, held_out = random_ids(text.vocab_size, tokens, seed), True
    else:
        sequences, held_out = calibration_ids(tok, data, tokens, chat, seed)
    kind = "random ids" if tok is None else "built-in text" + (", chat format" if chat else "")
    calib = Calibration(tempfile.TemporaryDirectory(prefix="gemma3-calibrate-"), held_out=held_out,
                        source=str(data) if data else kind)
    root = Path(calib.directory.name)
    load, done, total = _weights(src, root / "weights", progress, extra=text.num_hidden_layers + 1)

    # Hidden states of every sequence, (1, L, D) each: as TextModel.embed, rows scaled by sqrt(hidden).
    table = load("model.embed_tokens.weight")
    scale = np.float32(math.sqrt(text.hidden_size))
    hidden = [mx.array(np.asarray(table[np.array(ids)]) * scale)[None] for ids in sequences]
    del table
    for i, local in enumerate(text.is_local):
        prefix = f"model.layers.{i}."
        layer = DecoderLayer(text, local)
        layer.load_weights([(k, mx.array(load(prefix + k))) for k, _ in tree_flatten(layer.parameters())], strict=True)
        attn, mlp = layer.self_attn, layer.mlp
        sites = {"qkv": (attn, "q_proj", ("q_proj", "k_proj", "v_proj")), "o": (attn, "o_proj", ("o_proj",)),
                 "gate_up": (mlp, "gate_proj", ("gate_proj", "up_proj")), "down": (mlp, "down_proj", ("down_proj",))}
        catchers = {}
        for site, (parent, attr, _) in sites.items():
            catchers[site] = _Catcher(getattr(parent, attr))
            setattr(parent, attr, catchers[site])
        for n, h in enumerate(hidden):
            cache = WindowCache(text.sliding_window) if local else KVCache()
            hidden[n] = layer(h, cache.make_mask(h.shape[1]), cache)
            mx.eval(hidden[n], *(c.h for c in catchers.values()))
        for site, (parent, _, members) in sites.items():
            file = f"{prefix}{site}.npy"
            np.save(root / file, catchers[site].hessian())
            kind = "self_attn" if parent is attn else "mlp"
            calib.sites.update({f"{prefix}{kind}.{m}.weight": file for m in members})
        del layer, catchers
        done += 1
        _tick(progress, done, total)

    norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
    norm.load_weights([("weight", mx.array(load("model.norm.weight")))], strict=True)
    head = _Catcher(lambda x: x)
    for h in hidden:
        head(norm(h))
        mx.eval(head.h)
    h = head.hessian()
    h[np.diag_indices_from(h)] += EMBED_IDENTITY * float(np.mean(np.diag(h)))
    np.save(root / "head.npy", h)
    calib.sites["model.embed_tokens.weight"] = "head.npy"
    _tick(progress, total, total)
    shutil.rmtree(root / "weights", ignore_errors=True)  # spilled weights: no longer needed
    calib.tokens, calib.sequences = sum(len(s) for s in sequences), len(sequences)
    calib.seconds = time.perf_counter() - t0
    calib.peak_rss_mb = peak_rss_mb()
    return calib


class _Catcher(nn.Module):
    """Wraps a layer: passes its input through and adds x^T x (float32) to a running sum."""

    def __init__(self, inner):
        super().__init__()
        self._inner, self.h, self.n = inner, None, 0

    def __call__(self, x):
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        g = xf.T @ xf
        self.h = g if self.h is None else self.h + g
        self.n += xf.shape[0]
        return self._inner(x)

    def hessian(self) -> np.ndarray:
        return np.array(self.h) / max(self.n, 1)


def _weights(src, spill: Path, progress, extra: int):
    """(load(name) -> float32 array, tensors done, total steps). A safetensors source is read in place,
    one tensor at a time; a GGUF's text tensors are dequantized once into .npy files under `spill`
    (its file order is not the layers' order) and memory-mapped from there."""
    if hasattr(src, "files"):  # HFSource
        index = {sanitize_name(k): (f, k) for f in src.files for k in f.names if sanitize_name(k)}

        def read(name):
            f, k = index[name]
            return np.array(f.get(k).astype(mx.float32))

        return read, 0, extra
    spill.mkdir()
    total = src.tensor_count() + extra
    done = 0
    for name, t in src.tensors(native=False):
        if name.startswith("model."):
            np.save(spill / f"{name}.npy", np.asarray(t, np.float32))
        done += 1
        _tick(progress, done, total)
    return (lambda name: np.load(spill / f"{name}.npy", mmap_mode="r")), done, total


def _tick(progress, done, total):
    if progress:
        progress(min(done, total), total)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 20) if sys.platform == "darwin" else r / 1024


# ---- data ---------------------------------------------------------------------------------------


def documents(data: str | Path | None) -> list[dict]:
    """Calibration documents: {"prompt": request or None, "text": body} or {"messages": chat}."""
    if data is None:
        return _builtin()
    p = Path(data).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{p}: cannot read calibration data ({e})") from None
    if p.suffix.lower() != ".jsonl":
        docs = [{"prompt": None, "text": t.strip()} for t in raw.split("\n\n\n") if t.strip()]
    else:
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(_row(row))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConversionError(f"{p}:{n}: expected a JSON object with \"text\", \"messages\" "
                                      "or \"prompt\"/\"completion\"") from None
    if not docs:
        raise ConversionError(f"{p}: no calibration text in it")
    return docs


def _row(row: dict) -> dict:
    if "messages" in row:
        return {"messages": [{"role": m["role"], "content": str(m["content"])} for m in row["messages"]]}
    if "text" in row:
        return {"prompt": None, "text": str(row["text"])}
    return {"prompt": str(row["prompt"]), "text": str(row["completion"])}


def _builtin() -> list[dict]:
    """calibration.txt: documents opened by a "### request" line (the user's turn in chat format)."""
    docs = []
    for block in BUILTIN.read_text(encoding="utf-8").split("\n### ")[1:]:
        prompt, _, body = block.partition("\n")
        docs.append({"prompt": prompt.strip(), "text": body.strip()})
    return docs


def calibration_ids(tok: Tokenizer, data, tokens: int, chat: bool, seed: int = 0) -> tuple[list[list[int]], bool]:
    """(sequences of at most SEQUENCE ids, each starting with BOS, about `tokens` in all; whether
    quality.TEXT stayed out). Documents are split into sequences; with more than `tokens`, a
    seeded random choice of sequences is kept, in their original order."""
    docs = documents(data)
    held_out = not any(TEXT[:200] in d.get("text", "") + json.dumps(d.get("messages", "")) for d in docs)
    seqs = []
    for d in docs:
        ids = _encode(tok, d, chat)
        body = ids[1:] if ids and ids[0] == tok.bos_id else ids
        step = SEQUENCE - 1
        seqs += [[tok.bos_id] + body[i : i + step] for i in range(0, len(body), step) if len(body[i : i + step]) >= 8]
    if not seqs:
        raise ConversionError("the calibration data has too little text (a few sentences at least)")
    if sum(map(len, seqs)) > tokens:
        order = np.random.default_rng(seed).permutation(len(seqs))
        keep, n = [], 0
        for k in order:
            if n >= tokens:
                break
            keep.append(int(k))
            n += len(seqs[k])
        seqs = [seqs[k] for k in sorted(keep)]
        over = sum(map(len, seqs)) - tokens
        if over > 0:  # trim the last sequence to land on `tokens` exactly
            seqs[-1] = seqs[-1][: max(8, len(seqs[-1]) - over)]
    return seqs, held_out


def random_ids(vocab_size: int, tokens: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [min(SEQUENCE, tokens - i) for i in range(0, tokens, SEQUENCE)]
    return [[2] + rng.integers(4, vocab_size, n - 1).tolist() for n in lengths if n >= 8]


def _encode(tok: Tokenizer, d: dict, chat: bool) -> list[int]:
    if "messages" in d:
        return tok.apply_chat_template(d["messages"], add_generation_prompt=False)
    if chat and d.get("prompt"):
        return tok.apply_chat_template([{"role": "user", "content": d["prompt"]},
                                        {"role": "model", "content": d["text"]}], add_generation_prompt=False)
    return tok.encode(d["text"])
