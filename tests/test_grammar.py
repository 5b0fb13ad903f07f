"""GBNF grammars (engine.grammar): llama.cpp's grammar files parse; sentences are recognised as
Python's json / re recognise them; the byte-level token masks equal a direct per-token check over
code points; generation under a grammar only makes text the grammar allows and ends only where
it is complete; run --grammar / --grammar-file, library and server options; errors with line:col."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from engine.errors import HalfbyteError
from engine.grammar import Grammar, GrammarError, allowed_tokens, as_grammar, grammar_for_request

FIXTURES = Path(__file__).parent / "fixtures" / "grammars"
LLAMA_CPP_GRAMMARS = Path(os.environ.get("HALFBYTE_LLAMA_CPP") or "/nonexistent") / "grammars"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def all_grammar_files() -> list[Path]:
    files = sorted(FIXTURES.glob("*.gbnf"))
    if LLAMA_CPP_GRAMMARS.is_dir():
        files += sorted(LLAMA_CPP_GRAMMARS.glob("*.gbnf"))
    return files


@pytest.fixture(scope="module")
def demo_model():
    from engine.default_model import default_model_path
    from engine.model import Model

    return Model.load(default_model_path(), n_ctx=512)


# -- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", all_grammar_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_llama_cpp_grammar_files_parse(path):
    grammar = Grammar.from_file(path)
    assert grammar.initial_stacks()


JSON_SAMPLES = ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e4, "x\\n\\u00e9"], "b": {"c": null, "d": true}}',
                '{ "k" : "v" }', '{"a":1,"b":2}', '{"a" 1}', '{"a": 01}', '{"a": [1,]}', '{"a": "\x01"}',
                '{"a": tru}', '[1]', '{"a": 1} x', '{"\\q": 1}', '{"a":\n 1}', '{"a": .5}']


@pytest.mark.parametrize("text", JSON_SAMPLES)
def test_json_gbnf_agrees_with_python_json(text):
    try:
        expected = isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        expected = False
    assert Grammar(fixture("json.gbnf")).accepts_text(text) == expected


def test_arithmetic_list_and_chess():
    arithmetic = Grammar(fixture("arithmetic.gbnf"))
    assert arithmetic.accepts_text("1+2*(y-3)=x\n")
    assert not arithmetic.accepts_text("x=1+\n")
    lists = Grammar(fixture("list.gbnf"))
    assert lists.accepts_text("- one\n- two\n")
    assert not lists.accepts_text("- one")
    chess = Grammar(fixture("chess.gbnf"))
    assert chess.accepts_text("1. e4 e5\n2. Nf3 Nc6\n3. O-O exd4+\n")
    assert not chess.accepts_text("1. e4 e5\n")


# GBNF constructs against the same pattern in Python's re
CONSTRUCTS = [
    ('root ::= [a-c]+ "x"?', r"[a-c]+x?"),
    ('root ::= [^abc]{2,3}', r"[^abc]{2,3}"),
    ('root ::= "ab"{2} | "c"{0,}', r"(?:ab){2}|c*"),
    ('root ::= ("a" | "b" "c")* # a comment\n', r"(?:a|bc)*"),
    ('root ::= . . "\\x41"', r"..A"),
    ('root ::= [\\u00e0-\\u00ff]{1,2} "\\U0001F600"?', "[\u00e0-\u00ff]{1,2}\U0001F600?"),
    ('root ::= "[" [\\]\\-]* "]"', r"\[[\]\-]*\]"),
    ('root ::= ( "a"\n  | "b" ) "c" |\n  "d"', r"(?:a|b)c|d"),
    ('root ::= x{1,}\nx ::= [0-9] | "-"', r"[0-9-]+"),
]


@pytest.mark.parametrize("gbnf, pattern", CONSTRUCTS)
def test_constructs_match_like_python_re(gbnf, pattern):
    grammar = Grammar(gbnf)
    regex = re.compile(pattern, re.DOTALL)
    rng = np.random.default_rng(len(gbnf))
    alphabet = list("abcxA-[]09\u00e0\u00ff\U0001F600\n")
    samples = ["", "ab", "abab", "aaax", "bcbc", "ac", "bc", "[]", "[-]", "\u00e0\U0001F600", "zzA", "12-3", "dd"]
    samples += ["".join(rng.choice(alphabet, size=rng.integers(0, 6))) for _ in range(300)]
    for text in samples:
        assert grammar.accepts_text(text) == bool(regex.fullmatch(text)), (gbnf, text)


@pytest.mark.parametrize("text, where, what", [
    ('root ::= "a', "1:10", "unterminated string literal"),
    ('root ::= foo', "1:10", "undefined rule 'foo'"),
    ('root ::= "a"\nx ::= [a-', "2:7", "unterminated character class"),
    ('root ::= "a" )', "1:14", "expecting the end of the line"),
    ('root ::= "\\q"', "1:11", "unknown escape \\q"),
    ('root\n::= "a"', "1:5", "expecting ::="),
    ('root ::= "a"{3,1}', "1:13", "the maximum is below the minimum"),
    ('root ::= ( "a" ', "1:16", "expecting ')'"),
    ('root ::= "\\x4"', "1:11", "expecting 2 hex digits"),
    ('root ::= * "a"', "1:10", "expecting something before '*'"),
])
def test_bad_grammars_name_line_and_column(text, where, what):
    with pytest.raises(GrammarError) as info:
        Grammar(text)
    message = str(info.value)
    assert f"at {where}:" in message and what in message and "\n" not in message


def test_other_grammar_errors():
    with pytest.raises(GrammarError, match="no 'root' rule"):
        Grammar('x ::= "a"')
    with pytest.raises(GrammarError, match="left-recursive"):
        Grammar('root ::= root "a" | "b"')
    with pytest.raises(GrammarError, match="defined twice"):
        Grammar('root ::= "a"\nroot ::= "b"')


# -- token masks ---------------------------------------------------------------------------------------


def direct_allowed(grammar: Grammar, tokenizer, prefix: str) -> set[int]:
    """The tokens whose text continues ``prefix``, by stepping the code-point automaton per token
    (only tokens made of whole UTF-8 characters: byte tokens are checked separately)."""
    stacks = grammar.initial_stacks()
    for ch in prefix:
        stacks = grammar.advance(stacks, ord(ch))
    out = set()
    for token in range(tokenizer.vocab_size):
        if token in tokenizer.eog_ids:
            if () in stacks:
                out.add(token)
            continue
        data = tokenizer.token_bytes(token)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        s = stacks
        for ch in text:
            s = grammar.advance(s, ord(ch))
            if not s:
                break
        if text and s:
            out.add(token)
    return out


@pytest.mark.parametrize("name, prefixes", [
    ("json.gbnf", ["", "{", '{"a', '{"a": ', '{"a": [1, {"b": "x"}', '{"a": 12', '{"a": 1}']),
    ("arithmetic.gbnf", ["", "x", "x+", "1+(y", "1+(y)=x\n"]),
    ("list.gbnf", ["", "- ", "- a\n"]),
])
def test_masks_equal_a_direct_check(demo_model, name, prefixes):
    tokenizer = demo_model.tokenizer
    grammar = Grammar(fixture(name))
    whole = {t for t in range(tokenizer.vocab_size) if _whole_utf8(tokenizer.token_bytes(t))}
    for prefix in prefixes:
        got = set(allowed_tokens(grammar, tokenizer, prefix).tolist())
        expected = direct_allowed(grammar, tokenizer, prefix)
        assert got & (whole | set(tokenizer.eog_ids)) == expected, prefix


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return bool(data)
    except UnicodeDecodeError:
        return False


def test_partial_utf8_tokens(demo_model):
    """Byte tokens may start or continue a character the grammar allows (Japanese here)."""
    tokenizer = demo_model.tokenizer
    byte_token = {tokenizer.token_bytes(t)[0]: t for t in range(tokenizer.vocab_size)
                  if len(tokenizer.token_bytes(t)) == 1 and tokenizer.token_bytes(t)[0] >= 0x80}
    grammar = Grammar(fixture("japanese.gbnf"))
    first = set(allowed_tokens(grammar, tokenizer).tolist())
    assert {byte_token[b] for b in range(0xE3, 0xEA)} <= first  # hiragana .. CJK lead bytes
    assert byte_token[0xE2] not in first and byte_token[0xC3] not in first
    matcher = grammar.matcher(tokenizer)
    matcher.accept(byte_token[0xE3])
    after = set(np.nonzero(matcher.mask())[0].tolist())
    assert {byte_token[b] for b in (0x80, 0x81, 0x82, 0x83)} <= after and byte_token[0x84] not in after
    matcher.accept(byte_token[0x81])
    matcher.accept(byte_token[0x82])  # U+3042 HIRAGANA LETTER A
    assert matcher.is_complete
    with pytest.raises(HalfbyteError):
        matcher.accept(byte_token[0x41] if 0x41 in byte_token else tokenizer.encode("A", add_bos=False)[-1])


def test_end_of_generation_only_when_complete(demo_model):
    tokenizer = demo_model.tokenizer
    grammar = Grammar('root ::= " LORD" " God"?')
    eos = tokenizer.eos_id
    assert eos not in allowed_tokens(grammar, tokenizer)
    assert eos in allowed_tokens(grammar, tokenizer, " LORD")
    assert list(allowed_tokens(grammar, tokenizer, " LORD God")) == sorted(tokenizer.eog_ids)
    # EOS pushed up as far as it goes: it still waits for a complete sentence
    text = demo_model.generate("And the", grammar=grammar, logit_bias={eos: 50.0}, seed=1, max_tokens=10)
    assert text == " LORD" and demo_model.last_stats.stop_reason == "eos"


# -- generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_generation_under_json_gbnf_is_json(demo_model, seed):
    grammar = Grammar(fixture("json.gbnf"))
    text = demo_model.generate("And the LORD said", grammar=grammar, seed=seed, max_tokens=120,
                               repeat_penalty=1.1)
    stats = demo_model.last_stats
    if stats.stop_reason == "eos":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a prefix the grammar allows
        assert stats.stop_reason == "length"
        matcher = grammar.matcher(demo_model.tokenizer)
        for token in stats.tokens:
            assert matcher.allows(token)
            matcher.accept(token)


def test_greedy_generation_under_a_grammar(demo_model):
    grammar = 'root ::= (" the" | " LORD" | " and")+ "."'
    text = demo_model.generate("And", grammar=grammar, temperature=0, max_tokens=30)
    assert re.fullmatch(r"(?: the| LORD| and)+\.?", text)
    if demo_model.last_stats.stop_reason == "eos":
        assert text.endswith(".")


def test_library_and_server_options(demo_model):
    yes_no = 'root ::= " yes" | " no"'
    out = demo_model.create_completion("Is it so? Answer:", grammar=yes_no, max_tokens=5, seed=1)
    assert out["choices"][0]["text"] in (" yes", " no")
    chat = demo_model.create_chat_completion([{"role": "user", "content": "Yes or no?"}],
                                             grammar=Grammar.from_string('root ::= "yes" | "no"'), max_tokens=5)
    assert chat["choices"][0]["message"]["content"] in ("yes", "no")
    assert as_grammar(yes_no) is as_grammar(yes_no)  # parsed once, automaton kept warm
    assert grammar_for_request(None, {"type": "text"}) is None
    with pytest.raises(HalfbyteError):
        grammar_for_request(yes_no, {"type": "json_object"})
    with pytest.raises(HalfbyteError):
        demo_model.generate("x", grammar=42)

    from types import SimpleNamespace

    from engine.server import ApiError, Service

    service = Service(SimpleNamespace(n_vocab=demo_model.n_vocab), SimpleNamespace(n_ctx=64))
    assert service.settings({"prompt": "x", "grammar": yes_no}, chat=False).grammar is as_grammar(yes_no)
    with pytest.raises(ApiError, match="1:10"):
        service.settings({"prompt": "x", "grammar": 'root ::= "a'}, chat=False)


def run_cli(*args):
    from click.testing import CliRunner

    from engine.cli import main

    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_run_grammar_and_grammar_file(tmp_path):
    result = run_cli("-p", "Is it so?", "-n", 8, "-s", 1, "--grammar", 'root ::= " yes" | " no"')
    assert result.exit_code == 0, result.output
    assert result.stdout in (" yes", " no") and "stopped: eos" in result.stderr
    path = tmp_path / "list.gbnf"
    path.write_text(fixture("list.gbnf"))
    result = run_cli("-p", "Items:", "-n", 24, "-s", 2, "--grammar-file", path)
    assert result.exit_code == 0, result.output
    assert Grammar(fixture("list.gbnf")).matcher  # the output is a prefix of a list:
    assert result.stdout.startswith("- ")


def test_run_bad_grammar_is_one_line_with_line_and_column(tmp_path):
    result = run_cli("-p", "x", "--grammar", 'root ::= "a"\nb ::= [x-')
    assert result.exit_code == 1
    assert "grammar error at 2:7: unterminated character class" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= nothing\n")
    result = run_cli("-p", "x", "--grammar-file", bad)
    assert result.exit_code == 1 and f"{bad}: grammar error at 1:10: undefined rule 'nothing'" in result.stderr
    result = run_cli("-p", "x", "--grammar", 'root ::= "a"', "-j", "{}")
    assert result.exit_code == 1 and "give one of --grammar" in result.stderr
