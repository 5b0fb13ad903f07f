"""Runtime subcommands: `halfbyte run` and `halfbyte tokenize`."""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click

from engine.errors import HalfbyteError
from engine.sampling import cli_sampling_kwargs, cli_sampling_options


def check_not_directory(path: str | None) -> None:
    """Our one-line error for a directory given where a file is expected (click's own check
    would print its usage text and exit 2)."""
    if path is not None and os.path.isdir(path):
        raise HalfbyteError(f"{path}: is a directory")


def read_text_file(path: str) -> str:
    """A UTF-8 file's exact text (no newline added or stripped); errors name the file."""
    check_not_directory(path)
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as exc:
        raise HalfbyteError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise HalfbyteError(f"{path}: not UTF-8 text") from None


def one_text_source(text: str | None, text_file: str | None, text_name: str, required: bool) -> None:
    """``run`` and ``tokenize`` take their text from an option/argument or from ``-f FILE``, never both."""
    if text is not None and text_file is not None:
        raise HalfbyteError(f"give either {text_name} or -f FILE, not both")
    if required and text is None and text_file is None:
        raise HalfbyteError(f"give either {text_name} or -f FILE")


def check_option(name: str, value: int | None, minimum: int, hint: str = "") -> None:
    """A numeric option's range, checked before the (slow) model load."""
    if value is not None and value < minimum:
        raise HalfbyteError(f"{name} must be >= {minimum}{hint}, got {value}")


def compile_notices() -> None:
    """Say on stderr whenever kernels compile for more than a moment (first use, cold cache)."""
    from engine import jit_cache

    jit_cache.set_notice(
        lambda what: click.echo(f"halfbyte: compiling kernels (first use of {what})...", err=True)
    )


@contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """halfbyte's own warnings (e.g. a context beyond the training one) as ``halfbyte: warning: ...``
    lines; other warnings are shown (or not) as Python would."""
    from engine.model import ContextOverflowWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if issubclass(category, ContextOverflowWarning):
            click.echo(f"halfbyte: warning: {message}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ContextOverflowWarning)
        warnings.showwarning = show
        yield


def load_model(model_path: str, n_ctx: int | None, threads: int | None, hf_file: str | None = None,
               revision: str | None = None, lora: list | tuple = ()):  # -> engine.model.Model
    from engine.hub import resolve_model_path
    from engine.model import Model

    # A MODEL that is no local path but reads org/repo[:QUANT] is a GGUF repo on the Hub (engine/hub.py).
    model_path = resolve_model_path(model_path, hf_file, revision)
    check_not_directory(model_path)
    with warnings_on_stderr():
        return Model.load(model_path, n_ctx=n_ctx, threads=threads, lora=lora)


def _open_model(model_path: str | None, n_ctx: int | None, threads: int | None, hf_file: str | None = None,
                revision: str | None = None, lora: list | tuple = ()):  # -> engine.model.Model
    if model_path is None:
        if hf_file is not None:
            raise HalfbyteError("--hf-file needs a Hub repo (org/name) as MODEL")
        from engine.default_model import default_model_path

        model_path = str(default_model_path())
        click.echo(f"halfbyte: no model given, using the embedded demo model {model_path}", err=True)
    compile_notices()
    return load_model(model_path, n_ctx, threads, hf_file, revision, lora)


def _compiling(seconds: float) -> str:
    return f" (+{seconds:.2f} s compiling kernels)" if seconds >= 0.005 else ""


def _print_summary(model) -> None:  # model: engine.model.Model
    stats = model.last_stats
    click.echo(
        f"\nhalfbyte: prompt     {stats.prompt_tokens:5d} tokens in {stats.prompt_seconds:7.2f} s "
        f"({stats.prompt_tokens_per_second:8.2f} tokens/s){_compiling(stats.prompt_compile_seconds)}",
        err=True,
    )
    click.echo(
        f"halfbyte: generation {stats.generated_tokens:5d} tokens in {stats.generation_seconds:7.2f} s "
        f"({stats.generation_tokens_per_second:8.2f} tokens/s){_compiling(stats.generation_compile_seconds)}, "
        f"stopped: {stats.stop_reason or 'interrupted'}",
        err=True,
    )


def _stream(model, prompt: str, options: dict, reset: bool) -> None:
    pieces = model.generate(prompt, stream=True, reset=reset, **options)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        model.last_stats.stop_reason = "interrupted"
        raise


THREADS_HELP = ("Threads (0 or negative, the default: every core that other processes leave free, "
                "re-checked while running).")


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("-p", "--prompt", default=None, help="Text to continue.")
@click.option("-f", "--file", "prompt_file", metavar="FILE", help="Read the prompt from a file (instead of -p).")
@click.option("-n", "--n-predict", "max_tokens", default=128, show_default=True,
              help="Tokens to generate (-1 = until end of text or a full context).")
@click.option("--temp", "temperature", default=0.8, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-k", default=40, show_default=True, help="Top-k sampling (0 = off).")
@click.option("--top-p", default=0.95, show_default=True, help="Top-p (nucleus) sampling, in (0, 1].")
@click.option("--min-p", default=0.05, show_default=True, help="Min-p sampling, in [0, 1].")
@click.option("--repeat-penalty", default=1.0, show_default=True, help="Repetition penalty (1 = off).")
@click.option("--repeat-last-n", default=64, show_default=True,
              help="Tokens the repetition penalty looks back (-1 = the whole context).")
@click.option("-s", "--seed", type=int, default=-1, show_default=True, help="Random seed (-1 = a random one).")
@click.option("-t", "--threads", type=int, default=None, help=THREADS_HELP)
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=0, show_default=True,
              help="Context size (0 = the model's training context; more is allowed, with a warning).")
@click.option("-r", "--reverse-prompt", "stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--echo", is_flag=True, help="Also print the prompt.")
@click.option("-i", "--interactive", is_flag=True, help="Chat-style: read more input after each generation.")
@click.option("--context-shift", is_flag=True,
              help="When the context is full, drop its older half and go on (default: stop).")
@click.option("-hff", "--hf-file", "hf_file", metavar="NAME",
              help="With MODEL = org/repo: this .gguf file of the repo (a name or a glob).")
@click.option("--revision", "hf_revision", metavar="REV", help="With MODEL = org/repo: a branch, tag or commit.")
@click.option("--lora", "lora", multiple=True, metavar="FILE", help="Apply this LoRA adapter GGUF (repeatable).")
@click.option("--lora-scaled", "lora_scaled", multiple=True, nargs=2, type=(str, float), metavar="FILE S",
              help="Apply this LoRA adapter GGUF scaled by S (repeatable).")
@cli_sampling_options
def run(model_path: str | None, prompt: str | None, prompt_file: str | None, max_tokens: int, temperature: float,
        top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, seed: int,
        threads: int | None, n_ctx: int, stop: tuple[str, ...], echo: bool, interactive: bool,
        context_shift: bool, hf_file: str | None = None, hf_revision: str | None = None, lora: tuple = (),
        lora_scaled: tuple = (), **sampling) -> None:
    """Generate text from a GGUF model, streaming it to stdout (timings go to stderr).

    Ctrl-C stops it: the timings so far, then `halfbyte: interrupted`, exit status 130."""
    from engine.model import check_seed
    from engine.sampling import SamplingParams

    # Every value is checked before the (slow) model load.
    SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    sampling = cli_sampling_kwargs(**sampling)  # llama.cpp's other samplers, --grammar, -j
    check_option("-n", max_tokens, -1, " (-1 = until end of text or a full context)")
    check_option("-c", n_ctx, 0, " (0 = the model's training context)")
    if seed != -1 and seed < 0:
        raise HalfbyteError(f"-s must be >= 0, or -1 for a random seed, got {seed}")
    if any(not s for s in stop):
        raise HalfbyteError("-r: stop strings must not be empty")
    one_text_source(prompt, prompt_file, "-p PROMPT", required=False)
    check_not_directory(model_path)
    if prompt_file is not None:
        prompt = read_text_file(prompt_file)
    if prompt is None and not interactive:
        prompt = ""
    seed = check_seed(seed)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    model = _open_model(model_path, n_ctx, threads, hf_file, hf_revision,
                        [(path, 1.0) for path in lora] + [(path, scale) for path, scale in lora_scaled])
    options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed, stop=list(stop),
                   context_shift=context_shift, **sampling)
    try:
        if prompt is not None and (prompt or not interactive):
            if echo:
                click.echo(prompt, nl=False)
            _stream(model, prompt, options, reset=True)
        if interactive:
            first = not model.tokens
            while True:
                click.echo("\n> ", nl=False, err=True)
                line = sys.stdin.readline()
                if not line:
                    break
                _stream(model, line, options | {"add_bos": None if first else False}, reset=first)
                first = False
    except KeyboardInterrupt:
        if model.last_stats.prompt_tokens:  # the timings of what ran, then `halfbyte: interrupted` (exit 130)
            _print_summary(model)
        raise
    if model.last_stats.prompt_tokens:
        _print_summary(model)


@click.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("text", required=False)
@click.option("-f", "--file", "text_file", metavar="FILE", help="Tokenize this file (UTF-8) instead of TEXT.")
@click.option("--pieces", is_flag=True, help="Print one token per line with its text (control tokens by name).")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@click.option("--special", is_flag=True, help="Parse special-token text such as <s>.")
def tokenize(model_path: str, text: str | None, text_file: str | None, pieces: bool, no_bos: bool,
             special: bool) -> None:
    """Print the token ids of TEXT (or of the file given with -f), like llama-tokenize."""
    from engine.errors import file_error
    from engine.gguf_file import GGUFFile
    from engine.tokenizer import Tokenizer

    one_text_source(text, text_file, "TEXT", required=True)
    check_not_directory(model_path)
    if text_file is not None:
        text = read_text_file(text_file)
    with GGUFFile(model_path) as file:
        try:
            tokenizer = Tokenizer.from_metadata(file.metadata)
        except HalfbyteError as exc:
            raise (exc if model_path in str(exc) else file_error(model_path, str(exc))) from None
    ids = tokenizer.encode(text, add_bos=False if no_bos else None, parse_special=special)
    if pieces:
        for token_id in ids:
            click.echo(f"{token_id:6d} -> {tokenizer.token_piece(token_id)!r}")
    else:
        click.echo(" ".join(str(i) for i in ids))


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("-f", "--file", "text_file", metavar="FILE", required=True, help="The text to score (UTF-8).")
@click.option("-c", "--ctx-size", "n_ctx", default=512, show_default=True,
              help="Tokens per window (0 = the model's training context).")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Score at most this many windows (>= 1).")
@click.option("-t", "--threads", type=int, default=None, help=THREADS_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--lora", "lora", multiple=True, metavar="FILE", help="Apply this LoRA adapter GGUF (repeatable).")
@click.option("--lora-scaled", "lora_scaled", multiple=True, nargs=2, type=(str, float), metavar="FILE S",
              help="Apply this LoRA adapter GGUF scaled by S (repeatable).")
def perplexity(model_path: str | None, text_file: str, n_ctx: int, max_chunks: int | None, threads: int | None,
               quiet: bool, lora: tuple = (), lora_scaled: tuple = ()) -> None:
    """Perplexity of MODEL on a text file, computed like llama.cpp's llama-perplexity."""
    from tqdm import tqdm

    from engine.perplexity import MIN_CTX
    from engine.perplexity import perplexity as compute

    if n_ctx != 0:
        check_option("-c", n_ctx, MIN_CTX, " (or 0 = the model's training context)")
    check_option("--chunks", max_chunks, 1)
    check_not_directory(model_path)
    text = read_text_file(text_file)
    model = _open_model(model_path, n_ctx, threads, None, None,
                        [(path, 1.0) for path in lora] + [(path, scale) for path, scale in lora_scaled])
    bar = None

    def on_chunk(done: int, total: int, ppl: float) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:  # created once the first window is scored: no empty bar before an error
            bar = tqdm(desc="perplexity", unit="chunk", total=total, file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix_str(f"PPL {ppl:.4f}")
        bar.update(1)

    try:
        result = compute(model, text, n_ctx=model.n_ctx, max_chunks=max_chunks, on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()
    click.echo(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.chunk_ppl)))
    click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f} "
               f"({result.n_chunks} chunks of {result.n_ctx} tokens, {result.tokens_scored} tokens scored)")
