"""What a conversion cost in quality: KL divergence and top-1 agreement against the float source.

Both models run in float32 on the same built-in text; the reference is the source checkpoint
dequantized (a GGUF's blocks, a Hugging Face directory's weights). KL is KL(source || converted)
per position, averaged. It does not judge generated text.

The check never holds either model whole: it walks the layers, reading one layer of each model
at a time (the source's by random access, the converted one expanded to float32), and carries
both models' hidden states through it, so KL and top-1 are exactly those of the whole models.
The tied head is applied in slices of the vocabulary with an online log-sum-exp. Memory: the
source's embedding matrix, the converted one as stored, one layer of each and a slice of the
head, whatever the number of layers. It also feeds each converted layer the *float* model's
input to that layer (the text's first ERROR_TOKENS positions): `layer_error[i]` is how far its
output lands from the float layer's, relative to what the float layer adds to the residual
stream (0 = exact).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import KVCache, WindowCache
from ..errors import ModelFileError
from ..loader import load_config, load_tokenizer, materialise, read_weights
from ..model import DecoderLayer
from ..norm import RMSNorm
from ..weights import sanitize_name
from .gguf import GGUFSource, mlx_name
from .sources import open_source

HEAD_SLICE_BYTES = 64 << 20  # float32 rows of the head applied at once
MIN_SLICE_ROWS = 1024
ERROR_TOKENS = 64  # positions the per-layer errors are measured on (a third layer pass: kept short)
COMPARED = ("both models' logits over the vocabulary (KL, top-1), computed layer by layer in float32; "
            "per layer, the converted layer on the float model's input against the float layer (first 64 positions)")

# Original prose, varied on purpose (narrative, numbers, a list, a little code), ~300 tokens.
TEXT = """The lighthouse keeper kept a ledger of every ship that passed the point, and by the third winter the ledger had grown into something closer to a diary. On clear nights he wrote about the colour of the water, the smell of the kelp drying on the rocks, and the slow, patient arithmetic of the tides: two highs and two lows each day, each arriving roughly fifty minutes later than the day before.
In March the supply boat brought a crate of oranges, a new wick for the lamp, and a letter from his sister, who had moved to the city and taken a job repairing clocks. "Everything here runs on schedules," she wrote, "but nobody seems to know what time it is."
He answered her the same evening. He described the storm of February 14th, when the wind reached 110 kilometres per hour and the spray climbed higher than the gallery rail; the seal that slept for a week on the landing stage; and the list he kept pinned above the stove:
1. Trim the wick before sunset.
2. Wind the clockwork every four hours.
3. Record the barometer at 06:00 and 18:00.
At the bottom of the letter he copied, for her amusement, the small program he had written on the old terminal to predict the tides:
def next_high(previous_minutes):
    return previous_minutes + 12 * 60 + 25
"She will laugh at that," he thought, and then, looking out at the dark line of the horizon, he was not sure that she would."""


def eval_ids(tokenizer, vocab_size: int, n: int = 320) -> list[int]:
    """The built-in text's ids; random ids (seeded) for tokenizer-less test models."""
    if tokenizer is not None:
        return tokenizer.encode(TEXT)[:n]
    return [2] + np.random.default_rng(0).integers(4, vocab_size, n - 1).tolist()


def compare(model, reference, ids: list[int]) -> dict:
    """KL(reference || model) averaged over positions, and top-1 agreement, of two whole models."""
    x = mx.array(ids)[None]
    logp = _log_softmax(reference(x)[0])
    logq = _log_softmax(model(x)[0])
    kl = mx.sum(mx.exp(logp) * (logp - logq), axis=-1)
    top1 = mx.argmax(logp, axis=-1) == mx.argmax(logq, axis=-1)
    return {"kl": float(mx.mean(kl)), "top1": float(mx.mean(top1.astype(mx.float32))), "tokens": len(ids)}


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def source_weights(src) -> dict[str, Callable[[], mx.array]]:
    """The float source's text weights by MLX name, each read from the file when called."""
    if isinstance(src, GGUFSource):
        return {n: (lambda t=t: mx.array(src.float_tensor(t))) for t in src.used if (n := mlx_name(t.name))}
    return {n: (lambda f=f, k=k: f.get(k)) for f in src.files for k in f.names if (n := sanitize_name(k))}


def check_against_source(model_dir: Path, src, adapter=None) -> dict:
    """Compare the converted model in `model_dir` with its float source, layer by layer (module docstring).
    `adapter` (adapters.Adapter): the reference is the source with it merged (a fused conversion)."""
    config = load_config(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = load_tokenizer(model_dir, config=config)
    t = config.text
    ids = eval_ids(tok, t.vocab_size)
    ref = source_weights(src)
    for module in adapter.modules if adapter is not None else ():
        n = f"{module}.weight"
        ref[n] = lambda f=ref[n], m=module: f().astype(mx.float32) + mx.array(adapter.delta(m))

    def float_part(prefix: str) -> dict:
        got = {n: ref[n]() for n in ref if n.startswith(prefix)}
        return materialise(got, None, mx.float32, expand=False)

    def quantized_part(prefix: str, expand: bool = True) -> dict:
        return read_weights(model_dir, config, mx.float32, expand, select=lambda n: n.startswith(prefix))

    ref_embed = _one(ref, "model.embed_tokens.weight")()  # as stored: cast a slice at a time
    mx.eval(ref_embed)
    q_embed = _Rows(quantized_part("model.embed_tokens.", expand=False), config.quantization)
    x = mx.array(ids)
    scale = mx.array(math.sqrt(t.hidden_size), mx.float32)
    h_f = (ref_embed[x].astype(mx.float32) * scale)[None]
    h_q = (q_embed.rows(x) * scale)[None]
    errors = []
    for i, local in enumerate(t.is_local):
        prefix = f"model.layers.{i}."
        f_layer = _module(DecoderLayer(t, local), float_part(prefix), prefix)
        q_layer = _module(DecoderLayer(t, local), quantized_part(prefix), prefix)
        out_f = _run(f_layer, h_f, t, local)
        n = ERROR_TOKENS  # causal: the first n positions' outputs need only the first n inputs
        errors.append(_relative_error(_run(q_layer, h_f[:, :n], t, local), out_f[:, :n], h_f[:, :n]))
        h_q = _run(q_layer, h_q, t, local)
        h_f = out_f
        mx.eval(h_f, h_q)
        del f_layer, q_layer
    h_f = _module(RMSNorm(t.hidden_size, t.rms_norm_eps), float_part("model.norm."), "model.norm.")(h_f)[0]
    h_q = _module(RMSNorm(t.hidden_size, t.rms_norm_eps), quantized_part("model.norm."), "model.norm.")(h_q)[0]
    kl, top1 = _head_kl(h_f, h_q, ref_embed, q_embed, t.vocab_size)
    worst = int(np.argmax(errors)) if errors else 0
    return {"kl": kl, "top1": top1, "tokens": len(ids), "layer_error": errors,
            "worst_layer": worst, "compared": COMPARED}


def _one(ref: dict, name: str):
    if name not in ref:
        raise ModelFileError(f"the source has no {name}")
    return ref[name]


class _Rows:
    """Rows of the converted embedding matrix in float32, expanded only as they are asked for."""

    def __init__(self, weights: dict, settings: dict | None):
        self.weights, self.settings = weights, settings

    def rows(self, index) -> mx.array:
        part = {n: w[index] for n, w in self.weights.items()}
        return materialise(part, self.settings, mx.float32, expand=True)["model.embed_tokens.weight"]


def _module(module: nn.Module, weights: dict, prefix: str) -> nn.Module:
    try:
        module.load_weights([(n[len(prefix):], w) for n, w in weights.items()], strict=True)
    except ValueError as e:
        raise ModelFileError(f"{prefix.rstrip('.')}: weights do not match the config ({' '.join(str(e).split())})") from None
    return module


def _run(layer: DecoderLayer, h: mx.array, t, local: bool) -> mx.array:
    """One decoder layer over the whole text, with a fresh cache of the kind the model gives it."""
    cache = WindowCache(t.sliding_window) if local else KVCache()
    return layer(h, cache.make_mask(h.shape[1]), cache)


def _relative_error(out: mx.array, ref: mx.array, h_in: mx.array) -> float:
    """|out - ref| over |ref - h_in|: the error against what the float layer adds to its input."""
    return float(mx.linalg.norm((out - ref).reshape(-1)) / mx.maximum(mx.linalg.norm((ref - h_in).reshape(-1)), 1e-30))


def _head_kl(h_f, h_q, ref_embed, q_embed: _Rows, vocab: int) -> tuple[float, float]:
    """Mean KL(float || converted) and top-1 agreement of the tied heads, a slice of the vocabulary
    at a time: running maxima and sums give both log-sum-exps and the p-weighted logit gap."""
    L = h_f.shape[0]
    step = max(MIN_SLICE_ROWS, HEAD_SLICE_BYTES // (4 * h_f.shape[-1]))
    m_f = m_q = mx.full((L,), -mx.inf)
    s_f = s_q = a = mx.zeros((L,))
    best_f = best_q = mx.full((L,), -mx.inf)
    arg_f = arg_q = mx.zeros((L,), mx.int32)
    for lo in range(0, vocab, step):
        hi = min(lo + step, vocab)
        lf = h_f @ ref_embed[lo:hi].astype(mx.float32).T  # (L, slice)
        lq = h_q @ q_embed.rows(slice(lo, hi)).T
        new_f, new_q = mx.maximum(m_f, lf.max(-1)), mx.maximum(m_q, lq.max(-1))
        e_f = mx.exp(lf - new_f[:, None])
        c_f = mx.exp(m_f - new_f)
        s_f = s_f * c_f + e_f.sum(-1)
        a = a * c_f + (e_f * (lf - lq)).sum(-1)
        s_q = s_q * mx.exp(m_q - new_q) + mx.exp(lq - new_q[:, None]).sum(-1)
        m_f, m_q = new_f, new_q
        best_f, arg_f = _running_argmax(lf, best_f, arg_f, lo)
        best_q, arg_q = _running_argmax(lq, best_q, arg_q, lo)
        mx.eval(m_f, m_q, s_f, s_q, a, best_f, best_q, arg_f, arg_q)
    kl = a / s_f - (m_f + mx.log(s_f)) + (m_q + mx.log(s_q))
    return float(mx.mean(kl)), float(mx.mean((arg_f == arg_q).astype(mx.float32)))


def _running_argmax(logits, best, arg, offset: int):
    top, where = logits.max(-1), mx.argmax(logits, -1).astype(mx.int32) + offset
    better = top > best  # strictly: ties keep the lower id, as one argmax over the vocabulary would
    return mx.where(better, top, best), mx.where(better, where, arg)


def check(model: str | Path, reference: str | Path) -> dict:
    """`gemma3 check MODEL --reference SOURCE`: SOURCE is a checkpoint, GGUF, or float MLX directory."""
    return check_against_source(Path(model), open_source(reference))
