"""The SigLIP tower and projector against transformers on a tiny random Gemma 3 VLM, real-size shapes, sanitize_vision."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gemma3_mlx import forward
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.safetensors_io import SafetensorsFile
from gemma3_mlx.vision import Projector, VisionTower, encode_images, sanitize_vision

from conftest import FIXTURES

TINY = FIXTURES / "tiny_vlm"


def build(config: ModelConfig, weights: dict) -> tuple[VisionTower, Projector]:
    tower, projector = VisionTower(config.vision), Projector(config)
    for module, prefix in ((tower, "vision_tower."), (projector, "multi_modal_projector.")):
        module.load_weights([(k[len(prefix):], v) for k, v in weights.items() if k.startswith(prefix)], strict=True)
    mx.eval(tower.parameters(), projector.parameters())
    return tower, projector


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig.from_dict(json.loads((TINY / "config.json").read_text()))
    st = SafetensorsFile(TINY / "model.safetensors")
    weights = sanitize_vision({k: st.get(k) for k in st.names})
    ref = {k: np.array(v) for k, v in mx.load(str(TINY / "ref.safetensors")).items()}
    return config, weights, ref


def test_encode_images_matches_transformers(tiny):
    config, weights, ref = tiny
    tower, projector = build(config, weights)
    pixels = mx.array(ref["pixels_nhwc"])
    hidden = np.array(tower(pixels))
    assert hidden.shape == ref["tower"].shape == (3, 64, 32)
    assert np.abs(hidden - ref["tower"]).max() <= 1e-4
    out = encode_images(tower, projector, pixels)
    assert out.dtype == mx.float32
    assert out.shape == ref["features"].shape == (3, config.mm_tokens_per_image, config.text.hidden_size)
    assert np.abs(np.array(out) - ref["features"]).max() <= 1e-4
    assert np.abs(ref["features"]).max() > 1.0  # the fixture is not degenerate
    # One image without a batch axis, and the channels-first copy is the same images.
    one = encode_images(tower, projector, mx.array(ref["pixels_nhwc"][1]))
    assert one.shape == (1, 16, 64) and np.abs(np.array(one)[0] - ref["features"][1]).max() <= 1e-4
    assert np.array_equal(ref["pixels"].transpose(0, 2, 3, 1), ref["pixels_nhwc"])


def test_encode_images_in_bfloat16_stays_close(tiny):
    config, weights, ref = tiny
    tower, projector = build(config, sanitize_vision(weights, dtype=mx.bfloat16))
    out = encode_images(tower, projector, mx.array(ref["pixels_nhwc"]))
    assert out.dtype == mx.bfloat16
    err = np.abs(np.array(out.astype(mx.float32)) - ref["features"]).max()
    assert err <= 0.05 * np.abs(ref["features"]).max()


def test_wrong_image_size_is_refused(tiny):
    config, weights, _ = tiny
    tower, projector = build(config, weights)
    with pytest.raises(ValueError, match="56x56"):
        encode_images(tower, projector, mx.zeros((1, 63, 63, 3)))


def test_sanitize_vision_maps_every_checkpoint_schema():
    conv = mx.arange(8 * 3 * 7 * 7, dtype=mx.float32).reshape(8, 3, 7, 7)  # PyTorch (out, in, kh, kw)
    norm = mx.ones((8,), dtype=mx.bfloat16)
    ours = "vision_tower.embeddings.patch_embedding.weight"
    for prefix in ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."):
        for proj in ("multi_modal_projector.", "model.multi_modal_projector."):
            out = sanitize_vision({
                prefix + "embeddings.patch_embedding.weight": conv,
                prefix + "encoder.layers.3.self_attn.q_proj.bias": norm,
                proj + "mm_input_projection_weight": norm,
                "language_model.model.layers.0.mlp.up_proj.weight": norm,  # text keys are not ours
                "model.language_model.norm.weight": norm,
            })
            assert sorted(out) == sorted([ours, "vision_tower.encoder.layers.3.self_attn.q_proj.bias",
                                          "multi_modal_projector.mm_input_projection_weight"])
            assert out[ours].shape == (8, 7, 7, 3)  # MLX conv layout (out, kh, kw, in)
            assert np.array_equal(np.array(out[ours]), np.array(conv).transpose(0, 2, 3, 1))
            assert all(v.dtype == mx.float32 for v in out.values())
            again = sanitize_vision(out)  # a converted checkpoint passes through unchanged
            assert all(np.array_equal(np.array(again[k]), np.array(out[k])) for k in out)
    assert sanitize_vision({"vision_tower.post_layernorm.weight": norm}, dtype=None)["vision_tower.post_layernorm.weight"].dtype == mx.bfloat16


def test_real_size_parameter_shapes_without_running():
    # gemma-3-4b: SigLIP 896/14 -> 64x64 = 4096 patches, pooled 4x4 -> 16x16 = 256 tokens, text 2560.
    config = ModelConfig.from_dict({"model_type": "gemma3", "text_config": {"hidden_size": 2560},
                                    "vision_config": {"vision_use_head": False}})
    tower, projector = VisionTower(config.vision), Projector(config)  # parameters stay lazy: nothing is evaluated
    shapes = {k: v.shape for k, v in tree_flatten(tower.parameters())}
    assert shapes["embeddings.patch_embedding.weight"] == (1152, 14, 14, 3)
    assert shapes["embeddings.position_embedding.weight"] == (4096, 1152)
    assert shapes["encoder.layers.26.self_attn.q_proj.weight"] == (1152, 1152)
    assert shapes["encoder.layers.26.self_attn.out_proj.bias"] == (1152,)
    assert shapes["encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["post_layernorm.bias"] == (1152,)
    assert "encoder.layers.27.mlp.fc1.weight" not in shapes
    assert len(shapes) == 3 + 27 * 16 + 2
    assert sum(int(np.prod(s)) for s in shapes.values()) == 416_866_032  # as transformers counts SiglipVisionModel without its head
    pshapes = {k: v.shape for k, v in tree_flatten(projector.parameters())}
    assert pshapes == {"mm_input_projection_weight": (1152, 2560), "mm_soft_emb_norm.weight": (1152,)}
    assert (projector.patches_per_side, projector.tokens_per_side) == (64, 16)


def test_projector_refuses_uneven_pooling():
    with pytest.raises(ValueError, match="pool"):
        Projector(ModelConfig.from_dict({"model_type": "gemma3", "mm_tokens_per_image": 200}))


def test_recorded_prompt_layouts_are_consistent(tiny):
    # The full-model fixture (for the multimodal integration): ids, token types and image order agree.
    config, _, ref = tiny
    layouts = json.loads((TINY / "prompts.json").read_text())["prompts"]
    T = config.mm_tokens_per_image
    block = [108, config.boi_token_index] + [config.image_token_index] * T + [config.eoi_token_index, 108]
    for name, p in layouts.items():
        ids = ref[f"{name}.input_ids"][0]
        assert ids.tolist() == p["ids"]
        assert np.array_equal(ref[f"{name}.token_type_ids"][0], (ids == config.image_token_index).astype(np.int32))
        assert ref[f"{name}.images"].tolist() == p["images"]
        starts = [i for i in range(len(ids)) if ids[i : i + len(block)].tolist() == block]
        assert len(starts) == len(p["images"])
        assert ref[f"{name}.logits"].shape == (1, len(ids), config.text.vocab_size)
        assert ref[f"{name}.mask_global"].shape == ref[f"{name}.mask_local"].shape == (len(ids), len(ids))


@pytest.mark.parametrize("prefix", ["vision_tower.vision_model.", "vision_tower."])  # transformers 4 / 5 names
def test_a_checkpoint_with_siglips_pooling_head_loads_and_matches(tmp_path, prefix):
    """vision_use_head: true (transformers' SigLIP default) adds a pooling head Gemma 3 never uses: it is dropped."""
    import shutil
    import warnings

    from gemma3_mlx.convert import convert
    from gemma3_mlx.loader import load_model

    src = tmp_path / "with_head"
    shutil.copytree(TINY, src)
    config = json.loads((TINY / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = True
    (src / "config.json").write_text(json.dumps(config))
    D, hidden = config["vision_config"]["hidden_size"], config["vision_config"]["intermediate_size"]
    rng = np.random.default_rng(0)
    head = {"probe": (1, 1, D), "attention.in_proj_weight": (3 * D, D), "attention.in_proj_bias": (3 * D,),
            "attention.out_proj.weight": (D, D), "attention.out_proj.bias": (D,), "layernorm.weight": (D,),
            "layernorm.bias": (D,), "mlp.fc1.weight": (hidden, D), "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (D, hidden), "mlp.fc2.bias": (D,)}
    weights = dict(mx.load(str(TINY / "model.safetensors")))
    weights.update({prefix + "head." + k: mx.array(rng.normal(size=s).astype(np.float32)) for k, s in head.items()})
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    ref = {k: np.array(v) for k, v in mx.load(str(TINY / "ref.safetensors")).items()}
    ids = mx.array(ref["one_image.input_ids"])
    pixels = mx.array(ref["pixels_nhwc"][:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer in the tiny checkpoint
        convert(src, tmp_path / "out", dtype="float32")
    for d in (src, tmp_path / "out"):  # loaded as it is, and converted
        out = np.array(forward.logits(load_model(d, dtype="float32"), ids, pixels=pixels))
        assert np.abs(out - ref["one_image.logits"]).max() <= 1e-4


def test_preprocess_image_feeds_the_model_as_documented():
    """The README's lines: `pixels, n = preprocess_image(...)`, then `forward.logits(model, input_ids, pixels=pixels)`."""
    from gemma3_mlx import preprocess_image
    from gemma3_mlx.loader import load_model

    model = load_model(TINY, dtype="float32")
    ref = {k: np.array(v) for k, v in mx.load(str(TINY / "ref.safetensors")).items()}
    input_ids = mx.array(ref["one_image.input_ids"])
    pixels, n = preprocess_image(FIXTURES / "images" / "rgb.png", model.config)
    assert n == 0 and pixels.shape == (1, 56, 56, 3)
    logits = forward.logits(model, input_ids, pixels=pixels)
    assert logits.shape == (1, input_ids.shape[1], 320)
    # The picture preprocessed independently, here: Pillow's bilinear resize to 56x56, scaled to [-1, 1], the
    # recipe of transformers' Gemma3ImageProcessor (which gives test_image.py's recorded pixels exactly).
    from PIL import Image

    mine = Image.open(FIXTURES / "images" / "rgb.png").convert("RGB").resize((56, 56), Image.BILINEAR)
    mine = mx.array((np.asarray(mine, np.float32) / 127.5 - 1)[None])
    assert np.abs(np.array(logits) - np.array(forward.logits(model, input_ids, pixels=mine))).max() < 1e-5
    other, _ = preprocess_image(FIXTURES / "images" / "wide.png", model.config)
    assert np.abs(np.array(logits) - np.array(forward.logits(model, input_ids, pixels=other))).max() > 1e-3  # the image counts
