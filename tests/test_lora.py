"""LoRA adapters (PEFT) against PeftModel: merged at convert time (convert --lora), and as llama.cpp's
LoRA adapter GGUF applied at run time (Model.load(lora=...), run --lora) on F32 and Q8_0 bases."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGMLQuantizationType
from tiny_models import build_model, llama_config, save_checkpoint

from converters.convert import convert, convert_adapter
from engine.cli import main
from engine.errors import HalfbyteError
from engine.model import Model

peft = pytest.importorskip("peft")

PROMPT = "Once upon a time, in a land far away, there lived"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q8_BOUND = 0.025  # tests/test_runtime.py's QUANT_BOUNDS for Q8_0 against the round-tripped reference


def make_adapter(directory: Path, seed: int, bin_format: bool = False, **config):
    """A PeftModel with random A and B (init_lora_weights=False) over a fresh base (seed 3), saved."""
    from peft import LoraConfig, get_peft_model

    base = build_model(llama_config(), seed=3)
    torch.manual_seed(seed)
    settings = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False)
    settings.update(config)
    model = get_peft_model(base, LoraConfig(**settings))
    model.eval()
    model.save_pretrained(directory, safe_serialization=not bin_format)
    return model


def load(path, lora=(), **kwargs):
    return Model.load(path, threads=2, lora=lora, **kwargs)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_checkpoint(build_model(llama_config(), seed=3), root / "hf", "llama")
    return root


@pytest.fixture(scope="module")
def ids(root):
    path = convert(str(root / "hf"), root / "vocab.gguf", GGMLQuantizationType.F32, vocab_only=True, progress=False)
    from engine.gguf_file import GGUFFile
    from engine.tokenizer import Tokenizer

    file = GGUFFile(path)
    try:
        return Tokenizer.from_metadata(file.metadata).encode(PROMPT, add_bos=None, parse_special=False)
    finally:
        file.close()


@pytest.fixture(scope="module")
def base_f32(root):
    return convert(str(root / "hf"), root / "base-f32.gguf", GGMLQuantizationType.F32, progress=False)


# ------------------------------------------------------------------------------------------
# Merged at convert time


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_merged_adapter_matches_peft(root, ids, fmt):
    """rsLoRA, rank_pattern, alpha_pattern, a regex target_modules and modules_to_save, merged into
    an F32 file (.bin adapters through the restricted unpickler)."""
    adapter = root / f"merged-{fmt}"
    reference = make_adapter(adapter, seed=11, bin_format=fmt == "bin", use_rslora=True,
                             target_modules=r".*\.(q_proj|k_proj|v_proj|down_proj)",
                             rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"])
    out = convert(str(root / "hf"), root / f"merged-{fmt}.gguf", GGMLQuantizationType.F32, progress=False,
                  lora=[(adapter, 1.0)])
    theirs = logits(reference, ids)
    with reference.disable_adapter():
        assert relative(logits(reference, ids), theirs) > 0.1  # the adapter matters
    assert relative(Model.load(out, threads=2, kv_type="f32").eval(ids), theirs) <= 1e-3


def test_two_adapters_and_a_scale_through_the_cli(root, ids):
    """convert --lora A --lora B --lora-scale 0.5 --lora-scale 1: A at half strength, then B."""
    first = make_adapter(root / "first", seed=21, target_modules=["q_proj", "up_proj"])
    for module in first.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] *= 0.5
    merged = first.merge_and_unload()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(22)
    second = get_peft_model(merged, LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"],
                                               init_lora_weights=False))
    second.eval()
    second.save_pretrained(root / "second")
    out = root / "two.gguf"
    result = CliRunner().invoke(main, ["convert", str(root / "hf"), "-o", str(out), "--f32", "-q",
                                       "--lora", str(root / "first"), "--lora", str(root / "second"),
                                       "--lora-scale", "0.5", "--lora-scale", "1"])
    assert result.exit_code == 0, result.output
    assert relative(Model.load(out, threads=2, kv_type="f32").eval(ids), logits(second, ids)) <= 1e-3


# ------------------------------------------------------------------------------------------
# Adapter GGUF, applied at run time


@pytest.fixture(scope="module")
def runtime_adapter(root):
    reference = make_adapter(root / "rt", seed=31, rank_pattern={"v_proj": 2}, use_rslora=True)
    path = convert_adapter(root / "rt", str(root / "hf"), root / "rt.gguf", GGMLQuantizationType.F32, progress=False)
    return path, reference


def test_adapter_gguf_metadata(runtime_adapter):
    from engine.gguf_file import GGUFFile

    file = GGUFFile(runtime_adapter[0])
    try:
        assert file.metadata["general.type"] == "adapter"
        assert file.metadata["adapter.type"] == "lora"
        assert file.metadata["adapter.lora.alpha"] == 8.0
        assert file.architecture == "llama"
        assert tuple(file.tensors["blk.0.attn_q.weight.lora_a"].ne) == (64, 4)
        assert tuple(file.tensors["blk.0.attn_q.weight.lora_b"].ne) == (4, 64)
        assert tuple(file.tensors["blk.1.attn_v.weight.lora_b"].ne) == (2, 32)
    finally:
        file.close()


def test_runtime_adapter_on_f32_base_matches_peft(base_f32, runtime_adapter, ids):
    path, reference = runtime_adapter
    model = load(base_f32, [(path, 1.0)], kv_type="f32")
    theirs = logits(reference, ids)
    assert relative(model.eval(ids), theirs) <= 1e-3
    model.reset()
    assert relative(np.concatenate([model.eval([t]) for t in ids]), theirs) <= 1e-3
    # scale 0: the base model alone
    plain = load(base_f32, [(path, 0.0)], kv_type="f32")
    with reference.disable_adapter():
        assert relative(plain.eval(ids), logits(reference, ids)) <= 1e-3


def test_runtime_adapter_on_q8_0_base(root, runtime_adapter, ids):
    """Base weights round-tripped through Q8_0 in the reference, LoRA kept float (as the file)."""
    from gguf import quants

    path, reference = runtime_adapter
    base = convert(str(root / "hf"), root / "base-q8_0.gguf", GGMLQuantizationType.Q8_0, progress=False)
    model = load(base, [(path, 1.0)])
    originals = {}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.ndim == 2 and "lora_" not in name:
                originals[name] = param.detach().clone()
                w = param.detach().numpy().astype(np.float32)
                param.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q8_0),
                                                               GGMLQuantizationType.Q8_0).reshape(w.shape)))
        try:
            theirs = logits(reference, ids)
        finally:
            for name, param in reference.named_parameters():
                if name in originals:
                    param.copy_(originals[name])
    assert relative(model.eval(ids), theirs) <= Q8_BOUND


def test_run_cli_lora_options(base_f32, runtime_adapter):
    path = str(runtime_adapter[0])
    result = CliRunner().invoke(main, ["run", str(base_f32), "-p", "Once", "-n", "4", "--temp", "0",
                                       "--lora", path, "--lora-scaled", path, "0.5"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------
# Bad inputs: one-line errors naming the file


def test_bad_adapters_are_clean_errors(root, tmp_path):
    good = root / "rt"
    hf = str(root / "hf")

    def fails(adapter, match, **kw):
        with pytest.raises(HalfbyteError, match=match) as info:
            convert(hf, tmp_path / "out.gguf", GGMLQuantizationType.F32, progress=False, lora=[(adapter, 1.0)], **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    def copy_with(name, config_change=None, weights=None):
        target = tmp_path / name
        target.mkdir()
        config = json.loads((good / "adapter_config.json").read_text())
        if config_change is not None:
            config.update(config_change)
            (target / "adapter_config.json").write_text(json.dumps(config))
        else:
            (target / "adapter_config.json").write_text(json.dumps(config))
        data = (good / "adapter_model.safetensors").read_bytes()
        (target / (weights[0] if weights else "adapter_model.safetensors")).write_bytes(
            weights[1] if weights else data)
        return target

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    assert "adapter_config.json: missing" in fails(missing, "adapter_config.json")
    fails(copy_with("r0", {"r": 0}), r"adapter_config.json: 'r' is 0")
    fails(copy_with("dora", {"use_dora": True}), "DoRA adapters .* not supported")
    fails(copy_with("ia3", {"peft_type": "IA3"}), "peft_type 'IA3' is not supported")
    fails(copy_with("rank", {"r": 8}), "rank 4, adapter_config.json says 8")
    data = (good / "adapter_model.safetensors").read_bytes()
    fails(copy_with("trunc", weights=("adapter_model.safetensors", data[: len(data) // 2])),
          "adapter_model.safetensors: .*truncated")
    # adapter of a wider base model: shapes do not match
    from peft import LoraConfig, get_peft_model

    wide = get_peft_model(build_model(llama_config(hidden_size=128, intermediate_size=256), seed=3),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    wide.save_pretrained(tmp_path / "wide")
    fails(tmp_path / "wide", f"adapter_model.safetensors: LoRA update of .* base model {hf}")
    # a malicious .bin: the restricted unpickler refuses it, nothing runs
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((good / "adapter_config.json").read_text())

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with zipfile.ZipFile(evil / "adapter_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Boom()}, protocol=2))
    fails(evil, "adapter_model.bin: refusing to unpickle")
    assert not (tmp_path / "pwned").exists()


def test_runtime_adapter_mismatch_names_both_files(root, tmp_path, base_f32):
    from peft import LoraConfig, get_peft_model

    other = tmp_path / "other-hf"
    save_checkpoint(build_model(llama_config(hidden_size=128, intermediate_size=256), seed=3), other, "llama")
    get_peft_model(build_model(llama_config(hidden_size=128, intermediate_size=256), seed=3),
                   LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    wrong = convert_adapter(tmp_path / "a", str(other), tmp_path / "wrong.gguf", GGMLQuantizationType.F16,
                            progress=False)
    with pytest.raises(HalfbyteError) as info:
        load(base_f32, [(wrong, 1.0)])
    assert str(wrong) in str(info.value) and str(base_f32) in str(info.value)
    with pytest.raises(HalfbyteError, match="not a LoRA adapter GGUF"):
        load(base_f32, [(base_f32, 1.0)])


# ------------------------------------------------------------------------------------------
# llama.cpp's convert_lora_to_gguf.py


@pytest.mark.skipif(not os.environ.get("HALFBYTE_LLAMA_CPP"),
                    reason="set HALFBYTE_LLAMA_CPP to a llama.cpp checkout to run")
def test_llama_cpp_adapter_gguf_runs_here(root, base_f32, ids, tmp_path):
    """llama.cpp's converter (plain LoRA: it writes alpha only, without rsLoRA or alpha patterns)
    gives the same logits here as PeftModel and as our own adapter GGUF."""
    reference = make_adapter(tmp_path / "plain", seed=41, rank_pattern={"v_proj": 2})
    lcp = Path(os.environ["HALFBYTE_LLAMA_CPP"])
    out = tmp_path / "llama.cpp-lora.gguf"
    env = dict(os.environ, PYTHONPATH=str(lcp / "gguf-py"))
    subprocess.run([sys.executable, str(lcp / "convert_lora_to_gguf.py"), str(tmp_path / "plain"), "--base",
                    str(root / "hf"), "--outtype", "f32", "--outfile", str(out)], check=True, capture_output=True,
                   env=env)
    theirs = logits(reference, ids)
    assert relative(load(base_f32, [(out, 1.0)], kv_type="f32").eval(ids), theirs) <= 1e-3


@pytest.mark.skipif(not os.environ.get("HALFBYTE_LLAMA_SERVER"),
                    reason="set HALFBYTE_LLAMA_SERVER to llama.cpp's llama-server binary to run")
def test_our_adapter_gguf_runs_in_llama_cpp(root, base_f32, runtime_adapter, ids):
    """Our adapter GGUF (with rsLoRA and a per-module rank, folded into what llama.cpp's format holds)
    loads in llama.cpp with --lora and generates PeftModel's greedy tokens."""
    import socket
    import time
    import urllib.request

    path, reference = runtime_adapter
    n_new = 16
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.environ["HALFBYTE_LLAMA_SERVER"], "-m", str(base_f32), "--lora", str(path),
                               "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-np", "1", "-t", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "llama-server did not start"
            time.sleep(0.3)
        body = json.dumps({"prompt": ids, "n_predict": n_new, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
                           "return_tokens": True, "cache_prompt": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["tokens"] == expected
        model, ours = load(base_f32, [(path, 1.0)]), []
        row = model.eval(ids, last_only=True)[-1]
        for _ in range(n_new):  # and here, greedy
            ours.append(int(np.argmax(row)))
            row = model.eval(ours[-1:])[-1]
        assert ours == expected
    finally:
        server.terminate()
        server.wait(10)
