"""Byte-level BPE (``tokenizer.ggml.model = gpt2``): GPT-2, GPT-NeoX, MPT, Falcon, Llama 3, Qwen2.

Encoding a text fragment is: pre-tokenize into words, map each word's UTF-8 bytes to
GPT-2's printable byte characters, then merge adjacent symbols by rank (lowest rank
first, ties to the leftmost pair), exactly as Hugging Face ``tokenizers`` does.

Pre-tokenizers (what the ``tokenizer.ggml.pre`` names select):

- GPT-2 pattern (``default``/absent, ``gpt-2``, ``mpt``)::

      's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

  reproduced by ``split_gpt2`` as a hand-written scanner. ``mpt`` also NFC-normalizes.
- ``falcon``: Falcon's tokenizer.json sequence: Punctuation (contiguous runs split
  off), the GPT-2 pattern with the byte-level mapping, Digits (contiguous runs of
  numeric characters split off, judged on the *byte-level* characters), then every
  ``[0-9]{3}`` isolated.
- every other name (``llama-bpe``, ``qwen2``, ``deepseek-v3``, ``starcoder``, ...): the
  regular expressions its tokenizer.json holds, run by ``pretokenize.RegexSplitter``
  (see ``PRE_TOKENIZERS`` for the names and the patterns, which are those of llama.cpp's
  llama-vocab.cpp, in tokenizer.json's original spelling where llama.cpp adapted them).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from engine.errors import HalfbyteError
from engine.tokenizer.pretokenize import RegexSplitter, chain, split_isolated
from engine.tokenizer.unicode import (
    BYTE_LEVEL_NUMERIC,
    BYTE_TO_UNICODE,
    SPACE,
    gpt2_class,
    is_punctuation,
    nfc_like_tokenizers,
    to_utf8,
)

_CONTRACTION_ONE = frozenset("stmd")  # 's 't 'm 'd
_CONTRACTION_TWO = frozenset(("re", "ve", "ll"))  # 're 've 'll
_THREE_DIGITS = re.compile(r"[0-9]{3}")

# Words longer than this are not cached (long runs of one class: base64, minified code).
_MAX_CACHED_WORD = 256
_MAX_CACHE_ENTRIES = 1 << 16


def split_gpt2(text: str) -> list[str]:
    """Split ``text`` as the GPT-2 pattern does (see module docstring), alternative by alternative."""
    pieces: list[str] = []
    n = len(text)
    classes = [gpt2_class(char) for char in text]
    i = 0
    while i < n:
        char = text[i]
        if char == "'" and i + 1 < n:
            if text[i + 1] in _CONTRACTION_ONE:
                pieces.append(text[i : i + 2])
                i += 2
                continue
            if text[i + 1 : i + 3] in _CONTRACTION_TWO:
                pieces.append(text[i : i + 3])
                i += 3
                continue
        start = i
        cls = classes[i]
        # ` ?X+`: one plain space (U+0020 only) may lead a run of letters, numbers or others.
        if char == " " and i + 1 < n and classes[i + 1] != SPACE:
            i += 1
            cls = classes[i]
        if cls != SPACE:
            i += 1
            while i < n and classes[i] == cls:
                i += 1
            pieces.append(text[start:i])
            continue
        end = i + 1
        while end < n and classes[end] == SPACE:
            end += 1
        if end < n and end - start > 1:
            # `\s+(?!\S)` backtracks by one so the last whitespace can lead the next word.
            end -= 1
        pieces.append(text[start:end])
        i = end
    return pieces


def _split_contiguous(text: str, is_delimiter: Callable[[str], bool]) -> list[str]:
    """Runs of delimiter characters and runs of the rest, in order (``Contiguous`` behaviour)."""
    pieces: list[str] = []
    start = 0
    previous: bool | None = None
    for i, char in enumerate(text):
        current = is_delimiter(char)
        if current != previous and i > start:
            pieces.append(text[start:i])
            start = i
        previous = current
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def byte_level(word: str) -> str:
    """The word's UTF-8 bytes as GPT-2 byte characters."""
    return "".join([BYTE_TO_UNICODE[b] for b in to_utf8(word)])


def pre_tokenize_gpt2(text: str) -> list[str]:
    return [byte_level(word) for word in split_gpt2(text)]


def pre_tokenize_falcon(text: str) -> list[str]:
    words: list[str] = []
    for chunk in _split_contiguous(text, is_punctuation):
        for word in split_gpt2(chunk):
            for run in _split_contiguous(byte_level(word), BYTE_LEVEL_NUMERIC.__contains__):
                words.extend(split_isolated(run, _THREE_DIGITS))
    return words


# The patterns, as tokenizer.json files (and llama.cpp's llama-vocab.cpp) spell them.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 (and StableLM 2): Llama 3's pattern with single digits.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEEPSEEK_CODER_PATTERNS = (
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",  # [一-龥ࠀ-一가-퟿]+
    r"\p{N}",
)
# deepseek-llm's tokenizer.json: explicit letter ranges (Latin, Greek, Cyrillic, ... ) instead of \p{L}.
DEEPSEEK_LLM_PATTERNS = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
DEEPSEEK_V3_PATTERNS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # [一-龥぀-ゟ゠-ヿ]+
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
BLOOM_PATTERN = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"  # " ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizer:
    """What a ``tokenizer.ggml.pre`` name stands for.

    ``split`` cuts (normalized) text into words; ``byte_level_split`` returns them as
    GPT-2 byte characters, ready for merging. ``ignore_merges``: a word that is a
    vocabulary token is that token, merges or not (Llama 3). ``add_bos``: llama.cpp's
    default for ``tokenizer.ggml.add_bos_token`` when the GGUF does not say.
    """

    split: Callable[[str], list[str]]
    normalize: Callable[[str], str] | None = None
    ignore_merges: bool = False
    add_bos: bool = False
    byte_level_split: Callable[[str], list[str]] | None = None

    def pre_tokenize(self, text: str) -> list[str]:
        if self.byte_level_split is not None:
            return self.byte_level_split(text)
        return [byte_level(word) for word in self.split(text)]


def _regex(*patterns: str, **options) -> PreTokenizer:
    return PreTokenizer(RegexSplitter(patterns), **options)


_GPT2 = PreTokenizer(split_gpt2)
_LLAMA3 = _regex(LLAMA3_PATTERN, ignore_merges=True, add_bos=True)
_LLAMA3_PLAIN = _regex(LLAMA3_PATTERN)
_STARCODER = PreTokenizer(chain(RegexSplitter([r"\p{N}"]), split_gpt2))
_BLOOM = _regex(BLOOM_PATTERN)

# pre name -> PreTokenizer. The groups follow llama.cpp's llama-vocab.cpp (which names
# share a pattern and flags); the normalizers follow the models' tokenizer.json.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # GPT-2's pattern. ``default``/absent is GPT-2 here (llama.cpp's "default" list is a
    # Falcon-like one, but the unnamed GGUFs we meet are GPT-NeoX style).
    "default": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "jais": _GPT2,
    "exaone4": _GPT2,
    "gigachat": _GPT2,
    "mpt": PreTokenizer(split_gpt2, normalize=nfc_like_tokenizers),
    # llama.cpp's converter names GPT-NeoX-style vocabularies by their hash; MPT's hashes as
    # "olmo" (same regex as gpt-2/mpt in llama.cpp, and the tokenizer.json has the NFC normalizer).
    "olmo": PreTokenizer(split_gpt2, normalize=nfc_like_tokenizers),
    "falcon": PreTokenizer(split_gpt2, byte_level_split=pre_tokenize_falcon),
    # Llama 3 and the vocabularies llama.cpp treats alike (BOS added, whole-word tokens first).
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3,
    "pixtral": _LLAMA3,
    # Llama 3's pattern with llama.cpp's plain BPE settings.
    "smaug-bpe": _LLAMA3_PLAIN,
    "dbrx": _LLAMA3_PLAIN,
    # Qwen2/2.5/3 (tokenizer.json normalizes to NFC first), and the same pattern elsewhere.
    "qwen2": _regex(QWEN2_PATTERN, normalize=nfc_like_tokenizers),
    "deepseek-r1-qwen": _regex(QWEN2_PATTERN, normalize=nfc_like_tokenizers),
    "megrez": _regex(QWEN2_PATTERN),
    "stablelm2": _regex(QWEN2_PATTERN),
    "hunyuan": _regex(QWEN2_PATTERN),
    "qwen35": _regex(QWEN35_PATTERN, normalize=nfc_like_tokenizers),
    # Every digit alone, then GPT-2's pattern.
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "smollm": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    "deepseek-coder": _regex(*DEEPSEEK_CODER_PATTERNS),
    "deepseek-llm": _regex(*DEEPSEEK_LLM_PATTERNS),
    "deepseek-v3": _regex(*DEEPSEEK_V3_PATTERNS),
    "bloom": _BLOOM,
    "gpt3-finnish": _BLOOM,
    "poro-chat": _BLOOM,
    "viking": _regex(BLOOM_PATTERN, r"\p{N}"),
}


def pre_tokenizer(pre: str) -> PreTokenizer:
    """The PreTokenizer of a ``tokenizer.ggml.pre`` name; a clear error for an unknown one."""
    found = PRE_TOKENIZERS.get(pre)
    if found is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise HalfbyteError(f"unsupported BPE pre-tokenizer tokenizer.ggml.pre = {pre!r} (supported: {supported})")
    return found


def parse_merges(merges: Sequence[str], token_to_id: dict[str, int]) -> dict[tuple[str, str], tuple[int, str]]:
    """``"a b"`` strings -> {(a, b): (rank, "ab")}; rank is the position in the list."""
    table: dict[tuple[str, str], tuple[int, str]] = {}
    for rank, merge in enumerate(merges):
        # Split at the first space after position 0, as llama.cpp does; byte-level
        # symbols never contain a real space (it is spelled "Ġ").
        cut = merge.find(" ", 1) if isinstance(merge, str) else -1
        if cut < 0:
            raise HalfbyteError(f"tokenizer.ggml.merges[{rank}] is not of the form 'left right': {merge!r}")
        left, right = merge[:cut], merge[cut + 1 :]
        merged = left + right
        if merged not in token_to_id:
            raise HalfbyteError(
                f"tokenizer.ggml.merges[{rank}] makes {merged!r}, which is not in tokenizer.ggml.tokens"
            )
        table.setdefault((left, right), (rank, merged))
    return table


class ByteLevelBPE:
    """Encodes text fragments (no special tokens in them) to ids."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        merges: Sequence[str],
        pre: str,
        whole_words: Mapping[str, int] | None = None,
    ) -> None:
        """``whole_words``: the tokens a word may be as a whole when the pre-tokenizer
        ignores merges (the model's own vocabulary, no added tokens); default all."""
        self.pre = pre_tokenizer(pre)
        self.normalize = self.pre.normalize
        self.pre_tokenize = self.pre.pre_tokenize
        self.token_to_id = token_to_id
        self.whole_words = (whole_words if whole_words is not None else token_to_id) if self.pre.ignore_merges else None
        self.merges = parse_merges(merges, token_to_id)
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        if self.normalize is not None:
            text = self.normalize(text)
        ids: list[int] = []
        cache = self._cache
        for word in self.pre_tokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._encode_word(word)
                if len(word) <= _MAX_CACHED_WORD:
                    if len(cache) >= _MAX_CACHE_ENTRIES:
                        cache.clear()
                    cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        if self.whole_words is not None:
            whole = self.whole_words.get(word)
            if whole is not None:
                return (whole,)
        token_to_id = self.token_to_id
        # A byte character missing from the vocabulary (Falcon lacks a few) is dropped
        # before merging, as tokenizers does without an unknown token: its neighbours
        # become adjacent and may merge.
        symbols: list[str | None] = [char for char in word if char in token_to_id]
        n = len(symbols)
        if n == 0:
            return ()
        next_index = list(range(1, n + 1))
        next_index[-1] = -1
        prev_index = list(range(-1, n - 1))
        merges = self.merges

        # Heap of (rank, left index, merged text): the lowest rank wins, ties go to the
        # leftmost pair. An entry is stale once either side has been merged away or
        # grown; then left + right no longer spells the recorded text.
        heap: list[tuple[int, int, str]] = []
        for i in range(n - 1):
            found = merges.get((symbols[i], symbols[i + 1]))  # type: ignore[arg-type]
            if found is not None:
                heap.append((found[0], i, found[1]))
        heapq.heapify(heap)

        while heap:
            _, left, merged = heapq.heappop(heap)
            left_text = symbols[left]
            right = next_index[left]
            if left_text is None or right < 0:
                continue
            right_text = symbols[right]
            if right_text is None or left_text + right_text != merged:
                continue
            symbols[left] = merged
            symbols[right] = None
            after = next_index[right]
            next_index[left] = after
            if after >= 0:
                prev_index[after] = left
            before = prev_index[left]
            if before >= 0:
                found = merges.get((symbols[before], merged))  # type: ignore[arg-type]
                if found is not None:
                    heapq.heappush(heap, (found[0], before, found[1]))
            if after >= 0:
                found = merges.get((merged, symbols[after]))  # type: ignore[arg-type]
                if found is not None:
                    heapq.heappush(heap, (found[0], left, found[1]))

        ids: list[int] = []
        i = 0
        while i >= 0:
            ids.append(token_to_id[symbols[i]])  # type: ignore[index]
            i = next_index[i]
        return tuple(ids)
