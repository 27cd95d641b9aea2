"""Reading the small files a user points at, with bounds: `read_bytes` and `read_json`.

A path is checked before a byte is read: it must be a regular file (a FIFO would block forever,
/dev/zero never end, a directory fail obscurely) no larger than the caller's limit, so a 3 GB file
given as an image or a config costs one `stat`, not 3 GB of memory. JSON that nests deeper than
Python's recursion limit is refused like any other malformed JSON. Weights are not read here:
safetensors_io.py and the GGUF reader map them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFileError


def read_bytes(path: str | Path, limit: int, what: str = "a file", error=ModelFileError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `error(message)` otherwise. `what`: "an image file"."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        raise error(f"{p}: {e.strerror or 'cannot read it'}") from None
    if p.is_dir():
        raise error(f"{p}: is a directory, not {what}")
    if not p.is_file():
        raise error(f"{p}: not a regular file (a device, FIFO or socket), not {what}")
    if st.st_size > limit:
        raise error(f"{p}: {st.st_size:,} bytes is too large for {what} (at most {limit:,})")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{p}: {e.strerror or 'cannot read it'}") from None
    if len(data) > limit:  # it grew since the stat
        raise error(f"{p}: too large for {what} (at most {limit:,} bytes)")
    return data


def read_json(path: str | Path, limit: int = 16 << 20, what: str = "a JSON file", error=ModelFileError):
    """A small JSON file's value; `error(message)` if it is missing, too large or not JSON."""
    data = read_bytes(path, limit, what, error)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
