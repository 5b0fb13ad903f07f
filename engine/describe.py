"""`halfbyte info`: a human summary of a GGUF file, from metadata and tensor infos only."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.filetypes import file_type_name
from engine.gguf_file import GGUFFile

TOKEN_TYPE_NAMES = {1: "normal", 2: "unknown", 3: "control", 4: "user", 5: "unused", 6: "byte"}
SPECIAL_TOKEN_KEYS = ("bos", "eos", "unknown", "padding", "separator", "eot", "eom")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, np.ndarray)):
        items = list(value[:4])
        more = f", ... ({len(value)} items)" if len(value) > 4 else ""
        return "[" + ", ".join(_format_value(v) for v in items) + more + "]"
    if isinstance(value, np.generic):
        return _format_value(value.item())
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    return str(value)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def tokenizer_summary(metadata: dict[str, Any]) -> list[str]:
    """Lines describing the embedded tokenizer (empty if the file has none)."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        return []
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    lines = [f"  model:      {model}"]
    if "tokenizer.ggml.pre" in metadata:
        lines.append(f"  pre:        {metadata['tokenizer.ggml.pre']}")
    lines.append(f"  vocab size: {len(tokens)}")
    if "tokenizer.ggml.merges" in metadata:
        lines.append(f"  merges:     {len(metadata['tokenizer.ggml.merges'])}")
    token_types = metadata.get("tokenizer.ggml.token_type")
    if token_types is not None and len(token_types):
        kinds, counts = np.unique(np.asarray(token_types), return_counts=True)
        parts = [f"{TOKEN_TYPE_NAMES.get(int(k), str(k))} {c}" for k, c in zip(kinds, counts)]
        lines.append(f"  token types: {', '.join(parts)}")
    for name in SPECIAL_TOKEN_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            token_id = int(metadata[key])
            piece = tokens[token_id] if 0 <= token_id < len(tokens) else "<out of range>"
            lines.append(f"  {name + ' id:':11} {token_id} {piece!r}")
    for flag in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        key = f"tokenizer.ggml.{flag}"
        if key in metadata:
            lines.append(f"  {flag}: {metadata[key]}")
    return lines


def describe(gguf: GGUFFile) -> str:
    """The full `info` report."""
    md = gguf.metadata
    arch = md.get("general.architecture", "<none>")
    lines = [f"file:         {gguf.path}", f"format:       GGUF v{gguf.version}, alignment {gguf.alignment}"]
    lines.append(f"architecture: {arch}")
    if "general.name" in md:
        lines.append(f"name:         {md['general.name']}")
    if "general.file_type" in md:
        lines.append(f"file type:    {file_type_name(int(md['general.file_type']))}")

    hyper = [(k, v) for k, v in md.items() if k.startswith(f"{arch}.")]
    if hyper:
        lines.append("hyper-parameters:")
        width = max(len(k) - len(arch) - 1 for k, _ in hyper)
        lines += [f"  {k[len(arch) + 1:]:<{width}}  {_format_value(v)}" for k, v in hyper]

    other = [
        (k, v) for k, v in md.items()
        if not k.startswith(f"{arch}.") and not k.startswith("tokenizer.")
        and k not in ("general.architecture", "general.name", "general.file_type")
    ]
    if other:
        lines.append("other metadata:")
        lines += [f"  {k}: {_format_value(v)}" for k, v in other]

    tok = tokenizer_summary(md)
    if tok:
        lines.append("tokenizer:")
        lines += tok

    tensors = list(gguf.tensors.values())
    lines.append(f"tensors: {len(tensors)}")
    if tensors:
        name_width = max(len(t.name) for t in tensors)
        lines.append(f"  {'name':<{name_width}}  {'type':<5}  {'shape (ne)':<22}  bytes")
        for t in tensors:
            shape = " x ".join(str(d) for d in t.ne) or "scalar"
            lines.append(f"  {t.name:<{name_width}}  {t.ggml_type.name:<5}  {shape:<22}  {t.nbytes}")
    n_params = sum(t.n_elements for t in tensors)
    tensor_bytes = sum(t.nbytes for t in tensors)
    lines.append("totals:")
    lines.append(f"  parameters:      {n_params} ({_human_count(n_params)})")
    lines.append(f"  tensor data:     {tensor_bytes} bytes ({_human_bytes(tensor_bytes)})")
    lines.append(f"  file size:       {gguf.file_size} bytes ({_human_bytes(gguf.file_size)})")
    if n_params:
        lines.append(f"  bits per weight: {tensor_bytes * 8 / n_params:.2f}")
    return "\n".join(lines)
