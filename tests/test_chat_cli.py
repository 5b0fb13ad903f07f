"""`halfbyte chat`: stdin-driven (in-process, with the model captured) and in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.chat_cli as chat_cli
from engine.cli import main

SYSTEM = "Speak as the KJV."


@pytest.fixture()
def captured(monkeypatch):
    """Run `halfbyte chat` in-process; the loaded model is kept for inspection."""
    models = []
    original = chat_cli.load_model

    def load(*args, **kwargs):
        models.append(original(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(chat_cli, "load_model", load)
    return models


def _run(args: list[str], lines: list[str]):
    return CliRunner().invoke(main, ["chat", *args], input="".join(line + "\n" for line in lines))


def test_history_is_rerendered_and_the_cache_reused(captured):
    turns = ["Who spake unto Moses?", "And what said he?"]
    result = _run(["-n", "10", "--temp", "0", "--system", SYSTEM], turns)
    assert result.exit_code == 0, result.output
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and all(answers)
    model = captured[0]
    # the second answer is what the library gives for the whole conversation
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": turns[0]},
                {"role": "assistant", "content": answers[0]}, {"role": "user", "content": turns[1]}]
    expected = model.create_chat_completion(messages, max_tokens=10, temperature=0, cache_prompt=False)
    assert answers[1] == expected["choices"][0]["message"]["content"]
    assert "chat template: chatml (fallback" in result.stderr


def test_reuses_kv_prefix(captured):
    result = _run(["-n", "6", "--temp", "0"], ["Who spake unto Moses?", "And then?"])
    assert result.exit_code == 0, result.output
    model = captured[0]
    from engine.chat import prompt_tokens

    answers = result.stdout.splitlines()
    first = [{"role": "user", "content": "Who spake unto Moses?"}]
    full = [*first, {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "And then?"}]
    n_first = len(prompt_tokens(model.tokenizer, model.apply_chat_template(first)))
    n_full = len(prompt_tokens(model.tokenizer, model.apply_chat_template(full)))
    # the second turn evaluated only what the first prompt and answer did not cover
    assert 0 < model.last_stats.prompt_tokens <= n_full - n_first - 1


def test_reset_unknown_command_and_exit(captured):
    result = _run(["-n", "8", "--temp", "0"], ["Who spake unto Moses?", "/reset", "/nope", "Who spake unto Moses?",
                                               "/exit", "never read"])
    assert result.exit_code == 0, result.output
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # after /reset, the same first turn
    assert "conversation cleared" in result.stderr and "unknown command /nope" in result.stderr


def test_old_turns_dropped_when_the_context_is_full(captured):
    long_line = "And the LORD spake unto Moses in the wilderness of Sinai, saying"
    result = _run(["-n", "8", "--temp", "0", "-c", "128", "--system", SYSTEM], [long_line] * 4)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 4
    assert "dropped the oldest turn" in result.stderr


def test_bad_options():
    result = CliRunner().invoke(main, ["chat", "--chat-template", "no-such-template"], input="")
    assert result.exit_code == 1 and "unknown chat template 'no-such-template'" in result.stderr
    result = CliRunner().invoke(main, ["chat", "-n", "0"], input="")
    assert result.exit_code == 1 and "-n must be >= 1" in result.stderr


def test_builtin_template_option(captured):
    result = _run(["-n", "4", "--temp", "0", "--chat-template", "llama2"], ["Hello"])
    assert result.exit_code == 0 and "chat template: llama2" in result.stderr
    assert captured[0].chat_template.name == "llama2"


# -- a real terminal ---------------------------------------------------------------------------------


def _halfbyte() -> str:
    exe = Path(sys.executable).with_name("halfbyte")
    return str(exe) if exe.exists() else f"{sys.executable} -m engine"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_tmux(tmp_path):
    socket = f"halfbyte-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    env = {**os.environ, "TERM": "xterm"}
    command = f"{_halfbyte()} chat -n 8 --temp 0 --system '{SYSTEM}'; echo CHAT-EXITED-$?; sleep 30"
    subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "40", "-s", "t", command], check=True, env=env)

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True).stdout

    def wait_for(predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pane()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out; the terminal shows:\n{pane()}")

    try:
        def prompts(text: str) -> int:  # capture-pane drops trailing spaces: a bare prompt is ">"
            return sum(1 for line in text.splitlines() if line == ">" or line.startswith("> "))

        wait_for(lambda text: prompts(text) == 1 and "chat template" in text)
        subprocess.run([*tmux, "send-keys", "-t", "t", "Who spake unto Moses?", "Enter"], check=True)
        text = wait_for(lambda text: prompts(text) >= 2)
        lines = [line for line in text.splitlines() if line.strip()]
        prompt_line = next(i for i, line in enumerate(lines) if "Who spake unto Moses?" in line)
        answer = lines[prompt_line + 1]
        assert answer.strip() and not answer.startswith(">")
        subprocess.run([*tmux, "send-keys", "-t", "t", "/exit", "Enter"], check=True)
        wait_for(lambda text: "CHAT-EXITED-0" in text, timeout=20)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
