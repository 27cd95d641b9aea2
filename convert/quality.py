"""What a conversion cost in quality: KL divergence and top-1 agreement against the float source.

Both models run in float32 on the same built-in text; the reference is the source checkpoint
dequantized (a GGUF's blocks, a Hugging Face directory's weights). KL is KL(source || converted)
per position, averaged. It does not judge generated text.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..loader import load_config, load_model, load_tokenizer
from ..model import Model
from .sources import open_source

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


def reference_model(src, dtype=mx.float32):
    """A float model built from a converter source (see sources.open_source), dequantized."""
    config = dataclasses.replace(src.config(), quantization=None)
    model = Model(config)
    model.load_weights([(n, mx.array(t).astype(dtype)) for n, t in src.tensors(native=False)], strict=True)
    mx.eval(model.parameters())
    return model


def eval_ids(tokenizer, vocab_size: int, n: int = 320) -> list[int]:
    """The built-in text's ids; random ids (seeded) for tokenizer-less test models."""
    if tokenizer is not None:
        return tokenizer.encode(TEXT)[:n]
    return [2] + np.random.default_rng(0).integers(4, vocab_size, n - 1).tolist()


def compare(model, reference, ids: list[int]) -> dict:
    """KL(reference || model) averaged over positions, and top-1 agreement."""
    x = mx.array(ids)[None]
    logp = _log_softmax(reference(x)[0])
    logq = _log_softmax(model(x)[0])
    kl = mx.sum(mx.exp(logp) * (logp - logq), axis=-1)
    top1 = mx.argmax(logp, axis=-1) == mx.argmax(logq, axis=-1)
    return {"kl": float(mx.mean(kl)), "top1": float(mx.mean(top1.astype(mx.float32))), "tokens": len(ids)}


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def check_against_source(model_dir: Path, src) -> dict:
    config = load_config(model_dir)
    model = load_model(model_dir, dtype="float32", config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = load_tokenizer(model_dir, config=config)
    ids = eval_ids(tok, model.config.text.vocab_size)
    result = compare(model, reference_model(src), ids)
    return result


def check(model: str | Path, reference: str | Path) -> dict:
    """`gemma3 check MODEL --reference SOURCE`: SOURCE is a checkpoint, GGUF, or float MLX directory."""
    return check_against_source(Path(model), open_source(reference))
