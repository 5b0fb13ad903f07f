"""The compiled decode step (engine/kernels/decode_step.py) against the layer code it replaces
(models/blocks.py): the same logits, bit for bit, for every generated token; and the layer code
wherever the step cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from converters.synthetic import LlamaShape, write_synthetic
from engine import ops
from engine.default_model import default_model_path
from engine.gguf_file import GGUFFile, GGUFWriter
from engine.kernels import decode_step, matmul
from engine.model import Model

REPO = Path(__file__).resolve().parents[1]
SHAPE = LlamaShape(n_vocab=32000, n_embd=128, n_layer=3, n_head=4, n_head_kv=2, n_ctx=256, n_ff=256)


@pytest.fixture(autouse=True)
def compile_here(monkeypatch):
    """The step compiled in this process (not by a background child) as soon as it is needed."""
    monkeypatch.setenv("HALFBYTE_BACKGROUND_COMPILE", "0")


@pytest.fixture
def steps_run(monkeypatch) -> list[bool]:
    """Each compiled step call: whether it ran."""
    calls: list[bool] = []
    real = decode_step.DecodeStack.__call__

    def spy(self, *args, **kwargs):
        calls.append(real(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(decode_step.DecodeStack, "__call__", spy)
    return calls


def generate_logits(model: Model, compiled: bool, n_tokens: int = 12) -> np.ndarray:
    """Logits of a prompt's last token, then of ``n_tokens`` greedy tokens, one evaluation each."""
    previous, ops.COMPILED_DECODE = ops.COMPILED_DECODE, compiled
    try:
        model.reset()
        logits = [model.eval([1, 450, 3303, 2987, 13])[-1]]
        for _ in range(n_tokens):
            logits.append(model.eval([int(np.argmax(logits[-1]))], last_only=True)[0])
    finally:
        ops.COMPILED_DECODE = previous
    return np.array(logits)


def with_metadata(path: Path, source: Path, metadata: dict) -> Path:
    """A copy of ``source`` with metadata keys added or replaced."""
    with GGUFFile(source) as src, GGUFWriter(path, alignment=src.alignment) as out:
        out.copy_metadata(src)
        for key, (value, value_type) in metadata.items():
            out.add(key, value, value_type)
        for info in src.tensors.values():
            out.add_tensor_info(info.name, info.shape, info.ggml_type)
        for info in src.tensors.values():
            out.write_tensor(info.name, src.tensor_bytes(info.name))
        out.finish()
    return path


@pytest.fixture(scope="module")
def q4_0_file(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("step") / "q4_0.gguf", SHAPE)


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("which", ["demo-q8_0", "synthetic-q4_0"])
def test_compiled_step_gives_the_layer_codes_logits_bit_for_bit(which, kv_type, q4_0_file, steps_run) -> None:
    path = default_model_path() if which == "demo-q8_0" else q4_0_file
    model = Model.load(path, n_ctx=128, threads=2, kv_type=kv_type)
    compiled = generate_logits(model, True)
    assert steps_run == [True] * 12  # every generated token went through the compiled step
    layer_code = generate_logits(model, False)
    assert len(steps_run) == 12
    np.testing.assert_array_equal(compiled.view(np.uint32), layer_code.view(np.uint32))
    assert model.n_past == 5 + 12


@pytest.mark.parametrize("scaling", [
    {"llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
     "llama.rope.scaling.factor": (2.0, GGUFValueType.FLOAT32)},
    # YaRN: per-pair frequency divisors and a magnitude other than 1 on the rotated values
    {"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING),
     "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
     "llama.rope.scaling.original_context_length": (16, GGUFValueType.UINT32)},
], ids=["linear", "yarn"])
def test_sliding_window_and_rope_scaling_pass_through(tmp_path, steps_run, scaling) -> None:
    """Mistral's window (here 4 positions, far less than the context) and the RoPE scalings reach the
    step's attention and rotation as they reach the layer code's."""
    path = with_metadata(tmp_path / "windowed.gguf", default_model_path(), {
        "llama.attention.sliding_window": (4, GGUFValueType.UINT32), **scaling})
    model = Model.load(path, n_ctx=64, threads=1)
    compiled = generate_logits(model, True)
    np.testing.assert_array_equal(compiled.view(np.uint32), generate_logits(model, False).view(np.uint32))
    assert steps_run and all(steps_run)
    plain = Model.load(default_model_path(), n_ctx=64, threads=1)
    assert not np.array_equal(compiled, generate_logits(plain, True))  # the window and scaling did matter


def test_the_layer_code_runs_where_the_step_cannot(tmp_path, q4_0_file, steps_run, monkeypatch) -> None:
    # a Q8_0 KV cache: quantized keys and values are stored by the layer code
    model = Model.load(q4_0_file, n_ctx=64, threads=1, kv_type="q8_0")
    generate_logits(model, True, 3)
    assert steps_run == []
    # products observed (engine/imatrix.py wraps ops.linear): each must go through the wrapper
    seen = []
    plain = ops.linear
    monkeypatch.setattr(ops, "linear", lambda x, w: seen.append(w) or plain(x, w))
    generate_logits(Model.load(q4_0_file, n_ctx=64, threads=1), True, 3)
    assert steps_run == [] and len(seen) == 4 * (7 * SHAPE.n_layer + 1)  # and the output head
    monkeypatch.setattr(ops, "linear", plain)
    # a weight type without an integer matrix-vector driver (Q4_1): the layer code, whatever the others
    generate_logits(Model.load(requantized(tmp_path, "q4_1", GGMLQuantizationType.Q4_1), n_ctx=64, threads=1), True, 3)
    assert steps_run == []


def requantized(tmp_path: Path, mix: str, expected_q: GGMLQuantizationType) -> Path:
    """A 256-wide synthetic file (K-quants take rows of 256) quantized by `halfbyte quantize`."""
    from click.testing import CliRunner

    from engine.cli import main

    wide = tmp_path / "wide.gguf"
    if not wide.exists():
        write_synthetic(wide, LlamaShape(32000, 256, 2, 4, 2, 512, 512), seed=3)
    out = tmp_path / f"{mix}.gguf"
    result = CliRunner().invoke(main, ["quantize", str(wide), str(out), mix, "--allow-requantize", "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(out) as f:
        assert f.tensors["blk.0.attn_q.weight"].ggml_type == expected_q
    return out


@pytest.mark.parametrize("mix, expected_q", [
    ("q4_k_m", GGMLQuantizationType.Q4_K),  # Q6_K for some layers' attn_v and ffn_down: two kinds of sums
    ("q5_k_s", GGMLQuantizationType.Q5_K),
    ("q6_k", GGMLQuantizationType.Q6_K),
    ("iq4_xs", GGMLQuantizationType.IQ4_XS),
])
def test_k_quant_files_run_the_step_bit_for_bit(tmp_path, steps_run, mix, expected_q) -> None:
    model = Model.load(requantized(tmp_path, mix, expected_q), n_ctx=64, threads=2)
    compiled = generate_logits(model, True, 6)
    assert steps_run == [True] * 6
    np.testing.assert_array_equal(compiled.view(np.uint32), generate_logits(model, False, 6).view(np.uint32))


def test_the_step_follows_the_kernel_path(tmp_path, steps_run) -> None:
    """The portable kernels' step gives their layer code's bits; the reference path (float products
    for the K-quants) has no step."""
    model = Model.load(requantized(tmp_path, "q4_k_m", GGMLQuantizationType.Q4_K), n_ctx=64, threads=2)
    previous = matmul.set_kernel_path("portable")
    try:
        compiled = generate_logits(model, True, 4)
        assert steps_run == [True] * 4
        np.testing.assert_array_equal(compiled.view(np.uint32), generate_logits(model, False, 4).view(np.uint32))
        matmul.set_kernel_path("reference")
        generate_logits(model, True, 2)
        assert len(steps_run) == 4
    finally:
        matmul.set_kernel_path(previous)


BACKGROUND_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from engine import ops
    from engine.default_model import default_model_path
    from engine.kernels import decode_step, matmul
    from engine.model import Model

    runs = []
    real = decode_step.DecodeStack.__call__
    decode_step.DecodeStack.__call__ = lambda self, *a: runs.append(real(self, *a)) or runs[-1]
    model = Model.load(default_model_path(), n_ctx=2048, threads=2)
    logits = [model.eval([1, 450])[-1]]
    while (not runs or not runs[-1]) and len(runs) < 1500:
        logits.append(model.eval([int(np.argmax(logits[-1]))], last_only=True)[0])
    tokens = [1, 450] + [int(np.argmax(row)) for row in logits[:-1]]
    ops.COMPILED_DECODE = False
    model.reset()
    again = [model.eval(tokens[:2])[-1]] + [model.eval([t], last_only=True)[0] for t in tokens[2:]]
    print(runs.index(True) if True in runs else -1, len(runs), np.array_equal(np.array(logits), np.array(again)))
    """
)


@pytest.mark.slow
def test_a_first_run_generates_on_the_layer_code_while_a_child_compiles_the_step(tmp_path) -> None:
    """On a cold cache the step is compiled by a child process: generation starts at once on the
    layer code, switches to the step when the child is done, with the same logits throughout; the
    next process finds the step in the cache and uses it from the first token."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), HALFBYTE_BACKGROUND_COMPILE="1",
               PYTHONPATH=str(REPO))
    results = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", BACKGROUND_SCRIPT], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        first, calls, same = run.stdout.split()
        results.append((int(first), int(calls), same == "True"))
    (cold_first, cold_calls, cold_same), (warm_first, _, warm_same) = results
    if os.cpu_count() and os.cpu_count() < 2:
        pytest.skip("one core: the step compiles in the process itself")
    assert cold_first > 0 and cold_same, results  # the layer code first, then the step
    assert warm_first == 0 and warm_same, results


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_biases_and_per_head_norms_run_the_step_bit_for_bit(tmp_path, steps_run, arch) -> None:
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms, in the step as in the layer code."""
    from test_architectures import checkpoint

    from converters.convert import convert

    path = convert(str(checkpoint(arch, tmp_path)), tmp_path / "m.gguf", GGMLQuantizationType.Q8_0, progress=False)
    model = Model.load(path, n_ctx=64, threads=2)
    layer = model.arch.layers[0]
    assert (layer.bq is not None) == (arch == "qwen2") and (layer.q_norm is not None) == (arch == "qwen3")
    compiled = generate_logits(model, True, 6)
    assert steps_run == [True] * 6
    np.testing.assert_array_equal(compiled.view(np.uint32), generate_logits(model, False, 6).view(np.uint32))
