"""Every example runs, on the default model (describe_image.py on a tiny seeing one), and prints what the
reference predicts. In this process (conftest.python_script: the script's __main__ with its own argv and
streams), except kv_memory.py, run as a real `python examples/kv_memory.py` process."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, python_script

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_generate_example(gemma3_home):
    meta = json.loads((FIXTURES / "ref_270m.json").read_text())
    r = python_script(EXAMPLES / "generate.py", [meta["greedy_prompt"]], home=gemma3_home)
    assert r.returncode == 0, r.stderr
    text, stats = r.stdout.rsplit("\n[", 1)
    assert text.startswith(" the capital of the country of France.") and len(text) > 80
    assert "32 generated" in stats and "finish: length" in stats


def test_kv_memory_example_prints_the_readme_table():
    r = subprocess.run([sys.executable, str(EXAMPLES / "kv_memory.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    readme = (EXAMPLES.parent / "README.md").read_text()
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 4B") or line.startswith("| 27B")]
    assert len(rows) == 6 and all(row in readme for row in rows)  # the README shows exactly these numbers
    assert "| 27B | 128K | 62.00 GiB | 10.41 GiB |" in r.stdout


def test_chat_example_reuses_the_first_turn(gemma3_home):
    r = python_script(EXAMPLES / "chat.py", home=gemma3_home)
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(stats) == 2
    total2, processed2 = (int(w) for w in stats[1].strip("[]").split()[0:5:3])
    assert processed2 < total2


def test_convert_example(tmp_path):
    r = python_script(EXAMPLES / "convert_and_check.py", [FIXTURES / "tiny_v5", tmp_path / "q4", "32"])
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stdout and "KL" in r.stdout and (tmp_path / "q4" / "config.json").exists()


def test_describe_image_example(tokenizer_270m, tmp_path):
    """On a tiny model with the real tokenizer and a tiny vision tower (what is checked is the script:
    its output, pan & scan's crops, a missing file; the 270M with eyes runs in test_chat, test_server
    and test_page)."""
    from conftest import give_eyes
    from gemma3_mlx import preprocess_image
    from test_server import make_tiny

    seeing_dir = give_eyes(make_tiny(tokenizer_270m, tmp_path / "tiny-text"), tmp_path / "tiny-seeing")
    wide = FIXTURES / "images" / "wide.png"
    crops = preprocess_image(wide, 56, pan_and_scan=True)[1]
    assert crops > 0
    tokens = {}
    for extra in ([], ["--pan-and-scan"]):
        r = python_script(EXAMPLES / "describe_image.py", [seeing_dir, wide, *extra])
        assert r.returncode == 0, r.stderr
        text, stats = r.stdout.rsplit("\n[", 1)
        assert text.strip() and "generated" in stats
        tokens[bool(extra)] = int(stats.split()[0])
    assert tokens[True] - tokens[False] > 16 * crops  # each crop adds a 16-token image block and its wording
    r = python_script(EXAMPLES / "describe_image.py", [seeing_dir, tmp_path / "no.jpg"])
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
