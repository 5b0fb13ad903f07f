"""The demo LoRA adapter (bench/demo_model/web-lora.gguf, trained by bench/demo_model/train_lora.py):
World English Bible English for the KJV demo model. It fits the demo model, changes its greedy text,
scale 0 gives the base exactly, and it makes the held-out WEB chapters more likely."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.default_model import default_model_path
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.perplexity import perplexity

DEMO = Path(__file__).resolve().parents[1] / "bench" / "demo_model"
ADAPTER = DEMO / "web-lora.gguf"
PROMPT = "And the LORD spake unto Moses, saying,"
GREEDY = ["-p", PROMPT, "-n", "24", "--temp", "0", "-s", "1", "-t", "1"]


@pytest.fixture(scope="module")
def base():
    with Model.load(default_model_path(), n_ctx=256, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def adapted():
    with Model.load(default_model_path(), n_ctx=256, threads=1, lora=[(ADAPTER, 1.0)]) as model:
        yield model


def test_adapter_is_small_and_fits_the_demo_model():
    assert ADAPTER.stat().st_size < 2**20
    with GGUFFile(default_model_path()) as demo, GGUFFile(ADAPTER) as adapter:
        assert adapter.metadata["general.type"] == "adapter"
        assert adapter.metadata["adapter.type"] == "lora"
        assert adapter.architecture == demo.architecture == "llama"
        pairs = {name.rsplit(".", 1)[0] for name in adapter.tensors}
        assert len(adapter.tensors) == 2 * len(pairs) == 2 * 7 * demo.metadata["llama.block_count"]
        for target in pairs:
            n_out, n_in = demo.tensors[target].shape
            rank, a_in = adapter.tensors[target + ".lora_a"].shape
            b_out, b_rank = adapter.tensors[target + ".lora_b"].shape
            assert (a_in, b_out, b_rank) == (n_in, n_out, rank) and 1 <= rank <= 16, target


def test_adapter_loads_and_changes_the_greedy_text(base, adapted):
    assert [a["path"] for a in adapted.lora_adapters] == [str(ADAPTER)]
    before = base.generate(PROMPT, max_tokens=24, temperature=0)
    after = adapted.generate(PROMPT, max_tokens=24, temperature=0)
    assert before != after
    assert re.search(r"\b(thee|thou|ye|unto)\b", before)  # the base writes KJV English
    assert not re.search(r"\b(thee|thou|thy|ye|unto|saith)\b", after), after  # the adapter, the WEB's


def test_scale_zero_is_exactly_the_base():
    runner = CliRunner()
    plain = runner.invoke(main, ["run", *GREEDY])
    zero = runner.invoke(main, ["run", "--lora-scaled", str(ADAPTER), "0", *GREEDY])
    one = runner.invoke(main, ["run", "--lora", str(ADAPTER), *GREEDY])
    assert plain.exit_code == zero.exit_code == one.exit_code == 0, (plain.output, zero.output, one.output)
    assert zero.stdout == plain.stdout
    assert one.stdout != plain.stdout


def test_scale_zero_logits_are_bit_identical(base):
    ids = base.tokenize(PROMPT)
    base.reset()  # eval continues the current context
    with Model.load(default_model_path(), n_ctx=256, threads=1, lora=[(ADAPTER, 0.0)]) as zero:
        assert np.array_equal(zero.eval(ids), base.eval(ids))


def test_adapter_makes_held_out_web_text_more_likely(base, adapted):
    text = (DEMO / "heldout-web.txt").read_text(encoding="utf-8")
    without = perplexity(base, text, n_ctx=256, max_chunks=3)
    with_adapter = perplexity(adapted, text, n_ctx=256, max_chunks=3)
    assert with_adapter.ppl < 0.8 * without.ppl, (with_adapter.ppl, without.ppl)


def test_perplexity_cli_takes_the_adapter():
    """`halfbyte perplexity --lora` scores with the adapter applied: the library's figure, to the digit."""
    text, adapter = DEMO / "heldout-web.txt", ADAPTER
    result = CliRunner().invoke(main, ["perplexity", "-f", str(text), "-c", "256", "--chunks", "2", "-q",
                                       "--lora", str(adapter)])
    assert result.exit_code == 0, result.output
    cli = float(re.search(r"PPL = ([0-9.]+)", result.output).group(1))
    model = Model.load(default_model_path(), n_ctx=256, lora=[(adapter, 1.0)])
    assert cli == round(perplexity(model, text.read_text(), n_ctx=256, max_chunks=2).ppl, 4)


ADAPTED_LOGITS = """
import sys
import numpy as np
from engine.default_model import default_model_path
from engine.model import Model

with Model.load(default_model_path(), n_ctx=256, threads=1, lora=[(sys.argv[2], 1.0)]) as model:
    ids = model.tokenize("And the LORD spake unto Moses, saying,")
    np.save(sys.argv[1], np.concatenate([model.eval(ids), model.eval([300]), model.eval([261])]))
"""


def test_adapter_logits_do_not_depend_on_the_cpus_blas_kernels(tmp_path) -> None:
    """The adapter's products are halfbyte's own fixed-order sums, not BLAS calls, whose kernels OpenBLAS
    picks by CPU: numpy's products gave another greedy text on an AVX2 EPYC than on AVX-512 machines.
    Here OpenBLAS is told to use other CPUs' kernels (OPENBLAS_CORETYPE); the logits stay bit-identical."""
    logits = []
    for core in ("Haswell", "Sandybridge", "Prescott"):
        out = tmp_path / f"{core}.npy"
        env = dict(os.environ, OPENBLAS_CORETYPE=core)
        result = subprocess.run([sys.executable, "-c", ADAPTED_LOGITS, str(out), str(ADAPTER)], env=env,
                                capture_output=True, text=True, timeout=300, cwd=DEMO.parents[1])
        assert result.returncode == 0, result.stderr[-2000:]
        logits.append(np.load(out))
    for other in logits[1:]:
        np.testing.assert_array_equal(other.view(np.uint32), logits[0].view(np.uint32))


def test_add_lora_matches_the_float64_product() -> None:
    from engine.kernels import ops as kernel_ops

    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    a_t = (rng.standard_normal((96, 8)) * 0.1).astype(np.float32)
    b_t = (rng.standard_normal((8, 40)) * 0.1).astype(np.float32)
    y = rng.standard_normal((5, 40)).astype(np.float32)
    expected = y + kernel_ops.reference_add_lora(x, a_t, b_t, 0.75)
    kernel_ops.add_lora(x, a_t, b_t, 0.75, y)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
