"""`halfbyte chat`: an interactive conversation with a chat model in the terminal.

Each turn the whole history is rendered again with the model's chat template (the file's
``tokenizer.chat_template``, ``--chat-template``, or ChatML for a file without one, as llama.cpp)
and generation continues from the KV cache: the part of the new prompt that repeats the previous
prompt and answer is not evaluated again. The answer streams to stdout and ends at an
end-of-generation token, the template's turn-end text, ``-n`` tokens or a full context. When the
history no longer fits in the context the oldest turns are dropped (the system prompt stays).

Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) quits. Ctrl-C during an
answer stops that answer; at the prompt it quits.
"""

from __future__ import annotations

import random
import sys

import click

from engine.errors import HalfbyteError
from engine.run_cli import THREADS_HELP, check_not_directory, check_option, compile_notices, load_model

HELP_LINE = "/reset clears the conversation, /exit quits"


def _read_line(prompt: str) -> str | None:
    """One line of input, None at the end of input. A terminal gets line editing (readline)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    click.echo(prompt, nl=False, err=True)
    line = sys.stdin.readline()
    if not line:
        return None
    return line.rstrip("\n").rstrip("\r")


def fit_history(model, messages: list[dict], reserve: int) -> list[dict]:  # model: engine.model.Model
    """Drop the oldest turns (never the system prompt nor the last message) until the rendered
    prompt leaves ``reserve`` tokens of the context free."""
    from engine.chat import prompt_tokens

    messages = list(messages)
    while True:
        n = len(prompt_tokens(model.tokenizer, model.apply_chat_template(messages)))
        if n + reserve <= model.n_ctx:
            return messages
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise HalfbyteError(f"the message needs {n} tokens, more than the context of {model.n_ctx} allows "
                                f"(with {reserve} for the answer); use a larger -c")
        # a user turn and the answer after it
        del messages[first:first + (2 if len(messages) - first > 2 else 1)]
        click.echo("halfbyte: the conversation no longer fits in the context: dropped the oldest turn", err=True)


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("--system", "system_prompt", default=None, help="A system prompt that starts the conversation.")
@click.option("--chat-template", "chat_template", metavar="NAME|FILE", default=None,
              help="Template: the file's own (default; ChatML if it has none), a built-in name (chatml, llama2, "
                   "llama3, mistral, zephyr, gemma, phi3), a named template of the file, or a Jinja file.")
@click.option("-n", "--n-predict", "max_tokens", default=-1, show_default=True,
              help="Tokens per answer at most (-1 = until the end of the turn or a full context).")
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
              help="Context size (0 = the model's training context).")
def chat(model_path: str | None, system_prompt: str | None, chat_template: str | None, max_tokens: int,
         temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, repeat_last_n: int,
         seed: int, threads: int | None, n_ctx: int) -> None:
    """Chat with MODEL (default: the embedded demo model) in the terminal, streaming each answer.

    /reset clears the conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer."""
    from engine.model import check_seed
    from engine.sampling import SamplingParams

    SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    check_option("-n", max_tokens, -1, " (-1 = until the end of the turn)")
    if max_tokens == 0:
        raise HalfbyteError("-n must be >= 1, or -1 for no limit, got 0")
    check_option("-c", n_ctx, 0, " (0 = the model's training context)")
    if seed != -1 and seed < 0:
        raise HalfbyteError(f"-s must be >= 0, or -1 for a random seed, got {seed}")
    check_not_directory(model_path)
    seed = check_seed(seed)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    if model_path is None:
        from engine.default_model import default_model_path

        model_path = str(default_model_path())
        click.echo(f"halfbyte: no model given, using the embedded demo model {model_path}", err=True)
    compile_notices()
    model = load_model(model_path, n_ctx, threads)
    model._chat_template_spec = chat_template
    template = model.chat_template  # resolved now: a bad --chat-template fails before the first turn
    click.echo(f"halfbyte: chat template: {template.name}; {HELP_LINE}", err=True)

    base = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = list(base)
    options = dict(max_tokens=None if max_tokens < 0 else max_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n)
    turn = 0
    while True:
        try:
            line = _read_line("> ")
        except KeyboardInterrupt:
            click.echo("", err=True)
            return
        if line is None:
            click.echo("", err=True)
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(base)
            click.echo("halfbyte: conversation cleared", err=True)
            continue
        if command.startswith("/") and " " not in command:
            click.echo(f"halfbyte: unknown command {command} ({HELP_LINE})", err=True)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reserve = min(max(1, max_tokens if max_tokens > 0 else 64), model.n_ctx // 2)
        try:
            messages = fit_history(model, messages, reserve)
        except HalfbyteError as exc:
            click.echo(f"halfbyte: error: {exc}", err=True)
            messages.pop()
            continue
        answer = []
        chunks = model.create_chat_completion(messages, stream=True, seed=seed + turn, **options)
        turn += 1
        try:
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    answer.append(piece)
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            chunks.close()
            click.echo("\nhalfbyte: answer interrupted", err=True)
        click.echo("")
        messages.append({"role": "assistant", "content": "".join(answer)})
