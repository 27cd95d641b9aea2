"""Every example runs, on the default model, and prints what the reference predicts."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_generate_example(gemma3_home):
    meta = json.loads((FIXTURES / "ref_270m.json").read_text())
    env = {**os.environ, "GEMMA3_MLX_HOME": str(gemma3_home)}
    r = subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), meta["greedy_prompt"]],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    text, stats = r.stdout.rsplit("\n[", 1)
    assert text.startswith(" the capital of the country of France.") and len(text) > 80
    assert "32 generated" in stats and "finish: length" in stats
