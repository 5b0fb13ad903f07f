"""The `halfbyte` command.

Every subcommand reports failures as one line, ``halfbyte: error: <file>: <reason>``,
on stderr with a non-zero exit; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from engine.errors import HalfbyteError, TerminatedBySignal

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"halfbyte: error: {message}", err=True)
    sys.exit(code)


def interrupted() -> None:
    click.echo("halfbyte: interrupted", err=True)
    # A KeyboardInterrupt that came out of an exec()/eval() of source text (Numba's compiler runs
    # generated code that way, so a Ctrl-C while kernels compile does) leaves CPython's "unhandled
    # KeyboardInterrupt" flag set; under `python -m` the interpreter then ends by killing itself
    # with SIGINT (status -2) instead of exiting 130. Any exec of source text resets that flag.
    exec("")
    sys.exit(EXIT_INTERRUPTED)


def _caused_by_interrupt(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


class HalfbyteGroup(click.Group):
    """Turns our errors (and Ctrl-C, and OS errors with a file name) into one-line exits."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HalfbyteError as exc:
            fail(str(exc))
        except TerminatedBySignal as exc:
            click.echo(f"halfbyte: {exc}", err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            interrupted()
        except SystemError as exc:
            # A Ctrl-C that Python delivered inside a C extension's call (Numba's dispatcher) comes
            # out as "SystemError: ... returned a result with an exception set", chained to the
            # KeyboardInterrupt. Kernel calls defer Ctrl-C (engine.model.deferred_interrupts); this
            # catches whatever slips through elsewhere.
            if not _caused_by_interrupt(exc):
                raise
            interrupted()
        except MemoryError:
            fail("out of memory")
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")


@click.group(cls=HalfbyteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="halfbyte", prog_name="halfbyte")
def main() -> None:
    """halfbyte: run LLaMA, MPT and Falcon on the CPU from one 4-bit GGUF file."""


def entry() -> None:
    """The `halfbyte` console script and `python -m engine`: ``main``, keeping a Ctrl-C's status.

    Once a Ctrl-C has become exit status 130, a further SIGINT (a second key press, or one sent
    to the whole process group) must not raise a KeyboardInterrupt while the exit unwinds:
    Python reports an uncaught one by killing itself with SIGINT (status -2, once seen in CI
    after `halfbyte: interrupted` was printed). So SIGINT is ignored from then on, and a
    KeyboardInterrupt that escaped ``main`` anyway is the same one-line 130."""
    try:
        main(prog_name="halfbyte")
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupted()


@main.command()
@click.argument("file")
def info(file: str) -> None:
    """Summarize a GGUF file: architecture, hyper-parameters, tokenizer, tensors."""
    from engine.describe import describe
    from engine.gguf_file import GGUFFile
    from engine.run_cli import check_not_directory

    check_not_directory(file)
    with GGUFFile(file) as gguf:
        click.echo(describe(gguf))


@main.command()
@click.argument("input_file", metavar="IN.gguf")
@click.argument("output_file", metavar="OUT.gguf")
@click.argument("type_name", metavar="TYPE")
@click.option("--allow-requantize", is_flag=True,
              help="Also re-quantize tensors that are already quantized (dequantized first: quality drops).")
@click.option("--pure", is_flag=True, help="TYPE's default type for every quantized tensor (no mix rules).")
@click.option("--output-tensor-type", metavar="T", help="ggml type of output.weight (e.g. q8_0, q6_k, f16).")
@click.option("--token-embedding-type", metavar="T", help="ggml type of token_embd.weight.")
@click.option("--imatrix", "imatrix_file", metavar="FILE",
              help="Importance matrix (halfbyte imatrix / llama-imatrix, GGUF or .dat) to weight the quantization.")
@click.option("--include-weights", multiple=True, metavar="NAME",
              help="Use the imatrix only for tensors whose name contains NAME (repeatable).")
@click.option("--exclude-weights", multiple=True, metavar="NAME",
              help="Do not use the imatrix for tensors whose name contains NAME (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def quantize(input_file: str, output_file: str, type_name: str, allow_requantize: bool, pure: bool,
             output_tensor_type: str | None, token_embedding_type: str | None, imatrix_file: str | None,
             include_weights: tuple[str, ...], exclude_weights: tuple[str, ...], quiet: bool) -> None:
    """Quantize the tensors of a GGUF file to TYPE as llama-quantize does, same types per tensor and same
    bytes: q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_nl, iq4_xs, q4_0, q4_1,
    q5_0, q5_1, q8_0, f16, bf16, f32. A file whose tensors are already quantized needs --allow-requantize.
    With --imatrix, llama-quantize --imatrix's bytes."""
    from engine.filetypes import parse_ggml_type, parse_quantize_mix
    from engine.requantize import quantize_gguf
    from engine.run_cli import check_not_directory, compile_notices

    mix = parse_quantize_mix(type_name)
    output_type = parse_ggml_type(output_tensor_type) if output_tensor_type is not None else None
    embedding_type = parse_ggml_type(token_embedding_type) if token_embedding_type is not None else None
    check_not_directory(input_file)
    check_not_directory(output_file)
    compile_notices()
    quantize_gguf(input_file, output_file, mix, progress=not quiet, allow_requantize=allow_requantize, pure=pure,
                  output_tensor_type=output_type, token_embedding_type=embedding_type, imatrix=imatrix_file,
                  include_weights=include_weights, exclude_weights=exclude_weights,
                  report=lambda line: click.echo(f"halfbyte: {line}", err=True))
    click.echo(f"wrote {output_file}", err=True)


@main.command()
@click.argument("type_names", metavar="[TYPE]...", nargs=-1)
def precompile(type_names: tuple[str, ...]) -> None:
    """Compile the kernels for this machine now, into Numba's cache: the demo model's and those of files
    of each TYPE (default: every type `halfbyte quantize` writes). `pip install` does this when it
    builds halfbyte; run it again after moving the installation to another CPU."""
    from engine.filetypes import parse_quantize_mix
    from engine.precompile import FILE_TYPES
    from engine.precompile import precompile as compile_kernels

    for name in type_names:
        parse_quantize_mix(name)
        if name.lower() not in FILE_TYPES:
            raise HalfbyteError(f"{name}: precompile covers {', '.join(FILE_TYPES)} "
                                "(the other mixes use their kernels)")
    compile_kernels(tuple(name.lower() for name in type_names) or FILE_TYPES,
                    log=lambda line: click.echo(f"halfbyte: {line}", err=True))


def _register_commands() -> None:
    # Imported here, not at the top: these modules import engine.cli's siblings lazily and keep
    # `halfbyte --help` fast (no Numba, no torch-sized imports until a command runs).
    from converters.cli import convert
    from engine.bench import bench
    from engine.chat_cli import chat
    from engine.embeddings import embed_command
    from engine.imatrix import imatrix_command
    from engine.run_cli import perplexity, run, tokenize
    from engine.server import serve

    for command in (convert, run, tokenize, bench, perplexity, chat, serve, embed_command, imatrix_command):
        main.add_command(command)


_register_commands()
