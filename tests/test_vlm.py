"""Multimodal Gemma 3 against transformers' Gemma3ForConditionalGeneration (tiny random config:
image block larger than the sliding window, non-default image token ids)."""

import json
import warnings

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401
import mlx.core as mx

from conftest import FIXTURES
from gemma3_mlx import forward
from gemma3_mlx import model as model_module
from gemma3_mlx.convert import convert
from gemma3_mlx.loader import load_model
from gemma3_mlx.prompt_cache import PromptCache

VLM = FIXTURES / "tiny_vlm"
REF = {k: np.array(v) for k, v in mx.load(str(VLM / "ref.safetensors")).items()}
PROMPTS = json.loads((VLM / "prompts.json").read_text())["prompts"]
NAMES = ["one_image", "two_images", "pan_and_scan"]


def inputs(name):
    return mx.array(REF[f"{name}.input_ids"]), mx.array(REF["pixels_nhwc"][PROMPTS[name]["images"]])


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    out = {"hf": VLM}
    d = tmp_path_factory.mktemp("vlm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in the tiny checkpoint
        convert(VLM, d / "f32", dtype="float32")
        out["q8"] = convert(VLM, d / "q8", bits=8, group_size=32).out
    out["f32"] = d / "f32"
    return out


@pytest.mark.parametrize("src", ["hf", "f32"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(vlm_dirs, src, name):
    model = load_model(vlm_dirs[src], dtype="float32")
    ids, pixels = inputs(name)
    out = np.array(forward.logits(model, ids, pixels=pixels))
    assert np.abs(out - REF[f"{name}.logits"]).max() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_image_masks_equal_the_references(name):
    """The masks our model builds for a whole prompt (each layer kind's cache mask, with its image
    blocks opened) equal the boolean masks transformers built, and opening the blocks changes them."""
    model = load_model(VLM, dtype="float32")
    ids = REF[f"{name}.input_ids"][0].tolist()
    spans = model_module.image_spans_of(ids, model.config.image_token_index)
    L = len(ids)
    for layer, cache in zip(model.model.layers, model.make_cache()):
        want = REF[f"{name}.mask_{'local' if layer.is_local else 'global'}"]
        assert (np.array(model_module.with_image_blocks(cache.make_mask(L), spans, L)).reshape(L, L) == want).all()
        assert (np.array(cache.make_mask(L)).reshape(L, L) != want).sum() > 0  # causal alone is not the reference


def test_image_attention_is_bidirectional_within_an_image(vlm_dirs, monkeypatch):
    """Our model gives transformers' logits with the image blocks bidirectional, and, with the blocks
    made causal (as some runtimes do), transformers' causal control (recorded without token_type_ids);
    the two differ, so the comparison can tell them apart."""
    model = load_model(vlm_dirs["f32"], dtype="float32")
    ids, pixels = inputs("one_image")
    ours = np.array(forward.logits(model, ids, pixels=pixels))
    monkeypatch.setattr(model_module, "with_image_blocks", lambda mask, spans, L: mask)
    causal = np.array(forward.logits(model, ids, pixels=pixels))
    assert np.abs(ours - REF["one_image.logits"]).max() <= 1e-4
    assert np.abs(causal - REF["one_image.logits_causal"]).max() <= 1e-4
    assert np.abs(ours - causal).max() > 0.1


@pytest.mark.parametrize("chunk", [3, 6, 7, 20, 100])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_keeps_image_blocks_whole(vlm_dirs, name, chunk):
    model = load_model(vlm_dirs["f32"], dtype="float32")
    ids, pixels = inputs(name)
    pc = PromptCache(model)
    last = np.array(pc.prefill(np.array(ids[0]).tolist(), chunk=chunk, images=list(np.array(pixels))))
    assert np.abs(last[0] - REF[f"{name}.logits"][0, -1]).max() <= 1e-4


def test_prefix_reuse_stops_at_a_different_image(vlm_dirs):
    model = load_model(vlm_dirs["f32"], dtype="float32")
    ids, pixels = inputs("one_image")
    ids = np.array(ids[0]).tolist()
    a, b = np.array(pixels[0]), np.array(REF["pixels_nhwc"][2])
    pc = PromptCache(model)
    pc.prefill(ids, images=[a])
    first = ids.index(302)
    again = np.array(pc.prefill(ids + [5], images=[a]))
    assert pc.reprocessed == 1  # same picture: everything reused
    other = np.array(pc.prefill(ids + [5], images=[b]))
    assert pc.reprocessed >= len(ids) + 1 - first  # another picture: recomputed from its block (or a snapshot before it)
    fresh = np.array(PromptCache(model).prefill(ids + [5], images=[b]))
    assert np.abs(other - fresh).max() <= 1e-5 and np.abs(other - again).max() > 1e-3
    with pytest.raises(ValueError, match="image blocks"):
        pc.prefill(ids, images=[])


def test_vision_tower_stays_float_when_text_is_quantized(vlm_dirs):
    cfg = json.loads((vlm_dirs["q8"] / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["model_type"] == "gemma3"
    from gemma3_mlx.safetensors_io import SafetensorsFile, checkpoint_files

    names = {n: f for f in checkpoint_files(vlm_dirs["q8"]) for n in SafetensorsFile(f).names}
    assert "model.layers.0.self_attn.q_proj.scales" in names
    assert not any(n.startswith(("vision_tower", "multi_modal_projector")) and n.endswith(".scales") for n in names)
    model = load_model(vlm_dirs["q8"], dtype="float32")
    ids, pixels = inputs("one_image")
    out = np.array(forward.logits(model, ids, pixels=pixels))
    ref = REF["one_image.logits"]
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("dequantize", [True, False])
def test_vision_tower_quantized_to_8_bits_on_request(tmp_path, dequantize):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = convert(VLM, tmp_path / "qv", bits=8, group_size=32, quantize_vision=True)
    q = json.loads((r.out / "config.json").read_text())["quantization"]
    s = q.get("vision_tower.encoder.layers.0.mlp.fc1", q)
    assert (s["bits"], s["group_size"]) == (8, 32)
    from gemma3_mlx.safetensors_io import SafetensorsFile, checkpoint_files

    names = {n for f in checkpoint_files(r.out) for n in SafetensorsFile(f).names}
    assert "vision_tower.encoder.layers.0.self_attn.q_proj.scales" in names
    assert "vision_tower.embeddings.patch_embedding.scales" not in names
    model = load_model(r.out, dtype="float32", dequantize=dequantize)
    ids, pixels = inputs("one_image")
    feats = np.array(forward.encode_images(model, pixels))
    ref = REF["features"][PROMPTS["one_image"]["images"]]
    assert np.abs(feats - ref).max() < 0.05 * np.abs(ref).max()
