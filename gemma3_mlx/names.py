"""What a model argument names: a local path or a Hugging Face hub id, decided without any I/O beyond
looking at the disk, so a mistyped path never becomes a network request.

Anything that exists, starts with `.`, `/` or `~`, ends in `.gguf`, or whose first component exists
(`models/x` when ./models exists) is local. A hub id is `org/name` in the hub's characters that is
not local. Shared by the resolver (models.py) and the converter (convert/sources.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(model: str) -> bool:
    """A path, not a name: it exists, starts with `.`, `/` or `~`, ends in .gguf, or its first
    component exists (`models/x` when ./models exists)."""
    p = Path(model).expanduser()
    if p.exists() or p.is_symlink() or model.startswith((".", "/", "~", os.sep)) or model.lower().endswith(".gguf"):
        return True
    parts = Path(model).parts
    return len(parts) > 1 and Path(parts[0]).exists()


def looks_like_hub_id(name: str) -> bool:
    """`org/name` with the hub's characters, that is not a local path."""
    parts = name.split("/")
    ok = lambda s: bool(s) and s[0].isalnum() and all(c.isalnum() or c in "-_." for c in s)  # noqa: E731
    return len(parts) == 2 and all(ok(s) for s in parts) and ".." not in name and not looks_local(name)
