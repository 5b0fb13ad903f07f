"""Runtime subcommands: `halfbyte run` and `halfbyte tokenize`."""

from __future__ import annotations

import random
import sys

import click

from engine.errors import HalfbyteError


def read_text_file(path: str) -> str:
    """A UTF-8 file's exact text (no newline added or stripped); errors name the file."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as exc:
        raise HalfbyteError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise HalfbyteError(f"{path}: not UTF-8 text") from None


def _open_model(model_path: str | None, n_ctx: int | None, threads: int | None):  # -> engine.model.Model
    from engine import jit_cache
    from engine.model import Model

    if model_path is None:
        from engine.default_model import default_model_path

        model_path = str(default_model_path())
        click.echo(f"halfbyte: no model given, using the embedded demo model {model_path}", err=True)
    if not jit_cache.is_warm():
        click.echo("halfbyte: compiling kernels (first run only)...", err=True)
    model = Model.load(model_path, n_ctx=n_ctx, threads=threads)
    return model


def _print_summary(model) -> None:  # model: engine.model.Model
    stats = model.last_stats
    click.echo(
        f"\nhalfbyte: prompt     {stats.prompt_tokens:5d} tokens in {stats.prompt_seconds:7.2f} s "
        f"({stats.prompt_tokens_per_second:8.2f} tokens/s)",
        err=True,
    )
    click.echo(
        f"halfbyte: generation {stats.generated_tokens:5d} tokens in {stats.generation_seconds:7.2f} s "
        f"({stats.generation_tokens_per_second:8.2f} tokens/s), stopped: {stats.stop_reason or 'interrupted'}",
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


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", default=None, help="Text to continue.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "max_tokens", default=128, show_default=True, help="Tokens to generate.")
@click.option("--temp", "temperature", default=0.8, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-k", default=40, show_default=True, help="Top-k sampling (0 = off).")
@click.option("--top-p", default=0.95, show_default=True, help="Top-p (nucleus) sampling, in (0, 1].")
@click.option("--min-p", default=0.05, show_default=True, help="Min-p sampling, in [0, 1].")
@click.option("--repeat-penalty", default=1.1, show_default=True, help="Repetition penalty (1 = off).")
@click.option("--repeat-last-n", default=64, show_default=True, help="Tokens the repetition penalty looks back.")
@click.option("-s", "--seed", type=int, default=None, help="Random seed (default: random).")
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: all cores).")
@click.option("-c", "--ctx-size", "n_ctx", type=int, default=None, help="Context size (default: the model's).")
@click.option("-r", "--reverse-prompt", "stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--echo", is_flag=True, help="Also print the prompt.")
@click.option("-i", "--interactive", is_flag=True, help="Chat-style: read more input after each generation.")
@click.option("--context-shift", is_flag=True,
              help="When the context is full, drop its older half and go on (default: stop).")
def run(model_path: str | None, prompt: str | None, prompt_file: str | None, max_tokens: int, temperature: float,
        top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int, seed: int | None,
        threads: int | None, n_ctx: int | None, stop: tuple[str, ...], echo: bool, interactive: bool,
        context_shift: bool) -> None:
    """Generate text from a GGUF model, streaming it to stdout (timings go to stderr)."""
    from engine import jit_cache
    from engine.sampling import SamplingParams

    # Validate sampling values before the (slow) model load.
    SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    if prompt_file is not None:
        prompt = read_text_file(prompt_file)
    if prompt is None and not interactive:
        prompt = ""
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    model = _open_model(model_path, n_ctx, threads)
    options = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed, stop=list(stop),
                   context_shift=context_shift)
    try:
        if prompt is not None and (prompt or not interactive):
            if echo:
                click.echo(prompt, nl=False)
            _stream(model, prompt, options, reset=True)
            jit_cache.mark_warm()
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
        pass
    finally:
        _print_summary(model)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.argument("text", required=False)
@click.option("-f", "--file", "text_file", type=click.Path(dir_okay=False), help="Tokenize this file (UTF-8).")
@click.option("--pieces", is_flag=True, help="Print one token per line with its text.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@click.option("--special", is_flag=True, help="Parse special-token text such as <s>.")
def tokenize(model_path: str, text: str | None, text_file: str | None, pieces: bool, no_bos: bool,
             special: bool) -> None:
    """Print the token ids of TEXT (or of the file given with -f), like llama-tokenize."""
    from engine.gguf_file import GGUFFile
    from engine.tokenizer import Tokenizer

    if (text is None) == (text_file is None):
        raise HalfbyteError("give either TEXT or -f FILE")
    if text_file is not None:
        text = read_text_file(text_file)
    with GGUFFile(model_path) as file:
        tokenizer = Tokenizer.from_metadata(file.metadata)
    ids = tokenizer.encode(text, add_bos=False if no_bos else None, parse_special=special)
    if pieces:
        for token_id in ids:
            click.echo(f"{token_id:6d} -> {tokenizer.token_bytes(token_id).decode('utf-8', 'replace')!r}")
    else:
        click.echo(" ".join(str(i) for i in ids))


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path(dir_okay=False))
@click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False),
              help="The text to score (UTF-8).")
@click.option("-c", "--ctx-size", "n_ctx", default=512, show_default=True, help="Tokens per window.")
@click.option("--chunks", "max_chunks", type=int, default=None, help="Score at most this many windows.")
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def perplexity(model_path: str | None, text_file: str, n_ctx: int, max_chunks: int | None, threads: int | None,
               quiet: bool) -> None:
    """Perplexity of MODEL on a text file, computed like llama.cpp's llama-perplexity."""
    from tqdm import tqdm

    from engine import jit_cache
    from engine.perplexity import perplexity as compute

    text = read_text_file(text_file)
    model = _open_model(model_path, None, threads)
    bar = None if quiet else tqdm(desc="perplexity", unit="chunk", file=sys.stderr, dynamic_ncols=True)

    def on_chunk(done: int, total: int, ppl: float) -> None:
        if bar is not None:
            bar.total = total
            bar.set_postfix_str(f"PPL {ppl:.4f}")
            bar.update(1)

    try:
        result = compute(model, text, n_ctx=n_ctx, max_chunks=max_chunks, on_chunk=on_chunk)
    finally:
        if bar is not None:
            bar.close()
    jit_cache.mark_warm()
    click.echo(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(result.chunk_ppl)))
    click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f} "
               f"({result.n_chunks} chunks of {result.n_ctx} tokens, {result.tokens_scored} tokens scored)")
