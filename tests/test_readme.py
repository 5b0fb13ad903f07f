"""Every `halfbyte` command in the README parses (subcommand and options exist), so none of them rots;
the cheap ones also run for real here (demo model, perplexity); the rest are exercised by the other
tests and by .ci/run (the set-up commands)."""

from __future__ import annotations

import doctest
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from engine.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """`halfbyte ...` in indented code lines (also after `&&`) and in inline code spans."""
    text = README.read_text(encoding="utf-8")
    found = [m.group(1) for m in re.finditer(r"`(halfbyte [^`]+)`", text)]
    for line in text.splitlines():
        if line.startswith("    "):
            found += [part.strip() for part in line.split("&&") if part.strip().startswith("halfbyte ")]
    commands = []
    for command in found:
        words = shlex.split(command, comments=True)
        if len(words) > 2 or (len(words) == 2 and words[1] == "run"):  # "`halfbyte convert`" names a command
            commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_commands_we_document():
    names = {c[0] for c in COMMANDS}
    assert {"run", "convert", "bench", "perplexity", "tokenize", "info", "quantize"} <= names


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses(args):
    name, rest = args[0], args[1:]
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"no subcommand {name!r}"
    command.make_context(name, list(rest))  # raises on an unknown option or a bad value


def needs_x86_kernels():
    # The samples must reproduce exactly on any x86-64 CPU, Intel or AMD: the integer block dots
    # are exact, and every float sum after them has an order fixed by our own code (vector IR, no
    # reassociation), so AVX2, AVX2-VNNI and AVX-512 VNNI give the same bits whatever CPU LLVM
    # tunes for (tests/test_cpu_independence.py holds the logits to that, bit for bit). Sampled
    # text is therefore as deterministic as greedy text here, and the test compares it exactly.
    # Other paths (the portable IR, arm64's prompt kernels) sum prompt products in another order,
    # so a sampled token may branch off there: those machines skip, saying why.
    from engine.kernels.matmul import kernel_description

    if not kernel_description().startswith("simd-avx"):
        pytest.skip(f"samples recorded with the x86 SIMD kernels, not {kernel_description()}")


def test_readme_run_sample_is_real_output():
    needs_x86_kernels()
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^    \$ halfbyte (run .*)\n    (.*)$", text, re.MULTILINE)
    assert match, "no `$ halfbyte run` sample in the README"
    args, expected = shlex.split(match.group(1)), match.group(2)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == expected


def test_readme_library_sample_is_real_output():
    needs_x86_kernels()
    from engine import Model

    parser = doctest.DocTestParser()
    test = parser.get_doctest(README.read_text(encoding="utf-8"), {"Model": Model}, "README", str(README), 0)
    assert len(test.examples) >= 4
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
