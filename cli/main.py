"""The `gemma3` command: each command parses its arguments and calls one library function.

User errors (bad paths, files, configs, values) print one line on stderr and exit 1; Typer's
own usage errors exit 2; Ctrl-C exits 130. Programming errors still show a traceback.
Output goes to stdout, everything else (progress, notes, warnings, errors) to stderr, coloured
only on a terminal (and never with NO_COLOR set); `--quiet` keeps only the output and errors.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import typer

# The runtime is imported with the package (gemma3_mlx/__init__.py), so these cost nothing extra;
# only the converter (gguf, ~80 ms) is imported inside the commands that use it.
from .. import distributed
from ..cache import kv_bytes
from ..chat import ChatSession
from ..generate import stream_generate
from ..image import load_image
from ..loader import Checkpoint, load, load_config
from ..memory import DoesNotFit, describe, ensure_fits, gb, machine_memory, needs
from ..adapters import AdapterError, check_name
from ..errors import Gemma3Error
from ..models import DEFAULT_MODEL, damaged, list_models, looks_like_hub_id, models_dir, remove, resolve
from ..prompt_cache import PromptCache
from ..constrain import vocabulary as constraint_vocabulary
from ..settings import DEFAULT, Sampling
from ..shard import OnPaper, Plan
from . import chat as chat_loop
from .parallel import open_parallel, quiet_other_ranks, read_on_rank0, report_ranks, shared_stdin
from .ui import App, Progress, QuietOpt, UI, _warn, fail, note, set_quiet, speculation, status, user_errors

app = App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help and errors: no boxes
    help="Run Google's Gemma 3 models on your own machine, with MLX.",
)


@app.callback()
def setup():
    """Run Google's Gemma 3 models on your own machine, with MLX."""
    warnings.showwarning = _warn  # library warnings (e.g. a checkpoint without a tokenizer): one line each
    quiet_other_ranks(sys.argv[1:])  # under mlx.launch --parallel: rank 0 alone speaks


def resolve_model(model: Optional[str]) -> Path:
    label = "Converting the default model (first use only)" if model is None else f"Converting {model}"
    return resolve(model, progress=Progress(label), note=note)


def open_model(path: Path, **options):
    """load(path), saying so on a terminal; a cached model that fails to load is reported as damaged,
    with the command that removes it. config.json and the weight headers are read once, for both steps."""
    with status(f"loading {path.name} ..."):
        try:
            checkpoint = Checkpoint.read(path)
            ensure_fits(path, dtype=options.get("dtype"), checkpoint=checkpoint)  # before loading: one line, not a machine swapping to a halt
            return load(checkpoint, **options)
        except (DoesNotFit, AdapterError):
            raise
        except (Gemma3Error, ValueError, OSError) as e:
            raise damaged(path, e) from None


KINDS = {True: "instruction-tuned", False: "base", None: "unknown"}


def warn_if_base(path: Path, config, advice: str) -> None:
    """One line when a base model is about to be used as a chat model. `advice` names {it}, a model to use instead."""
    if config.instruction_tuned is False:
        it = "-m google/gemma-3-270m-it" if path.name == DEFAULT_MODEL else "an instruction-tuned (-it) model"
        _warn(f"{path.name} is a base model: " + advice.format(it=it))


ModelOpt = typer.Option(None, "--model", "-m", help="Model directory, .gguf file, converted model name or hub id "
                                                     "(default: Gemma 3 270M).")
AdapterOpt = typer.Option(None, "--adapter", help="A LoRA adapter directory (PEFT or mlx-lm) to run on the model, unmerged.")


def no_parallel_adapter(parallel, adapter) -> None:
    if parallel and adapter:
        fail("--adapter does not run split across processes (--parallel); fuse it: gemma3 convert --adapter")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt; - reads it from standard input."),
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System instructions (chat format only)."),
    stats: bool = typer.Option(False, "--stats", help="Print speed, peak memory and KV bytes to stderr."),
    max_tokens: int = typer.Option(DEFAULT.max_tokens, "--max-tokens", "-n", min=1, help="Most tokens to generate."),
    temp: float = typer.Option(DEFAULT.temp, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(DEFAULT.top_k, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(DEFAULT.top_p, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(DEFAULT.min_p, "--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability."),
    repetition_penalty: float = typer.Option(DEFAULT.repetition_penalty, "--repetition-penalty", min=0.0, help="Penalize recent tokens (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="End the output before this text; it is not printed "
                                             "(repeatable)."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", metavar="FILE|JSON",
                                              help="Output JSON matching this schema (a file, or the schema itself)."),
    regex: Optional[str] = typer.Option(None, "--regex", metavar="PATTERN", help="Output matching this regular expression."),
    grammar: Optional[str] = typer.Option(None, "--grammar", metavar="FILE", help="Output matching this grammar "
                                          "(Lark, or llama.cpp GBNF)."),
    raw: bool = typer.Option(False, "--raw", help="No chat template (for base models such as the default one)."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image to show the model (repeatable)."),
    pan_and_scan: bool = typer.Option(False, "--pan-and-scan", help="Also show crops of large or non-square images."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: float32 or bfloat16 (default: by device)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller Gemma 3 guessing ahead (speculative "
                                              "decoding: the same output, faster when its guesses hold)."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Speculate by copying from the prompt (summaries, "
                                                                      "edits, quotes): the same output."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="tensor or pipeline: one model across the "
                                           "processes mlx.launch starts (see the README)."),
    adapter: Optional[Path] = AdapterOpt,
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
        # checked before loading: a bad value, schema or grammar is one line
        settings = Sampling(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                            seed=seed, max_tokens=max_tokens, stop=tuple(stop or ()),
                            constraint=chat_loop.constraint_from_options(json_schema, regex, grammar))
        if settings.constraint is not None:
            settings.constraint.compiled  # a syntax error is one line before the model loads
        no_parallel_adapter(parallel, adapter)
        group = None
        if parallel:
            group, path, model_obj, tokenizer = open_parallel(model, parallel, resolve_model, dtype,
                                                              speculating=bool(draft_model or prompt_lookup))
        else:
            path = resolve_model(model)
            model_obj, tokenizer = open_model(path, dtype=dtype, adapter=adapter)
        if tokenizer is None:
            fail("the model has no tokenizer.model")
        if not raw:
            warn_if_base(path, model_obj.config, "it continues text, it does not chat; add --raw, or use {it}")
        draft = open_model(resolve_model(draft_model), dtype=dtype)[0] if draft_model else None
        if prompt == "-":
            prompt = shared_stdin(group)
        text = prompt if raw else ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        if settings.constraint is not None:
            settings.constraint.check(constraint_vocabulary(tokenizer, model_obj.config.text.vocab_size))
        for r in stream_generate(model_obj, tokenizer, text, settings=settings, images=image or None,
                                 pan_and_scan=pan_and_scan, draft_model=draft, prompt_lookup=prompt_lookup):
            sys.stdout.write(r.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stats:
            typer.secho(f"prompt {r.prompt_tokens} tokens at {r.prompt_tps:.1f} tok/s, generated {r.generation_tokens} "
                        f"at {r.generation_tps:.2f} tok/s, peak memory {r.peak_memory_gb:.2f} GB, "
                        f"KV cache {r.kv_bytes / 1e6:.1f} MB, finish: {r.finish_reason}{speculation(r.stats)}",
                        err=True, dim=True, color=UI.color)
            if group is not None:
                report_ranks(group, model_obj, r.kv_bytes)


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
    calibrate: bool = typer.Option(False, "--calibrate", help="Round with the float model's activations on calibration text (GPTQ)."),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help="Calibration text: a text or JSONL file (default: built in)."),
    calibration_tokens: int = typer.Option(8192, "--calibration-tokens", help="Calibration tokens to use."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Merge this LoRA adapter (PEFT or mlx-lm) into "
                                           "the float weights before quantizing."),
    quiet: bool = QuietOpt,
):
    """Convert a checkpoint into an MLX model directory, and report its size and quality loss.

    A GGUF keeps its own block bits unless --bits, --recipe or --dtype is given.

    Example: gemma3 convert google/gemma-3-1b-it -o gemma-3-1b-it-4bit --recipe balanced
    """
    from ..convert import convert as run  # lazy: see the imports at the top

    set_quiet(quiet)
    calibration = None
    if calibrate or calibration_data is not None:
        calibration = {"data": calibration_data, "tokens": calibration_tokens, "progress": Progress("Calibrating")}
    with user_errors(), status(f"reading {source} ..."):  # on a terminal at once; the progress bar takes over
        r = run(source, out, dtype=dtype, bits=bits, group_size=group_size, recipe=recipe,
                method="rtn" if rtn else "search", force=force, check=not no_check, quantize_vision=quantize_vision,
                progress=Progress("Converting"), calibration=calibration, adapter=adapter)
        for fmt, n in sorted(r.formats.items()):
            note(f"  {n:4d} x {fmt}")
        typer.echo(f"{r.out}: {r.n_params / 1e6:.1f}M parameters, {r.n_bytes / 1e6:.1f} MB, {r.bits_per_weight:.2f} bits per weight")
        if r.calibration:
            c = r.calibration
            note(f"calibrated on {c['tokens']} tokens ({c['source']}) in {c['seconds']:.0f} s; "
                 f"peak memory {c['peak_rss_mb']:.0f} MB")
        if r.quality:
            print_quality(r.quality)
            if r.calibration:
                typer.echo("  (held out: that text was not used for calibration)" if r.calibration["held_out"]
                           else "  (not held out: the calibration data contains that text)")


def print_quality(q: dict) -> None:
    typer.echo(f"quality vs source ({q['tokens']} tokens): KL divergence {q['kl']:.5f}, top-1 agreement {100 * q['top1']:.1f}%")
    if q.get("layer_error"):
        i = q["worst_layer"]
        note(f"  layer by layer on the float model's activations: worst is layer {i}, "
             f"{100 * q['layer_error'][i]:.1f}% off what it adds (median {100 * statistics.median(q['layer_error']):.1f}%)")


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
        with status(f"running {model} and {reference} on the built-in text ..."):
            quality = run(model, reference)
        print_quality(quality)

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
        found = list_models()
        where = "$GEMMA3_MLX_HOME/models" if os.environ.get("GEMMA3_MLX_HOME") else "set GEMMA3_MLX_HOME to move it"
        if not found:
            typer.echo(f"no converted models in {root} ({where}) yet (the default model is converted on first use)")
        total, good = 0.0, 0
        for p, why in found:  # a damaged model is listed as such, and the listing goes on
            if why is None:
                try:
                    kind, size, precision = _describe(p)
                    tuned = KINDS[load_config(p).instruction_tuned]
                except (Gemma3Error, ValueError, TypeError, KeyError, OSError) as e:
                    why = " ".join(str(e).split())
            if why is not None:
                typer.echo(f"{p.name:40s} damaged: {why} (gemma3 rm {p.name} removes it)")
                continue
            typer.echo(f"{p.name:40s} {size:9.1f} MB  {precision:10s} {tuned:17s}  {kind}")
            total, good = total + size, good + 1
        if found:
            bad = f" and {len(found) - good} damaged" if good < len(found) else ""
            typer.echo(f"{good} model{'s' * (good != 1)}{bad}, {total:.1f} MB, in {root} ({where}); "
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
def info(model: Optional[str] = typer.Argument(None, help="Model directory, .gguf file, converted model name or hub id "
                                                        "(default: Gemma 3 270M)."),
         context: int = typer.Option(8192, "--context", min=1, help="Context for the memory needed to run."),
         kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Global KV cache at 4 or 8 bits (default: 16)."),
         ranks: int = typer.Option(1, "--ranks", min=1, max=64, help="Also show what each of this many machines holds "
                                   "when the model is split across them (--parallel)."),
         parallel: str = typer.Option("tensor", "--parallel", help="With --ranks: tensor or pipeline (layers split "
                                      "evenly).")):
    """Show a model's configuration, layer kinds, quantization, size, KV-cache memory, and the memory it needs
    on this machine to load and to run at --context; with --ranks N, what each of N machines needs.

    A hub id not converted yet is described from its config.json alone (a few KB): nothing else is fetched.

    Example: gemma3 info gemma-3-1b-it-q5
    """
    with user_errors():
        if model is not None and looks_like_hub_id(model) and not (models_dir() / model.replace("/", "--")).is_dir():
            from ..convert.hub import fetch_config  # lazy: see the imports at the top

            path, remote = fetch_config(model), True
        else:
            path, remote = resolve_model(model), False
        c = load_config(path)
        t = c.text
        kind, size, precision = _describe(path)
        pattern = "".join("L" if local else "G" for local in t.is_local)
        typer.echo(f"path            {model + ' (on the Hugging Face hub; not downloaded)' if remote else path}")
        typer.echo(f"type            {c.model_type} ({'text and images' if c.vision else 'text'})")
        typer.echo(f"kind            {KINDS[c.instruction_tuned]}" + {
            True: " (chat format)", False: " (plain continuation: use generate --raw)", None: ""}[c.instruction_tuned])
        typer.echo(f"layers          {t.num_hidden_layers}: {pattern} (L local window {t.sliding_window}, G global)")
        typer.echo(f"hidden / heads  {t.hidden_size} / {t.num_attention_heads} q, {t.num_key_value_heads} kv, head_dim {t.head_dim}")
        typer.echo(f"vocabulary      {t.vocab_size}")
        typer.echo(f"weights         {f'{size:.1f} MB, ' if not remote else ''}{precision}")
        for ctx in sorted({8192, 32768, t.max_position_embeddings}):
            typer.echo(f"KV at {ctx // 1024:>3d}K     {kv_bytes(c, ctx) / 2**30:.2f} GiB 16-bit "
                       f"({kv_bytes(c, ctx, full=True) / 2**30:.2f} GiB if every layer kept the full context)")
        n, have = needs(path, context=context, kv_bits=kv_bits, config=c), machine_memory()
        typer.echo(f"memory to load  {gb(n.to_load)} ({describe(n)})")
        typer.echo(f"memory to run   {gb(n.to_run)} at {context} tokens (+ KV {gb(n.kv)} at {kv_bits or 16} bits, "
                   f"activations {gb(n.activations)})")
        verdict = "fits" if n.to_run <= have else "loads, but not at this context" if n.to_load <= have else "does not fit"
        typer.echo(f"this machine    {gb(have)}: {verdict}")
        if ranks > 1:
            plans = [Plan(c, OnPaper(r, ranks), parallel) for r in range(ranks)]  # a bad mode or split: one line
            typer.echo(f"{f'on {ranks} ranks':16s}{parallel} parallel: what each machine needs (mlx.launch ... "
                       f"--parallel {parallel})")
            for r, plan in enumerate(plans):
                share = needs(path, context=context, kv_bits=kv_bits, config=c, plan=plan)
                typer.echo(f"{f'  rank {r}':16s}to load {gb(share.to_load)}, to run {gb(share.to_run)} "
                           f"(weights {gb(share.weights)}, KV {gb(share.kv)})")


@app.command()
def bench(
    model: Optional[str] = ModelOpt,
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1, help="Prompt length."),
    gen_tokens: int = typer.Option(32, "--gen-tokens", min=2, help="Tokens to generate."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Runs (the best and the median are shown)."),
    context: int = typer.Option(0, "--context", min=0, help="Tokens already in the cache before the prompt "
                                                             "(speed at that depth; not timed)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the global KV cache to 4 or 8 bits."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Measure with this draft model speculating."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Measure with prompt-lookup speculation."),
    adapter: Optional[Path] = AdapterOpt,
    quiet: bool = QuietOpt,
):
    """Measure prefill and decode speed, time to first token, peak memory and KV bytes.

    Example: gemma3 bench --prompt-tokens 1024 --gen-tokens 64 --context 8192
    """
    from ..convert.quality import TEXT  # lazy: see the imports at the top

    set_quiet(quiet)
    with user_errors():
        model_obj, tokenizer = open_model(resolve_model(model), adapter=adapter)
        limit = model_obj.config.text.max_position_embeddings
        if context + prompt_tokens + gen_tokens > limit:
            fail(f"--context + --prompt-tokens + --gen-tokens is {context + prompt_tokens + gen_tokens}, "
                 f"more than the model's context of {limit}")
        draft = open_model(resolve_model(draft_model))[0] if draft_model else None
        vocab = model_obj.config.text.vocab_size  # ids past the embedding are refused
        base = tokenizer.encode(TEXT, add_bos=False) if tokenizer else list(range(10, min(400, vocab)))
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
        # best: the highest speed, the shortest time, the least memory
        typer.echo(f"{prompt_tokens} prompt tokens{depth}, {gen_tokens} generated, {repeats} runs (best / median)")
        for i, (label, fmt, best) in enumerate([("prefill tok/s", "{:.1f}", max), ("decode tok/s", "{:.2f}", max),
                                                ("first token s", "{:.3f}", min), ("peak memory GB", "{:.2f}", min)]):
            col = [r[i] for r in rows]
            typer.echo(f"{label:16s} {fmt.format(best(col))} / {fmt.format(statistics.median(col))}")
        typer.echo(f"{'KV cache MB':16s} {rows[-1][4] / 1e6:.1f}")
        if draft is not None or prompt_lookup:
            typer.echo(f"{'drafts accepted':16s} {max(r[5] for r in rows):.0%} / {statistics.median(r[5] for r in rows):.0%}")
            typer.echo(f"{'tokens per step':16s} {max(r[6] for r in rows):.2f} / {statistics.median(r[6] for r in rows):.2f}")


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System instructions (folded into the first turn)."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="An image for the first message (repeatable)."),
    pan_and_scan: bool = typer.Option(False, "--pan-and-scan", help="Also show crops of large or non-square images."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Most tokens per reply."),
    temp: float = typer.Option(DEFAULT.temp, "--temp", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(DEFAULT.top_k, "--top-k", min=0, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(DEFAULT.top_p, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(DEFAULT.min_p, "--min-p", min=0.0, max=1.0, help="Drop tokens below min-p x the top probability."),
    repetition_penalty: float = typer.Option(DEFAULT.repetition_penalty, "--repetition-penalty", min=0.0, help="Penalize recent tokens (1: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds the session once: the same seed, the same session."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller Gemma 3 guessing ahead (speculative "
                                              "decoding: the same replies, faster when its guesses hold)."),
    prompt_lookup: bool = typer.Option(False, "--prompt-lookup", help="Speculate by copying from the conversation."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="tensor or pipeline: one model across the "
                                           "processes mlx.launch starts (see the README)."),
    adapter: Optional[Path] = AdapterOpt,
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
        no_parallel_adapter(parallel, adapter)
        group = None
        if parallel:
            group, path, model_obj, tokenizer = open_parallel(model, parallel, resolve_model, announce=True,
                                                              speculating=bool(draft_model or prompt_lookup))
        else:
            path = resolve_model(model)
            note(f"loading {path.name} ...", dim=True)
            model_obj, tokenizer = open_model(path, adapter=adapter)
        if tokenizer is None:
            fail("the model has no tokenizer.model")
        if pending and model_obj.config.vision is None:
            fail(f"{path.name} is a text-only model: it cannot see images")
        warn_if_base(path, model_obj.config, "it answers through a transcript; use {it} for real chat")
        draft = open_model(resolve_model(draft_model))[0] if draft_model else None
        settings = Sampling(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                            seed=seed, max_tokens=max_tokens)
        session = ChatSession(model_obj, tokenizer, system=system, pan_and_scan=pan_and_scan, draft_model=draft,
                              prompt_lookup=prompt_lookup, settings=settings)
    read = chat_loop.read_message if group is None else read_on_rank0(chat_loop.read_message, group)
    chat_loop.run(session, path, pending, interactive, read=read)


@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; beyond this machine only with --api-key."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GEMMA3_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or set GEMMA3_API_KEY)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Sequences decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests waiting beyond the batch (then 503)."),
    cache_gb: float = typer.Option(2.0, "--cache-gb", min=0.0, help="Memory for idle conversations' caches (LRU)."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Quantize the global KV cache to 4 or 8 bits."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="Allow browser pages from this origin (repeatable)."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="tensor or pipeline: one model across the "
                                           "processes mlx.launch starts; rank 0 listens (see the README)."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=PATH: also serve this LoRA adapter "
                                                "as model NAME, on the same base (repeatable)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller Gemma 3 guessing ahead "
                                              "(speculative decoding; same text, faster when its guesses hold)."),
    speculative: Optional[str] = typer.Option(None, "--speculative", help="The default for requests: draft, "
                                              "prompt-lookup or off (default: draft with --draft-model, else off); "
                                              "a request's \"speculative\" field overrides it."),
    open_page: bool = typer.Option(False, "--open", help="Open the chat page in the web browser once serving."),
    quiet: bool = QuietOpt,
):
    """Serve a model over the OpenAI API (chat and text completions, streaming, images) on localhost,
    with a chat page at / (in the browser: conversations, images, Markdown).

    Example: gemma3 serve -m gemma-3-1b-it-q5 --port 8080
    """
    from . import serve as server  # lazy: starlette and uvicorn load only here

    set_quiet(quiet)
    with user_errors():
        if not server.is_loopback(host) and not api_key:
            fail(f"--host {host} listens beyond this machine: give --api-key too (or use 127.0.0.1)")
        if kv_bits is not None and kv_bits not in (4, 8):
            fail(f"--kv-bits must be 4 or 8 (got {kv_bits})")
        no_parallel_adapter(parallel, adapter)
        speculative = speculative or ("draft" if draft_model else "off")
        if speculative not in ("draft", "prompt-lookup", "off"):
            fail(f"--speculative must be draft, prompt-lookup or off (got {speculative!r})")
        if speculative == "draft" and not draft_model:
            fail("--speculative draft needs --draft-model MODEL")
        if parallel and (draft_model or speculative != "off"):
            fail("--parallel does not combine with speculative decoding (--draft-model, --speculative)")
        adapters = serve_adapters(adapter or [])  # a bad name fails before loading anything
        rank = distributed.rank_from_env() if parallel else 0
        sock = server.bind(host, port) if rank == 0 else None  # before loading: a port in use fails at once
        group = None
        if parallel:
            group, path, model_obj, tokenizer = open_parallel(model, parallel, resolve_model)
        else:
            path = resolve_model(model)
            model_obj, tokenizer = open_model(path, adapter=adapters or None)  # refuses a model this machine cannot hold
        if tokenizer is None:
            fail("the model has no tokenizer.model")
        settings = dict(max_batch=max_batch, max_queue=max_queue, cache_gb=cache_gb, kv_bits=kv_bits)
        if rank != 0:  # rank 0 owns the port and decides; Ctrl-C reaches it, and it tells the others to stop
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            server.follow(model_obj, tokenizer, group, **settings)
            return
        names = (path.name,) + ((model,) if model and model != path.name else ())
        if draft_model:
            settings.update(draft_model=open_model(resolve_model(draft_model))[0])
        settings.update(speculative=speculative)
        if set(names) & set(adapters):
            fail(f"--adapter {next(iter(set(names) & set(adapters)))}=...: that name is the base model's")
        split = f" on {group.size()} ranks ({parallel} parallel)" if group is not None else ""
        page = server.page_url(host, sock)

        def ready():
            note(f"serving {path.name}{split} at http://{host}:{port}/v1 (Ctrl-C stops); chat page: {page}")
            if open_page:
                import webbrowser  # lazy: only with --open

                if not webbrowser.open(page):
                    _warn(f"no web browser to open here: visit {page}")
        server.serve(model_obj, tokenizer, names, host=host, port=port, api_key=api_key, cors=cors, sock=sock,
                     on_ready=ready, group=group, **settings)


def serve_adapters(specs: list[str]) -> dict[str, Path]:
    """serve's --adapter NAME=PATH (or PATH, named after its directory) -> {name: path}."""
    out = {}
    for spec in specs:
        name, _, where = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        check_name(name)
        if name in out:
            fail(f"--adapter {name}=...: two adapters are named {name!r}")
        out[name] = Path(where).expanduser()
    return out


def main():
    app()


if __name__ == "__main__":
    main()
