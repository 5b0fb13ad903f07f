"""Tokenizers built from GGUF metadata, checked id for id against the reference libraries.

References: ``sentencepiece`` on the LLaMA-2 model for the SPM vocabulary; Hugging Face
``tokenizers`` for the byte-level BPE ones (Falcon and MPT from their tokenizer.json,
GPT-NeoX built here from the GGUF's own vocabulary and merges with the standard
byte-level pre-tokenizer).

Special tokens: llama.cpp always cuts user-defined tokens (type 4) out of the text,
and control tokens (type 3) only with ``parse_special``. The matching Hugging Face
setup marks user-defined tokens as non-special added tokens, control ones as special,
and sets ``encode_special_tokens = True`` for the plain mode (special tokens are then
left as text), False for ``parse_special``.
"""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import HalfbyteError
from engine.gguf_file import GGUFFile
from engine.tokenizer import StreamDecoder, Tokenizer, TokenType
from engine.tokenizer.bpe import PRE_TOKENIZERS
from engine.tokenizer.unicode import nfc_like_tokenizers

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
BPE_NAMES = ("falcon", "mpt", "gpt-neox")

HOSTILE = [
    "",
    " ",
    "  ",
    "        ",
    " " * 30,
    "\t",
    "\n",
    "\n\n\t",
    "\r\n",
    " \n \n ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "   leading and trailing   ",
    "Hello  world   again    !",
    "你好，世界！这是一个测试。",
    "こんにちは、世界。カタカナとひらがな",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир! Ёжик",
    "Ελληνικά γράμματα",
    "עברית",
    "ไทย ภาษา",
    "😀 🤖 👍🏽",
    "👨‍👩‍👧‍👦 family, 👩🏽‍💻 coder",
    "🇺🇸🇯🇵🇩🇪 flags 🏳️‍🌈",
    "e\u0301 a\u0300 n\u0303 café naïve",
    "\u1100\u1161\u11a8",  # conjoining jamo: NFC composes them
    "Å Å ﬁ ½ ² ³ ¹ ¼",
    "1234567890 12 3",
    "123456789012345678901234567890",
    "3.14159 1,000,000 -42 +7 1e-5 0x1F",
    "٣٤٥ ௧௨௩ １２３",
    "I'm they'll don't 'S we've you're he'd it's 'll 're",
    "I'M THEY'LL DON'T",
    "''s '' 's''",
    "def f(x):\n    return x ** 2  # square\n",
    "if (a && b) { return c->d[i]; } else { x |= 0xFF; }",
    "<html><body class=\"x\">&amp;</body></html>",
    "https://example.com/path?q=1&r=two#frag",
    "user@example.com /usr/local/bin ~/.bashrc C:\\Windows",
    "!!!???...,,,;;;:::---___***",
    "$$$ +++ <<< === >>> ^^^ ~~~ ||| ``` @@@ ###",
    "«quotes» “curly” ‘single’ — dash – … ¿¡",
    "<s> </s> <unk> <|endoftext|> <|padding|> >>TITLE<<",
    "<s>Hello</s>",
    "<0x41> ▁ ▁▁",
    "\x00 \x01 \x1b[31m \x7f",
    "a\x1cb\x1dc\x1ed\x1fe",
    "\u00a0nbsp \u2003em \u3000ideographic \u200bzwsp \ufeffbom",
    "\u2028line\u2029para\u0085nel",
    "tab\tseparated\tvalues\n1\t2\t3",
    "MixedCASE camelCase snake_case kebab-case",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝟙𝟚𝟛",
    "\U00010000\U0010fffd\U000e0001",
]


def _load(path: Path) -> dict:
    with GGUFFile(path) as gguf:
        return dict(gguf.metadata)


def _vocab_path(name: str) -> Path:
    return FIXTURES / "vocab" / f"ggml-vocab-{name}.gguf"


@pytest.fixture(scope="module")
def metadata() -> dict[str, dict]:
    return {name: _load(_vocab_path(name)) for name in ("llama-spm", *BPE_NAMES)}


@pytest.fixture(scope="module")
def tokenizers(metadata) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_metadata(md) for name, md in metadata.items()}


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer.model"))


def _neox_reference(md: dict) -> HFTokenizer:
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {text: i for i, text in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in md["tokenizer.ggml.merges"]]
    reference = HFTokenizer(models.BPE(vocab, merges))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    reference.decoder = decoders.ByteLevel()
    for i, token_type in enumerate(md["tokenizer.ggml.token_type"]):
        if token_type == TokenType.CONTROL:
            reference.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)])
        elif token_type == TokenType.USER_DEFINED:
            reference.add_tokens([AddedToken(tokens[i], special=False, normalized=False)])
    return reference


def _json_reference(name: str, md: dict) -> HFTokenizer:
    config = json.loads((FIXTURES / "tokenizers" / name / "tokenizer.json").read_text(encoding="utf-8"))
    types = md["tokenizer.ggml.token_type"]
    # MPT's json calls its runs-of-spaces tokens special; the GGUF (and llama.cpp) make
    # them user-defined, i.e. always matched. Align the reference with the GGUF.
    for added in config["added_tokens"]:
        added["special"] = bool(types[added["id"]] == TokenType.CONTROL)
    return HFTokenizer.from_str(json.dumps(config))


@pytest.fixture(scope="module")
def references(metadata) -> dict[str, tuple[HFTokenizer, HFTokenizer]]:
    """name -> (plain: special tokens stay text, special: control tokens recognised)."""
    result = {}
    for name in BPE_NAMES:
        plain, special = (
            _neox_reference(metadata[name]) if name == "gpt-neox" else _json_reference(name, metadata[name])
            for _ in range(2)
        )
        plain.encode_special_tokens = True
        result[name] = (plain, special)
    return result


def _reference_ids(reference: HFTokenizer, text: str) -> list[int]:
    return reference.encode(text, add_special_tokens=False).ids


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = tokenizer.stream_decoder(**kwargs)
    chunks = [decoder.feed(token_id) for token_id in ids]
    chunks.append(decoder.flush())
    return chunks


# ------------------------------------------------------------------------- metadata and API


def test_attributes(tokenizers):
    spm = tokenizers["llama-spm"]
    assert (spm.model, spm.vocab_size, spm.bos_id, spm.eos_id, spm.unk_id) == ("llama", 32000, 1, 2, 0)
    assert spm.pad_id is None
    assert spm.add_bos and not spm.add_eos and spm.add_space_prefix
    falcon = tokenizers["falcon"]
    assert (falcon.model, falcon.pre, falcon.vocab_size) == ("gpt2", "falcon", 65024)
    assert (falcon.bos_id, falcon.eos_id) == (11, 11)
    assert not falcon.add_bos and not falcon.add_space_prefix
    mpt = tokenizers["mpt"]
    assert (mpt.pre, mpt.vocab_size, mpt.bos_id, mpt.eos_id, mpt.unk_id) == ("mpt", 50432, 0, 0, 0)
    assert tokenizers["gpt-neox"].pre is None


def test_pieces_and_bytes(tokenizers):
    spm = tokenizers["llama-spm"]
    hello = spm.encode("Hello", add_bos=False)
    assert hello == [15043]
    assert spm.piece(15043) == "▁Hello" and spm.token_bytes(15043) == b" Hello"
    assert spm.piece(13) == "<0x0A>" and spm.token_bytes(13) == b"\n"
    assert spm.token_bytes(1) == b"" and spm.token_bytes(1, render_special=True) == b"<s>"
    assert spm.token_bytes(0) == b""  # <unk>, as llama.cpp prints it
    assert spm.token_type(3) == TokenType.BYTE and spm.is_control(2)

    neox = tokenizers["gpt-neox"]
    (world,) = neox.encode(" world")
    assert neox.piece(world) == "Ġworld" and neox.token_bytes(world) == b" world"
    assert neox.token_bytes(0) == b""  # <|endoftext|>
    assert neox.token_bytes(neox.encode("\n")[0]) == b"\n"
    with pytest.raises(HalfbyteError):
        neox.piece(neox.vocab_size)
    with pytest.raises(HalfbyteError):
        neox.decode([-1])


def test_bos_eos_and_empty(tokenizers):
    spm = tokenizers["llama-spm"]
    assert spm.encode("") == [1]
    assert spm.encode("", add_bos=False) == []
    assert spm.encode("Hello", add_bos=False, add_eos=True) == [15043, 2]
    falcon = tokenizers["falcon"]
    assert falcon.encode("") == []
    assert falcon.encode("Hi", add_bos=True)[0] == 11


# ------------------------------------------------------------------------- SentencePiece


@pytest.mark.parametrize("text", HOSTILE)
def test_spm_matches_sentencepiece(tokenizers, sp, text):
    tokenizer = tokenizers["llama-spm"]
    ids = tokenizer.encode(text)
    assert ids == [1, *sp.encode(text)]
    # llama.cpp's vocabulary has no normalizer: the text comes back, except that a
    # literal "▁" is indistinguishable from the space it stands for.
    assert tokenizer.decode(ids) == text.replace("▁", " ") == sp.decode(ids).replace("▁", " ")
    assert "".join(_stream(tokenizer, ids, strip_leading_space=True)) == tokenizer.decode(ids)


def test_spm_parse_special(tokenizers, sp):
    tokenizer = tokenizers["llama-spm"]
    assert tokenizer.encode("<s>Hello</s>", parse_special=True) == [1, 1, 15043, 2]
    assert tokenizer.encode("<s>Hello</s>") == [1, *sp.encode("<s>Hello</s>")]
    # Text after a special token gets the space prefix again, as in llama.cpp.
    assert tokenizer.encode("a</s>b", add_bos=False, parse_special=True) == [*sp.encode("a"), 2, *sp.encode("b")]


def test_spm_decode_leading_space(tokenizers, sp):
    tokenizer = tokenizers["llama-spm"]
    for ids in ([1, 15043], [15043, 15043], [1, 2, 15043], [29871, 15043], [35, 15043], [1, 35, 15043], [259, 15043]):
        assert tokenizer.decode(ids) == sp.decode(ids), ids
    # Streaming after a prompt keeps the space: "▁world" continues "Hello" as " world".
    assert "".join(_stream(tokenizer, [3186])) == " world"
    assert "".join(_stream(tokenizer, [1, 15043], strip_leading_space=True)) == "Hello"


# ------------------------------------------------------------------------- byte-level BPE


@pytest.mark.parametrize("name", BPE_NAMES)
def test_bpe_matches_tokenizers(tokenizers, references, name):
    tokenizer = tokenizers[name]
    plain, special = references[name]
    for text in HOSTILE:
        ids = tokenizer.encode(text)
        assert ids == _reference_ids(plain, text), text
        assert tokenizer.encode(text, parse_special=True) == _reference_ids(special, text), text
        assert tokenizer.decode(ids) == plain.decode(ids, skip_special_tokens=False), text
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_bpe_special_tokens(tokenizers):
    falcon = tokenizers["falcon"]
    assert falcon.encode("<|endoftext|>", parse_special=True) == [11]
    assert 11 not in falcon.encode("<|endoftext|>")
    mpt = tokenizers["mpt"]
    # Runs of spaces are user-defined tokens in MPT's vocabulary: always matched.
    ids = mpt.encode("a     b")
    assert mpt.piece(ids[1]) == " " * 5 and mpt.token_type(ids[1]) == TokenType.USER_DEFINED
    assert mpt.decode(ids) == "a     b"


def test_mpt_normalizes_nfc(tokenizers, references):
    mpt = tokenizers["mpt"]
    assert mpt.encode("e\u0301") == mpt.encode("\u00e9")
    assert mpt.decode(mpt.encode("e\u0301")) == "\u00e9"
    # tokenizers' NFC tables predate Unicode 10: marks and compositions added since
    # are left alone (Python would reorder a + U+0345 + U+1DFA, compose U+11935 U+11930).
    plain, _ = references["mpt"]
    samples = ("a\u0345\u1dfa", "a\u1dfa\u0301", "\U00011935\U00011930", "a\u0301\u1ac0\u0316", "\u0d3b\u0301e\u0301")
    for text in samples:
        assert nfc_like_tokenizers(text) == plain.normalizer.normalize_str(text)
        assert mpt.encode(text) == _reference_ids(plain, text)


# Characters whose class differs between Python 3.11's Unicode 14 and the references:
# letters and digits from Unicode 15-16 (Oniguruma knows them), punctuation that
# tokenizers' old Punctuation table lacks, and two it still counts as punctuation.
_VERSION_SKEW = "\u1c89\ua7cb\U00011380\U00031350\U00010d40\U0001e5f1\u061d\u2e43\U00011660\u1b7f\u166d\U000111c9"


@pytest.mark.parametrize("name", BPE_NAMES)
def test_unicode_version_skew(tokenizers, references, name):
    # Compared word by word: ids alone rarely show a misplaced word boundary.
    plain, _ = references[name]
    pre_tokenize = PRE_TOKENIZERS[tokenizers[name].pre or "default"].pre_tokenize
    for char in _VERSION_SKEW:
        text = f"a{char}b 1{char}2 !{char}? {char} {char}{char}x"
        expected = [word for word, _ in plain.pre_tokenizer.pre_tokenize_str(text)]
        assert pre_tokenize(text) == expected, f"U+{ord(char):04X}"
        assert tokenizers[name].encode(text) == _reference_ids(plain, text), f"U+{ord(char):04X}"


# ------------------------------------------------------------------------- properties

# Arbitrary code points (no surrogates), weighted towards characters that stress the
# pre-tokenizers: spaces of all kinds, apostrophes, digits, punctuation, combining
# marks, emoji parts, and SentencePiece's own "▁".
_TRICKY = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000'sStTdDmlLvre0123456789²½٣.,!?-_$+<=>^~|`@#\"")
_TRICKY += ["\u0301", "\u0308", "\u200d", "\ufe0f", "\U0001f600", "\U0001f1fa", "\u4e2d", "\u1100", "\u2581", "é"]
TEXTS = st.text(
    alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(_TRICKY)),
    max_size=40,
)
PROPERTY_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    database=None,  # keep no example files in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def spelled_bytes(tokenizers) -> dict[str, set[int]]:
    """The byte values some token of each vocabulary can produce."""
    return {
        name: set(b"".join(tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)))
        for name, tokenizer in tokenizers.items()
    }


@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_spm_property(tokenizers, sp, text):
    tokenizer = tokenizers["llama-spm"]
    ids = tokenizer.encode(text)
    assert ids == [1, *sp.encode(text)]
    assert tokenizer.decode(ids) == text.replace("▁", " ")
    chunks = _stream(tokenizer, ids, strip_leading_space=True)
    assert "".join(chunks) == tokenizer.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)


@pytest.mark.parametrize("name", BPE_NAMES)
@PROPERTY_SETTINGS
@given(text=TEXTS)
def test_bpe_property(tokenizers, references, spelled_bytes, name, text):
    tokenizer = tokenizers[name]
    plain, special = references[name]
    ids = tokenizer.encode(text)
    assert ids == _reference_ids(plain, text)
    assert tokenizer.encode(text, parse_special=True) == _reference_ids(special, text)

    decoded = tokenizer.decode(ids)
    if name == "mpt":
        assert unicodedata.normalize("NFC", decoded) == unicodedata.normalize("NFC", text)
    else:
        # Falcon's vocabulary lacks a few byte characters (some C0 controls, and 0xF2,
        # a lead byte for planes 8-11); like tokenizers, those bytes are dropped.
        expected = bytes(b for b in text.encode("utf-8") if b in spelled_bytes[name])
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == expected
        if len(expected) == len(text.encode("utf-8")):
            assert decoded == text
    chunks = _stream(tokenizer, ids)
    assert "".join(chunks) == decoded
    if "\ufffd" not in decoded:
        assert not any("\ufffd" in chunk for chunk in chunks)


# ------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", ("llama-spm", *BPE_NAMES))
def test_stream_decoder_never_splits_characters(tokenizers, name):
    tokenizer = tokenizers[name]
    text = "😀👨‍👩‍👧‍👦🇯🇵 漢字かな交じり文 한국어 𝔘𝔫𝔦 e\u0301"
    if name == "mpt":
        text = unicodedata.normalize("NFC", text)
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > len(text) // 2  # many characters really are split over several tokens
    decoder = tokenizer.stream_decoder(strip_leading_space=True)
    assert isinstance(decoder, StreamDecoder)
    chunks = []
    for token_id in ids:
        chunk = decoder.feed(token_id)
        assert "\ufffd" not in chunk
        chunks.append(chunk)
    assert decoder.flush() == ""
    assert "".join(chunks) == text


def test_stream_decoder_flushes_incomplete_character(tokenizers):
    spm = tokenizers["llama-spm"]
    decoder = spm.stream_decoder()
    assert decoder.feed(3 + 0xF0) == ""  # <0xF0>: first byte of a 4-byte character
    assert decoder.feed(3 + 0x9F) == ""
    assert decoder.flush() == "\ufffd"


# ------------------------------------------------------------------------- speed


@pytest.mark.parametrize("name", ("llama-spm", *BPE_NAMES))
def test_encode_10kb_is_fast(tokenizers, name):
    tokenizer = tokenizers[name]
    paragraph = " ".join(HOSTILE[10:50])
    text = (paragraph * (10_000 // len(paragraph) + 1))[:10_000]
    for sample in (text, "x" * 10_000):
        start = time.perf_counter()
        ids = tokenizer.encode(sample)
        elapsed = time.perf_counter() - start
        assert ids and elapsed < 1.0, f"{name}: {elapsed:.2f} s for 10 kB"


# ------------------------------------------------------------------------- errors


def _tiny_llama_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.array([0, 0, 0, -1, -2, -0.5], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 1, 1, 1], dtype=np.int32),
    }


def test_tiny_vocabulary_without_byte_tokens():
    tokenizer = Tokenizer.from_metadata(_tiny_llama_metadata())
    assert tokenizer.encode("a a") == [1, 5, 5]
    assert tokenizer.encode("b", add_bos=False) == [3, 0]  # no <0x62>: the unknown token
    with pytest.raises(HalfbyteError):
        tokenizer.encode(b"a")  # type: ignore[arg-type]
    no_prefix = Tokenizer.from_metadata({**_tiny_llama_metadata(), "tokenizer.ggml.add_space_prefix": False})
    assert no_prefix.encode("a a", add_bos=False) == [4, 5]
    assert no_prefix.decode([5, 5]) == " a a"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": None}, "missing tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": None}, "missing tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "empty"),
        ({"tokenizer.ggml.tokens": "abc"}, "array of strings"),
        ({"tokenizer.ggml.scores": np.zeros(5, dtype=np.float32)}, "has 5 entries"),
        ({"tokenizer.ggml.token_type": np.ones(7, dtype=np.int32)}, "has 7 entries"),
        ({"tokenizer.ggml.scores": None}, "missing tokenizer.ggml.scores"),
        ({"tokenizer.ggml.bos_token_id": 6}, "outside the vocabulary"),
        ({"tokenizer.ggml.eos_token_id": "2"}, "must be an integer"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "must be a boolean"),
        ({"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁", "a", "a"]}, "twice"),
    ],
)
def test_bad_llama_metadata(change, message):
    md = _tiny_llama_metadata()
    for key, value in change.items():
        if value is None:
            md.pop(key)
        else:
            md[key] = value
    with pytest.raises(HalfbyteError, match=message):
        Tokenizer.from_metadata(md)


def test_bad_bpe_metadata(metadata):
    good = metadata["gpt-neox"]
    for change, message in [
        ({"tokenizer.ggml.merges": None}, "missing tokenizer.ggml.merges"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported BPE pre-tokenizer tokenizer.ggml.pre = 'no-such-pre'"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, "not of the form"),
        ({"tokenizer.ggml.merges": ["Ġ zzzzqqq"]}, "not in tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None}, "no tokenizer.ggml.bos_token_id"),
    ]:
        md = dict(good)
        for key, value in change.items():
            if value is None:
                md.pop(key)
            else:
                md[key] = value
        with pytest.raises(HalfbyteError, match=message):
            Tokenizer.from_metadata(md)
