"""Tokenizers built from GGUF metadata alone (llama.cpp's ``tokenizer.ggml.*`` keys).

Two kinds, chosen by ``tokenizer.ggml.model``:

- ``llama``: SentencePiece BPE with byte fallback (LLaMA). Same ids as the
  ``sentencepiece`` library on the model the GGUF was converted from.
- ``gpt2``: byte-level BPE with a pre-tokenizer named by ``tokenizer.ggml.pre``
  (``default``/absent, ``gpt-2``, ``mpt``, ``falcon``, ``llama-bpe``, ``qwen2``, ...;
  ``bpe.PRE_TOKENIZERS`` lists them). Same ids as Hugging Face ``tokenizers`` with the
  matching tokenizer.json. Like llama.cpp, ``llama-bpe`` adds BOS unless
  ``tokenizer.ggml.add_bos_token`` says otherwise.

Special tokens follow llama.cpp: user-defined tokens (type 4) are always cut out of
the text before the rest is tokenized; control and unknown tokens (types 3, 2) only
when ``parse_special=True``. Where several could match, the leftmost, then longest,
wins (Hugging Face's rule).

End of generation: ``eog_ids`` holds every token that ends a generation, found as llama.cpp's
vocabulary finds them: EOS, the ``eot``/``eom``/``fim_*`` token ids the file names, and tokens
whose text ends a turn in a known chat format (``<|eot_id|>``, ``<|im_end|>``, ``<|end|>``,
``<end_of_turn>``, ``<|endoftext|>``, ...: ``EOG_TOKEN_TEXTS``).

Decoding concatenates each token's bytes (``token_bytes``) and reads them as UTF-8.
Unlike llama.cpp's BPE detokenizer it does not "clean up" spaces before punctuation,
so ``decode(encode(text)) == text`` (up to MPT's NFC and SentencePiece's ``▁``).

Example::

    tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
    ids = tok.encode("Hello")          # [1, 15043] for LLaMA (BOS added by default)
    tok.decode(ids)                    # "Hello"
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any

import numpy as np

from engine.errors import HalfbyteError
from engine.tokenizer.bpe import ByteLevelBPE, pre_tokenizer
from engine.tokenizer.spm import SentencePieceBPE
from engine.tokenizer.unicode import UNICODE_TO_BYTE, to_utf8

__all__ = ["StreamDecoder", "Tokenizer", "TokenType"]

SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenType(IntEnum):
    """Values of ``tokenizer.ggml.token_type`` (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_KNOWN_MODELS = ("llama", "gpt2")

# End of generation (llama.cpp's llama_vocab special_eog_ids): besides EOS, the ids these
# tokenizer.ggml.*_token_id keys name, and tokens with these texts wherever the vocabulary has them.
EOG_ID_KEYS = ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")
EOG_TOKEN_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
)


def _key(name: str) -> str:
    return f"tokenizer.ggml.{name}"


def _string_list(metadata: Mapping[str, Any], name: str) -> list[str]:
    value = metadata.get(_key(name))
    if value is None:
        raise HalfbyteError(f"missing {_key(name)} in the GGUF metadata")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise HalfbyteError(f"{_key(name)} must be an array of strings")
    return list(value)


def _numeric_array(metadata: Mapping[str, Any], name: str, length: int) -> np.ndarray | None:
    value = metadata.get(_key(name))
    if value is None:
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise HalfbyteError(f"{_key(name)} must be a numeric array") from exc
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise HalfbyteError(f"{_key(name)} must be a numeric array, got {array.dtype} of shape {array.shape}")
    if len(array) != length:
        raise HalfbyteError(f"{_key(name)} has {len(array)} entries but tokenizer.ggml.tokens has {length}")
    return array


def _optional_id(metadata: Mapping[str, Any], name: str, default: int | None, vocab_size: int) -> int | None:
    value = metadata.get(_key(name), default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise HalfbyteError(f"{_key(name)} must be an integer, got {value!r}")
    if not 0 <= int(value) < vocab_size:
        raise HalfbyteError(f"{_key(name)} = {value} is outside the vocabulary of {vocab_size} tokens")
    return int(value)


def _optional_flag(metadata: Mapping[str, Any], name: str, default: bool) -> bool:
    value = metadata.get(_key(name), default)
    if not isinstance(value, (bool, np.bool_)):
        raise HalfbyteError(f"{_key(name)} must be a boolean, got {value!r}")
    return bool(value)


def end_of_generation_ids(tokens: Sequence[str], eos_id: int | None, extra: Iterable[int] = ()) -> frozenset[int]:
    """The tokens that end a generation, as llama.cpp's vocabulary finds them: EOS, the file's
    EOT/EOM/FIM ids (``extra``) and every token whose text ends a turn in a known chat format
    (``EOG_TOKEN_TEXTS``: ``<|eot_id|>``, ``<|im_end|>``, ``<|end|>``, ``<end_of_turn>``, ...)."""
    wanted = frozenset(EOG_TOKEN_TEXTS)
    found = {text: i for i, text in enumerate(tokens) if text in wanted}
    ids = set(found.values())
    # gpt-oss style vocabularies: <|end|> ends a message but not the generation (llama.cpp's rule).
    if "<|end|>" in found and (("<|return|>" in found and "<|call|>" in found)
                               or ("<|calls|>" in found and "<|flush|>" in found)):
        ids.discard(found["<|end|>"])
    ids.update(int(i) for i in extra)
    if eos_id is not None:
        ids.add(int(eos_id))
    return frozenset(ids)


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Build with ``from_metadata``."""

    def __init__(
        self,
        *,
        model: str,
        pre: str | None,
        tokens: list[str],
        token_types: np.ndarray,
        scores: np.ndarray | None,
        merges: list[str] | None,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        eog_extra_ids: Iterable[int] = (),
    ) -> None:
        self.model = model
        self.pre = pre
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unk_id = unk_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        # Only SentencePiece vocabularies prepend a space (llama.cpp ignores the key for BPE).
        self.add_space_prefix = add_space_prefix and model == "llama"
        self._tokens = tokens
        self._types = [int(t) for t in token_types]

        token_to_id: dict[str, int] = {}
        for token_id, text in enumerate(tokens):
            if not text:
                continue  # an empty token can never be matched (llama.cpp renames it)
            if text in token_to_id:
                raise HalfbyteError(
                    f"tokenizer.ggml.tokens has {text!r} twice (ids {token_to_id[text]} and {token_id})"
                )
            token_to_id[text] = token_id

        if model == "llama":
            assert scores is not None
            mergeable_types = (TokenType.NORMAL, TokenType.USER_DEFINED, TokenType.UNUSED)
            mergeable = {
                text: (float(scores[i]), i)
                for i, text in enumerate(tokens)
                if self._types[i] in mergeable_types and text
            }
            unused = frozenset(i for i, t in enumerate(self._types) if t == TokenType.UNUSED)
            byte_ids: list[int | None] = [token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
            self._spm: SentencePieceBPE | None = SentencePieceBPE(mergeable, unused, byte_ids, unk_id)
            self._bpe: ByteLevelBPE | None = None
        else:
            assert merges is not None
            self._spm = None
            whole_words = {text: i for text, i in token_to_id.items() if self._types[i] == TokenType.NORMAL}
            self._bpe = ByteLevelBPE(token_to_id, merges, pre if pre is not None else "default", whole_words)

        # Token strings cut out of the text before tokenizing, leftmost-longest.
        always = [i for i, t in enumerate(self._types) if t == TokenType.USER_DEFINED and tokens[i]]
        special = always + [
            i for i, t in enumerate(self._types) if t in (TokenType.CONTROL, TokenType.UNKNOWN) and tokens[i]
        ]
        self._split_always = self._splitter(always)
        self._split_special = self._splitter(special)
        self._bytes_cache: dict[int, bytes] = {}
        self.eog_ids = end_of_generation_ids(tokens, eos_id, eog_extra_ids)

    def is_eog(self, token_id: int) -> bool:
        """True for a token that ends a generation (``eog_ids``)."""
        return token_id in self.eog_ids

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer described by GGUF ``metadata`` (keys ``tokenizer.ggml.*``).

        Raises ``HalfbyteError`` for an unknown model or pre-tokenizer, and for missing
        or inconsistent keys (array lengths that differ, ids outside the vocabulary,
        merges that make tokens the vocabulary lacks, duplicate tokens).
        """
        model = metadata.get(_key("model"))
        if model is None:
            raise HalfbyteError("missing tokenizer.ggml.model in the GGUF metadata")
        if model not in _KNOWN_MODELS:
            raise HalfbyteError(
                f"unsupported tokenizer.ggml.model = {model!r} (supported: {', '.join(_KNOWN_MODELS)})"
            )
        tokens = _string_list(metadata, "tokens")
        if not tokens:
            raise HalfbyteError("tokenizer.ggml.tokens is empty")
        vocab_size = len(tokens)
        token_types = _numeric_array(metadata, "token_type", vocab_size)
        if token_types is None:
            token_types = np.full(vocab_size, TokenType.NORMAL, dtype=np.int32)
        elif token_types.dtype.kind not in "iu":
            raise HalfbyteError("tokenizer.ggml.token_type must be an integer array")
        scores = _numeric_array(metadata, "scores", vocab_size)
        pre = metadata.get(_key("pre"))
        if pre is not None and not isinstance(pre, str):
            raise HalfbyteError(f"tokenizer.ggml.pre must be a string, got {pre!r}")

        if model == "llama":
            if scores is None:
                raise HalfbyteError("missing tokenizer.ggml.scores, which a 'llama' (SentencePiece) vocabulary needs")
            merges = None
            # llama.cpp's defaults for SentencePiece vocabularies
            default_bos, default_eos, default_unk, default_add_bos = 1, 2, 0, True
        else:
            merges = _string_list(metadata, "merges")
            # llama.cpp adds BOS by default for some pre-tokenizers (Llama 3's).
            default_add_bos = pre_tokenizer(pre if pre is not None else "default").add_bos
            default_bos, default_eos, default_unk = None, None, None

        def default_if_in_range(token_id: int | None) -> int | None:
            return token_id if token_id is not None and token_id < vocab_size else None

        bos_id = _optional_id(metadata, "bos_token_id", default_if_in_range(default_bos), vocab_size)
        eos_id = _optional_id(metadata, "eos_token_id", default_if_in_range(default_eos), vocab_size)
        unk_id = _optional_id(metadata, "unknown_token_id", default_if_in_range(default_unk), vocab_size)
        pad_id = _optional_id(metadata, "padding_token_id", None, vocab_size)
        if bos_id is None and model == "gpt2":
            default_add_bos = False  # a name's BOS default needs a BOS token to add
        add_bos = _optional_flag(metadata, "add_bos_token", default_add_bos)
        add_eos = _optional_flag(metadata, "add_eos_token", False)
        add_space_prefix = _optional_flag(metadata, "add_space_prefix", model == "llama")
        eog_extra = [_optional_id(metadata, f"{name}_token_id", None, vocab_size) for name in EOG_ID_KEYS]
        if add_bos and bos_id is None:
            raise HalfbyteError("tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id")
        if add_eos and eos_id is None:
            raise HalfbyteError("tokenizer.ggml.add_eos_token is true but there is no tokenizer.ggml.eos_token_id")

        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            token_types=token_types,
            scores=scores,
            merges=merges,
            bos_id=bos_id,
            eos_id=eos_id,
            unk_id=unk_id,
            pad_id=pad_id,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            eog_extra_ids=[i for i in eog_extra if i is not None],
        )

    def _splitter(self, ids: list[int]) -> tuple[re.Pattern[str], dict[str, int]] | None:
        if not ids:
            return None
        by_text = {self._tokens[i]: i for i in ids}
        # Longest first: `re` tries alternatives in order at the leftmost position.
        alternatives = sorted(by_text, key=len, reverse=True)
        return re.compile("|".join(re.escape(text) for text in alternatives)), by_text

    # ----------------------------------------------------------------- encoding

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        parse_special: bool = False,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of ``text``.

        ``add_bos``/``add_eos``: None means the GGUF's own setting. ``parse_special``:
        also recognise control tokens written in the text (``<s>``, ``<|endoftext|>``).
        """
        if not isinstance(text, str):
            raise HalfbyteError(f"encode() needs a str, got {type(text).__name__}")
        if add_bos is None:
            add_bos = self.add_bos
        if add_eos is None:
            add_eos = self.add_eos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise HalfbyteError("this vocabulary has no BOS token to add")
            ids.append(self.bos_id)

        splitter = self._split_special if parse_special else self._split_always
        after_special = True  # SentencePiece adds its space prefix to text that starts a run
        for fragment, token_id in self._fragments(text, splitter):
            if token_id is not None:
                ids.append(token_id)
                after_special = True
                continue
            if self._spm is not None:
                if self.add_space_prefix and after_special:
                    fragment = " " + fragment
                ids.extend(self._spm.encode(fragment.replace(" ", SPACE_SYMBOL)))
            else:
                assert self._bpe is not None
                ids.extend(self._bpe.encode(fragment))
            after_special = False

        if add_eos:
            if self.eos_id is None:
                raise HalfbyteError("this vocabulary has no EOS token to add")
            ids.append(self.eos_id)
        return ids

    @staticmethod
    def _fragments(
        text: str, splitter: tuple[re.Pattern[str], dict[str, int]] | None
    ) -> Iterable[tuple[str, int | None]]:
        """(text, None) for plain text and ("", id) for special tokens found in it."""
        if not text:
            return
        if splitter is None:
            yield text, None
            return
        pattern, by_text = splitter
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], None
            yield "", by_text[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None

    # ----------------------------------------------------------------- decoding

    def _check_id(self, token_id: int) -> int:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise HalfbyteError(f"token id must be an integer, got {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise HalfbyteError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        return int(token_id)

    def piece(self, token_id: int) -> str:
        """The token's string as stored in the GGUF (``▁Hello``, ``Ġworld``, ``<0x0A>``)."""
        return self._tokens[self._check_id(token_id)]

    def token_type(self, token_id: int) -> TokenType:
        try:
            return TokenType(self._types[self._check_id(token_id)])
        except ValueError:  # a type number llama.cpp does not know either
            return TokenType.UNDEFINED

    def is_control(self, token_id: int) -> bool:
        return self._types[self._check_id(token_id)] == TokenType.CONTROL

    def token_bytes(self, token_id: int, render_special: bool = False) -> bytes:
        """The raw bytes a token stands for; control/unknown/unused tokens give b""
        unless ``render_special`` (then their text)."""
        token_id = self._check_id(token_id)
        if not render_special:
            cached = self._bytes_cache.get(token_id)
            if cached is not None:
                return cached
        text = self._tokens[token_id]
        token_type = self._types[token_id]
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED, TokenType.UNDEFINED):
            result = to_utf8(text) if render_special else b""
        elif token_type == TokenType.USER_DEFINED:
            result = to_utf8(text)
        elif token_type == TokenType.BYTE:
            match = _BYTE_PIECE.fullmatch(text)
            result = bytes([int(match.group(1), 16)]) if match else to_utf8(text)
        elif self.model == "llama":
            result = to_utf8(text.replace(SPACE_SYMBOL, " "))
        else:
            # Byte-level characters back to bytes; anything outside the table (not
            # produced by the byte-level mapping) stands for its own UTF-8.
            result = b"".join(
                bytes([UNICODE_TO_BYTE[c]]) if c in UNICODE_TO_BYTE else to_utf8(c) for c in text
            )
        if not render_special:
            self._bytes_cache[token_id] = result
        return result

    def _strips_space(self, token_id: int) -> bool | None:
        """For the first token of a SentencePiece sequence: True/False once decided, None to
        keep waiting. Like sentencepiece, control tokens are skipped, and only a normal or
        user-defined piece loses the dummy-prefix space (a ``<0x20>`` byte keeps it)."""
        token_type = self._types[token_id]
        if token_type == TokenType.CONTROL:
            return None
        return token_type in (TokenType.NORMAL, TokenType.USER_DEFINED)

    def token_piece(self, token_id: int, errors: str = "replace") -> str:
        """A token's display text, special tokens included (``<s>``, ``<|eot_id|>``,
        `` Hello`` for ``▁Hello``/``Ġworld``-style pieces): llama.cpp's
        ``llama_token_to_piece(..., special=true)`` read as UTF-8. A token holding part of
        a character (a byte token) shows U+FFFD unless ``errors`` says otherwise
        (``"backslashreplace"`` shows ``\\xe4``)."""
        return self.token_bytes(token_id, render_special=True).decode("utf-8", errors=errors)

    def decode(
        self,
        ids: Iterable[int],
        special: bool = False,
        strip_leading_space: bool = True,
        *,
        render_special: bool | None = None,
    ) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD).

        ``special``: control tokens (BOS, EOS, ``<|eot_id|>``, ...) appear as their text,
        as with llama.cpp's ``special = true``; by default they are left out.
        ``render_special`` is the older name of ``special``.
        ``strip_leading_space``: the ids start a sequence, so the space SentencePiece
        prepended when encoding is dropped (``[BOS, "▁Hello"]`` -> ``"Hello"``).
        """
        if render_special is not None:
            special = render_special
        decoder = self.stream_decoder(special=special, strip_leading_space=strip_leading_space)
        return "".join([decoder.feed(token_id) for token_id in ids]) + decoder.flush()

    def stream_decoder(
        self, special: bool = False, strip_leading_space: bool = False, *, render_special: bool | None = None
    ) -> StreamDecoder:
        """A decoder for ids arriving one at a time (generation).

        The default suits continuing after a prompt: a first ``▁world`` prints as
        `` world``. Pass ``strip_leading_space=True`` when the ids start a sequence.
        ``special``: render control tokens as their text (``render_special``: older name).
        """
        if render_special is not None:
            special = render_special
        return StreamDecoder(self, render_special=special, strip_leading_space=strip_leading_space)

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns ids fed one by one into text, emitting only complete UTF-8 characters.

    Bytes of a character split across tokens (emoji, CJK through byte fallback or
    byte-level BPE) are held back until the character is whole; bytes that can never
    form a character come out as U+FFFD. ``flush()`` releases what is left.
    """

    def __init__(self, tokenizer: Tokenizer, render_special: bool = False, strip_leading_space: bool = False) -> None:
        self._tokenizer = tokenizer
        self._render_special = render_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending_strip = strip_leading_space and tokenizer.add_space_prefix

    def feed(self, token_id: int) -> str:
        """The text that became complete with this token ("" if none yet)."""
        data = self._tokenizer.token_bytes(token_id, render_special=self._render_special)
        if self._pending_strip:
            strips = self._tokenizer._strips_space(token_id)
            if strips is not None:
                self._pending_strip = False
                if strips and data.startswith(b" "):
                    data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
