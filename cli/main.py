"""The `gemma3` command: each command parses its arguments and calls one library function.

User errors (bad paths, files, configs, values) print one line on stderr and exit 1; Typer's
own usage errors exit 2; Ctrl-C exits 130. Programming errors still show a traceback.
Output goes to stdout, everything else (progress, notes, warnings, errors) to stderr, coloured
only on a terminal (and never with NO_COLOR set); `--quiet` keeps only the output and errors.
"""

from __future__ import annotations

import atexit
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer

# The runtime is imported with the package (gemma3_mlx/__init__.py), so these cost nothing extra;
# only the converter (gguf, ~80 ms) is imported inside the commands that use it.
from ..cache import kv_bytes
from ..chat import ChatSession
from ..errors import Gemma3Error
from ..generate import stream_generate
from ..image import load_image
from ..loader import load, load_config
from ..models import DEFAULT_MODEL, cache_dir, models_dir, remove, resolve
from ..prompt_cache import PromptCache

# Usage metavars as click writes them: Typer's own are type tags (`<int range>`) and `{prompt}`.
METAVARS = {"int": "INTEGER", "int range": "INTEGER", "float": "NUMBER", "float range": "NUMBER", "str": "TEXT",
            "path": "PATH", "file": "PATH", "directory": "PATH"}


class App(typer.Typer):
    """The Typer app, with plain help (no boxes, no type tags) and a usage error as one `error:` line."""

    def __call__(self, args=None):
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
    label = METAVARS.get(tag, tag.upper())
    if p.param_type_name == "argument":
        p.metavar = p.name.upper()
        p.display_type_rich = lambda ctx: ""
        p._usage_display_name = lambda: p.metavar if p.required else f"[{p.metavar}]"
    elif not getattr(p, "is_flag", False):
        p.display_type_rich = lambda ctx: label


app = App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help and errors: no boxes
    help="Run Google's Gemma 3 models on your own machine, with MLX.",
)


class UI:
    """How much to say on stderr, and whether in colour (None: only where the stream is a terminal)."""

    quiet = False
    color: bool | None = False if os.environ.get("NO_COLOR") else None


def note(message: str, **style) -> None:
    """A line for the user on stderr (progress, statistics), unless --quiet."""
    if not UI.quiet:
        typer.secho(message, err=True, color=UI.color, **style)


def _labelled(label: str, message, **style) -> None:
    """One line on stderr: a coloured label, then the plain message."""
    typer.secho(label, err=True, nl=False, color=UI.color, **style)
    typer.echo(str(message), err=True)


def _warn(message, *args, **kwargs) -> None:
    if not UI.quiet:
        _labelled("warning: ", message, fg="yellow")


@app.callback()
def setup():
    """Run Google's Gemma 3 models on your own machine, with MLX."""
    warnings.showwarning = _warn  # library warnings (e.g. a checkpoint without a tokenizer): one line each


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
        fail(str(e))
    except (ValueError, OSError) as e:
        fail(" ".join(str(e).split()) or type(e).__name__)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130)


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


def resolve_model(model: Optional[str]) -> Path:
    label = "Converting the default model (first use only)" if model is None else f"Converting {model}"
    return resolve(model, progress=Progress(label), note=note)


KINDS = {True: "instruction-tuned", False: "base", None: "unknown"}


def warn_if_base(path: Path, config, advice: str) -> None:
    """One line when a base model is about to be used as a chat model. `advice` names {it}, a model to use instead."""
    if config.instruction_tuned is False:
        it = "-m google/gemma-3-270m-it" if path.name == DEFAULT_MODEL else "an instruction-tuned (-it) model"
        _warn(f"{path.name} is a base model: it continues text, it does not chat; " + advice.format(it=it))


ModelOpt = typer.Option(None, "--model", "-m", help="Model directory, .gguf file, converted model name or hub id "
                                                     "(default: Gemma 3 270M).")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt; - reads it from standard input."),
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System instructions (chat format only)."),
    stats: bool = typer.Option(False, "--stats", help="Print speed, peak memory and KV bytes to stderr."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0, help="Penalize recent tokens (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    raw: bool = typer.Option(False, "--raw", help="No chat template (for base models such as the default one)."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image to show the model (repeatable)."),
    pan_and_scan: bool = typer.Option(False, "--pan-and-scan", help="Also show crops of large or non-square images."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32 or bfloat16 (default: by device)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller Gemma 3 guessing ahead (speculative "
                                              "decoding: the same output, faster when its guesses hold)."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Speculate by copying from the prompt (summaries, "
                                                                      "edits, quotes): the same output."),
    quiet: bool = QuietOpt,
):
    """Stream a completion of PROMPT.

    Example: gemma3 generate --raw "The capital of France is"

    With a vision model: gemma3 generate -m gemma-3-4b-it-mlx --image photo.jpg "What is in this picture?"
    """
    set_quiet(quiet)
    with user_errors():
        if image:
            image = [load_image(p) for p in image]  # fail fast, before loading the model
        path = resolve_model(model)
        model_obj, tokenizer = load(path, dtype=dtype)
        if tokenizer is None:
            fail("the model has no tokenizer.model")
        if not raw:
            warn_if_base(path, model_obj.config, "add --raw, or use {it}")
        draft = load(resolve_model(draft_model), dtype=dtype)[0] if draft_model else None
        if prompt == "-":
            prompt = sys.stdin.read()
        text = prompt if raw else ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        for r in stream_generate(
            model_obj, tokenizer, text, max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, images=image or None,
            pan_and_scan=pan_and_scan, draft_model=draft, prompt_lookup=prompt_lookup,
        ):
            sys.stdout.write(r.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats:
            typer.secho(f"prompt {r.prompt_tokens} tokens at {r.prompt_tps:.1f} tok/s, generated {r.generation_tokens} "
                        f"at {r.generation_tps:.2f} tok/s, peak memory {r.peak_memory_gb:.2f} GB, "
                        f"KV cache {r.kv_bytes / 1e6:.1f} MB, finish: {r.finish_reason}{speculation(r.stats)}",
                        err=True, dim=True, color=UI.color)


def speculation(s) -> str:
    """', drafts: 61% accepted, 2.4 tokens per target step' while speculating, else ''."""
    if s is None or not s.target_steps:
        return ""
    return f", drafts: {s.acceptance:.0%} accepted, {s.tokens_per_step:.1f} tokens per target step"


@app.command()
def convert(
    source: str = typer.Argument(..., help="Hugging Face model directory, hub id (org/name) or .gguf file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --force)."),
    bits: Optional[int] = typer.Option(None, "--bits", "-q", help="Quantize every matrix to 2, 3, 4, 5, 6 or 8 bits."),
    group_size: int = typer.Option(64, "--group-size", help="Values per quantization group: 32, 64 or 128."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Mixed precision: small, balanced or quality (see README)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Float storage: float32 or bfloat16 (a GGUF is then dequantized)."),
    rtn: bool = typer.Option(False, "--rtn", help="Plain round-to-nearest instead of the clipping search."),
    quantize_vision: bool = typer.Option(False, "--quantize-vision", help="Also quantize the vision tower's linear layers to 8 bits."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the quality check against the source."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    quiet: bool = QuietOpt,
):
    """Convert a checkpoint into an MLX model directory, and report its size and quality loss.

    A GGUF keeps its own block bits unless --bits, --recipe or --dtype is given.

    Example: gemma3 convert google/gemma-3-1b-it -o gemma-3-1b-it-4bit --recipe balanced
    """
    from ..convert import convert as run  # lazy: see the imports at the top

    set_quiet(quiet)
    with user_errors():
        r = run(source, out, dtype=dtype, bits=bits, group_size=group_size, recipe=recipe,
                method="rtn" if rtn else "search", force=force, check=not no_check, quantize_vision=quantize_vision,
                progress=Progress("Converting"))
        for fmt, n in sorted(r.formats.items()):
            note(f"  {n:4d} x {fmt}")
        typer.echo(f"{r.out}: {r.n_params / 1e6:.1f}M parameters, {r.n_bytes / 1e6:.1f} MB, {r.bits_per_weight:.2f} bits per weight")
        if r.quality:
            print_quality(r.quality)


def print_quality(q: dict) -> None:
    typer.echo(f"quality vs source ({q['tokens']} tokens): KL divergence {q['kl']:.5f}, top-1 agreement {100 * q['top1']:.1f}%")


@app.command()
def check(
    model: str = typer.Argument(..., help="Converted model directory."),
    reference: str = typer.Option(..., "--reference", "-r", help="The float source: HF directory, .gguf file or float MLX directory."),
):
    """Measure a converted model's quality loss against its source (KL divergence, top-1 agreement).

    Example: gemma3 check gemma-3-1b-it-4bit --reference gemma-3-1b-it
    """
    from ..convert import check as run  # lazy: see the imports at the top

    with user_errors():
        print_quality(run(model, reference))

def _describe(path: Path) -> tuple[str, float, str]:
    """(architecture, size in MB, precision) of a model directory."""
    c = load_config(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
    q = c.quantization
    if q:
        bits = sorted({int(v["bits"]) for v in q.values() if isinstance(v, dict)} | {int(q["bits"])})
        precision = "/".join(map(str, bits)) + "-bit"
    else:
        precision = "float"
    kind = f"{c.text.num_hidden_layers} layers, hidden {c.text.hidden_size}" + (", vision" if c.vision else "")
    return kind, size, precision


@app.command()
def models():
    """List the converted models in the cache, with size and precision.

    Example: gemma3 models
    """
    with user_errors():
        root = models_dir()
        found = sorted(p for p in root.glob("*") if (p / "config.json").exists()) if root.exists() else []
        where = "$GEMMA3_MLX_HOME/models" if os.environ.get("GEMMA3_MLX_HOME") else "set GEMMA3_MLX_HOME to move it"
        if not found:
            typer.echo(f"no converted models in {root} ({where}) yet (the default model is converted on first use)")
        total = 0.0
        for p in found:
            kind, size, precision = _describe(p)
            tuned = KINDS[load_config(p).instruction_tuned]
            typer.echo(f"{p.name:40s} {size:9.1f} MB  {precision:10s} {tuned:17s}  {kind}")
            total += size
        if found:
            typer.echo(f"{len(found)} model{'s' * (len(found) != 1)}, {total:.1f} MB, in {root} ({where}); "
                       "gemma3 rm NAME deletes one")


@app.command()
def rm(name: str = typer.Argument(..., help="A converted model's name, as `gemma3 models` lists it.")):
    """Delete a converted model from the cache.

    Example: gemma3 rm gemma-3-270m-it-q8
    """
    with user_errors():
        freed = remove(name)
        typer.echo(f"removed {name} ({freed / 1e6:.1f} MB)")


@app.command()
def info(model: Optional[str] = typer.Argument(None, help="Model directory or .gguf file (default: Gemma 3 270M).")):
    """Show a model's configuration, layer kinds, quantization, size and KV-cache memory.

    Example: gemma3 info gemma-3-1b-it-q5
    """
    with user_errors():
        path = resolve_model(model)
        c = load_config(path)
        t = c.text
        kind, size, precision = _describe(path)
        pattern = "".join("L" if local else "G" for local in t.is_local)
        typer.echo(f"path            {path}")
        typer.echo(f"type            {c.model_type} ({'text and images' if c.vision else 'text'})")
        typer.echo(f"kind            {KINDS[c.instruction_tuned]}" + {
            True: " (chat format)", False: " (plain continuation: use generate --raw)", None: ""}[c.instruction_tuned])
        typer.echo(f"layers          {t.num_hidden_layers}: {pattern} (L local window {t.sliding_window}, G global)")
        typer.echo(f"hidden / heads  {t.hidden_size} / {t.num_attention_heads} q, {t.num_key_value_heads} kv, head_dim {t.head_dim}")
        typer.echo(f"vocabulary      {t.vocab_size}")
        typer.echo(f"weights         {size:.1f} MB, {precision}")
        for ctx in sorted({8192, 32768, t.max_position_embeddings}):
            typer.echo(f"KV at {ctx // 1024:>3d}K     {kv_bytes(c, ctx) / 2**30:.2f} GiB 16-bit "
                       f"({kv_bytes(c, ctx, full=True) / 2**30:.2f} GiB if every layer kept the full context)")


@app.command()
def bench(
    model: Optional[str] = ModelOpt,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1, help="Prompt length."),
    gen_tokens: int = typer.Option(32, "--gen-tokens", min=2, help="Tokens to generate."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs (min and median are shown)."),
    context: int = typer.Option(0, "--context", min=0, help="Tokens already in the cache before the prompt "
                                                             "(speed at that depth; not timed)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the global KV cache to 4 or 8 bits."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Measure with this draft model speculating."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Measure with prompt-lookup speculation."),
    quiet: bool = QuietOpt,
):
    """Measure prefill and decode speed, time to first token, peak memory and KV bytes.

    Example: gemma3 bench --prompt-tokens 1024 --gen-tokens 64 --context 8192
    """
    from ..convert.quality import TEXT  # lazy: see the imports at the top

    set_quiet(quiet)
    with user_errors():
        model_obj, tokenizer = load(resolve_model(model))
        limit = model_obj.config.text.max_position_embeddings
        if context + prompt_tokens + gen_tokens > limit:
            fail(f"--context + --prompt-tokens + --gen-tokens is {context + prompt_tokens + gen_tokens}, "
                 f"more than the model's context of {limit}")
        draft = load(resolve_model(draft_model))[0] if draft_model else None
        base = tokenizer.encode(TEXT, add_bos=False) if tokenizer else list(range(10, 400))
        n_ids = context + prompt_tokens
        ids = [2] + (base * (n_ids // len(base) + 1))[: n_ids - 1]
        rows = []
        for _ in range(repeats):
            pc = PromptCache(model_obj, kv_bits=kv_bits)
            if context:
                pc.prefill(ids[:context])  # the conversation so far: not timed
            mx.reset_peak_memory()
            for last in stream_generate(model_obj, tokenizer, ids, cache=pc, max_tokens=gen_tokens, stop_ids=(),
                                        draft_model=draft, prompt_lookup=prompt_lookup):
                pass
            s = last.stats
            rows.append((s.prompt_tps, s.generation_tps, s.prompt_time, mx.get_peak_memory() / 1e9, pc.nbytes,
                         s.acceptance, s.tokens_per_step))
        depth = f" after {context} tokens of context" if context else ""
        typer.echo(f"{prompt_tokens} prompt tokens{depth}, {gen_tokens} generated, {repeats} runs (min / median)")
        for i, (label, fmt) in enumerate([("prefill tok/s", "{:.1f}"), ("decode tok/s", "{:.2f}"),
                                          ("first token s", "{:.3f}"), ("peak memory GB", "{:.2f}")]):
            col = [r[i] for r in rows]
            typer.echo(f"{label:16s} {fmt.format(min(col))} / {fmt.format(statistics.median(col))}")
        typer.echo(f"{'KV cache MB':16s} {rows[-1][4] / 1e6:.1f}")
        if draft is not None or prompt_lookup:
            typer.echo(f"{'drafts accepted':16s} {min(r[5] for r in rows):.0%} / {statistics.median(r[5] for r in rows):.0%}")
            typer.echo(f"{'tokens per step':16s} {min(r[6] for r in rows):.2f} / {statistics.median(r[6] for r in rows):.2f}")


CHAT_HELP = '''commands: /image PATH  /system TEXT  /retry  /undo  /reset  /save FILE  /load FILE  /stats  /show
          /set NAME VALUE (temp, top-k, top-p, min-p, repetition-penalty, max-tokens, seed)  /help  /quit
"""  starts a message of several lines; """ again ends it. Ctrl-C stops a reply; Ctrl-D quits.'''

# /set names, as the flags spell them, and the type each takes.
SET_NAMES = {"temp": "temp", "temperature": "temp", "top-k": "top_k", "top-p": "top_p", "min-p": "min_p",
             "repetition-penalty": "repetition_penalty", "max-tokens": "max_tokens", "seed": "seed"}
SET_TYPES = {"temp": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
             "max_tokens": int, "seed": int}


def _settings_text(session) -> str:
    s = session.settings
    return ", ".join(f"{flag} {'none' if s[key] is None else s[key]}" for flag, key in SET_NAMES.items()
                     if flag != "temperature")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System instructions (folded into the first turn)."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image for the first message (repeatable)."),
    pan_and_scan: bool = typer.Option(False, "--pan-and-scan", help="Also show crops of large or non-square images."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temp: float = typer.Option(0.0, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(0.0, "--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0, help="Penalize recent tokens (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the session once: the same seed, the same session."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller Gemma 3 guessing ahead (speculative "
                                              "decoding: the same replies, faster when its guesses hold)."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Speculate by copying from the conversation."),
    quiet: bool = QuietOpt,
):
    """Chat with a model. Each turn processes only its new tokens; piped input is one message per line.

    Example: gemma3 chat -m gemma-3-1b-it-q5 --system "Answer briefly."
    """
    interactive = sys.stdin.isatty()
    set_quiet(quiet)
    with user_errors():
        pending = [str(p) for p in image or []]
        if pending:
            for p in pending:  # fail fast, before loading the model
                load_image(p)
        path = resolve_model(model)
        note(f"loading {path.name} ...", dim=True)
        model_obj, tokenizer = load(path)
        if tokenizer is None:
            fail("the model has no tokenizer.model")
        if pending and model_obj.config.vision is None:
            fail(f"{path.name} is a text-only model: it cannot see images")
        warn_if_base(path, model_obj.config, "chat with {it}, or continue a text with gemma3 generate --raw")
        draft = load(resolve_model(draft_model))[0] if draft_model else None
        session = ChatSession(model_obj, tokenizer, system=system, pan_and_scan=pan_and_scan, draft_model=draft,
                              prompt_lookup=prompt_lookup,
                              max_tokens=max_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    prompt, more = "", ""
    if interactive:
        prompt, more = ">>> ", "... "
        try:
            import readline  # line editing and history for input()

            _keep_history(readline)
            if UI.color is not False and sys.stdout.isatty():  # \001..\002: zero-width for readline
                prompt = "\001\x1b[1;32m\002>>> \001\x1b[0m\002"
        except ImportError:
            pass
        note("gemma3 chat: /help for commands, Ctrl-D to quit", dim=True)
    while True:
        try:
            line = read_message(prompt, more)
        except EOFError:
            if interactive:
                typer.echo("", err=True)
            raise typer.Exit(0)
        except KeyboardInterrupt:
            typer.echo("", err=True)
            continue
        if not line:
            continue
        replies = None
        with user_errors_kept():
            if line.startswith("/"):
                replies, pending = chat_command(session, path, line, pending)
            else:
                replies = session.send(line, images=pending)
                pending = []
            if replies is not None:
                stream_reply(session, replies)
                r, limit = session.last, model_obj.config.text.max_position_embeddings
                if r is not None and r.prompt_tokens + r.generation_tokens > 0.9 * limit:
                    _warn(f"the conversation uses {r.prompt_tokens + r.generation_tokens} of "
                          f"{limit} context tokens; /reset or /undo to make room")


def read_message(prompt: str, more: str) -> str:
    """One message: a line, or the lines between a line opening with \"\"\" and one ending with it."""
    line = input(prompt).strip()
    if not line.startswith('"""'):
        return line
    text = line[3:]
    if text.endswith('"""'):  # """one line"""
        return text[:-3].strip()
    lines = [text]
    while True:
        line = input(more)
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(line)


def _exchanges(session) -> int:
    return sum(m["role"] == "user" for m in session.messages)


def chat_command(session, path: Path, line: str, pending: list):
    """Run one /command; (replies to stream or None, the images waiting for the next message)."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        raise typer.Exit(0)
    elif cmd == "/help":
        typer.echo(CHAT_HELP)
    elif cmd == "/reset":
        n = _exchanges(session)
        session.reset()
        note(f"cleared the conversation ({n} exchange{'s' * (n != 1)}); the system prompt is kept", dim=True)
    elif cmd == "/undo":
        n = session.undo()
        note("nothing to undo: the conversation is empty" if n is None else f"removed the last exchange ({n} tokens)",
             dim=True)
    elif cmd == "/retry":
        if session.greedy and session.messages:
            note("temperature 0 is greedy decoding: the same reply again (/set temp 0.7 to sample)", dim=True)
        return session.retry(), pending
    elif cmd == "/system":
        session.system = arg or None
        note(f"system prompt set: {arg}" if arg else "system prompt removed", dim=True)
    elif cmd == "/image":
        if session.model.config.vision is None:
            raise ValueError(f"{path.name} is a text-only model: it cannot see images")
        if not arg:
            raise ValueError("/image needs a file: /image PATH")
        load_image(arg)
        note(f"{arg} goes with your next message", dim=True)
        return None, pending + [arg]
    elif cmd == "/save":
        if not arg:
            raise ValueError(f"/save needs a file name, e.g. /save chat-{time.strftime('%Y%m%d-%H%M')}.json")
        session.save(arg)
        n = _exchanges(session)
        note(f"saved {n} exchange{'s' * (n != 1)} to {Path(arg).expanduser().resolve()}", dim=True)
    elif cmd == "/load":
        if not arg:
            raise ValueError("/load needs a file name: /load FILE")
        session.load(arg)
        n = _exchanges(session)
        note(f"loaded {n} exchange{'s' * (n != 1)} from {arg}" + ("; the last one:" if n else ""), dim=True)
        last_user = max((i for i, m in enumerate(session.messages) if m["role"] == "user"), default=None)
        for m in session.messages[last_user:] if last_user is not None else []:
            typer.echo(("you: " if m["role"] == "user" else "model: ") + m["content"])
    elif cmd == "/set":
        name, _, value = arg.partition(" ")
        key = SET_NAMES.get(name.lower().replace("_", "-"))
        if key is None or not value.strip():
            raise ValueError(f"usage: /set NAME VALUE, NAME one of {', '.join(SET_NAMES)}")
        value = value.strip()
        try:
            parsed = None if key == "seed" and value.lower() == "none" else SET_TYPES[key](value)
        except ValueError:
            raise ValueError(f"{name} takes {'an integer' if SET_TYPES[key] is int else 'a number'}, "
                             f"not {value!r}") from None
        session.set(**{key: parsed})
        note(f"{name} set to {value}", dim=True)
    elif cmd == "/show":
        typer.echo(f"model     {path}")
        typer.echo(f"system    {session.system or '(none)'}")
        typer.echo(f"settings  {_settings_text(session)}")
    elif cmd == "/stats":
        print_chat_stats(session)
    else:
        error(f"unknown command {cmd} (/help lists them)")
    return None, pending


def print_chat_stats(session) -> None:
    """The last reply's figures (while it is still in the conversation), then the conversation's size."""
    r = session.last
    if r is not None:
        typer.secho(f"prompt {r.prompt_tokens} tokens ({r.prefill_tokens} processed, "
                    f"{r.prompt_tps:.1f} tok/s), reply {r.generation_tokens} tokens "
                    f"({r.generation_tps:.1f} tok/s), KV cache {r.kv_bytes / 1e6:.1f} MB, "
                    f"peak memory {r.peak_memory_gb:.2f} GB{speculation(r.stats)}", dim=True, color=UI.color)
    n = _exchanges(session)
    limit = session.model.config.text.max_position_embeddings
    typer.secho(f"conversation {n} exchange{'s' * (n != 1)}, {session.count_tokens()} of {limit} context tokens",
                dim=True, color=UI.color)


def _keep_history(readline) -> None:
    """Up-arrow history across chats, in the cache directory (best effort: a read-only home is fine)."""
    path = cache_dir() / "chat_history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


@contextmanager
def user_errors_kept():
    """In the chat loop: report a user error in one line and carry on."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, OSError, Gemma3Error) as e:
        error(" ".join(str(e).split()))


def stream_reply(session, replies) -> None:
    said = False
    try:
        for r in replies:
            said = True
            sys.stdout.write(r.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        session.cancel()
        replies.close()  # the partial reply stays in the conversation
        typer.secho(" [stopped]" if said else "[stopped before the reply began: the turn was taken back]",
                    err=True, dim=True, color=UI.color)
    sys.stdout.write("\n")
    sys.stdout.flush()


def main():
    app()


if __name__ == "__main__":
    main()
