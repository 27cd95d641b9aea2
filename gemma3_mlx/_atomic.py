"""Writing beside the user's files: temporary names that say whose they are, and atomic replacement.

A directory is built under a temporary name beside its destination, `.NAME.<pid>.<hex>.tmp`, then
renamed into place. Replacing swaps the two in one system call (Linux `renameat2(RENAME_EXCHANGE)`,
macOS `renamex_np(RENAME_SWAP)`), so OUT holds the old or the new model at every moment; where the
file system cannot swap, two renames run with signals held and the old one waits as
`.NAME.<pid>.<hex>.old` until the new one is in place. Whatever a killed process left (its pid gone,
or older than a week) is cleaned up by the next writer to the same place: a temporary is removed,
an old model whose replacement never arrived is put back.

Only a directory we wrote may be replaced: it holds MARKER and nothing but the files of a converted
model. Nothing here deletes anything else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MARKER = ".gemma3-mlx"  # in every directory we convert into: what --force may replace
_OURS = re.compile(r"^(config\.json|tokenizer\.model|model(-\d{5}-of-\d{5})?\.safetensors|"
                   r"model\.safetensors\.index\.json|shard-\d{5}\.safetensors|\.gemma3-mlx)$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$")
STALE_SECONDS = 7 * 24 * 3600  # a pid that old may belong to another process by now


def temp_name(name: str, kind: str = "tmp") -> str:
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def make_temp_dir(parent: Path, name: str) -> Path:
    """A fresh `.NAME.<pid>.<hex>.tmp` directory in `parent`, with ordinary permissions (the umask's),
    after sweeping what dead writers left there for the same NAME."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent, name)
    tmp = parent / temp_name(name)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def sweep(parent: Path, name: str | None = None) -> list[Path]:
    """Clean up after writers that were killed (SIGKILL, power loss) while writing into `parent`
    (for destination `name` only, when given): the entries cleaned up."""
    done = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return done
    for p in entries:
        m = _TEMP.match(p.name)
        if not m or (name is not None and m["name"] != name) or int(m["pid"]) == os.getpid():
            continue
        try:
            age = time.time() - p.lstat().st_mtime
        except OSError:
            continue
        if _alive(int(m["pid"])) and age < STALE_SECONDS:
            continue
        out = p.parent / m["name"]
        try:
            if m["kind"] == "old" and not out.exists() and not out.is_symlink():
                os.rename(p, out)  # killed between the two renames: the old model goes back
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        done.append(p)
    return done


def why_not_replace(out: Path) -> str | None:
    """None when `out` may be replaced (it does not exist, is empty, or is a model we converted and
    holds nothing else); otherwise why not, as the end of a sentence."""
    if out.is_symlink():
        return "is a symbolic link"
    if not out.exists():
        return None
    if not out.is_dir():
        return "is a file, not a model directory"
    try:
        entries = sorted(os.listdir(out))
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not entries:
        return None
    others = [e for e in entries if not _OURS.match(e)]
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"holds files gemma3-mlx did not write ({', '.join(others[:3])}{more})"
    if MARKER not in entries:
        return f"was not written by gemma3-mlx (it has no {MARKER} file)"
    return None


def output_problem(out: Path, force: bool, keep=()) -> str | None:
    """Why a conversion may not write `out` (None: it may). `keep`: paths (the source) that must
    stay untouched, so `out` may neither be one of them nor contain one."""
    out = Path(out).expanduser()
    target = out.resolve()
    for k in keep:
        k = Path(k).expanduser()
        if not k.exists():
            continue
        k = k.resolve()
        if k == target:
            return f"{out} is the source: choose another output directory"
        if target in k.parents:
            return f"{out} contains the source {k}: choose another output directory"
    if out.exists() or out.is_symlink():
        if not force:
            return f"{out} already exists (use --force to replace a model converted by gemma3-mlx)"
        why = why_not_replace(out)
        if why:
            return f"{out} {why}; --force only replaces a model converted by gemma3-mlx: remove it yourself or choose another -o"
    return None


def write_marker(directory: Path, **info) -> None:
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "gemma3-mlx", **info}) + "\n")


# ------------------------------------------------------------------ renames

AT_FDCWD = -100
_NOREPLACE, _EXCHANGE = 1, 2  # renameat2 flags (Linux)
_SWAP, _EXCL = 2, 4  # renamex_np flags (macOS)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """The atomic rename with `flags` (Linux numbering); False where the system cannot do it."""
    fs = os.fsencode
    if sys.platform.startswith("linux") and _LIBC is not None and hasattr(_LIBC, "renameat2"):
        r = _LIBC.renameat2(AT_FDCWD, fs(str(src)), AT_FDCWD, fs(str(dst)), flags)
    elif sys.platform == "darwin" and _LIBC is not None and hasattr(_LIBC, "renamex_np"):
        r = _LIBC.renamex_np(fs(str(src)), fs(str(dst)), _SWAP if flags == _EXCHANGE else _EXCL)
    else:
        return False
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 45, 95):  # EINVAL, ENOSYS, ENOTSUP/EOPNOTSUPP: this file system cannot
        return False
    raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (main thread, POSIX)."""
    held = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished directory `tmp` to `out`. Without `replace`, an `out` that appeared
    meanwhile (another conversion) raises FileExistsError; with it, the old `out` is swapped out
    in one step and deleted."""
    if not replace or not (out.exists() or out.is_symlink()):
        try:
            if not _rename_flags(tmp, out, _NOREPLACE):
                if out.exists() or out.is_symlink():
                    raise FileExistsError(17, "File exists", str(out))
                os.rename(tmp, out)  # a directory in the way that is not empty makes this fail too
        except OSError as e:
            if e.errno in (17, 39, 66):  # EEXIST, ENOTEMPTY (Linux, macOS)
                raise FileExistsError(17, "File exists", str(out)) from None
            raise
        return
    if _rename_flags(tmp, out, _EXCHANGE):  # tmp now holds the old model
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / temp_name(out.name, "old")
    with signals_held():  # SIGKILL between the two: the next writer's sweep puts the old one back
        os.rename(out, old)
        os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def replace_file(path: Path, data: bytes | str) -> None:
    """Write a file through a temporary beside it and a rename: a full disk or a crash leaves the
    previous content whole."""
    path = Path(path)
    tmp = path.parent / temp_name(path.name)
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
