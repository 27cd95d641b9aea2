"""What the `gemma3` command says and how: one-line errors, notes and warnings on stderr, colour only on a
terminal, progress bars, and Typer's usage errors as one `error:` line. No command lives here."""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager

import typer

from .._signals import raise_on_terminate
from ..errors import Gemma3Error

# Usage metavars as click writes them: Typer's own are type tags (`<int range>`) and `{prompt}`.
METAVARS = {"int": "INTEGER", "int range": "INTEGER", "float": "NUMBER", "float range": "NUMBER", "str": "TEXT",
            "path": "PATH", "file": "PATH", "directory": "PATH"}


class App(typer.Typer):
    """The Typer app, with plain help (no boxes, no type tags) and a usage error as one `error:` line."""

    def __call__(self, args=None):
        raise_on_terminate()  # SIGTERM/SIGHUP run the cleanups (a conversion's temporary directory goes)
        command = typer.main.get_command(self)
        for sub in command.commands.values():
            for p in sub.params:
                _plain_metavar(p)
        try:
            code = command.main(args, standalone_mode=False)
        except typer.Abort:
            code = 130
        except typer.TyperException as e:  # click's usage errors, as Typer vendors them
            if type(e).__name__ == "NoArgsIsHelpError":  # `gemma3` alone: the help
                e.show()
            else:
                message = e.format_message().rstrip(".").replace("Input should be", "it must be")
                ctx = getattr(e, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                error(message[:1].lower() + message[1:] + hint)
            code = getattr(e, "exit_code", 2)
        sys.exit(code if isinstance(code, int) else 0)


def _plain_metavar(p) -> None:
    tag = p.display_type(None).strip("<>")  # "int range"
    if tag.lower().startswith("list[") and tag.endswith("]"):  # a repeatable option: one value's type
        tag = tag[5:-1].lower()
    label = METAVARS.get(tag, tag.upper())
    if p.param_type_name == "argument":
        p.metavar = p.name.upper()
        p.display_type_rich = lambda ctx: ""
        p._usage_display_name = lambda: p.metavar if p.required else f"[{p.metavar}]"
    elif not getattr(p, "is_flag", False):
        p.display_type_rich = lambda ctx: label


class UI:
    """How much to say on stderr, and whether in colour (None: only where the stream is a terminal)."""

    quiet = False
    color: bool | None = False if os.environ.get("NO_COLOR") else None


def note(message: str, **style) -> None:
    """A line for the user on stderr (progress, statistics), unless --quiet."""
    if not UI.quiet:
        typer.secho(message, err=True, color=UI.color, **style)


@contextmanager
def status(message: str):
    """A transient line on a terminal while something slow runs (loading a model), erased after;
    nothing where stderr is a pipe or a file, or with --quiet."""
    shown = not UI.quiet and sys.stderr.isatty()
    if shown:
        typer.secho(message, err=True, nl=False, dim=True, color=UI.color)
        sys.stderr.flush()
    try:
        yield
    finally:
        if shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _labelled(label: str, message, **style) -> None:
    """One line on stderr: a coloured label, then the plain message."""
    typer.secho(label, err=True, nl=False, color=UI.color, **style)
    typer.echo(str(message), err=True)


def _warn(message, *args, **kwargs) -> None:
    if not UI.quiet:
        _labelled("warning: ", message, fg="yellow")


QuietOpt = typer.Option(False, "--quiet", help="Print only the output (and errors): no progress, notes or warnings.")


def set_quiet(quiet: bool) -> None:
    UI.quiet = quiet
    if quiet:
        from huggingface_hub.utils import disable_progress_bars  # third-party, needed only with --quiet

        disable_progress_bars()


def error(message: str) -> None:
    _labelled("error: ", message, fg="red", bold=True)


def fail(message: str, code: int = 1):
    error(message)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""
    try:
        yield
    except Gemma3Error as e:
        fail(" ".join(str(e).split()))
    except (ValueError, OSError, RecursionError, MemoryError) as e:
        fail(error_text(e))
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)


def error_text(e: BaseException) -> str:
    """A user error as one line; a full disk says so, whatever was being written."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full: could not write {e.filename or 'the output'}; free some space and try again"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, RecursionError):
        return "too deeply nested"
    if isinstance(e, MemoryError):
        return "not enough memory"
    return " ".join(str(e).split()) or type(e).__name__


class Progress:
    """A progress bar on stderr for conversions (tensors done / total)."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int) -> None:
        if UI.quiet:
            return
        if self.bar is None:
            self.bar = typer.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)
        if done >= total:
            self.bar.__exit__(None, None, None)


def speculation(s) -> str:
    """', drafts: 61% accepted, 2.4 tokens per target step' while speculating, else ''."""
    if s is None or not s.target_steps:
        return ""
    return f", drafts: {s.acceptance:.0%} accepted, {s.tokens_per_step:.1f} tokens per target step"
