"""A model's context saved and restored: its tokens and the used part of its KV cache, as llama.cpp's
``llama_state_get_data`` / ``llama_state_load_file`` (llama-cpp-python's ``save_state`` / ``load_state``).

    blob = model.save_state()                 # bytes; model.save_state("ctx.hbstate") also writes a file
    model.load_state(blob)                    # or model.load_state("ctx.hbstate")

Layout, little-endian: ``b"HBSTATE\\0"``, format version u32, header length u32, the header (UTF-8
JSON: what the state belongs to and the sizes below), the tokens (int32), then the keys and the values
of every layer for the first ``n_tokens`` positions, in the cache's own storage type (F16, F32 or
Q8_0 blocks). A state loads only into the same model (architecture, tensor names, types and shapes,
a sample of every tensor's bytes, file size) with the same context size and KV cache types; anything
else is a one-line error naming both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import HalfbyteError

MAGIC = b"HBSTATE\0"
VERSION = 1
_SAMPLE_BYTES = 1024  # of each tensor, into the fingerprint: same-shape fine-tunes differ here


class Closed:
    """Stands in for a closed model's file, architecture and KV cache: any use is a clear error."""

    def __getattr__(self, name: str) -> Any:
        raise HalfbyteError("this model is closed")


def fingerprint(model: Any) -> str:
    """A hash of the model's tensors (names, types, shapes, and the first bytes of each)."""
    cached = getattr(model, "_state_fingerprint", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256(str(model.architecture).encode())
    file = model.file
    for name in sorted(file.tensors):
        info = file.tensors[name]
        digest.update(f"{name}:{info.ggml_type.name}:{info.shape};".encode())
        raw = file.tensor_bytes(name).reshape(-1)
        digest.update(raw[:_SAMPLE_BYTES].tobytes())
    model._state_fingerprint = digest.hexdigest()
    return model._state_fingerprint


def _identity(model: Any) -> dict[str, Any]:
    file = model.file
    size = file.total_size if hasattr(file, "total_size") else file.file_size
    return {"architecture": model.architecture, "model": model.path.name, "model_bytes": size,
            "tensors": fingerprint(model), "n_ctx": model.n_ctx, "type_k": model.cache.type_k,
            "type_v": model.cache.type_v}


def save_state(model: Any) -> bytes:
    """The model's context (tokens and their KV entries) as bytes."""
    with model._exclusive():
        n = len(model.tokens)
        cache = model.cache
        keys = np.ascontiguousarray(cache.k[:, :n]).tobytes()
        values = np.ascontiguousarray(cache.v[:, :n]).tobytes()
        header = _identity(model) | {"n_tokens": n, "k_bytes": len(keys), "v_bytes": len(values),
                                     "k_shape": list(cache.k.shape[2:]), "v_shape": list(cache.v.shape[2:])}
        tokens = np.asarray(model.tokens, dtype="<i4").tobytes()
    text = json.dumps(header, sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<II", VERSION, len(text)), text, tokens, keys, values])


def _describe(side: dict[str, Any]) -> str:
    return f"{side.get('model')} ({side.get('architecture')}, {side.get('model_bytes')} bytes)"


def _parse(data: bytes, where: str) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise HalfbyteError(f"{where}: not a halfbyte state (no {MAGIC!r} magic)")
    if len(view) < len(MAGIC) + 8:
        raise HalfbyteError(f"{where}: truncated state")
    version, length = struct.unpack_from("<II", view, len(MAGIC))
    if version != VERSION:
        raise HalfbyteError(f"{where}: state format version {version}, this halfbyte reads version {VERSION}")
    start = len(MAGIC) + 8
    try:
        header = json.loads(bytes(view[start : start + length]).decode())
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise HalfbyteError(f"{where}: corrupt state header") from None
    return header, view[start + length :]


def load_state(model: Any, data: bytes, where: str = "state") -> None:
    """Restore a context saved by ``save_state``; the model's current context is replaced."""
    header, body = _parse(data, where)
    mine = _identity(model)
    if header.get("architecture") != mine["architecture"] or header.get("tensors") != mine["tensors"] \
            or header.get("model_bytes") != mine["model_bytes"]:
        raise HalfbyteError(f"{where}: saved from model {_describe(header)}, not from this model {_describe(mine)}")
    for key, what in (("n_ctx", "context size"), ("type_k", "KV cache key type"), ("type_v", "KV cache value type")):
        if header.get(key) != mine[key]:
            raise HalfbyteError(f"{where}: saved with {what} {header.get(key)}, this model has {mine[key]} "
                                f"(load it with the same {'n_ctx' if key == 'n_ctx' else 'kv_type'})")
    n = header.get("n_tokens")
    cache = model.cache
    if not isinstance(n, int) or not 0 <= n <= model.n_ctx:
        raise HalfbyteError(f"{where}: corrupt state header (n_tokens {n!r})")
    k_shape = (cache.k.shape[0], n, *cache.k.shape[2:])
    v_shape = (cache.v.shape[0], n, *cache.v.shape[2:])
    k_bytes = int(np.prod(k_shape)) * cache.k.dtype.itemsize
    v_bytes = int(np.prod(v_shape)) * cache.v.dtype.itemsize
    if header.get("k_bytes") != k_bytes or header.get("v_bytes") != v_bytes or len(body) != 4 * n + k_bytes + v_bytes:
        raise HalfbyteError(f"{where}: truncated or corrupt state ({len(body)} bytes of data, expected "
                            f"{4 * n + k_bytes + v_bytes})")
    tokens = np.frombuffer(body, dtype="<i4", count=n)
    if n and (tokens.min() < 0 or tokens.max() >= model.n_vocab):
        raise HalfbyteError(f"{where}: corrupt state (token ids outside the vocabulary)")
    keys = np.frombuffer(body, dtype=cache.k.dtype, count=k_bytes // cache.k.dtype.itemsize, offset=4 * n)
    values = np.frombuffer(body, dtype=cache.v.dtype, offset=4 * n + k_bytes)
    with model._exclusive():
        cache.k[:, :n] = keys.reshape(k_shape)
        cache.v[:, :n] = values.reshape(v_shape)
        cache.n_past = n
        model.tokens = [int(t) for t in tokens]


def write_state_file(path: str | os.PathLike, data: bytes) -> None:
    """``data`` into ``path`` atomically (a temporary file beside it, renamed into place)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HalfbyteError(f"{path}: cannot write the state: {exc.strerror or exc}") from None


def read_state_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise HalfbyteError(f"{path}: cannot read the state: {exc.strerror or exc}") from None
