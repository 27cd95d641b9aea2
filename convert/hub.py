"""Fetch a Hugging Face hub checkpoint by name: only the files a conversion reads, with progress.

Used only when the user names a hub model (`gemma3 convert google/gemma-3-1b-it -o ...`);
nothing else in gemma3-mlx touches the network. Never fetches pickle (`*.bin`, `*.pt`) files.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConversionError

ALLOW = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` (cached by huggingface-hub between calls)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW))
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id}: no such model on the Hugging Face hub (or it needs a login: `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConversionError(f"{repo_id}: download failed ({' '.join(str(e).split())[:200]})") from None
