"""The integer IQ4_NL x Q8_0 kernels (engine/kernels/simd.py: matvec_iq4_nl, matmul_iq4_nl and their
portable ``_generic`` twins), as ggml's ``ggml_vec_dot_iq4_nl_q8_0``.

* Against a numpy reference (the weights dequantized through ggml's kvalues_iq4nl table, times the
  dequantized Q8_0 activations, in float64): float32 rounding only, for 1, 3, 8 and 17 tokens (the
  4-token tiles and the remainder) and row counts that are not multiples of anything; host ISA and
  portable IR; weights from halfbyte's own IQ4_NL writer and random bytes.
* Extreme blocks (every value -127 against activations +-127) stay exact: no 16-bit saturation.
* Dispatch: matmul.matvec / matmul run these kernels on the "auto" and "portable" paths (within the
  Q8_0 activation rounding of the float product) and the dequantizing float path on "reference".
* A whole model: the demo model quantized to iq4_nl by ``halfbyte quantize`` gives the logits of the
  "reference" path within the bound the Q4_0 tests use (tests/test_runtime.py QUANT_BOUNDS).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from llvm_targets import CALLS, instructions_for

from engine import quants
from engine.kernels import matmul as mm
from engine.kernels import simd
from engine.kernels.matmul import WeightView, matmul, matvec

REPO = Path(__file__).resolve().parents[1]
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float64)
DRIVERS = {"host": (simd.matvec_iq4_nl, simd.matmul_iq4_nl),
           "generic": (simd.matvec_iq4_nl_generic, simd.matmul_iq4_nl_generic)}
U = 2.0**-24


def dequantize_iq4_nl(raw: np.ndarray) -> np.ndarray:
    """float64 ``(n_out, n_in)``: value j of a block is d * table[low nibble of byte j] (j < 16), else
    d * table[high nibble of byte j - 16] (as kquant_quantize.dequantize_iq4_nl and ggml)."""
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
    return (d[..., None] * KVALUES[codes]).reshape(raw.shape[0], -1)


def q8_0_values(xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return (xq.astype(np.float64).reshape(xq.shape[0], -1, 32) * xs[..., None].astype(np.float64)).reshape(xq.shape)


def rounding_bound(w: np.ndarray, x_used: np.ndarray) -> np.ndarray:
    """|kernel - exact| for float32 sums of exact block integers: each block term d_w * d_x * idot sees the
    rounding of the scale product and at most n_blocks + 5 roundings of the summation (8 lanes, two
    accumulator sets, a tree; simd.row_dot_error_bound), so gamma(n_blocks + 6) * sum |w_j x_j|."""
    k = w.shape[1] // 32 + 6
    return k * U / (1 - k * U) * (np.abs(x_used) @ np.abs(w).T)


def writer_weights(n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    raw = quants.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), T.IQ4_NL)
    return np.ascontiguousarray(raw.reshape(n_out, -1).view(np.uint8))


def random_weights(n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes with random finite fp16 scales of both signs over a wide range."""
    raw = rng.integers(0, 256, (n_out, n_in // 32 * 18), dtype=np.uint8)
    scales = (rng.choice([-1.0, 1.0], (n_out, n_in // 32)) * np.exp2(rng.uniform(-20, 4, (n_out, n_in // 32))))
    raw.reshape(n_out, -1, 18)[..., :2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return raw


def run(path: str, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    matvec_fn, matmul_fn = DRIVERS[path]
    xq, xs, _ = simd.quantize_activations_q8_0_batch(x)
    if x.shape[0] == 1:
        out = np.empty(raw.shape[0], np.float32)
        matvec_fn(raw, xq[0], xs[0], out)
        return out[None]
    out = np.empty((x.shape[0], raw.shape[0]), np.float32)
    matmul_fn(raw, xq, xs, out)
    return out


@pytest.mark.parametrize("path", sorted(DRIVERS))
@pytest.mark.parametrize("weights", [writer_weights, random_weights], ids=["writer", "random-bytes"])
@pytest.mark.parametrize("n_out,n_in", [(37, 256), (16, 32), (5, 4096)])
@pytest.mark.parametrize("n_tok", [1, 3, 8, 17])
def test_products_match_dequantized_weights_times_q8_0_activations(path, weights, n_out, n_in, n_tok) -> None:
    rng = np.random.default_rng(n_out * 1000 + n_in + n_tok)
    raw = weights(n_out, n_in, rng)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    got = run(path, raw, x)
    w = dequantize_iq4_nl(raw)
    np.testing.assert_array_equal(w, quants.dequantize(raw, T.IQ4_NL).reshape(n_out, n_in))  # the reference's layout
    xq, xs, _ = simd.quantize_activations_q8_0_batch(x)
    x_used = q8_0_values(xq, xs)
    exact = x_used @ w.T
    bound = rounding_bound(w, x_used)
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / np.maximum(bound, 1e-300))
    scale = np.abs(x_used) @ np.abs(w).T
    assert np.all(np.abs(got - exact) <= 1e-5 * scale)
    # and the float product on the float activations, within the activations' 8-bit rounding
    amax = np.abs(x.reshape(n_tok, -1, 32)).max(-1).astype(np.float64)
    step = np.repeat(amax / 127 * 0.57, 32, axis=1)  # half a step + the fp16 rounding of d (test_matmul)
    assert np.all(np.abs(got - x.astype(np.float64) @ w.T) <= step @ np.abs(w).T + 1e-5 * scale)


@pytest.mark.parametrize("path", sorted(DRIVERS))
def test_matvec_equals_a_lone_token_of_matmul_and_rows_are_independent(path) -> None:
    """The remainder tokens of a batch use the matrix-vector row dot: the same bits; a row's result does
    not depend on which rows are around it."""
    rng = np.random.default_rng(7)
    raw = writer_weights(21, 512, rng)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    batch = run(path, raw, x)
    np.testing.assert_array_equal(run(path, raw, x[4:5])[0], batch[4])
    np.testing.assert_array_equal(run(path, raw[3:9], x)[:, :], batch[:, 3:9])


@pytest.mark.parametrize("path", sorted(DRIVERS))
def test_extreme_blocks_are_exact(path) -> None:
    """Every value -127 (code 0) or 113 against activations +-127 with unit scales: the block dots reach
    32 * 127 * 127 and pairs 2 * 127 * 127, and the results are the exact integers."""
    n_in = 128
    raw = np.zeros((4, n_in // 32 * 18), np.uint8)
    blocks = raw.reshape(4, -1, 18)
    blocks[..., :2] = np.float16(1.0).reshape(1).view(np.uint8)
    blocks[1, :, 2:] = 0xFF  # code 15: 113
    blocks[2, :, 2:] = 0xF0  # low nibbles -127, high 113
    blocks[3, :, 2:] = np.arange(16, dtype=np.uint8) * 17  # every code
    x = np.full((5, n_in), 127.0, np.float32)
    x[1] = -127.0
    x[2, ::2] = -127.0
    x[3] = np.arange(n_in) * 37 % 255 - 127
    x[3, ::32] = -127.0  # every block reaches 127 in magnitude
    x[4, :16] = -127.0
    xq, xs, _ = simd.quantize_activations_q8_0_batch(x)
    assert np.all(xs == 1.0)  # amax 127: d = 1 exactly
    exact = xq.astype(np.float64) @ dequantize_iq4_nl(raw).T
    for n_tok in (1, 5):
        np.testing.assert_array_equal(run(path, raw, x[:n_tok]), exact[:n_tok].astype(np.float32))


def test_drivers_reject_mismatched_shapes() -> None:
    raw = np.zeros((3, 4 * 18), np.uint8)
    xq, xs, _ = simd.quantize_activations_q8_0_batch(np.ones((2, 96), np.float32))
    with pytest.raises(ValueError):
        simd.matvec_iq4_nl(raw, xq[0], xs[0], np.empty(3, np.float32))
    with pytest.raises(ValueError):
        simd.matmul_iq4_nl_generic(raw, xq, xs, np.empty((2, 3), np.float32))


@pytest.mark.parametrize("path", mm.KERNEL_PATHS)
def test_matmul_dispatches_iq4_nl(path, monkeypatch) -> None:
    """"auto" / "portable" run the integer kernels (counted), "reference" the dequantizing float path."""
    rng = np.random.default_rng(3)
    raw = writer_weights(19, 256, rng)
    weight = WeightView.from_raw(T.IQ4_NL, (256, 19), raw)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    calls = []
    suffix = "_generic" if path == "portable" else ""
    for name in ("matvec_iq4_nl", "matmul_iq4_nl"):
        real = getattr(simd, name + suffix)
        monkeypatch.setattr(simd, name + suffix,
                            lambda *args, _real=real, _name=name: (calls.append(_name), _real(*args))[1])
    previous = mm.set_kernel_path(path)
    try:
        batch, single = matmul(weight, x), matvec(weight, x[0])
    finally:
        mm.set_kernel_path(previous)
    w = dequantize_iq4_nl(raw)
    float_product = x.astype(np.float64) @ w.T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).T
    if path == "reference":
        assert calls == []
        assert np.all(np.abs(batch - float_product) <= 1e-5 * scale)
        return
    assert calls == ["matmul_iq4_nl", "matvec_iq4_nl"]
    xq, xs, _ = simd.quantize_activations_q8_0_batch(x)
    x_used = q8_0_values(xq, xs)
    assert np.all(np.abs(batch - x_used @ w.T) <= rounding_bound(w, x_used))
    assert np.all(np.abs(single - (x_used @ w.T)[0]) <= rounding_bound(w, x_used)[0])


@pytest.mark.parametrize(
    "triple, cpu, features, isa, expect",
    [
        ("aarch64-unknown-linux-gnu", "cortex-a76", "", "neon-dotprod", ("sdot", "tbl")),
        ("aarch64-unknown-linux-gnu", "cortex-a72", "", "generic", ("smull",)),
        ("x86_64-unknown-linux-gnu", "haswell", "", "avx2", ("vpshufb", "vpmaddubsw")),
        ("x86_64-unknown-linux-gnu", "x86-64", "", "generic", ("pmullw",)),  # SSE2 only
    ],
)
def test_ir_compiles_for_each_target_without_library_calls(triple, cpu, features, isa, expect) -> None:
    """The arm64 flavours cannot run here: compiled for their targets, to the instructions intended."""
    instructions, asm = instructions_for(simd.standalone_iq4_nl_row_dot_ir(isa), triple, cpu, features)
    assert not [i for i in instructions if i in CALLS], asm
    for mnemonic in expect:
        assert mnemonic in instructions, (mnemonic, asm)


AVX2_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from engine import quants
    from engine.kernels import simd
    from gguf import GGMLQuantizationType as T
    assert simd.kernel_isa() == "avx2", simd.kernel_isa()
    rng = np.random.default_rng(5)
    for n_in, n_out, n_tok in ((64, 19, 1), (4096, 16, 9), (96, 8, 5)):
        w = quants.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), T.IQ4_NL)
        w = np.ascontiguousarray(w.reshape(n_out, -1).view(np.uint8))
        xq, xs, _ = simd.quantize_activations_q8_0_batch(rng.standard_normal((n_tok, n_in)).astype(np.float32))
        outs = [np.empty((n_tok, n_out), np.float32) for _ in range(2)]
        simd.matmul_iq4_nl(w, xq, xs, outs[0])
        simd.matmul_iq4_nl_generic(w, xq, xs, outs[1])
        np.testing.assert_allclose(outs[0], outs[1], rtol=2e-6, atol=2e-6 * np.abs(outs[1]).max())
        vec = [np.empty(n_out, np.float32) for _ in range(2)]
        simd.matvec_iq4_nl(w, xq[0], xs[0], vec[0])
        simd.matvec_iq4_nl_generic(w, xq[0], xs[0], vec[1])
        np.testing.assert_allclose(vec[0], vec[1], rtol=2e-6, atol=2e-6 * np.abs(vec[1]).max())
    print("ok")
    """
)


@pytest.mark.slow
def test_plain_avx2_kernels_match_the_portable_ones(tmp_path: Path) -> None:
    """On a VNNI host, the pmaddubsw flavour is compiled in a child process for the host minus VNNI
    (as tests/test_simd.py does for Q4_0 / Q8_0)."""
    host = simd._target_features()
    if not simd.has_x8_kernels() or simd.kernel_isa() == "avx2":
        pytest.skip("plain AVX2 is this host's own ISA (tested directly) or the host is not x86 AVX2")
    features = ",".join(f"+{f}" for f in sorted(host) if f not in ("avxvnni", "avx512vnni"))
    env = dict(os.environ, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# Max |logits - reference| / max |reference logits| allowed for Q4_0 models (tests/test_runtime.py
# QUANT_BOUNDS, tests/test_llama_cpp.py BOUNDS): the cost of Q8_0 activations.
QUANT_BOUND = 0.025
PROMPT = "In the beginning God created the heaven and the earth."


def test_demo_model_quantized_to_iq4_nl_runs_like_the_reference_path(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from engine.cli import main
    from engine.default_model import default_model_path
    from engine.gguf_file import GGUFFile
    from engine.model import Model

    out = tmp_path / "iq4_nl.gguf"
    result = CliRunner().invoke(main, ["quantize", str(default_model_path()), str(out), "iq4_nl",
                                       "--allow-requantize", "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(out) as f:
        kinds = {name: info.ggml_type for name, info in f.tensors.items()}
    assert kinds["blk.0.attn_q.weight"] == T.IQ4_NL and kinds["blk.0.ffn_down.weight"] == T.IQ4_NL, kinds
    calls = []
    for name in ("matvec_iq4_nl", "matmul_iq4_nl"):
        real = getattr(simd, name)
        monkeypatch.setattr(simd, name, lambda *args, _real=real, _name=name: (calls.append(_name), _real(*args))[1])
    model = Model.load(out, threads=2)
    ids = model.tokenize(PROMPT)
    previous = mm.set_kernel_path("auto")
    try:
        ours = model.eval(ids)
        assert "matmul_iq4_nl" in calls, calls  # the prompt's products ran on the integer kernel
        n_calls = len(calls)
        mm.set_kernel_path("reference")
        model.reset()
        reference = model.eval(ids)
        assert len(calls) == n_calls  # the reference path does not touch the integer kernels
    finally:
        mm.set_kernel_path(previous)
    assert np.isfinite(ours).all()
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error <= QUANT_BOUND, error
    assert not np.array_equal(ours, reference)  # really two different paths
