"""Fetch a Hugging Face hub checkpoint by name: only the files a conversion reads, with progress.

Used only when the user names a hub model (`gemma3 convert google/gemma-3-1b-it -o ...`);
nothing else in gemma3-mlx touches the network. Never fetches pickle (`*.bin`, `*.pt`) files.
Every failure is one complete sentence: what went wrong and what to do.
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConversionError
from ..names import looks_like_hub_id  # noqa: F401  (names.py owns what a hub id is; re-exported)

ALLOW = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.model"]


def _sentence(repo_id: str, e: BaseException) -> str:
    """One complete sentence for a failed hub request."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    elsewhere = "download it elsewhere and pass the directory"
    if isinstance(e, GatedRepoError):
        return (f"{repo_id} is gated on the Hugging Face hub: accept its license on huggingface.co/{repo_id} "
                "and log in with `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return f"no model {repo_id} on the Hugging Face hub (or it is private: log in with `hf auth login`)"
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id} has no such revision on the Hugging Face hub"
    if isinstance(e, LocalEntryNotFoundError):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            return f"HF_HUB_OFFLINE is set, so {repo_id} cannot be fetched from the Hugging Face hub; unset it or {elsewhere}"
        return f"cannot reach the Hugging Face hub (no network?) to fetch {repo_id}; {elsewhere}"
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return (f"the Hugging Face hub answered {status or 'with an error'} for {repo_id}; try again later, "
                f"or {elsewhere}")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full: {repo_id} could not be downloaded into the Hugging Face cache; free some space"
    if isinstance(e, OSError) and e.errno is not None:
        return f"could not download {repo_id} ({e.strerror}); {elsewhere}"
    return f"cannot reach the Hugging Face hub (no network?) to fetch {repo_id}; {elsewhere}"


def _hub_errors():
    """What a hub request can raise besides OSError: the HTTP client's network errors."""
    errors = [OSError, ValueError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def _quiet_retries():
    """huggingface-hub logs each retry of a failed request as a warning: the failure is reported once, by us."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` (cached by huggingface-hub between calls)."""
    from huggingface_hub import snapshot_download

    try:
        with _quiet_retries():
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW))
    except _hub_errors() as e:
        raise ConversionError(_sentence(repo_id, e)) from None


def fetch_config(repo_id: str, revision: str | None = None) -> Path:
    """The directory holding `repo_id`'s config.json, fetching only that file (a few KB)."""
    from huggingface_hub import hf_hub_download

    try:
        with _quiet_retries():
            return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
    except _hub_errors() as e:
        raise ConversionError(_sentence(repo_id, e)) from None
