"""converters.sources: local directories, aliases and repo ids, downloaded through the real
huggingface_hub code from a loopback fake Hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so every Hub call
runs in a fresh subprocess with its own environment; the fake Hub runs here, in a thread, and
logs every request so the tests can check what was (not) fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters.checkpoint import open_checkpoint
from converters.sources import ALIASES, resolve_source
from engine.errors import HalfbyteError


def sha40(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class FakeHub:
    """Just the endpoints huggingface_hub 2.4 calls for resolve_revision, list_repo_files and
    snapshot_download: repo info, the recursive tree listing, and HEAD/GET of /resolve/ files."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.handle(self, head=False)

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def commit(self, repo: str) -> str:
        return sha40(repo + json.dumps(sorted(self.repos[repo])))

    def fetched(self) -> set[str]:
        """Files requested through /resolve/ (HEAD or GET)."""
        return {path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path in self.requests if "/resolve/" in path}

    def handle(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        match = (re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                 or re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
                 or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path))
        if match is None:
            return self.send(request, 404, b"unknown endpoint", head)
        repo, revision = match.group(1), match.group(2) or "main"
        if repo not in self.repos:
            return self.send(request, 404, b"", head, {"X-Error-Code": "RepoNotFound",
                                                       "X-Error-Message": "Repository not found"})
        if repo in self.gated:
            return self.send(request, 403, b"", head, {"X-Error-Code": "GatedRepo",
                                                       "X-Error-Message": "Access to this repo is restricted"})
        files, commit = self.repos[repo], self.commit(repo)
        if revision not in ("main", commit):
            return self.send(request, 404, b"", head, {"X-Error-Code": "RevisionNotFound"})
        if "/tree/" in path:
            listing = [{"type": "file", "path": name, "size": len(data), "oid": sha40(name)}
                       for name, data in files.items()]
            return self.send(request, 200, json.dumps(listing).encode(), head, {"Content-Type": "application/json"})
        if "/resolve/" not in path:
            info = {"id": repo, "sha": commit, "private": False, "siblings": [{"rfilename": n} for n in files]}
            return self.send(request, 200, json.dumps(info).encode(), head, {"Content-Type": "application/json"})
        name = match.group(3)
        if name not in files:
            return self.send(request, 404, b"", head, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        data = files[name]
        self.send(request, 200, data, head, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                             "X-Repo-Commit": commit, "Content-Type": "application/octet-stream"})

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, body: bytes, head: bool,
             headers: dict[str, str] | None = None) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)


def safetensors_bytes(tensors: dict[str, torch.Tensor], tmp: Path) -> bytes:
    save_file(tensors, str(tmp))
    return tmp.read_bytes()


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[FakeHub]:
    scratch = tmp_path_factory.mktemp("hub-files")
    torch.manual_seed(0)
    weights = {"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4).bfloat16()}
    config = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()
    tokenizer = b'{"model": {"type": "BPE", "vocab": {}}}'
    fake = FakeHub()
    # A repo with both formats: only the safetensors may be downloaded.
    fake.repos["huggyllama/llama-7b"] = {
        "config.json": config, "tokenizer.json": tokenizer, "tokenizer_config.json": b"{}",
        "model.safetensors": safetensors_bytes(weights, scratch / "single.safetensors"),
        "pytorch_model.bin": b"decoy: must not be downloaded", "README.md": b"# not needed",
    }
    # Sharded safetensors plus a stray consolidated file the index does not name.
    shard_a = safetensors_bytes({"lm_head.weight": weights["lm_head.weight"]}, scratch / "a.safetensors")
    shard_b = safetensors_bytes({"model.embed_tokens.weight": weights["model.embed_tokens.weight"]},
                                scratch / "b.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    fake.repos["someone/sharded"] = {
        "config.json": config, "tokenizer.model": b"sentencepiece bytes",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard_a, "model-00002-of-00002.safetensors": shard_b,
        "consolidated.safetensors": b"decoy: not named by the index",
    }
    # PyTorch only (like mosaicml/mpt-7b): the .bin shards and their index, not training_args.bin.
    torch.save({"lm_head.weight": weights["lm_head.weight"]}, scratch / "p1.bin")
    torch.save({"model.embed_tokens.weight": weights["model.embed_tokens.weight"]}, scratch / "p2.bin")
    bin_index = {"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00002.bin",
                                "model.embed_tokens.weight": "pytorch_model-00002-of-00002.bin"}}
    fake.repos["mosaicml/mpt-7b"] = {
        "config.json": config, "tokenizer.json": tokenizer,
        "pytorch_model.bin.index.json": json.dumps(bin_index).encode(),
        "pytorch_model-00001-of-00002.bin": (scratch / "p1.bin").read_bytes(),
        "pytorch_model-00002-of-00002.bin": (scratch / "p2.bin").read_bytes(),
        "training_args.bin": b"decoy",
    }
    fake.repos["meta-llama/Llama-2-7b-hf"] = {"config.json": config}
    fake.gated.add("meta-llama/Llama-2-7b-hf")
    fake.repos["someone/no-weights"] = {"config.json": config, "README.md": b"#"}
    fake.weights = weights
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


RUNNER = """
import json, sys
from converters.sources import resolve_source
from engine.errors import HalfbyteError

results = []
for source, revision in json.loads(sys.argv[1]):
    try:
        results.append({"path": str(resolve_source(source, revision=revision, progress=False))})
    except HalfbyteError as exc:
        results.append({"error": str(exc)})
print(json.dumps(results))
"""


def resolve_in_subprocess(requests: list[tuple[str, str | None]], endpoint: str, hf_home: Path,
                          offline: bool = False) -> list[dict[str, str]]:
    """resolve_source in a fresh interpreter whose environment is exactly the Hub settings given."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("HF_") and "proxy" not in key.lower() and key != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(requests)], env=env, capture_output=True,
                            text=True, timeout=120, cwd=hf_home.parent)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def dead_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def downloaded(hub, tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """One online run over every scenario the fake Hub serves."""
    hf_home = tmp_path_factory.mktemp("online") / "hf-home"
    requests = [("llama-7b", None), ("someone/sharded", None), ("mosaicml/mpt-7b", "main"),
                ("nobody/nothing", None), ("llama2-7b", None), ("someone/sharded", "v9.9"),
                ("someone/no-weights", None)]
    return hf_home, resolve_in_subprocess(requests, hub.endpoint, hf_home)


def snapshot_of(hf_home: Path, hub: FakeHub, repo: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / hub.commit(repo)


def test_alias_downloads_config_tokenizer_and_safetensors_only(hub, downloaded):
    hf_home, results = downloaded
    snapshot = snapshot_of(hf_home, hub, "huggyllama/llama-7b")
    assert results[0] == {"path": str(snapshot)}
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert "pytorch_model.bin" not in hub.fetched() and "README.md" not in hub.fetched()
    with open_checkpoint(snapshot) as checkpoint:
        for name, tensor in hub.weights.items():
            np.testing.assert_array_equal(checkpoint.load(name), tensor.float().numpy())


def test_sharded_repos_fetch_exactly_the_indexed_shards(hub, downloaded):
    hf_home, results = downloaded
    sharded = snapshot_of(hf_home, hub, "someone/sharded")
    assert results[1] == {"path": str(sharded)}
    assert sorted(p.name for p in sharded.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.model"]
    bins = snapshot_of(hf_home, hub, "mosaicml/mpt-7b")
    assert results[2] == {"path": str(bins)}
    assert sorted(p.name for p in bins.iterdir()) == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json", "tokenizer.json"]
    assert not {"consolidated.safetensors", "training_args.bin"} & hub.fetched()
    for snapshot in (sharded, bins):
        with open_checkpoint(snapshot) as checkpoint:
            np.testing.assert_array_equal(checkpoint.load("lm_head.weight"),
                                          hub.weights["lm_head.weight"].float().numpy())


def test_hub_errors_are_one_line_and_say_what_to_do(downloaded):
    _, results = downloaded
    not_found, gated, bad_revision, no_weights = (r["error"] for r in results[3:])
    assert not_found.startswith("nobody/nothing: ") and "not found" in not_found and "HF_TOKEN" in not_found
    assert gated.startswith("meta-llama/Llama-2-7b-hf: ") and "gated" in gated and "HF_TOKEN" in gated
    assert bad_revision.startswith("someone/sharded: ") and "'v9.9' not found" in bad_revision
    assert no_weights.startswith("someone/no-weights: ") and "no weights" in no_weights
    assert all("\n" not in message for message in (not_found, gated, bad_revision, no_weights))


def test_offline_mode_uses_the_cache(hub, downloaded):
    hf_home, online = downloaded
    before = len(hub.requests)
    requests = [("llama-7b", None), ("someone/sharded", None), ("mosaicml/mpt-7b", "main")]
    assert resolve_in_subprocess(requests, hub.endpoint, hf_home, offline=True) == online[:3]
    assert len(hub.requests) == before  # not a single request reached the Hub


def test_unreachable_hub_falls_back_to_the_cache(hub, downloaded):
    hf_home, online = downloaded
    results = resolve_in_subprocess([("llama-7b", None), ("someone/other", None)], dead_endpoint(), hf_home)
    assert results[0] == online[0]
    message = results[1]["error"]
    assert message.startswith("someone/other: ") and "cannot reach the Hugging Face Hub" in message
    assert "halfbyte convert /path/to/dir" in message


def test_unreachable_hub_without_cache(tmp_path):
    [result] = resolve_in_subprocess([("falcon-7b", None)], dead_endpoint(), tmp_path / "hf-home")
    assert result["error"].startswith("tiiuae/falcon-7b: cannot reach the Hugging Face Hub")
    assert "halfbyte convert /path/to/dir" in result["error"]


def test_offline_mode_without_cache(hub, tmp_path):
    before = len(hub.requests)
    [result] = resolve_in_subprocess([("llama-7b", None)], hub.endpoint, tmp_path / "hf-home", offline=True)
    assert result["error"].startswith("huggyllama/llama-7b: HF_HUB_OFFLINE is set")
    assert "halfbyte convert /path/to/dir" in result["error"]
    assert len(hub.requests) == before


# --------------------------------------------------------------------------------------------
# No Hub involved


def test_local_directory_is_used_as_is(tmp_path, monkeypatch):
    assert resolve_source(str(tmp_path)) == tmp_path
    # A directory wins over an alias or repo id spelled the same way.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama-7b").mkdir()
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_source("llama-7b") == Path("llama-7b")
    assert resolve_source("org/name") == Path("org/name")


def test_file_is_not_a_source(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(HalfbyteError, match="model.gguf: is a file"):
        resolve_source(str(tmp_path / "model.gguf"))


def test_empty_source():
    with pytest.raises(HalfbyteError, match="empty source"):
        resolve_source("  ")


@pytest.mark.parametrize("source", ["llama-99b", "/no/such/dir", "a/b/c", "not a repo"])
def test_unknown_source_lists_the_aliases(source):
    with pytest.raises(HalfbyteError) as excinfo:
        resolve_source(source)
    message = str(excinfo.value)
    assert message.startswith(f"{source}: not a directory") and "\n" not in message
    assert all(alias in message for alias in ALIASES)


def test_alias_table():
    required = {
        "llama-7b": "huggyllama/llama-7b", "llama-13b": "huggyllama/llama-13b",
        "llama2-7b": "meta-llama/Llama-2-7b-hf", "open-llama-3b": "openlm-research/open_llama_3b",
        "open-llama-7b": "openlm-research/open_llama_7b", "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "mpt-7b": "mosaicml/mpt-7b", "mpt-7b-instruct": "mosaicml/mpt-7b-instruct",
        "falcon-7b": "tiiuae/falcon-7b", "falcon-7b-instruct": "tiiuae/falcon-7b-instruct",
        "falcon-40b": "tiiuae/falcon-40b",
    }
    assert required.items() <= ALIASES.items()
