"""Regex pre-tokenizers (``tokenizer.ggml.pre``): Llama 3, Qwen2 and the other names.

References:
- Llama 3 (``llama-bpe``) and Qwen2/3 (``qwen2``): Hugging Face ``tokenizers`` on the real
  tokenizer.json files, compared id for id. The GGUF metadata is built here from the same
  file the way the converter does (added tokens: special -> control, others -> user-defined).
- Names without a real vocabulary here: the word split itself, against a ``Sequence`` of
  ``tokenizers.pre_tokenizers.Split(Regex(pattern), "isolated")`` (Oniguruma running the
  very patterns), and the class tables against Oniguruma's ``\\p{..}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import HalfbyteError
from engine.tokenizer import Tokenizer, TokenType
from engine.tokenizer.bpe import GPT2_PATTERN, PRE_TOKENIZERS, pre_tokenizer, split_gpt2
from engine.tokenizer.identify import CHECK_HASHES, check_hash, pre_from_tokenizer_json
from engine.tokenizer.pretokenize import RegexSplitter, translate
from engine.tokenizer.unicode_tables import CLASS_RANGES, class_ranges

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"
REAL = {"llama3": "llama-bpe", "qwen": "qwen2"}

CORPUS = [
    "",
    " ",
    "   x",
    "x   ",
    "Hello world",
    " Hello  world   again    !",
    "\n",
    "\n\n  \n",
    "\n\n  \n   x",
    "a\r\nb\r\n\r\n  c\n",
    "\t\tindented\n\t\t\tmore\n",
    "trailing spaces   \n   ",
    "I'm they'll don't we've you're he'd it's",
    "I'M THEY'LL DON'T WE'VE YOU'RE HE'D IT'S 'S 'T 'Re 'vE",
    "'ſ 'ſt ''s '' x's",
    "1 12 123 1234 12345 123456 1234567 3.14159 1,000,000 -42 1e-5 0x1F",
    "٣٤٥٦ ௧௨௩௪ １２３４ ²³¹ ½¼ Ⅻ 𝟙𝟚𝟛",
    "你好，世界！这是一个测试。",
    "こんにちは、世界。カタカナとひらがな",
    "안녕하세요 세계 \u1100\u1161\u11a8",
    "مرحبا بالعالم، كيف الحال؟",
    "नमस्ते दुनिया। हिन्दी",
    "Привет, мир! Ёжик",
    "ไทย ภาษา",
    "😀 🤖 👍🏽 👨‍👩‍👧‍👦 🇺🇸🇯🇵 🏳️‍🌈",
    "e\u0301 a\u0300 n\u0303 café naïve Å Å ﬁ",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n    pass\n",
    "if (a && b) { return c->d[i]; } else { x |= 0xFF; }",
    "<html><body class=\"x\">&amp;</body></html>",
    "https://example.com/path?q=1&r=two#frag user@example.com",
    "!!!???...,,,;;;:::---___*** $$$ +++ <<< === >>> ^^^ ~~~ |||",
    "«quotes» “curly” ‘single’ — dash – … ¿¡",
    "\x00 \x01 \x1b[31m \x7f a\x1cb\x1dc",
    "\u00a0nbsp \u2003em \u3000ideographic \u200bzwsp \ufeffbom \u2028line\u2029para\u0085nel",
    " việc jeho ektedir Việt",  # whole-word tokens BPE merges would not build (Llama 3 ignores merges)
    "<|begin_of_text|>Hi<|eot_id|>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|endoftext|>",
    "<|im_start <|eot_id |> <tool_call></tool_call> <|fim_prefix|>",
    "\U00010000\U0010fffd\U000e0001 \U00011380 \u1c89",
]

SNIPPETS = [
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<think>", "</tool_call>", "<|", "|>", "'s", "'LL", "\r\n", "\n\n", "   ", "123456", "٣٤٥",
]
_TRICKY = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2003\u3000'sStTdDmlLvre0123456789²½٣.,!?-_$+<=>^~|`@#\"")
_TRICKY += ["\u0301", "\u0308", "\u200d", "\ufe0f", "\U0001f600", "\U0001f1fa", "\u4e2d", "\u3042", "\u1100", "é", "ſ"]
_CHARS = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(_TRICKY))
TEXTS = st.lists(st.one_of(st.text(alphabet=_CHARS, max_size=8), st.sampled_from(SNIPPETS)), max_size=8).map("".join)
SWEEP = settings(
    max_examples=250,
    deadline=None,
    database=None,  # keep no example files in the work tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _tokenizer_json(name: str) -> dict:
    return json.loads((FIXTURES / name / "tokenizer.json").read_text(encoding="utf-8"))


def gguf_metadata(name: str, pre: str) -> dict:
    """tokenizer.ggml.* keys for the fixture's tokenizer.json (as the converter writes them)."""
    data = _tokenizer_json(name)
    config = json.loads((FIXTURES / name / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = dict(data["model"]["vocab"])
    types = {}
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    tokens = [""] * (max(vocab.values()) + 1)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(types.get(i, TokenType.NORMAL)) for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": vocab[config["eos_token"]],
        "tokenizer.ggml.bos_token_id": vocab[config["bos_token"] or "<|endoftext|>"],
    }
    if "add_bos_token" in config:
        metadata["tokenizer.ggml.add_bos_token"] = config["add_bos_token"]
    return metadata


@pytest.fixture(scope="module")
def real() -> dict[str, tuple[Tokenizer, HFTokenizer, HFTokenizer]]:
    """name -> (ours, reference with special tokens as text, reference parsing them)."""
    result = {}
    for name, pre in REAL.items():
        plain = HFTokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
        plain.encode_special_tokens = True
        special = HFTokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
        result[name] = (Tokenizer.from_metadata(gguf_metadata(name, pre)), plain, special)
    return result


def _ids(reference: HFTokenizer, text: str) -> list[int]:
    return reference.encode(text, add_special_tokens=False).ids


def _check(tokenizer: Tokenizer, plain: HFTokenizer, special: HFTokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_bos=False)
    assert ids == _ids(plain, text), text
    parsed = tokenizer.encode(text, add_bos=False, parse_special=True)
    assert parsed == _ids(special, text), text
    assert tokenizer.decode(parsed, special=True) == special.decode(parsed, skip_special_tokens=False), text


# ------------------------------------------------------------------------- real vocabularies


@pytest.mark.parametrize("name", REAL)
def test_real_vocabulary_matches_tokenizers(real, name):
    tokenizer, plain, special = real[name]
    for text in CORPUS:
        _check(tokenizer, plain, special, text)
    long_text = "".join(CORPUS) * 3
    _check(tokenizer, plain, special, long_text)


@pytest.mark.parametrize("name", REAL)
@SWEEP
@given(text=TEXTS)
def test_real_vocabulary_sweep(real, name, text):
    tokenizer, plain, special = real[name]
    _check(tokenizer, plain, special, text)


def test_llama3_bos_and_specials(real):
    llama3 = real["llama3"][0]
    assert llama3.pre == "llama-bpe" and llama3.vocab_size == 128256
    # llama.cpp adds BOS for llama-bpe unless tokenizer.ggml.add_bos_token says otherwise.
    assert llama3.add_bos and llama3.encode("Hello world") == [128000, 9906, 1917]
    assert llama3.encode("<|begin_of_text|>Hi", parse_special=True)[:2] == [128000, 128000]
    no_bos = Tokenizer.from_metadata({**gguf_metadata("llama3", "llama-bpe"), "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("Hello world") == [9906, 1917]
    without_id = {**gguf_metadata("llama3", "llama-bpe")}
    del without_id["tokenizer.ggml.bos_token_id"]
    assert not Tokenizer.from_metadata(without_id).add_bos
    eot = llama3.encode("<|eot_id|>", add_bos=False, parse_special=True)
    assert eot == [128009] and llama3.is_control(128009)
    assert 128009 not in llama3.encode("<|eot_id|>")
    # Whole-word tokens: merges alone would spell " việc" as three tokens.
    assert llama3.encode(" việc", add_bos=False) == [100769]


def test_qwen_no_bos_and_user_defined_tokens(real):
    qwen = real["qwen"][0]
    assert not qwen.add_bos and qwen.encode("Hello world") == [9707, 1879]
    # <think> is a non-special added token: cut out of the text even without parse_special.
    assert qwen.encode("<think>x</think>")[0] == 151667
    assert qwen.token_type(151667) == TokenType.USER_DEFINED
    assert qwen.encode("<|im_start|>", parse_special=True) == [151644]
    assert 151644 not in qwen.encode("<|im_start|>")
    # NFC first, as the tokenizer.json's normalizer does.
    assert qwen.encode("e\u0301") == qwen.encode("\u00e9")


def test_decode_special_and_token_piece(real):
    llama3 = real["llama3"][0]
    ids = llama3.encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", parse_special=True)
    assert ids[0] == 128000
    assert llama3.decode(ids) == "user\n\nHi"
    rendered = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert llama3.decode(ids, special=True) == rendered
    assert llama3.decode(ids, render_special=True) == llama3.decode(ids, special=True)
    assert "".join(llama3.token_piece(i) for i in ids) == llama3.decode(ids, special=True)
    assert llama3.token_piece(128000) == "<|begin_of_text|>"
    assert llama3.token_piece(9906) == "Hello" and llama3.token_piece(1917) == " world"
    (first, *_) = llama3.encode("😀", add_bos=False)
    assert llama3.token_piece(first) == "\ufffd"  # part of a character
    assert llama3.token_piece(first, errors="backslashreplace").startswith("\\x")
    qwen = real["qwen"][0]
    assert qwen.token_piece(151644) == "<|im_start|>" and qwen.token_piece(151667) == "<think>"


# ------------------------------------------------------------------------- every pre name


def _patterns(pre: str) -> list[str] | None:
    """The regexes a name runs, in order, or None for the hand-written ones."""
    split = pre_tokenizer(pre).split
    if isinstance(split, RegexSplitter):
        return list(split.patterns)
    if pre_tokenizer(pre) is PRE_TOKENIZERS["starcoder"]:
        return [r"\p{N}", GPT2_PATTERN]
    assert split is split_gpt2, pre
    return [GPT2_PATTERN]


_REFERENCE_SPLITS: dict[str, pre_tokenizers.PreTokenizer] = {}


def _reference_words(pre: str, text: str) -> list[str]:
    if pre not in _REFERENCE_SPLITS:
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _patterns(pre)]
        _REFERENCE_SPLITS[pre] = pre_tokenizers.Sequence(splits)
    return [word for word, _ in _REFERENCE_SPLITS[pre].pre_tokenize_str(text)]


REGEX_NAMES = sorted(name for name in PRE_TOKENIZERS if name != "falcon")  # falcon: see test_tokenizer.py


@pytest.mark.parametrize("pre", REGEX_NAMES)
def test_split_matches_oniguruma(pre):
    split = pre_tokenizer(pre).split
    for text in CORPUS:
        assert split(text) == _reference_words(pre, text), (pre, text)


_SWEEP_NAMES = ["llama-bpe", "qwen2", "qwen35", "starcoder", "deepseek-llm", "deepseek-coder", "deepseek-v3", "bloom",
                "viking"]


@pytest.mark.parametrize("pre", _SWEEP_NAMES)
@settings(max_examples=120, deadline=None, database=None)
@given(text=TEXTS)
def test_split_sweep(pre, text):
    assert pre_tokenizer(pre).split(text) == _reference_words(pre, text)


def test_aliases_share_patterns():
    for alias in ("llama3", "llama-v3", "falcon3"):
        assert PRE_TOKENIZERS[alias] is PRE_TOKENIZERS["llama-bpe"]
    assert PRE_TOKENIZERS["llama-bpe"].ignore_merges and PRE_TOKENIZERS["llama-bpe"].add_bos
    assert not PRE_TOKENIZERS["smaug-bpe"].ignore_merges and not PRE_TOKENIZERS["smaug-bpe"].add_bos
    assert _patterns("smaug-bpe") == _patterns("dbrx") == _patterns("llama-bpe")
    assert _patterns("stablelm2") == _patterns("qwen2")
    assert _patterns("refact") == _patterns("command-r") == _patterns("starcoder")


def test_unknown_pre_is_named():
    with pytest.raises(HalfbyteError, match="tokenizer.ggml.pre = 'tekken-9'"):
        pre_tokenizer("tekken-9")


def test_translate_rejects_what_it_cannot_mean():
    for pattern in (r"\d+", r"\P{L}", r"[\S]", r"\p{Han}", r"\w"):
        with pytest.raises(HalfbyteError):
            translate(pattern)


def test_class_tables_match_oniguruma():
    # Planes 4-13 are unassigned and 15-16 private use: no letters, marks, ... there.
    codes = [c for c in range(0x40000) if not 0xD800 <= c <= 0xDFFF] + list(range(0xE0000, 0xF0000))
    text = "".join(map(chr, codes))
    for name in CLASS_RANGES:
        split = pre_tokenizers.Split(Regex(rf"\p{{{name}}}+"), behavior="removed")
        outside = set("".join(word for word, _ in split.pre_tokenize_str(text)))
        expected = sorted(set(text) - outside)
        ours = [chr(c) for first, last in class_ranges(name) for c in range(first, last + 1)]
        assert ours == expected, name


# ------------------------------------------------------------------------- speed (no limit)


def test_encode_100kb_reports_speed(real, capsys):
    """Not a timed test: encodes ~100 kB of varied text and prints tokens/s next to HF's."""
    tokenizer, plain, _ = real["llama3"]
    text = ("\n".join(CORPUS) * 60)[:100_000]
    start = time.perf_counter()
    ids = tokenizer.encode(text, add_bos=False)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    reference = _ids(plain, text)
    theirs = time.perf_counter() - start
    assert ids == reference
    with capsys.disabled():
        print(f"\nllama-bpe 100 kB: {len(ids) / ours:,.0f} tokens/s (tokenizers: {len(ids) / theirs:,.0f})")


# ------------------------------------------------------------------------- naming a tokenizer.json


@pytest.mark.parametrize(
    "name, expected", [("llama3", "llama-bpe"), ("qwen", "qwen2"), ("mpt", "olmo"), ("falcon", "falcon")]
)
def test_pre_from_tokenizer_json(name, expected):
    assert pre_from_tokenizer_json(_tokenizer_json(name)) == expected


def test_check_hash_is_llama_cpps():
    # Our fixture's Llama 3 file adds no BOS, so its fingerprint is Smaug's; with Meta's BOS
    # template it is Meta-Llama-3-8B's. Structure names both llama-bpe (ignore_merges is on).
    data = _tokenizer_json("llama3")
    assert CHECK_HASHES[check_hash(data)] == "smaug-bpe"
    bos = {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<|begin_of_text|>": bos},
    }
    assert CHECK_HASHES[check_hash(data)] == "llama-bpe"
    data["model"]["ignore_merges"] = False
    assert pre_from_tokenizer_json(data) == "smaug-bpe"
    # A pattern spelled differently (llama.cpp's adaptation): the fingerprint still knows it.
    data["model"]["ignore_merges"] = True
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    )
    assert pre_from_tokenizer_json(data) == "llama-bpe"
    data["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    assert pre_from_tokenizer_json(data) is None
