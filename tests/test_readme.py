"""The README's tour, run as written: every shell command and the Python API block.

The hub is a local stand-in (HF_HUB_OFFLINE with a prepared cache, the real code path of
huggingface-hub): `google/gemma-3-270m-it` serves a tiny float32 Gemma 3 with the real 270M's tokenizer
(test_server.make_tiny, random weights, widths that quantize at 8 bits in groups of 64) and
`google/gemma-3-4b-it` another such tiny model with a tiny vision tower (`give_eyes`); `photo.jpg` is a test
image. The tour's first command runs the real default model (converted once per run by conftest). What
is checked is that every command and block runs as written and says what it should; what the real
weights generate is checked by the tests of each feature (test_cli, test_chat, test_vlm, ...), so the
hub's stand-ins are tiny: the ten processes on the float32 270M took ~5 CPU-minutes, now ~1.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, give_eyes

README = (Path(__file__).parent.parent / "README.md").read_text()
ROOT = Path(__file__).parent.parent


def tour(lang: str) -> list[str]:
    section = README.split("## Tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def commands() -> list[str]:
    lines = [line for block in tour("bash") for line in block.splitlines() if line.strip()]
    return [re.split(r"\s{2,}# ", line)[0] for line in lines]


def fake_hub(root: Path, repos: dict) -> Path:
    """A huggingface-hub cache holding `repos` (id -> directory), as a finished download leaves it."""
    for repo_id, src in repos.items():
        storage = root / "hub" / ("models--" + repo_id.replace("/", "--"))
        commit = "0" * 40
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(commit)
        snap = storage / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            (snap / f.name).symlink_to(f.resolve())
    return root


@pytest.fixture(scope="module")
def tour_env(gemma3_home, tokenizer_270m, tmp_path_factory):
    from PIL import Image

    from test_server import make_tiny

    tmp = tmp_path_factory.mktemp("tour")
    home = tmp / "home"
    (home / "models").mkdir(parents=True)  # the tour's own cache, holding the default model
    (home / "models" / "gemma-3-270m").symlink_to(gemma3_home / "models" / "gemma-3-270m", target_is_directory=True)
    it = make_tiny(tokenizer_270m, tmp / "tiny-it", hidden_size=64, intermediate_size=128)
    seeing = give_eyes(make_tiny(tokenizer_270m, tmp / "tiny-text", seed=1), tmp / "tiny-seeing")
    hub = fake_hub(tmp / "hf", {"google/gemma-3-270m-it": it, "google/gemma-3-4b-it": seeing})
    work = tmp / "work"
    (work / "examples").mkdir(parents=True)
    for f in (ROOT / "examples").glob("*.py"):
        (work / "examples" / f.name).symlink_to(f)
    Image.open(FIXTURES / "images" / "wide.png").convert("RGB").save(work / "photo.jpg")
    env = {**os.environ, "GEMMA3_MLX_HOME": str(home), "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return work, env


def test_the_tour_has_what_the_issue_asks_for():
    cmds = " ; ".join(commands())
    for what in ("gemma3 chat", "--image", "gemma3 convert google/", "| gemma3 chat", "gemma3 bench", "gemma3 models",
                 "gemma3 info", "describe_image.py"):
        assert what in cmds
    api = "".join(tour("python"))
    for what in ("load(", "stream_generate(", "ChatSession(", ".send(", ".retry(", ".save(", "images="):
        assert what in api


def test_readme_tour_runs_as_written(tour_env):
    work, env = tour_env
    outputs = {}
    for cmd in commands():
        t0 = time.time()
        r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, input="Hi\n", capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, cmd
        assert r.stdout.strip(), cmd
        outputs[cmd] = r
        print(f"{time.time() - t0:6.1f} s  {cmd}")  # shown with pytest -s
    convert = next(r for c, r in outputs.items() if c.startswith("gemma3 convert"))
    assert "bits per weight" in convert.stdout and "KL divergence" in convert.stdout
    first = next(r for c, r in outputs.items() if "--stats" in c)
    assert "tok/s" in first.stderr and "peak memory" in first.stderr
    piped = next(r for c, r in outputs.items() if c.startswith("printf"))
    assert piped.stderr == "" and len([line for line in piped.stdout.splitlines() if line.strip()]) >= 2
    models = next(r for c, r in outputs.items() if c.startswith("gemma3 models"))
    assert "google--gemma-3-4b-it" in models.stdout and "gemma-3-270m" in models.stdout
    info = next(r for c, r in outputs.items() if c.startswith("gemma3 info"))
    assert "text and images" in info.stdout


def api_blocks() -> list[str]:
    """Every ```python block of the README, in order: later sections go on from the tour's (its `model`
    is the seeing stand-in for google/gemma-3-4b-it, so the image section runs on it)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    # Not the ones that need another process: a running server (its client is examples/openai_client.py,
    # run by test_server) or mlx.launch's ranks (run by test_distributed).
    return [b for b in blocks if "OpenAI(" not in b and "distributed.init" not in b]


def test_readme_python_api_runs_as_written(tour_env):
    work, env = tour_env
    if not (work / "gemma-3-270m-it-q8").exists():  # made by the tour's convert command when it ran first
        cmd = next(c for c in commands() if c.startswith("gemma3 convert"))
        subprocess.run(["bash", "-c", cmd], cwd=work, env=env, check=True, capture_output=True, timeout=600)
    blocks = api_blocks()
    assert len(blocks) >= 4 and "Engine(" in blocks[1] and "PromptCache(" in "".join(blocks)
    code = "\n".join(blocks)
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokens processed]" in r.stdout and (work / "conversation.json").exists()
    assert (work / "doc.safetensors").exists()
    finished = [line for line in r.stdout.splitlines() if line.endswith(" tok/s") and "'" in line]
    assert len(finished) >= 2  # the engine section: both sequences ended with a reason
    vocab = 262144
    assert "(1, " in r.stdout and f", {vocab})" in r.stdout  # the image section's logits
