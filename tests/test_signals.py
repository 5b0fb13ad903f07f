"""A conversion (or re-quantization) killed by a catchable signal leaves nothing behind.

SIGTERM, SIGHUP and SIGQUIT are turned into an exception by GGUFWriter while its partial file
exists, so the same clean-up as for Ctrl-C (SIGINT) runs: no ``.partial`` file, no output, one
line on stderr and exit status 128 + signal number (130 for SIGINT, as before).

Each case starts a real ``halfbyte`` process, waits for its partial file to appear (the header is
written, tensors are being converted), then sends the signal. The model is big enough (about 25M
parameters) that converting its tensors takes far longer than the polling interval.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import LLAMA_TOKENIZER

REPO = Path(__file__).resolve().parents[1]
SIGNALS = {"SIGTERM": (signal.SIGTERM, 143, "terminated by SIGTERM"),
           "SIGHUP": (signal.SIGHUP, 129, "terminated by SIGHUP"),
           "SIGQUIT": (signal.SIGQUIT, 131, "terminated by SIGQUIT"),
           "SIGINT": (signal.SIGINT, 130, "interrupted")}


def write_llama_checkpoint(directory: Path, hidden: int = 256, layers: int = 8, ff: int = 1024) -> Path:
    """A LLaMA checkpoint written directly with numpy (random F16 weights), no transformers needed."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    vocab = 32000
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(LLAMA_TOKENIZER, directory / "tokenizer.model")
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)

    state = {"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden),
             "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}"
        state.update({
            f"{p}.input_layernorm.weight": np.ones(hidden, np.float16),
            f"{p}.post_attention_layernorm.weight": np.ones(hidden, np.float16),
            **{f"{p}.self_attn.{n}_proj.weight": weight(hidden, hidden) for n in "qkvo"},
            f"{p}.mlp.gate_proj.weight": weight(ff, hidden), f"{p}.mlp.up_proj.weight": weight(ff, hidden),
            f"{p}.mlp.down_proj.weight": weight(hidden, ff),
        })
    save_file(state, str(directory / "model.safetensors"))
    return directory


def halfbyte(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("signals") / "llama")


@pytest.fixture(scope="module")
def float_gguf(checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("f32") / "model-f32.gguf"
    process = halfbyte("convert", str(checkpoint), "--f32", "-q", "-o", str(output))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return output


def signal_when_partial(process: subprocess.Popen, out_dir: Path, signum: int) -> None:
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out_dir.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no partial file appeared"
        time.sleep(0.002)
    process.send_signal(signum)


def assert_clean_termination(process: subprocess.Popen, out_dir: Path, exit_code: int, message: str) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [f"halfbyte: {message}"], stderr
    assert os.listdir(out_dir) == [], "partial or output file left behind"


@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_during_convert_leaves_nothing(checkpoint, tmp_path, name):
    signum, exit_code, message = SIGNALS[name]
    process = halfbyte("convert", str(checkpoint), "-q", "-o", str(tmp_path / "o.gguf"))
    signal_when_partial(process, tmp_path, signum)
    assert_clean_termination(process, tmp_path, exit_code, message)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_during_quantize_leaves_nothing(float_gguf, tmp_path, name):
    signum, exit_code, message = SIGNALS[name]
    process = halfbyte("quantize", str(float_gguf), str(tmp_path / "o.gguf"), "q4_0", "-q")
    signal_when_partial(process, tmp_path, signum)
    assert_clean_termination(process, tmp_path, exit_code, message)


def test_ignored_sighup_stays_ignored(checkpoint, tmp_path):
    """Under nohup (SIGHUP ignored) the writer does not take SIGHUP over: the conversion completes."""
    process = halfbyte("convert", str(checkpoint), "-q", "--q8_0", "-o", str(tmp_path / "o.gguf"),
                       preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    signal_when_partial(process, tmp_path, signal.SIGHUP)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert os.listdir(tmp_path) == ["o.gguf"]


def test_handlers_are_restored_after_writing(tmp_path):
    from engine.gguf_file import GGUFWriter

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with GGUFWriter(tmp_path / "a.gguf") as writer:
        writer.write_header()
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        writer.finish()
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RuntimeError), GGUFWriter(tmp_path / "b.gguf") as writer:
        writer.write_header()
        raise RuntimeError("boom")
    assert {s: signal.getsignal(s) for s in before} == before
    assert os.listdir(tmp_path) == ["a.gguf"]
