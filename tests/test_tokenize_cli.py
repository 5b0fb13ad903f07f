"""`halfbyte tokenize` on llama.cpp's vocab files, against sentencepiece."""

from __future__ import annotations

from pathlib import Path

import sentencepiece
from click.testing import CliRunner

from engine.cli import main

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SPM_VOCAB = FIXTURES / "vocab" / "ggml-vocab-llama-spm.gguf"
TEXT = "Hello world! Ünïcödé 🦙 and  spaces\n"


def reference_ids(text: str) -> list[int]:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "llama2-tokenizer.model"))
    return sp.encode(text)


def test_ids_on_one_line_with_bos():
    result = CliRunner().invoke(main, ["tokenize", str(SPM_VOCAB), TEXT])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == " ".join(map(str, [1, *reference_ids(TEXT)]))


def test_file_input_is_read_exactly_and_no_bos(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode())
    result = CliRunner().invoke(main, ["tokenize", str(SPM_VOCAB), "-f", str(path), "--no-bos"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == " ".join(map(str, reference_ids(TEXT)))


def test_pieces():
    result = CliRunner().invoke(main, ["tokenize", str(SPM_VOCAB), "Hello", "--pieces"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["1", "->", "'<s>'"]  # control tokens by name, as llama-tokenize shows them
    assert "' Hello'" in lines[1] or "'Hello'" in lines[1]


def test_missing_text_is_a_clean_error():
    result = CliRunner().invoke(main, ["tokenize", str(SPM_VOCAB)])
    assert result.exit_code != 0 and "halfbyte: error:" in result.output


def test_text_and_file_together_are_refused_like_run(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x", encoding="utf-8")
    result = CliRunner().invoke(main, ["tokenize", str(SPM_VOCAB), "hello", "-f", str(path)])
    assert result.exit_code == 1 and "give either TEXT or -f FILE, not both" in result.stderr
