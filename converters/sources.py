"""Where `halfbyte convert SOURCE` finds a checkpoint: a local directory, a Hub repo id, or an alias.

Hub downloads go through huggingface_hub itself, so its cache, its progress bars and its
environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``) work
as everywhere else. Only what conversion needs is fetched: config.json, the tokenizer files and
one set of weights (safetensors when the repo has them, else PyTorch .bin), never both.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from converters.checkpoint import WeightLayout, pick_weight_layout, read_index
from engine.errors import HalfbyteError, file_error
from engine.hub import repo_files, silent_tqdm, translate_hub_errors

ALIASES: dict[str, str] = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "open-llama-3b": "openlm-research/open_llama_3b",
    "open-llama-7b": "openlm-research/open_llama_7b",
    "open-llama-13b": "openlm-research/open_llama_13b",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "mpt-7b": "mosaicml/mpt-7b",
    "mpt-7b-instruct": "mosaicml/mpt-7b-instruct",
    "mpt-7b-chat": "mosaicml/mpt-7b-chat",
    "falcon-7b": "tiiuae/falcon-7b",
    "falcon-7b-instruct": "tiiuae/falcon-7b-instruct",
    "falcon-40b": "tiiuae/falcon-40b",
    "falcon-40b-instruct": "tiiuae/falcon-40b-instruct",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.2",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "dolly-v2-3b": "databricks/dolly-v2-3b",
    "redpajama-incite-3b": "togethercomputer/RedPajama-INCITE-Base-3B-v1",
    "gpt2": "openai-community/gpt2",
    "cerebras-gpt-1.3b": "cerebras/Cerebras-GPT-1.3B",
    "stablelm-3b-4e1t": "stabilityai/stablelm-3b-4e1t",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "microsoft/Phi-3-mini-128k-instruct",
    "gemma-2b": "google/gemma-2b",
    "gemma-2b-it": "google/gemma-2b-it",
    "gemma-7b": "google/gemma-7b",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
    "gemma-2-9b": "google/gemma-2-9b",
}

# config.json plus every tokenizer file the vocab readers may use; each is fetched if the repo has it.
CONFIG_AND_TOKENIZER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)

# The Hub's own rule for repo ids: "namespace/name", letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

LOCAL_HINT = "download the checkpoint elsewhere and run `halfbyte convert /path/to/dir`"


def resolve_source(source: str, revision: str | None = None, progress: bool = True) -> Path:
    """The local directory holding the checkpoint named by ``source``.

    An existing directory is used as is (it wins over a repo id or alias of the same spelling);
    an alias from ``ALIASES`` or an ``org/name`` repo id is downloaded into (or found in) the
    Hugging Face cache at ``revision``.
    """
    if not source.strip():
        raise HalfbyteError("empty source: give a checkpoint directory, a Hub repo id (org/name) or an alias")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise file_error(path, "is a file; expected a checkpoint directory, a Hub repo id (org/name) or an alias")
    repo_id = ALIASES.get(source) or ALIASES.get(source.lower())
    if repo_id is None and REPO_ID.fullmatch(source):
        repo_id = source
    if repo_id is None:
        raise HalfbyteError(
            f"{source}: not a directory, a Hub repo id (org/name) or a known alias "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return download_checkpoint(repo_id, revision=revision, progress=progress)


def download_checkpoint(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """Fetch config, tokenizer and weights of ``repo_id`` into the Hugging Face cache (or find them
    there when offline) and return the snapshot directory."""
    import huggingface_hub
    with translate_hub_errors(repo_id, revision, "directory", LOCAL_HINT):
        api = huggingface_hub.HfApi()
        # Resolving once pins every later call to one commit, and records revision -> commit in
        # the cache so that the same call works again offline.
        resolved = api.resolve_revision(repo_id, revision=revision)
        files = repo_files(api, repo_id, resolved)
        layout = pick_weight_layout(files)
        if "config.json" not in files:
            raise HalfbyteError(f"{repo_id}: the repo has no config.json (not a transformers checkpoint)")
        if layout is None:
            raise HalfbyteError(
                f"{repo_id}: the repo has no weights halfbyte reads (model.safetensors, pytorch_model.bin "
                "or their sharded forms)"
            )
        wanted = [name for name in CONFIG_AND_TOKENIZER_FILES if name in files]
        snapshot = _download(repo_id, resolved, [*wanted, *_weight_files(layout, [])], progress)
        if layout.index is not None:
            # The index says which shards hold the weights (a repo may also carry other
            # *.safetensors, e.g. consolidated.safetensors): fetch exactly those.
            shards = sorted(set(read_index(snapshot / layout.index).values()))
            missing = [shard for shard in shards if shard not in files]
            if missing:
                raise HalfbyteError(f"{repo_id}: {layout.index} names {missing[0]}, which the repo does not have")
            snapshot = _download(repo_id, resolved, [*wanted, *_weight_files(layout, shards)], progress)
        return snapshot


def _weight_files(layout: WeightLayout, shards: list[str]) -> list[str]:
    return [*([layout.index] if layout.index else []), *layout.files, *shards]


def _download(repo_id: str, resolved: Any, files: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id,
        revision=resolved,
        # Exact names, escaped: allow_patterns are fnmatch patterns.
        allow_patterns=[glob.escape(name) for name in files],
        tqdm_class=None if progress else silent_tqdm(),
    )
    return Path(folder)


