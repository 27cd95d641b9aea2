"""Calibrated quantization (convert --calibrate): GPTQ on the float model's activations, on tiny configs."""

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

from conftest import FIXTURES
import gemma3_mlx
from gemma3_mlx.convert import convert
from gemma3_mlx.convert.calibrate import calibrate, calibration_ids, documents, random_ids
from gemma3_mlx.convert.quantize import quantize, quantize_gptq
from gemma3_mlx.convert.sources import open_source
from gemma3_mlx.errors import ConversionError
from gemma3_mlx.generate import generate_tokens
from gemma3_mlx.packing import unpack

TOKENS = 384  # random ids: enough for full-rank 64/96-wide Hessians, quick on the tiny model


def _convert(src, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixtures have no tokenizer.model
        return convert(src, out, **kw)


def _dequantized(directory) -> dict:
    """Weight name -> float32 matrix, as the converter stored it (float16 scales upcast)."""
    config = json.loads((directory / "config.json").read_text())["quantization"]
    t = {}
    for p in directory.glob("*.safetensors"):
        t.update(mx.load(str(p)))
    out = {}
    for k in t:
        if k.endswith(".scales"):
            module = k[: -len(".scales")]
            spec = config.get(module, config)
            out[module + ".weight"] = np.array(mx.dequantize(
                t[module + ".weight"], t[k].astype(mx.float32), t[module + ".biases"].astype(mx.float32),
                group_size=spec["group_size"], bits=spec["bits"]))
    return out


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """tiny_v5 with the "small" recipe (4-, 6- and 8-bit matrices), uncalibrated and calibrated, and
    the calibration (its Hessians) itself."""
    src, tmp = FIXTURES / "tiny_v5", tmp_path_factory.mktemp("calibrate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = calibrate(open_source(src), tokens=TOKENS)
    _convert(src, tmp / "u", recipe="small")
    report = _convert(src, tmp / "c", recipe="small", calibration={"tokens": TOKENS}, check=True)
    yield calib, tmp / "u", tmp / "c", report
    calib.close()


def _output_error(w, q, h) -> float:
    """||X (W - Wq)^T||^2 over the calibration inputs X, as tr(E H E^T) with H = X^T X / N."""
    e = np.asarray(q, np.float64) - np.asarray(w, np.float64)
    return float(np.einsum("rc,rc->", e @ h, e))


def test_calibrated_error_never_worse_than_uniform_per_layer(tiny_pair):
    calib, u, c, _ = tiny_pair
    floats = dict(open_source(FIXTURES / "tiny_v5").tensors())
    uni, cal = _dequantized(u), _dequantized(c)
    assert set(calib.sites) == set(uni) == set(cal)  # every quantized matrix, the tied embedding too
    totals = np.zeros(2)
    for name, site in calib.sites.items():
        h = np.load(f"{calib.directory.name}/{site}").astype(np.float64)
        errs = [_output_error(floats[name], q[name], h) for q in (uni, cal)]
        assert errs[1] <= errs[0] * (1 + 1e-5), (name, errs)
        totals += errs
    assert totals[1] < 0.8 * totals[0], totals  # and clearly better overall


@pytest.mark.parametrize("bits", [3, 5, 6, 8])
def test_other_bit_widths_never_worse_either(tiny_pair, bits):
    calib = tiny_pair[0]
    floats = dict(open_source(FIXTURES / "tiny_v5").tensors())
    for name in ("model.layers.3.self_attn.v_proj.weight", "model.layers.5.mlp.down_proj.weight", "model.embed_tokens.weight"):
        h = np.load(f"{calib.directory.name}/{calib.sites[name]}").astype(np.float64)
        errs = []
        for t in (quantize(floats[name], bits, 32), calib.quantize(name, floats[name], bits, 32)):
            s, b = (a.astype(mx.float16).astype(mx.float32) for a in t[1:])  # as stored
            errs.append(_output_error(floats[name], np.array(mx.dequantize(t[0], s, b, group_size=32, bits=bits)), h))
        assert errs[1] <= errs[0] * (1 + 1e-5), (name, bits, errs)


def test_gptq_rounding_uses_the_hessian():
    """A Hessian with correlated inputs: GPTQ's output error well below the uncalibrated search's."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 128)).astype(np.float32)
    x = rng.normal(size=(512, 128)).astype(np.float32) @ (np.eye(128) + 0.3 * rng.normal(size=(128, 128)))
    h = x.T @ x / len(x)

    def err(t):
        q = unpack(np.array(t[0]), 4).astype(np.float32).reshape(64, -1, 32)
        s, b = (np.array(a).astype(np.float16).astype(np.float32)[..., None] for a in t[1:])
        e = (q * s + b).reshape(64, 128) - w
        return np.einsum("rc,rc->r", e @ h, e)

    plain, gptq = err(quantize(w, 4, 32)), err(quantize_gptq(w, h, 4, 32))
    assert np.all(gptq <= plain * (1 + 1e-5)) and gptq.sum() < 0.7 * plain.sum()
    with pytest.raises(ValueError):
        quantize_gptq(w, h[:64, :64], 4, 32)


def test_calibration_is_deterministic(tiny_pair):
    calib = tiny_pair[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = calibrate(open_source(FIXTURES / "tiny_v5"), tokens=TOKENS)
    for site in set(calib.sites.values()):
        assert np.array_equal(np.load(f"{calib.directory.name}/{site}"), np.load(f"{again.directory.name}/{site}"))
    again.close()
    w = dict(open_source(FIXTURES / "tiny_v5").tensors())["model.embed_tokens.weight"]
    a, b = (calib.quantize("model.embed_tokens.weight", w, 4, 32) for _ in range(2))
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, b))
    assert random_ids(384, TOKENS, 0) == random_ids(384, TOKENS, 0) != random_ids(384, TOKENS, 1)


def _generates(directory):
    fx = mx.load(str(FIXTURES / "tiny_v5" / "logits.safetensors"))
    ids, ref = fx["input_ids"], np.array(fx["logits"])
    for dequantize in (True, False):
        model = gemma3_mlx.load_model(directory, "float32", dequantize=dequantize)
        logits = np.array(model(ids))
        logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        assert (np.exp(logp) * (logp - logq)).sum(-1).mean() < 0.1
        tokens = list(generate_tokens(model, np.array(ids[0, :5]).tolist(), max_tokens=6))
        assert len(tokens) == 6 and all(0 <= t < model.config.text.vocab_size for t in tokens)


def test_a_calibrated_model_loads_and_generates(tiny_pair):
    report = tiny_pair[3]
    c = report.calibration
    assert c["tokens"] == TOKENS and c["held_out"] and c["peak_rss_mb"] > 0 and c["seconds"] > 0
    assert report.quality["kl"] < 0.1
    _generates(tiny_pair[2])


def test_calibration_needs_quantization_and_readable_data(tmp_path):
    with pytest.raises(ConversionError, match="--bits or --recipe"):
        _convert(FIXTURES / "tiny_v5", tmp_path / "a", dtype="float32", calibration={})
    with pytest.raises(ConversionError, match="cannot read"):
        _convert(FIXTURES / "tiny_v5", tmp_path / "b", bits=4, group_size=32,
                 calibration={"data": tmp_path / "missing.txt"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(ConversionError, match="bad.jsonl:2"):
        documents(bad)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_calibration_text(tmp_path):
    """Built-in documents (held out from the report's text), chat format for -it models, user files."""
    import tiny_files

    from gemma3_mlx.convert.gguf import GGUFSource
    from gemma3_mlx.tokenizer import Tokenizer

    tok = Tokenizer(model_proto=GGUFSource(tiny_files.write_gguf(tmp_path / "tiny.gguf")).tokenizer_model())
    base, held_out = calibration_ids(tok, None, 4096, chat=False)
    chat, _ = calibration_ids(tok, None, 4096, chat=True)
    assert held_out and 4096 <= sum(map(len, base)) <= 4096 + 8 and max(map(len, base)) <= 512
    assert all(s[0] == tok.bos_id for s in base + chat)
    assert any(tok.start_of_turn_id in s for s in chat) and not any(tok.start_of_turn_id in s for s in base)
    user = tmp_path / "data.jsonl"
    user.write_text("\n".join(json.dumps(r) for r in [
        {"text": "A plain document about rivers and the sea, long enough to count."},
        {"messages": [{"role": "user", "content": "Hi there, how are you?"}, {"role": "model", "content": "Well, thanks."}]},
        {"prompt": "Name a colour.", "completion": "Blue, like the sky on a clear day."}]))
    seqs, held_out = calibration_ids(tok, user, 10_000, chat=True)
    assert len(seqs) == 3 and held_out
    from gemma3_mlx.convert.quality import TEXT

    (tmp_path / "leaky.txt").write_text("Some text.\n\n\n" + TEXT)
    assert not calibration_ids(tok, tmp_path / "leaky.txt", 10_000, chat=False)[1]


def test_cli_calibrates_a_multimodal_model_leaving_the_vision_tower(tmp_path):
    """In process (the subprocess tests elsewhere cover startup): flags, the summary, the held-out note."""
    from typer.testing import CliRunner

    from gemma3_mlx.cli.main import app

    src = FIXTURES / "tiny_vlm"
    args = ["convert", str(src), "-o", str(tmp_path / "out"), "--bits", "4", "--group-size", "32",
            "--calibrate", "--calibration-tokens", str(TOKENS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"calibrated on {TOKENS} tokens (random ids)" in r.stderr and "held out" in r.stdout
    out = {}
    for p in (tmp_path / "out").glob("*.safetensors"):
        out.update(mx.load(str(p)))
    vision = {k: v for k, v in open_source(src).tensors() if k.startswith(("vision_tower.", "multi_modal_projector."))}
    assert vision and all(np.array_equal(np.array(out[k]), np.array(v)) for k, v in vision.items())
    assert any(k.startswith("model.layers.") and k.endswith(".scales") for k in out)
    model = gemma3_mlx.load_model(tmp_path / "out", "float32")
    assert model.config.vision is not None
    assert len(list(generate_tokens(model, [2, 10, 11, 12], max_tokens=4))) == 4
    r = CliRunner().invoke(app, args[:3] + [str(tmp_path / "bad"), "--bits", "4", "--calibrate", "--calibration-tokens", "3"])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1] == "error: --calibration-tokens 3: too few (at least 16)"
    assert "Traceback" not in r.output and not (tmp_path / "bad").exists()


def test_a_gguf_source_calibrates_on_the_built_in_text(tmp_path):
    """The GGUF path: tensors dequantized once into the temporary directory, its own tokenizer."""
    import tiny_files

    gguf = tiny_files.write_gguf(tmp_path / "tiny.gguf")
    r = _convert(gguf, tmp_path / "out", bits=4, group_size=32, calibration={"tokens": 256})
    assert r.calibration["source"].startswith("built-in text") and r.calibration["tokens"] == 256
    model, tok = gemma3_mlx.load(tmp_path / "out", dtype="float32")
    assert len(list(generate_tokens(model, tok.encode("the cat sat"), max_tokens=3))) == 3
