"""The `halfbyte` command.

Every subcommand reports failures as one line, ``halfbyte: error: <file>: <reason>``,
on stderr with a non-zero exit; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from engine.errors import HalfbyteError, TerminatedBySignal

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"halfbyte: error: {message}", err=True)
    sys.exit(code)


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
            click.echo("halfbyte: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except MemoryError:
            fail("out of memory")
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")


@click.group(cls=HalfbyteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="halfbyte", prog_name="halfbyte")
def main() -> None:
    """halfbyte: run LLaMA, MPT and Falcon on the CPU from one 4-bit GGUF file."""


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
def info(file: str) -> None:
    """Summarize a GGUF file: architecture, hyper-parameters, tokenizer, tensors."""
    from engine.describe import describe
    from engine.gguf_file import GGUFFile

    with GGUFFile(file) as gguf:
        click.echo(describe(gguf))


@main.command()
@click.argument("input_file", metavar="IN.gguf", type=click.Path(dir_okay=False, path_type=str))
@click.argument("output_file", metavar="OUT.gguf", type=click.Path(dir_okay=False, path_type=str))
@click.argument("type_name", metavar="TYPE")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def quantize(input_file: str, output_file: str, type_name: str, quiet: bool) -> None:
    """Re-quantize the float tensors of a GGUF file to TYPE (q4_0, q4_1, q5_0, q5_1, q8_0, f16, f32)."""
    from engine.filetypes import parse_output_type
    from engine.requantize import quantize_gguf

    quantize_gguf(input_file, output_file, parse_output_type(type_name), progress=not quiet)
    click.echo(f"wrote {output_file}", err=True)


def _register_commands() -> None:
    # Imported here, not at the top: these modules import engine.cli's siblings lazily and keep
    # `halfbyte --help` fast (no Numba, no torch-sized imports until a command runs).
    from converters.cli import convert
    from engine.bench import bench
    from engine.run_cli import perplexity, run, tokenize

    for command in (convert, run, tokenize, bench, perplexity):
        main.add_command(command)


_register_commands()
