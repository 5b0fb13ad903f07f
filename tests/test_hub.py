"""engine.hub: ready-made GGUF files from a loopback fake Hub (tests/test_sources.py's FakeHub),
through the real huggingface_hub code, each Hub call in a fresh subprocess (huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_sources import FakeHub, dead_endpoint

from converters.synthetic import LlamaShape, write_synthetic
from engine.errors import HalfbyteError
from engine.hub import choose_gguf, parse_hub_spec, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
SHAPE = LlamaShape(n_vocab=32000, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ctx=128, n_ff=128)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("gguf-hub")
    q4 = write_synthetic(scratch / "q4.gguf", SHAPE, "q4_0", seed=1).read_bytes()
    q8 = write_synthetic(scratch / "q8.gguf", SHAPE, "q8_0", seed=2).read_bytes()
    fake = FakeHub()
    fake.repos["someone/tiny-GGUF"] = {
        "tiny-Q4_K_M.gguf": q4, "tiny-q8_0.gguf": q8, "tiny-Q4_K_S.gguf": b"decoy", "mmproj-tiny-f16.gguf": b"decoy",
        "README.md": b"# not needed",
    }
    fake.repos["someone/one-file"] = {"model.gguf": q8, "config.json": b"{}"}
    fake.repos["someone/no-gguf"] = {"config.json": b"{}", "model.safetensors": b"x"}
    fake.repos["someone/gated-GGUF"] = {"m-Q4_K_M.gguf": q4}
    fake.gated.add("someone/gated-GGUF")
    fake.q4, fake.q8 = q4, q8
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def hub_env(endpoint: str, hf_home: Path, offline: bool = False) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("HF_") and "proxy" not in key.lower() and key != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


RUNNER = """
import json, sys
from engine.hub import download_gguf
from engine.errors import HalfbyteError

results = []
for repo, filename, quant in json.loads(sys.argv[1]):
    try:
        results.append({"path": str(download_gguf(repo, filename=filename, quant=quant, progress=False))})
    except HalfbyteError as exc:
        results.append({"error": str(exc)})
print(json.dumps(results))
"""


def download(requests, endpoint: str, hf_home: Path, offline: bool = False) -> list[dict[str, str]]:
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(requests)], env=hub_env(endpoint, hf_home,
                            offline), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def online(hub, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("online") / "hf-home"
    requests = [["someone/tiny-GGUF", None, "q4_k_m"], ["someone/tiny-GGUF", "*Q8_0.gguf", None],
                ["someone/one-file", None, None], ["someone/tiny-GGUF", None, "Q4_K"],
                ["someone/tiny-GGUF", "tiny-Q4_K_*.gguf", None], ["someone/no-gguf", None, None],
                ["nobody/nothing", None, None], ["someone/gated-GGUF", None, None]]
    return hf_home, download(requests, hub.endpoint, hf_home)


def snapshot(hf_home: Path, hub: FakeHub, repo: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / hub.commit(repo)


def test_quant_tag_and_glob_fetch_only_the_chosen_file(hub, online):
    hf_home, results = online
    folder = snapshot(hf_home, hub, "someone/tiny-GGUF")
    assert results[0] == {"path": str(folder / "tiny-Q4_K_M.gguf")}  # the tag is case-insensitive
    assert results[1] == {"path": str(folder / "tiny-q8_0.gguf")}  # so is the glob (fnmatch on the Hub's names)
    assert (folder / "tiny-Q4_K_M.gguf").read_bytes() == hub.q4
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-Q4_K_M.gguf", "tiny-q8_0.gguf"]
    assert not {"tiny-Q4_K_S.gguf", "mmproj-tiny-f16.gguf", "README.md"} & hub.fetched()
    one = snapshot(hf_home, hub, "someone/one-file")
    assert results[2] == {"path": str(one / "model.gguf")}  # no tag: the repo's only model file
    assert sorted(p.name for p in one.iterdir()) == ["model.gguf"]


def test_errors_are_one_line(online):
    _, results = online
    no_match, ambiguous, no_gguf, not_found, gated = (r["error"] for r in results[3:])
    assert no_match.startswith("someone/tiny-GGUF: no .gguf file matches quantization 'Q4_K'")
    assert "tiny-Q4_K_M.gguf" in no_match and "mmproj" not in no_match
    assert ambiguous.startswith("someone/tiny-GGUF: file 'tiny-Q4_K_*.gguf' is ambiguous")
    assert "tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf" in ambiguous
    assert no_gguf.startswith("someone/no-gguf: the repo has no .gguf file") and "halfbyte convert" in no_gguf
    assert not_found.startswith("nobody/nothing: repo not found") and "HF_TOKEN" in not_found
    assert gated.startswith("someone/gated-GGUF: gated repo") and "HF_TOKEN" in gated
    assert all("\n" not in r["error"] for r in results[3:])


def test_offline_uses_the_cache_and_says_what_is_missing(hub, online):
    hf_home, results = online
    before = len(hub.requests)
    again = download([["someone/tiny-GGUF", None, "Q4_K_M"], ["someone/tiny-GGUF", "tiny-Q4_K_S.gguf", None],
                      ["someone/other-GGUF", None, None]], hub.endpoint, hf_home, offline=True)
    assert again[0] == results[0]
    assert again[1]["error"].startswith("someone/tiny-GGUF: HF_HUB_OFFLINE is set and the file is not in the")
    assert again[2]["error"].startswith("someone/other-GGUF: HF_HUB_OFFLINE is set")
    assert len(hub.requests) == before  # not one request reached the Hub


def test_unreachable_hub(hub, online, tmp_path):
    hf_home, results = online
    [cached] = download([["someone/tiny-GGUF", None, "Q4_K_M"]], dead_endpoint(), hf_home)
    assert cached == results[0]  # the cache stands in for the Hub
    [fresh] = download([["someone/tiny-GGUF", None, "Q4_K_M"]], dead_endpoint(), tmp_path / "empty")
    assert fresh["error"].startswith("someone/tiny-GGUF: cannot reach the Hugging Face Hub")


def test_run_and_from_pretrained(hub, online):
    hf_home, _ = online
    env = hub_env(hub.endpoint, hf_home)
    run = subprocess.run([sys.executable, "-m", "engine", "run", "someone/tiny-GGUF:Q8_0", "-p", "hello", "-n", "4",
                          "--temp", "0", "-t", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    code = ("from engine import Model\n"
            "m = Model.from_pretrained('someone/tiny-GGUF', filename='tiny-q8_0.gguf', progress=False, threads=1)\n"
            "print(m.path.name); print(m.generate('hello', max_tokens=4, temperature=0), end='')\n")
    lib = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert lib.returncode == 0, lib.stderr
    name, text = lib.stdout.split("\n", 1)
    assert name == "tiny-q8_0.gguf" and run.stdout == text
    bad = subprocess.run([sys.executable, "-m", "engine", "run", "someone/no-gguf", "-p", "x"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 1 and bad.stderr.startswith("halfbyte: error: someone/no-gguf: the repo has no .gguf")


# -- no Hub involved --------------------------------------------------------------------------------


def test_parse_hub_spec():
    assert parse_hub_spec("org/repo") == ("org/repo", None)
    assert parse_hub_spec("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")
    assert parse_hub_spec("unsloth/x-GGUF:UD-Q4_K_XL") == ("unsloth/x-GGUF", "UD-Q4_K_XL")
    for not_hub in ("model.gguf", "dir/model.gguf", "/abs/path", "a/b/c", "org/repo:", "plain"):
        assert parse_hub_spec(not_hub) is None


def test_choose_gguf():
    files = ["Model-Q4_K_M.gguf", "Model-Q4_K_S.gguf", "Model.Q8_0.gguf", "model-iq4_xs.gguf", "mmproj-F16.gguf",
             "Q6_K/Model-Q6_K-00001-of-00002.gguf", "Q6_K/Model-Q6_K-00002-of-00002.gguf", "README.md"]
    assert choose_gguf("r", files, quant="q8_0") == ["Model.Q8_0.gguf"]
    assert choose_gguf("r", files, quant="IQ4_XS") == ["model-iq4_xs.gguf"]
    assert choose_gguf("r", files) == ["Model-Q4_K_M.gguf"]  # several files: llama.cpp's default tag
    assert choose_gguf("r", files, quant="Q6_K") == ["Q6_K/Model-Q6_K-00001-of-00002.gguf",
                                                     "Q6_K/Model-Q6_K-00002-of-00002.gguf"]
    assert choose_gguf("r", files, filename="*-00002-of-00002.gguf")[0].endswith("00001-of-00002.gguf")
    assert choose_gguf("r", files, filename="mmproj-F16.gguf") == ["mmproj-F16.gguf"]  # asked for by name
    with pytest.raises(HalfbyteError, match="lacks Q6_K/Model-Q6_K-00002-of-00002.gguf"):
        choose_gguf("r", files[:-2], quant="Q6_K")
    with pytest.raises(HalfbyteError, match="default quantization 'Q4_K_M'"):
        choose_gguf("r", files[1:4])


def test_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").write_bytes(b"")
    assert resolve_model_path("org/repo") == "org/repo"  # an existing path is never a Hub repo
    assert resolve_model_path("missing.gguf") == "missing.gguf"  # the loader says "no such file"
    with pytest.raises(HalfbyteError, match="--hf-file needs a Hub repo"):
        resolve_model_path("org/repo", hf_file="x.gguf")
    with pytest.raises(HalfbyteError, match="either org/other:Q8_0 or --hf-file"):
        resolve_model_path("org/other:Q8_0", hf_file="x.gguf")


# -- split GGUF (llama.cpp's gguf-split) ----------------------------------------------------------------


def write_split(source: Path, out: Path, tensors_per_part: int) -> list[Path]:
    """``source`` as a split GGUF written by llama.cpp's own Python writer (gguf-py's GGUFWriter with
    ``split_max_tensors``, gguf-split's format: ``out.stem-0000i-of-0000n.gguf``, every part a GGUF with
    ``split.no`` / ``split.count`` / ``split.tensors.count``, the metadata in the first)."""
    from gguf import GGUFValueType
    from gguf import GGUFWriter as LlamaCppWriter

    from engine.gguf_file import GGUFFile

    out.parent.mkdir(parents=True, exist_ok=True)
    with GGUFFile(source) as file:
        writer = LlamaCppWriter(out, file.architecture, split_max_tensors=tensors_per_part)
        for key, value in file.metadata.items():
            if key == "general.architecture":
                continue
            vtype, sub = file.value_types[key]
            if vtype == GGUFValueType.ARRAY:
                value = list(value) if isinstance(value, list) else value.tolist()
            writer.add_key_value(key, value, vtype, sub)
        for name, info in file.tensors.items():
            writer.add_tensor(name, np.array(file.tensor_bytes(name)), raw_dtype=info.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    single = write_synthetic(root / "single.gguf", SHAPE, "q8_0", seed=5)
    parts = write_split(single, root / "parts" / "tiny-Q8_0.gguf", tensors_per_part=8)
    return single, parts


def test_split_gguf_loads_as_one_model(split_model):
    from engine.gguf_file import GGUFFile
    from engine.model import Model

    single, parts = split_model
    assert [p.name for p in parts] == [f"tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFFile(parts[1], _split_part=True) as second:
        assert second.metadata["split.no"] == 1 and "general.architecture" not in second.metadata
    with GGUFFile(single) as whole, GGUFFile(parts[0]) as split:
        assert split.paths == parts and split.total_size == sum(p.stat().st_size for p in parts)
        assert split.metadata["split.count"] == 3 and split.metadata["split.tensors.count"] == len(whole.tensors)
        assert sorted(split.tensors) == sorted(whole.tensors)
        assert {info.part for info in split.tensors.values()} == {0, 1, 2}
        for name in whole.tensors:
            np.testing.assert_array_equal(split.tensor_array(name), whole.tensor_array(name))
    ids = list(range(1, 20))
    one = Model.load(single, threads=1).eval(ids)
    np.testing.assert_array_equal(Model.load(parts[0], threads=1).eval(ids), one)


def test_split_gguf_errors(split_model, tmp_path):
    from engine.gguf_file import GGUFFile

    _, parts = split_model
    with pytest.raises(HalfbyteError, match=r"is part 2 of a 3-part split GGUF; open the first part "
                                            r"\(tiny-Q8_0-00001-of-00003.gguf\)"):
        GGUFFile(parts[1])
    for part in parts[:2]:
        (tmp_path / part.name).symlink_to(part)
    with pytest.raises(HalfbyteError, match="split GGUF part 3 of 3 is missing: .*tiny-Q8_0-00003-of-00003.gguf"):
        GGUFFile(tmp_path / parts[0].name)
    (tmp_path / "renamed.gguf").symlink_to(parts[0])
    with pytest.raises(HalfbyteError, match="not named NAME-00001-of-00003.gguf"):
        GGUFFile(tmp_path / "renamed.gguf")
    (tmp_path / "mixed-00001-of-00003.gguf").symlink_to(parts[0])
    (tmp_path / "mixed-00002-of-00003.gguf").symlink_to(parts[2])
    (tmp_path / "mixed-00003-of-00003.gguf").symlink_to(parts[1])
    with pytest.raises(HalfbyteError, match="mixed-00002-of-00003.gguf: metadata split.no is 2, expected 1"):
        GGUFFile(tmp_path / "mixed-00001-of-00003.gguf")


def test_split_gguf_from_the_hub(split_model, tmp_path):
    _, parts = split_model
    fake = FakeHub()
    fake.repos["someone/split-GGUF"] = {f"Q8_0/{p.name}": p.read_bytes() for p in parts}
    fake.repos["someone/split-GGUF"]["other-Q4_0.gguf"] = b"decoy"
    fake.thread.start()
    try:
        hf_home = tmp_path / "hf-home"
        [result] = download([["someone/split-GGUF", None, "q8_0"]], fake.endpoint, hf_home)
        code = ("import sys; from engine import Model\n"
                "print(Model.load(sys.argv[1], threads=1).generate([1, 2, 3], max_tokens=6, temperature=0))")
        env = hub_env(fake.endpoint, hf_home, offline=True)
        [offline] = download([["someone/split-GGUF", None, "q8_0"]], fake.endpoint, hf_home, offline=True)
        loaded = subprocess.run([sys.executable, "-c", code, result["path"]], env=env, capture_output=True,
                                text=True, timeout=300, cwd=REPO)
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    folder = snapshot(hf_home, fake, "someone/split-GGUF")
    assert result == offline == {"path": str(folder / "Q8_0" / parts[0].name)}
    assert sorted(p.name for p in (folder / "Q8_0").iterdir()) == [p.name for p in parts]
    assert "other-Q4_0.gguf" not in fake.fetched()
    assert loaded.returncode == 0, loaded.stderr
