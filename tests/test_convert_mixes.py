"""`halfbyte convert --q4_k_m` (and the other llama-quantize mixes): the checkpoint is quantized
straight to the mix's per-tensor types. The reference is the two-step path llama.cpp users take,
here with halfbyte's own quantize (byte-identical to llama-quantize, tests/test_quantize_mixes.py):
convert to F32, then quantize to the mix. Every tensor must get the same type and the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from tiny_models import build_model, llama_config, save_checkpoint

from converters.convert import convert
from engine.cli import main
from engine.gguf_file import GGUFFile
from engine.model import Model
from engine.requantize import quantize_gguf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixes")
    # Rows of 256 and 512 values split into K-quant super-blocks (smaller rows would fall back).
    config = llama_config(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2)
    save_checkpoint(build_model(config, seed=5), root / "hf", "llama")
    f32 = convert(str(root / "hf"), root / "f32.gguf", GGMLQuantizationType.F32, progress=False)
    return root, f32


@pytest.mark.parametrize("mix", ["q4_k_m", "q6_k", "iq4_xs", "q3_k_s"])
def test_mix_straight_from_the_checkpoint_equals_f32_then_quantize(checkpoint, mix):
    root, f32 = checkpoint
    direct = convert(str(root / "hf"), root / f"direct-{mix}.gguf", mix, progress=False)
    two_step = root / f"two-step-{mix}.gguf"
    quantize_gguf(f32, two_step, mix, progress=False)
    with GGUFFile(direct) as ours, GGUFFile(two_step) as reference:
        assert ours.metadata["general.file_type"] == reference.metadata["general.file_type"]
        assert set(ours.tensors) == set(reference.tensors)
        kinds = set()
        for name, info in reference.tensors.items():
            assert ours.tensors[name].ggml_type == info.ggml_type, name
            assert np.array_equal(ours.tensor_bytes(name), reference.tensor_bytes(name)), name
            kinds.add(info.ggml_type.name)
    # a real mix: several types (Q4_K, Q6_K and F32 norms for q4_k_m); Q6_K alone is Q6_K + F32 norms
    assert len(kinds) >= (2 if mix == "q6_k" else 3), kinds
    ids = [1, 450, 4996, 17354, 1701]
    assert np.isfinite(Model.load(direct, n_ctx=32).eval(ids)).all()


def test_cli_flag_and_default_name(checkpoint, tmp_path, monkeypatch):
    root, _ = checkpoint
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(root / "hf"), "--q4_k_m", "-q"])
    assert result.exit_code == 0, result.output
    with GGUFFile(tmp_path / "hf-q4_k_m.gguf") as written:
        assert written.metadata["general.file_type"] == 15  # llama.cpp's MOSTLY_Q4_K_M
    result = CliRunner().invoke(main, ["convert", str(root / "hf"), "--base", str(root / "hf"), "--q6_k"])
    assert result.exit_code == 1 and "adapter GGUF is written as F32 or F16" in result.output
