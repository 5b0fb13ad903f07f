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


def _is_array(value: Any) -> bool:
    return isinstance(value, (list, np.ndarray))


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def tokenizer_summary(metadata: dict[str, Any]) -> list[str]:
    """Lines describing the embedded tokenizer (empty if the file has none).

    `info` is how a user inspects a suspect file, so a key of the wrong GGUF type is shown
    as it is rather than crashing the report.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        return []
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    if not _is_array(tokens):
        tokens = []
    lines = [f"  model:      {model}"]
    if "tokenizer.ggml.pre" in metadata:
        lines.append(f"  pre:        {metadata['tokenizer.ggml.pre']}")
    lines.append(f"  vocab size: {len(tokens)}")
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        lines.append(f"  merges:     {len(merges) if _is_array(merges) else _format_value(merges)}")
    token_types = metadata.get("tokenizer.ggml.token_type")
    if isinstance(token_types, np.ndarray) and len(token_types):
        kinds, counts = np.unique(np.asarray(token_types), return_counts=True)
        parts = [f"{TOKEN_TYPE_NAMES.get(int(k), str(k))} {c}" for k, c in zip(kinds, counts)]
        lines.append(f"  token types: {', '.join(parts)}")
    for name in SPECIAL_TOKEN_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        if key in metadata:
            token_id = metadata[key]
            if not _is_integer(token_id):
                lines.append(f"  {name + ' id:':11} {_format_value(token_id)} <not an integer>")
                continue
            token_id = int(token_id)
            piece = tokens[token_id] if 0 <= token_id < len(tokens) else "<out of range>"
            lines.append(f"  {name + ' id:':11} {token_id} {piece!r}")
    for flag in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        key = f"tokenizer.ggml.{flag}"
        if key in metadata:
            lines.append(f"  {flag}: {metadata[key]}")
    lines += _eog_lines(metadata, tokens)
    lines += chat_template_summary(metadata)
    return lines


def _eog_lines(metadata: dict[str, Any], tokens: list) -> list[str]:
    """The end-of-generation tokens (llama.cpp's rule, engine.tokenizer.end_of_generation_ids)."""
    from engine.tokenizer import EOG_ID_KEYS, end_of_generation_ids

    if not all(isinstance(t, str) for t in tokens):
        return []

    def valid(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if _is_integer(value) and 0 <= int(value) < len(tokens) else None

    eos = valid("eos")
    if eos is None and metadata.get("tokenizer.ggml.model") == "llama" and len(tokens) > 2:
        eos = 2  # SentencePiece's default, as the tokenizer uses
    extra = [i for i in (valid(k) for k in EOG_ID_KEYS) if i is not None]
    ids = sorted(end_of_generation_ids(tokens, eos, extra))
    if not ids:
        return ["  end of generation: <none>"]
    return [f"  end of generation: {', '.join(f'{i} {tokens[i]!r}' for i in ids)}"]


def chat_template_summary(metadata: dict[str, Any]) -> list[str]:
    """Whether the file has a chat template: its length and first line, and named alternatives."""
    value = metadata.get("tokenizer.chat_template")
    if value is None:
        lines = ["  chat template: <none> (chat uses ChatML, as llama.cpp)"]
    elif not isinstance(value, str):
        lines = [f"  chat template: {_format_value(value)} <not a string>"]
    else:
        first = value.strip().splitlines()[0] if value.strip() else ""
        lines = [f"  chat template: {len(value)} chars, first line {_format_value(first)}"]
    prefix = "tokenizer.chat_template."
    for key, named in metadata.items():
        if key.startswith(prefix) and isinstance(named, str):
            first = named.strip().splitlines()[0] if named.strip() else ""
            name = key[len(prefix):]
            lines.append(f"  chat template {name!r}: {len(named)} chars, first line {_format_value(first)}")
    return lines


def describe(gguf: GGUFFile) -> str:
    """The full `info` report."""
    md = gguf.metadata
    arch = str(md.get("general.architecture", "<none>"))  # str(): shown even if stored with a wrong type
    fmt = getattr(gguf, "legacy_format", None) or f"GGUF v{gguf.version}, alignment {gguf.alignment}"  # 2023 GGML
    lines = [f"file:         {gguf.path}", f"format:       {fmt}"]
    lines.append(f"architecture: {arch}")
    if "general.name" in md:
        lines.append(f"name:         {md['general.name']}")
    if "general.file_type" in md:
        file_type = md["general.file_type"]
        shown = file_type_name(int(file_type)) if _is_integer(file_type) else _format_value(file_type)
        lines.append(f"file type:    {shown}")

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
    report = "\n".join(lines)
    # Invalid UTF-8 from the file is held as lone surrogates, which a strict UTF-8 stdout
    # refuses (a traceback instead of a report): show those bytes as \xNN instead.
    return report.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
