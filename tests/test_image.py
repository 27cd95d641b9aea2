"""Image loading, pan & scan and preprocessing against transformers' recorded Gemma3ImageProcessor."""

import io
import json
import struct
import zlib

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from gemma3_mlx.config import ModelConfig
from gemma3_mlx.errors import ConfigError, Gemma3Error
from gemma3_mlx.image import ImageError, image_prompt_text, load_image, pan_and_scan_crops, preprocess_image

from conftest import FIXTURES

IMAGES = FIXTURES / "images"
REF = {k: np.array(v) for k, v in mx.load(str(IMAGES / "ref_pixels.safetensors")).items()}
CROPS = json.loads((IMAGES / "ref_crops.json").read_text())
SIZE = CROPS["image_size"]
NAMES = ["rgb", "rgba", "la", "gray", "gray16", "palette", "palette_trns", "cmyk", "wide", "tall"]
PAS = dict(min_crop_size=256, max_crops=4, min_ratio=1.2)


def _path(name):
    return IMAGES / f"{name}.{'tiff' if name == 'cmyk' else 'png'}"


def _pil(name):
    return Image.open(io.BytesIO(_path(name).read_bytes()))  # no file handle to leak


def _ref(name, pas):
    n = int(REF[f"{name}.pas.num_crops" if pas else f"{name}.num_crops"][0])
    pixels = REF[f"{name}.pas"] if f"{name}.pas" in REF else REF[name]
    return pixels if pas else pixels[:1], n


@pytest.mark.parametrize("pas", [False, True], ids=["plain", "pan_and_scan"])
@pytest.mark.parametrize("name", NAMES)
def test_pixels_match_reference(name, pas):
    want, want_crops = _ref(name, pas)
    got, crops = preprocess_image(_path(name), SIZE, pan_and_scan=pas, **PAS)
    assert crops == want_crops
    assert isinstance(got, mx.array) and got.dtype == mx.float32  # what model(..., pixel_values=) takes
    got = np.array(got)
    assert got.shape == want.shape == (1 + crops, SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= 1e-6  # measured: 0.0 for every image (README: "exactly")
    assert -1.0 <= got.min() and got.max() <= 1.0


@pytest.mark.parametrize("name, n", [("wide", 3), ("tall", 3), ("rgb", 0)])
def test_pan_and_scan_crops_the_wide_and_tall_images(name, n):
    """Our crops of the fixture images: as many as the reference made (3 of the wide and the tall one,
    none of the plain one), and our boxes, cut from the image, are the reference's crop pixels."""
    got, crops = preprocess_image(_path(name), SIZE, pan_and_scan=True, **PAS)
    want, want_crops = _ref(name, True)
    assert crops == want_crops == n
    im = _pil(name)
    boxes = pan_and_scan_crops(*im.size, **PAS)
    assert len(boxes) == n
    for box, pixels in zip(boxes, want[1:]):  # each crop alone, preprocessed: the reference's crop
        crop = np.array(preprocess_image(im.convert("RGB").crop(box), SIZE)[0])[0]
        assert np.abs(crop - pixels).max() <= 1e-6


def test_inputs_as_bytes_pil_and_model_config():
    cfg = ModelConfig.from_dict({"model_type": "gemma3", "vision_config": {"image_size": SIZE}})
    want, _ = _ref("rgba", False)
    for source in (_path("rgba"), str(_path("rgba")), _path("rgba").read_bytes(), _pil("rgba")):
        got, crops = preprocess_image(source, cfg)
        assert crops == 0 and np.abs(np.array(got) - want).max() <= 1e-6


def test_text_only_config_is_refused():
    cfg = ModelConfig.from_dict({"model_type": "gemma3_text"})
    with pytest.raises(ConfigError, match="vision"):
        preprocess_image(_path("rgb"), cfg)


def test_fixtures_tell_the_choices_apart():
    """The recorded pixels would catch dropping alpha instead of compositing on white, or another filter."""
    want, _ = _ref("rgba", False)
    dropped = _pil("rgba").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    assert np.abs(np.asarray(dropped) / 127.5 - 1 - want).max() > 0.5
    want, _ = _ref("rgb", False)
    bicubic = _pil("rgb").resize((SIZE, SIZE), Image.BICUBIC)
    assert np.abs(np.asarray(bicubic) / 127.5 - 1 - want).max() > 0.05


@pytest.mark.parametrize("case", CROPS["crops"], ids=lambda c: f"{c['width']}x{c['height']}")
def test_crop_boxes_match_reference(case):
    opts = (case["min_crop_size"], case["max_crops"], case["min_ratio"])
    assert pan_and_scan_crops(case["width"], case["height"], *opts) == [tuple(b) for b in case["boxes"]]


@pytest.mark.parametrize(
    "w,h,n",
    [(1000, 1000, 0), (1199, 1000, 0), (1200, 1000, 2), (1920, 1080, 2), (3000, 1000, 3), (4000, 1000, 4),
     (500, 300, 0), (2480, 3508, 2)],
)
def test_spec_crop_counts(w, h, n):
    boxes = pan_and_scan_crops(w, h)
    assert len(boxes) == n
    if boxes:  # non-overlapping and covering the image exactly
        assert sum((r - l) * (b - t) for l, t, r, b in boxes) == w * h


def test_prompt_text_matches_reference():
    for n, text in CROPS["prompt_text"].items():
        assert image_prompt_text(int(n)) == text
    assert image_prompt_text(2, "<img>") == (
        "Here is the original image <img> and here are some crops to help you see better <img> <img>"
    )


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((32, 64, 3), np.uint8)
    rgb[:, :32] = (255, 0, 0)  # left half red, right half blue
    rgb[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the left half ends up on top
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (32, 64)
    top, bottom = np.asarray(im)[:28].mean((0, 1)), np.asarray(im)[36:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _raises_one_line(source, match):
    with pytest.raises(ImageError, match=match) as e:
        load_image(source)
    assert isinstance(e.value, Gemma3Error) and "\n" not in str(e.value)


def test_bad_images(tmp_path):
    _raises_one_line(tmp_path / "missing.png", "not found")
    _raises_one_line(tmp_path, "not an image file")
    (tmp_path / "notes.png").write_text("not an image at all\n")
    _raises_one_line(tmp_path / "notes.png", "not an image")
    data = _path("rgb").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    _raises_one_line(tmp_path / "half.png", "truncated")
    buf = io.BytesIO()
    _pil("rgb").save(buf, "JPEG")
    _raises_one_line(buf.getvalue()[: len(buf.getvalue()) // 2], "truncated")
    _raises_one_line(_png_header(100_000, 100_000), "too large")
    _raises_one_line(Image.new("RGB", (0, 0)), "empty")
    _raises_one_line(12345, "expected an image path")


def test_pillow_pixel_limit_is_an_error(monkeypatch):
    # 300x200 = 60000 pixels: Pillow only warns between 1x and 2x its limit, and errors above.
    opened = _pil("rgb")
    for limit in (40_000, 20_000):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        _raises_one_line(_path("rgb"), "too large")
        _raises_one_line(opened, "too large")


def test_one_pixel_image_is_refused():
    # The reference would stretch the single pixel over the whole frame; we refuse it clearly.
    _raises_one_line(_path("tiny"), "too small")
    _raises_one_line(Image.new("RGB", (1, 50)), "too small")
