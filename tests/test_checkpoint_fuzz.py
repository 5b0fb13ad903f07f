"""Fuzzing `halfbyte convert` with hostile checkpoints, in the spirit of test_gguf_file.py's GGUF fuzzing.

Three families of mutants of one tiny valid LLaMA checkpoint (fixed seed, ~170 cases):
- config.json: a key set to a value of the wrong type or range, deleted, or nested deep;
- model.safetensors: header entries with other dtypes, shapes, data_offsets, header lengths, nesting;
- pytorch_model.bin: the pickle rewritten record by record (tests/test_checkpoint.py's opcode writer)
  with hostile storage offsets, shapes, strides, element counts and storage types.

All cases run in ONE child process (a driver calling the click command with standalone_mode=False)
under an address-space limit (RLIMIT_AS) and a timeout, so an unbounded allocation shows up as a
failure instead of swapping the machine. For each case only the contract is checked: exit 0 with a
readable GGUF file, or exit 1 with exactly one ``halfbyte: error: `` line naming a file (warnings
aside); never a traceback; and nothing but the finished output left in the output directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_checkpoint import tensor_record, torch_pickle
from tiny_models import LLAMA_TOKENIZER

from engine.gguf_file import GGUFFile

REPO = Path(__file__).resolve().parents[1]
# Measured: a normal conversion of the seed in the driver (one Numba thread) peaks at ~600 MiB of
# address space (VmPeak; numba/LLVM reserve much of it); 1.5 GiB leaves room and still catches any
# allocation proportional to a hostile count.
ADDRESS_SPACE_LIMIT = 1536 << 20
HIDDEN, FF, VOCAB = 32, 64, 32000

DRIVER = textwrap.dedent(
    """
    import io, json, resource, sys, traceback
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    from engine.cli import main
    for case in json.load(open(sys.argv[1])):
        stderr = io.StringIO()
        real_stderr, sys.stderr = sys.stderr, stderr
        try:
            main(["convert", case["dir"], "-o", case["out"], "-q", "--q4_0"], standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = "crash"
            stderr.write(traceback.format_exc())
        finally:
            sys.stderr = real_stderr
        print(json.dumps({"name": case["name"], "code": code, "stderr": stderr.getvalue()}), flush=True)
    """
)


def seed_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float16)

    p = "model.layers.0"
    return {
        "model.embed_tokens.weight": weight(VOCAB, HIDDEN), "lm_head.weight": weight(VOCAB, HIDDEN),
        "model.norm.weight": np.ones(HIDDEN, np.float16),
        f"{p}.input_layernorm.weight": np.ones(HIDDEN, np.float16),
        f"{p}.post_attention_layernorm.weight": np.ones(HIDDEN, np.float16),
        **{f"{p}.self_attn.{n}_proj.weight": weight(HIDDEN, HIDDEN) for n in "qkvo"},
        f"{p}.mlp.gate_proj.weight": weight(FF, HIDDEN), f"{p}.mlp.up_proj.weight": weight(FF, HIDDEN),
        f"{p}.mlp.down_proj.weight": weight(HIDDEN, FF),
    }


SEED_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
               "intermediate_size": FF, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
               "vocab_size": VOCAB, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8,
               "rope_scaling": {"type": "linear", "factor": 2.0}}

# Values that break parsers: zero, negatives, u32 edges, huge, wrong types, nesting. Raw JSON text.
HOSTILE_VALUES = ["0", "-1", "-5", "1", "3", "2147483648", "4294967296", "1099511627776", "1000000000",
                  "1e400", "-1e400", "1.5", "0.0", "\"abc\"", "\"2\"", "\"\"", "null", "true", "false", "[]",
                  "[1, 2]", "{}", "{\"factor\": \"x\"}", "{\"type\": 3}", "[[[[[[]]]]]]",
                  "1" + "0" * 5000, "[" * 100_000 + "]" * 100_000]


def write_bin(path: Path, records: dict, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", torch_pickle(records))
        archive.writestr("archive/byteorder", b"little")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("fuzz-seeds")
    state = seed_state(np.random.default_rng(0))
    made = {}
    for fmt in ("safetensors", "bin"):
        d = root / fmt
        d.mkdir()
        (d / "config.json").write_text(json.dumps(SEED_CONFIG))
        shutil.copy(LLAMA_TOKENIZER, d / "tokenizer.model")
        if fmt == "safetensors":
            save_file(state, str(d / "model.safetensors"))
        else:
            records = {name: tensor_record("HalfStorage", str(i), array.size, 0, array.shape,
                                           tuple(s // 2 for s in array.strides))
                       for i, (name, array) in enumerate(state.items())}
            write_bin(d / "pytorch_model.bin", records, {str(i): a.tobytes() for i, a in enumerate(state.values())})
        made[fmt] = d
    return made


def case_dir(root: Path, seed: Path, name: str, replaced: str) -> Path:
    """A checkpoint directory: symlinks to the seed's files, except ``replaced`` (written by the caller)."""
    d = root / name
    d.mkdir()
    for entry in seed.iterdir():
        if entry.name != replaced:
            (d / entry.name).symlink_to(entry)
    return d


def config_mutants(rng: random.Random, count: int) -> list[tuple[str, str]]:
    keys = [*SEED_CONFIG, "rope_parameters", "pad_token_id", "unk_token_id", "max_sequence_length"]
    mutants = []
    for i in range(count):
        key = rng.choice(keys)
        parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in SEED_CONFIG.items() if k != key]
        if rng.random() > 0.1:  # else: the key is deleted
            parts.append(f"{json.dumps(key)}: {rng.choice(HOSTILE_VALUES)}")
        text = "{" + ", ".join(parts) + "}"
        if rng.random() < 0.05:
            text = rng.choice(["[" + text + "]", text[: len(text) // 2], "\ud800".join([text, ""]), "null"])
        mutants.append((f"config-{i}-{key}", text))
    return mutants


def safetensors_mutants(seed: Path, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    raw = (seed / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    names = [n for n in header if n != "__metadata__"]
    mutants = []
    for i in range(count):
        mutated = json.loads(json.dumps(header))
        body = data
        name = rng.choice(names)
        entry = mutated[name]
        kind = rng.randrange(9)
        if kind == 0:
            entry["dtype"] = rng.choice(["F32", "BF16", "I64", "F8_E4M3", "XYZ", 5, None, ["F16"]])
        elif kind == 1:
            shape = entry["shape"]
            index = rng.randrange(len(shape))
            shape[index] = rng.choice([0, 1, -1, shape[index] * 2, 2**31, 2**40, 2**64, "x", 1.5, None])
        elif kind == 2:
            entry["shape"] = rng.choice([[], [1] * 40, entry["shape"][::-1], entry["shape"] + [1], "[4]", None])
        elif kind == 3:
            begin, end = entry["data_offsets"]
            delta = rng.choice([-64, -2, -1, 1, 2, 64, 2**32, 2**63])
            entry["data_offsets"] = rng.choice([[begin + delta, end + delta], [begin, end + delta], [end, begin],
                                                [begin], [begin, end, 0], [-1, end], ["0", end]])
        elif kind == 4:  # alias another tensor's bytes (overlap)
            other = mutated[rng.choice(names)]
            entry["data_offsets"] = list(other["data_offsets"])
            entry["shape"], entry["dtype"] = list(other["shape"]), other["dtype"]
        elif kind == 5:
            body = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + bytes(rng.choice([1, 64]))
        elif kind == 6:
            del mutated[name]
        elif kind == 7:
            mutated[name] = rng.choice([None, 5, "x", [], {"dtype": "F16"}])
        else:
            mutated["__metadata__"] = rng.choice([{"format": "pt"}, [], None, {"x": [[[[]]]]}])
        text = json.dumps(mutated).encode()
        if rng.random() < 0.05:
            text = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        length_field = len(text)
        if rng.random() < 0.08:
            length_field = rng.choice([0, 1, len(text) - 1, len(text) + 1, 2**40, 2**64 - 1])
        mutants.append((f"safetensors-{i}-{kind}", struct.pack("<Q", length_field) + text + body))
    return mutants


def bin_mutants(rng: random.Random, count: int) -> list[tuple[str, dict, dict]]:
    state = seed_state(np.random.default_rng(0))
    names = list(state)
    storages = {str(i): a.tobytes() for i, a in enumerate(state.values())}
    hostile_ints = [-64, -1, 0, 1, 7, 2**31, 2**62, 2**63, 2**64, "abc", 1.5, None, (), True]
    mutants = []
    for i in range(count):
        fields = {name: dict(storage_type="HalfStorage", key=str(j), numel=state[name].size, offset=0,
                             shape=state[name].shape, stride=tuple(s // 2 for s in state[name].strides))
                  for j, name in enumerate(names)}
        target = fields[rng.choice(names)]
        field = rng.choice(["storage_type", "key", "numel", "offset", "shape", "stride", "shape_and_stride"])
        if field == "storage_type":
            target[field] = rng.choice(["FloatStorage", "BFloat16Storage", "LongStorage", "BoolStorage",
                                        "QuantizedStorage", "UntypedStorage"])
        elif field == "key":
            target[field] = rng.choice(["999", "../0", "", "0"])
        elif field in ("numel", "offset"):
            target[field] = rng.choice(hostile_ints + [target["numel"] + 1, target["numel"] - 1])
        elif field == "shape":
            target[field] = rng.choice([("x",), (-4, 4), tuple(reversed(target["shape"])), (2**40,), [4, 4],
                                        (0,) + tuple(target["shape"]), (1,) * 40])
        elif field == "stride":
            target[field] = rng.choice([(-1, 1), (1,), (0, 0), (1, 1), tuple(reversed(target["stride"])),
                                        ("a", 1), (2**62, 1)])
        else:
            target["shape"], target["stride"] = rng.choice([((2**20, 2**20), (0, 0)), ((4, 4), (2**40, 1)),
                                                            ((VOCAB * 2, HIDDEN), (HIDDEN, 1))])
        records = {name: tensor_record(**f) for name, f in fields.items()}
        mutants.append((f"bin-{i}-{field}", records, storages))
    return mutants


@pytest.mark.slow
def test_fuzz_convert_hostile_checkpoints(seeds, tmp_path):
    rng = random.Random(20240612)
    cases = []
    for name, text in config_mutants(rng, 70):
        d = case_dir(tmp_path, seeds["safetensors"], name, "config.json")
        (d / "config.json").write_text(text, errors="surrogatepass")
        cases.append((name, d))
    for name, content in safetensors_mutants(seeds["safetensors"], rng, 70):
        d = case_dir(tmp_path, seeds["safetensors"], name, "model.safetensors")
        (d / "model.safetensors").write_bytes(content)
        cases.append((name, d))
    for name, records, storages in bin_mutants(rng, 40):
        d = case_dir(tmp_path, seeds["bin"], name, "pytorch_model.bin")
        write_bin(d / "pytorch_model.bin", records, storages)
        cases.append((name, d))
    cases.append(("valid-safetensors", seeds["safetensors"]))
    cases.append(("valid-bin", seeds["bin"]))
    plan = []
    for name, d in cases:
        out_dir = tmp_path / "out" / name
        out_dir.mkdir(parents=True)
        plan.append({"name": name, "dir": str(d), "out": str(out_dir / "o.gguf")})
    (tmp_path / "cases.json").write_text(json.dumps(plan))

    result = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cases.json"), str(ADDRESS_SPACE_LIMIT)],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "NUMBA_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(plan), result.stderr[-3000:]
    counts = {0: 0, 1: 0}
    for case, outcome in zip(plan, outcomes):
        name, code, stderr = outcome["name"], outcome["code"], outcome["stderr"]
        out_dir = Path(case["out"]).parent
        lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("halfbyte: warning: ")]
        assert code in (0, 1), f"{name}: exit {code}\n{stderr}"
        assert "Traceback" not in stderr, f"{name}\n{stderr}"
        if code == 0:
            assert os.listdir(out_dir) == ["o.gguf"], name
            with GGUFFile(case["out"]) as gguf:
                assert gguf.architecture == "llama" and len(gguf.tensors) == 12, name
        else:
            assert len(lines) == 1 and lines[0].startswith("halfbyte: error: "), f"{name}: {stderr}"
            assert case["dir"] in lines[0] or case["out"] in lines[0], f"{name}: names no file: {lines[0]}"
            assert os.listdir(out_dir) == [], f"{name}: left {os.listdir(out_dir)}"
        counts[code] += 1
    assert outcomes[-1]["code"] == 0 and outcomes[-2]["code"] == 0
    assert counts[0] >= 5 and counts[1] >= 100, counts
