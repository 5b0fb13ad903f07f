"""Ready-made GGUF files from the Hugging Face Hub: ``org/repo[:QUANT]`` as llama.cpp's ``-hf``.

    path = download_gguf("Qwen/Qwen2.5-0.5B-Instruct-GGUF", quant="Q4_K_M")
    path = download_gguf("org/repo", filename="*q8_0.gguf")     # a name or a glob

Only the chosen file is fetched (all its parts for a split GGUF, ``NAME-00001-of-00003.gguf``),
through huggingface_hub itself: its cache (``HF_HOME``, ``HF_HUB_CACHE``), its progress bar, its
resumable downloads, ``HF_TOKEN``, ``HF_ENDPOINT`` and offline mode (``HF_HUB_OFFLINE=1``: the
cache only, and a clear error when the file is not there). Errors are one line.
"""

from __future__ import annotations

import fnmatch
import glob
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from engine.errors import HalfbyteError, file_error

# org/repo, then an optional :TAG (a quantization name such as Q4_K_M, IQ4_XS, UD-Q4_K_XL, F16).
HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(?P<tag>[A-Za-z0-9_.-]+))?")
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf default tag

LOCAL_HINT = "download the .gguf file elsewhere and give its path"


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``("org/repo", "Q4_K_M")`` for ``"org/repo:Q4_K_M"``, ``("org/repo", None)`` for ``"org/repo"``,
    None when ``spec`` does not look like a Hub model (callers check local paths first)."""
    match = HUB_SPEC.fullmatch(spec.strip())
    if match is None or spec.endswith(".gguf"):
        return None
    return match.group("repo"), match.group("tag")


def split_parts(name: str) -> tuple[str, int, int] | None:
    """``(prefix, number, count)`` of a gguf-split part name (number from 1), else None."""
    match = SPLIT_NAME.match(name)
    if match is None:
        return None
    return match.group("prefix"), int(match.group("no")), int(match.group("count"))


def split_part_name(prefix: str, number: int, count: int) -> str:
    """llama.cpp's ``llama_split_path``: ``PREFIX-%05d-of-%05d.gguf``, ``number`` from 1."""
    return f"{prefix}-{number:05d}-of-{count:05d}.gguf"


def _is_model_file(name: str) -> bool:
    # Multimodal projectors ship beside the model in many GGUF repos; llama.cpp skips them too.
    return name.lower().endswith(".gguf") and "mmproj" not in PurePosixPath(name).name.lower()


def _group_key(name: str) -> str:
    """One key per model file: the first part's name for every part of a split file."""
    parts = split_parts(name)
    return split_part_name(parts[0], 1, parts[2]) if parts else name


def _quant_matches(name: str, tag: str) -> bool:
    """Whether file ``name`` is the ``tag`` quantization: the tag as a whole word of the name, case-insensitive
    (``Q4_K`` is not ``Q4_K_M``; ``model.Q4_K_M.gguf``, ``Model-q4_k_m.gguf``, ``Q4_K_M/Model-00001-of-00002.gguf``)."""
    stem = name[: -len(".gguf")]
    parts = split_parts(name)
    if parts:
        stem = parts[0]
    word = re.compile(r"(?:^|[-._/])" + re.escape(tag.lower()) + r"(?:$|[-./])")
    return word.search(stem.lower()) is not None


def choose_gguf(repo_id: str, files: list[str], filename: str | None = None, quant: str | None = None) -> list[str]:
    """The repo files to fetch, first part first: ``filename`` (a name or glob, matched against the path and
    against the base name, case-insensitive), else the ``quant`` tag, else the repo's one model file or its
    Q4_K_M."""
    ggufs = sorted(name for name in files if name.lower().endswith(".gguf"))
    models = [name for name in ggufs if _is_model_file(name)]
    if not ggufs:
        raise HalfbyteError(f"{repo_id}: the repo has no .gguf file (for a transformers checkpoint use "
                            f"`halfbyte convert {repo_id}`)")
    if filename is not None:
        # Case-insensitive, like the quant tag: "*q4_k_m.gguf" finds bartowski's "...-Q4_K_M.gguf".
        pattern = filename.lower()
        chosen = [n for n in ggufs if fnmatch.fnmatchcase(n.lower(), pattern)
                  or fnmatch.fnmatchcase(PurePosixPath(n).name.lower(), pattern)]
        what = f"file {filename!r}"
        pool = ggufs
    elif quant is not None:
        chosen = [n for n in models if _quant_matches(n, quant)]
        what = f"quantization {quant!r}"
        pool = models
    else:
        groups = {_group_key(n) for n in models}
        if len(groups) == 1:
            chosen = models
        else:
            chosen = [n for n in models if _quant_matches(n, DEFAULT_QUANT)]
        what = f"default quantization {DEFAULT_QUANT!r} (several model files)"
        pool = models
    groups = sorted({_group_key(n) for n in chosen})
    available = ", ".join(sorted({_group_key(n) for n in pool})) or "none"
    if not groups:
        raise HalfbyteError(f"{repo_id}: no .gguf file matches {what}; the repo has: {available}")
    if len(groups) > 1:
        raise HalfbyteError(f"{repo_id}: {what} is ambiguous, it matches: {', '.join(groups)} "
                            "(give the file name with --hf-file / filename=)")
    first = groups[0]
    parts = split_parts(first)
    if parts is None:
        return [first]
    prefix, _, count = parts
    names = [split_part_name(prefix, i, count) for i in range(1, count + 1)]
    missing = [n for n in names if n not in files]
    if missing:
        raise HalfbyteError(f"{repo_id}: split GGUF {first} has {count} parts but the repo lacks {missing[0]}")
    return names


def silent_tqdm() -> type:
    """huggingface_hub's tqdm, always disabled (``progress=False``) without touching its global switch."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class SilentTqdm(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def repo_files(api: Any, repo_id: str, resolved: Any) -> list[str]:
    """File names of the repo at the resolved commit: from the tree listing the cache keeps per
    commit (works offline), else from the Hub."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [entry.path for entry in get_cached_repo_tree(repo_id, revision=resolved)]
    except CachedRepoTreeNotFoundError:
        return api.list_repo_files(repo_id, revision=resolved.resolved)


def no_network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached and the cache cannot stand in."""
    from huggingface_hub import errors as hub_errors

    found: list[type[BaseException]] = [
        hub_errors.OfflineModeIsEnabled,  # HF_HUB_OFFLINE=1
        hub_errors.LocalEntryNotFoundError,  # includes IncompleteSnapshotError
        hub_errors.RevisionResolutionError,
        ConnectionError,
        TimeoutError,
    ]
    try:  # the HTTP client huggingface_hub 2.x uses; transport errors can escape mid-download
        import httpx2

        found.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(found)


@contextmanager
def translate_hub_errors(repo_id: str, revision: str | None, local_kind: str, local_hint: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line ``HalfbyteError``s naming ``repo_id``, for both Hub users
    (GGUF files here, checkpoints in converters/sources.py). ``local_kind``: what a local path would
    have been ("file", "directory"); ``local_hint``: how to do without the Hub."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    missing = "the file is not" if local_kind == "file" else "the files are not"
    try:
        yield
    except hub_errors.GatedRepoError:
        raise HalfbyteError(
            f"{repo_id}: gated repo: accept its license on the Hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise HalfbyteError(f"{repo_id}: repo not found on the Hugging Face Hub, and no local {local_kind} of that "
                            "name (for a private repo set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise HalfbyteError(f"{repo_id}: revision {revision!r} not found on the Hugging Face Hub") from None
    except hub_errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HalfbyteError(f"{repo_id}: access denied by the Hugging Face Hub (HTTP {status}): set HF_TOKEN "
                                "to a token that can read this repo") from None
        raise HalfbyteError(f"{repo_id}: Hugging Face Hub error (HTTP {status}); {local_hint}") from None
    except no_network_errors():
        constants = huggingface_hub.constants
        if constants.is_offline_mode():
            cached = "the file is not" if local_kind == "file" else "the files are not all"
            raise HalfbyteError(f"{repo_id}: HF_HUB_OFFLINE is set and {cached} in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}); unset it to download, or {local_hint}") from None
        raise HalfbyteError(f"{repo_id}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} (no network?) and "
                            f"{missing} in the local cache; {local_hint}") from None
    except OSError as exc:  # the cache itself: disk full, read-only, permissions
        raise file_error(exc.filename or huggingface_hub.constants.HF_HUB_CACHE,
                         f"cannot write the Hugging Face cache: {exc.strerror or exc}") from None


def download_gguf(repo_id: str, filename: str | None = None, quant: str | None = None, revision: str | None = None,
                  progress: bool = True) -> Path:
    """Fetch (or find in the cache) one GGUF model of ``repo_id``; returns the local path of its (first) file."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    if not HUB_SPEC.fullmatch(repo_id) or ":" in repo_id:
        raise HalfbyteError(f"{repo_id!r} is not a Hub repo id (org/name)")
    with translate_hub_errors(repo_id, revision, "file", LOCAL_HINT):
        api = huggingface_hub.HfApi()
        resolved = api.resolve_revision(repo_id, revision=revision)
        files = repo_files(api, repo_id, resolved)
        names = choose_gguf(repo_id, files, filename, quant)
        # snapshot_download of exact names (not hf_hub_download): it also records the repo's tree listing
        # in the cache, so that the same choice can be made again offline.
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=resolved, allow_patterns=[glob.escape(n) for n in names],
            tqdm_class=None if progress else silent_tqdm()))
        paths = [folder / n for n in names]
        if not all(p.is_file() for p in paths):
            raise hub_errors.LocalEntryNotFoundError("not in the cache")
        return paths[0]


def resolve_model_path(model: str, hf_file: str | None = None, revision: str | None = None,
                       progress: bool = True) -> str:
    """What ``halfbyte run MODEL`` opens: an existing path as is; ``org/repo[:QUANT]`` (with ``hf_file`` a
    name or glob in the repo) from the Hub; anything else as a path (the loader names the missing file)."""
    if Path(model).expanduser().exists():
        if hf_file is not None:
            raise HalfbyteError(f"--hf-file needs a Hub repo (org/name), but {model} is a local path")
        return model
    spec = parse_hub_spec(model)
    if spec is None:
        if hf_file is not None:
            raise HalfbyteError(f"--hf-file needs a Hub repo (org/name), got {model!r}")
        return model
    repo_id, tag = spec
    if tag is not None and hf_file is not None:
        raise HalfbyteError(f"give either {repo_id}:{tag} or --hf-file, not both")
    return str(download_gguf(repo_id, filename=hf_file, quant=tag, revision=revision, progress=progress))

