"""Prompts with images: soft-token blocks, pan & scan wording, markers, and CLI refusals."""

import numpy as np
import pytest

import gemma3_mlx  # noqa: F401

from conftest import FIXTURES, gemma3
from gemma3_mlx.config import ModelConfig
from gemma3_mlx.prompt import build_prompt
from gemma3_mlx.tokenizer import Tokenizer

IMAGES = FIXTURES / "images"
CFG = ModelConfig.from_dict({"model_type": "gemma3", "mm_tokens_per_image": 16,
                             "vision_config": {"image_size": 56, "patch_size": 7},
                             "text_config": {"hidden_size": 64, "num_hidden_layers": 7}})


@pytest.fixture(scope="module")
def tok(tokenizer_270m):
    return Tokenizer(tokenizer_270m, boi_token_index=255999, eoi_token_index=256000,
                     image_token_index=262144)


def runs(ids, token):
    """Lengths of the runs of `token` in ids."""
    out, n = [], 0
    for t in ids + [None]:
        if t == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def some_image():
    return next(p for p in sorted(IMAGES.iterdir()) if p.suffix in (".png", ".jpg"))


def test_one_image_block_in_chat(tok):
    ids, blocks = build_prompt(tok, [{"role": "user", "content": "Describe this."}], CFG, [some_image()])
    assert runs(ids, 262144) == [16] and len(blocks) == 1 and blocks[0].shape == (56, 56, 3)
    i = ids.index(255999)
    assert ids[i + 17] == 256000 and ids.count(2) == 1  # boi, 16 soft tokens, eoi; one BOS
    assert ids[i + 18] == 108 and tok.decode(ids[i + 18 :]).startswith("\n\nDescribe this.")  # "\n\n" after eoi
    assert ids[-3:] == tok.generation_prompt_ids()


def test_markers_place_images_and_pan_and_scan_adds_crops(tok):
    wide = IMAGES / "wide.png" if (IMAGES / "wide.png").exists() else next(IMAGES.glob("wide*"))
    msgs = [{"role": "user", "content": "Compare <start_of_image> with <start_of_image> please"}]
    ids, blocks = build_prompt(tok, msgs, CFG, [wide, some_image()], pan_and_scan=True)
    n_crops = len(blocks) - 2
    assert n_crops >= 2 and runs(ids, 262144) == [16] * len(blocks)
    text = tok.decode(ids)
    assert "Here is the original image" in text and "and here are some crops to help you see better" in text
    assert text.index("Compare") < text.index("Here is") < text.index("with") < text.index("please")


def test_image_count_must_match_markers(tok):
    msgs = [{"role": "user", "content": "<start_of_image><start_of_image> two?"}]
    with pytest.raises(ValueError, match="marks 2 images"):
        build_prompt(tok, msgs, CFG, [some_image()])
    text_only = ModelConfig.from_dict({"model_type": "gemma3_text"})
    with pytest.raises(ValueError, match="cannot see images"):
        build_prompt(tok, "hi", text_only, [some_image()])


def test_raw_prompt_with_image(tok):
    ids, blocks = build_prompt(tok, "A photo of", CFG, [some_image()])
    assert ids[0] == 2 and runs(ids, 262144) == [16] and len(blocks) == 1


@pytest.mark.parametrize("bad", ["missing.png", "not_an_image", "one_pixel.png", "truncated.png"])
def test_cli_bad_image_is_one_clean_line(bad, tmp_path):
    """Refused before any model is needed: an empty GEMMA3_MLX_HOME, where the default model is not converted yet."""
    path = tmp_path / bad
    if bad == "not_an_image":
        path.write_text("hello")
    elif bad == "one_pixel.png":
        path.write_bytes((IMAGES / "tiny.png").read_bytes())
    elif bad == "truncated.png":
        data = (IMAGES / "rgb.png").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    r = gemma3(["generate", "hi", "--image", path], home=tmp_path / "home")
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "home" / "models").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
