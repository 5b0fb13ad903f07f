"""Character classes and byte tables shared by the tokenizers.

Python's ``re`` has no ``\\p{L}``-style classes, so the pre-tokenizers scan text by
hand, asking this module what each character is. Classes come from
``unicodedata`` (one dictionary look-up per distinct character after the first).

The classes follow the libraries whose ids we must reproduce:

- letters / numbers: Unicode general categories L* and N*, as Oniguruma's
  ``\\p{L}`` / ``\\p{N}`` (the regex engine inside Hugging Face ``tokenizers``);
- whitespace: Oniguruma's ``\\s``, which is the Unicode White_Space property. It is
  *not* ``str.isspace()``: Python also counts U+001C..U+001F as spaces;
- punctuation: ``tokenizers``' Punctuation pre-tokenizer, i.e. ASCII punctuation
  (which adds ``$+<=>^`|~`` to the Unicode P* categories) or any P* character;
- numeric: Rust's ``char::is_numeric`` (categories Nd, Nl, No), used by the Digits
  pre-tokenizer.

The references do not use Python's Unicode version (14.0 in Python 3.11): tokenizers
0.23's Oniguruma knows Unicode 16.0, while its Punctuation pre-tokenizer uses an old
table (the ``unicode_categories`` crate, about Unicode 8). The small tables below
bridge the gap; they were found by running every code point through those
pre-tokenizers and comparing with ``unicodedata``.
"""

from __future__ import annotations

import bisect
import re
import unicodedata

# Classes of the GPT-2 pre-tokenizer pattern.
LETTER = 1
NUMBER = 2
SPACE = 3
OTHER = 4

# The Unicode White_Space property (PropList.txt), which is what `\s` means in the
# regex engines of the reference tokenizers. It has been stable since Unicode 6.3.
WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


class _CodeRanges:
    """A sorted set of inclusive code point ranges."""

    def __init__(self, *pairs: tuple[int, int]) -> None:
        self._firsts = [first for first, _ in pairs]
        self._lasts = [last for _, last in pairs]

    def __contains__(self, code: int) -> bool:
        at = bisect.bisect_right(self._firsts, code) - 1
        return at >= 0 and code <= self._lasts[at]


# Letters and numbers assigned in Unicode 15.0-16.0 (unassigned for Python 3.11).
_LATER_LETTERS = _CodeRanges(
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389), (0x1138B, 0x1138B),
    (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3),
    (0x11BC0, 0x11BE0), (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB),
    (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_LATER_NUMBERS = _CodeRanges(
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59), (0x16130, 0x16139),
    (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3), (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)

# Punctuation (P*) in Unicode 9.0-16.0 that tokenizers' old table does not know ...
_NOT_PUNCTUATION = _CodeRanges(
    (0x061D, 0x061D), (0x09FD, 0x09FD), (0x0A76, 0x0A76), (0x0C77, 0x0C77), (0x0C84, 0x0C84),
    (0x1B4E, 0x1B4F), (0x1B7D, 0x1B7F), (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), (0x10D6E, 0x10D6E),
    (0x10EAD, 0x10EAD), (0x10F55, 0x10F59), (0x10F86, 0x10F89), (0x113D4, 0x113D5), (0x113D7, 0x113D8),
    (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145D), (0x11660, 0x1166C), (0x116B9, 0x116B9),
    (0x1183B, 0x1183B), (0x11944, 0x11946), (0x119E2, 0x119E2), (0x11A3F, 0x11A46), (0x11A9A, 0x11A9C),
    (0x11A9E, 0x11AA2), (0x11B00, 0x11B09), (0x11BE1, 0x11BE1), (0x11C41, 0x11C45), (0x11C70, 0x11C71),
    (0x11EF7, 0x11EF8), (0x11F43, 0x11F4F), (0x11FFF, 0x11FFF), (0x12FF1, 0x12FF2), (0x16D6D, 0x16D6F),
    (0x16E97, 0x16E9A), (0x16FE2, 0x16FE2), (0x1E5FF, 0x1E5FF), (0x1E95E, 0x1E95F),
)
# ... and two characters it still counts as punctuation though Unicode has since
# re-categorized them (U+166D to So, U+111C9 to Mn).
_OLD_PUNCTUATION = _CodeRanges((0x166D, 0x166D), (0x111C9, 0x111C9))

_gpt2_class_cache: dict[str, int] = {}
_punctuation_cache: dict[str, bool] = {}


def gpt2_class(char: str) -> int:
    """LETTER, NUMBER, SPACE or OTHER: the classes the GPT-2 pattern distinguishes."""
    cls = _gpt2_class_cache.get(char)
    if cls is None:
        if char in WHITE_SPACE:
            cls = SPACE
        elif ord(char) in _LATER_LETTERS:
            cls = LETTER
        elif ord(char) in _LATER_NUMBERS:
            cls = NUMBER
        else:
            major = unicodedata.category(char)[0]
            cls = LETTER if major == "L" else NUMBER if major == "N" else OTHER
        _gpt2_class_cache[char] = cls
    return cls


def is_punctuation(char: str) -> bool:
    """What the ``tokenizers`` Punctuation pre-tokenizer splits on."""
    result = _punctuation_cache.get(char)
    if result is None:
        code = ord(char)
        result = (
            char in _ASCII_PUNCTUATION
            or code in _OLD_PUNCTUATION
            or (unicodedata.category(char)[0] == "P" and code not in _NOT_PUNCTUATION)
        )
        _punctuation_cache[char] = result
    return result


# Combining marks and canonical decompositions from Unicode 10-14 that tokenizers'
# NFC normalizer (MPT) does not know: its normalization tables are Unicode 9-era.
# To it these characters are unassigned starters that never reorder or compose, so
# they cut the text into independently normalized stretches.
_UNKNOWN_TO_TOKENIZERS_NFC = (
    (0x07FD, 0x07FD), (0x0898, 0x089F), (0x08CA, 0x08D3), (0x09FE, 0x09FE), (0x0C3C, 0x0C3C),
    (0x0D3B, 0x0D3C), (0x0EBA, 0x0EBA), (0x1715, 0x1715), (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFA),
    (0xA82C, 0xA82C), (0x10D24, 0x10D27), (0x10EAB, 0x10EAC), (0x10F46, 0x10F50), (0x10F82, 0x10F85),
    (0x11070, 0x11070), (0x1133B, 0x1133B), (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x11930, 0x11930),
    (0x11935, 0x11935), (0x11938, 0x11938), (0x1193D, 0x1193E), (0x11943, 0x11943), (0x119E0, 0x119E0),
    (0x11A34, 0x11A34), (0x11A47, 0x11A47), (0x11A99, 0x11A99), (0x11D42, 0x11D42), (0x11D44, 0x11D45),
    (0x11D97, 0x11D97), (0x16FF0, 0x16FF1), (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF),
)
_NFC_BOUNDARY = re.compile(
    "(["
    + "".join(f"{re.escape(chr(first))}-{re.escape(chr(last))}" for first, last in _UNKNOWN_TO_TOKENIZERS_NFC)
    + "])"
)


def nfc_like_tokenizers(text: str) -> str:
    """Unicode NFC as the ``tokenizers`` NFC normalizer computes it (see above)."""
    if text.isascii():
        return text
    parts = _NFC_BOUNDARY.split(text)
    # split() with a capturing group alternates: text, boundary char, text, ...
    return "".join(part if i % 2 else unicodedata.normalize("NFC", part) for i, part in enumerate(parts))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space,
    soft hyphen, ...) are shifted to U+0100 and up, so that every token is a string
    of visible characters and a space shows up as ``Ġ``.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


BYTE_TO_UNICODE: dict[int, str] = bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {char: b for b, char in BYTE_TO_UNICODE.items()}

# Byte-level characters that Rust's `char::is_numeric` accepts: the ASCII digits and
# the Latin-1 superscripts/fractions (bytes B2 B3 B9 BC BD BE stand for themselves).
# Falcon's Digits pre-tokenizer runs *after* the byte-level mapping, so these bytes,
# even inside a multi-byte character, split from their neighbours.
BYTE_LEVEL_NUMERIC = frozenset(
    char for char in BYTE_TO_UNICODE.values() if unicodedata.category(char) in ("Nd", "Nl", "No")
)


def to_utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``, never raising.

    The GGUF reader keeps invalid UTF-8 in token strings as surrogate escapes
    (U+DC80..U+DCFF), so those turn back into their original bytes; any other lone
    surrogate (only from odd input text) is written out as its 3-byte form.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", errors="surrogatepass")
