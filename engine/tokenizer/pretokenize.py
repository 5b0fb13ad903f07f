"""Regex pre-tokenizers: the patterns of tokenizer.json / llama.cpp run on Python's ``re``.

Byte-level BPE vocabularies cut text into words with a list of regular expressions
applied in turn, each one splitting every piece the previous ones left: the matches
become words, and so does the text between them (Hugging Face's ``Split`` with
``behavior = "Isolated"``; llama.cpp's ``unicode_regex_split``).

The patterns are written for Oniguruma (inside Hugging Face ``tokenizers``), which has
``\\p{L}``-style classes that Python's ``re`` lacks. ``translate`` rewrites them for
``re``:

- ``\\p{L}``, ``\\p{N}``, ``\\p{P}``, ``\\p{S}``, ``\\p{M}`` become explicit code point
  ranges (``unicode_tables``: Oniguruma's own classes, Unicode 16.0);
- ``\\s`` / ``\\S`` become the Unicode White_Space set and its complement (Python's
  ``\\s`` also counts U+001C..U+001F);
- ``$`` becomes ``\\Z`` (the patterns run on pieces that hold no newline, where
  Oniguruma's end-of-line and end-of-string agree).

Everything else (alternation order, greedy quantifiers with backtracking, ``(?!\\S)``,
``(?i:...)`` for contractions, where ``'ſ`` matches ``'s`` in both engines) behaves the
same in both engines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache

from engine.errors import HalfbyteError
from engine.tokenizer.unicode import WHITE_SPACE
from engine.tokenizer.unicode_tables import class_ranges


def _escape(code: int) -> str:
    return f"\\U{code:08x}"


@cache
def _class_body(name: str) -> str:
    """The inside of a ``[...]`` set matching the class ``name``."""
    if name == "s":
        return "".join(_escape(ord(char)) for char in sorted(WHITE_SPACE))
    try:
        ranges = class_ranges(name)
    except KeyError:
        raise HalfbyteError(f"pre-tokenizer pattern uses an unsupported class \\p{{{name}}}") from None
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in ranges)


def translate(pattern: str) -> str:
    """An Oniguruma pattern of the kind tokenizer.json holds -> the same pattern for ``re``."""
    out: list[str] = []
    in_set = False
    i = 0
    n = len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            escaped = pattern[i + 1]
            if escaped in "pP" and pattern.startswith("{", i + 2):
                end = pattern.find("}", i + 3)
                if escaped == "P" or end < 0:
                    raise HalfbyteError(f"pre-tokenizer pattern {pattern!r}: unsupported escape at {i}")
                body = _class_body(pattern[i + 3 : end])
                out.append(body if in_set else f"[{body}]")
                i = end + 1
                continue
            if escaped == "s":
                body = _class_body("s")
                out.append(body if in_set else f"[{body}]")
            elif escaped == "S":
                if in_set:
                    raise HalfbyteError(f"pre-tokenizer pattern {pattern!r}: \\S inside a set is not supported")
                out.append(f"[^{_class_body('s')}]")
            elif escaped in "dDwWbBhH" or escaped.isdigit():
                # Their meaning differs between the engines (ASCII or Unicode); no pattern we use has them.
                raise HalfbyteError(f"pre-tokenizer pattern {pattern!r}: unsupported escape \\{escaped}")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_set:
            if char == "]":
                in_set = False
            elif char == "[":
                char = "\\["
            out.append(char)
            i += 1
            continue
        if char == "[":
            in_set = True
            out.append(char)
            i += 1
            # A "^" and then a "]" right after the opening bracket are literal parts of the set.
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("\\]")
                i += 1
            continue
        out.append("\\Z" if char == "$" else char)
        i += 1
    return "".join(out)


@cache
def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(translate(pattern))
    except re.error as exc:
        raise HalfbyteError(f"pre-tokenizer pattern {pattern!r} does not compile: {exc}") from None


def split_isolated(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Every match of ``pattern`` becomes its own piece, as do the gaps between (``Isolated``)."""
    pieces: list[str] = []
    start = 0
    for match in pattern.finditer(text):
        begin, end = match.span()
        if begin == end:
            continue  # an empty match splits nothing
        if begin > start:
            pieces.append(text[start:begin])
        pieces.append(text[begin:end])
        start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class RegexSplitter:
    """Splits text with ``patterns`` in turn (each refines the pieces of the one before)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled: list[re.Pattern[str]] | None = None  # compiled on first use

    def compile(self) -> list[re.Pattern[str]]:
        if self._compiled is None:
            self._compiled = [compile_pattern(p) for p in self.patterns]
        return self._compiled

    def __call__(self, text: str) -> list[str]:
        first, *rest = self._compiled if self._compiled is not None else self.compile()
        pieces = split_isolated(text, first)
        for pattern in rest:
            refined: list[str] = []
            for piece in pieces:
                refined.extend(split_isolated(piece, pattern))
            pieces = refined
        return pieces

    def __repr__(self) -> str:
        return f"RegexSplitter({list(self.patterns)!r})"


def chain(*splitters: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """Apply ``splitters`` in turn, each to every piece the previous one made."""

    def split(text: str) -> list[str]:
        pieces = [text]
        for splitter in splitters:
            pieces = [word for piece in pieces for word in splitter(piece)]
        return pieces

    return split
