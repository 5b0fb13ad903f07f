"""Tokenizer files of a Hugging Face checkpoint -> llama.cpp's ``tokenizer.ggml.*`` metadata.

Two families, as llama.cpp names them:
- ``llama``: a SentencePiece ``tokenizer.model`` (pieces, scores, token types), LLaMA.
- ``gpt2``: a byte-level BPE ``tokenizer.json`` (vocab, merges): MPT and Falcon, and Llama 3,
  Qwen2/3 and other checkpoints without a ``tokenizer.model``, with ``tokenizer.ggml.pre`` naming
  the pre-tokenizer (identified from tokenizer.json itself) so llama.cpp splits text the same way.

Like llama.cpp's converter (gguf-py's ``SpecialVocab``), both also write the add-BOS/EOS flags,
the special token ids (bos, eos, unk, pad, and eot/eom where the tokenizer or generation config
names them) and the chat template(s) of tokenizer_config.json (or chat_template.jinja/json).

Both pad the vocabulary to the model's ``vocab_size`` (embedding rows) with unused
``[PAD<i>]`` tokens, as llama.cpp's converter does, so ids and embedding rows agree.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys, TokenType

from converters.base import MAX_VOCAB, ConfigReader, MetadataEntry, boolean, describe_value, read_json, string, u32
from engine.errors import HalfbyteError, file_error

SPECIAL_NAMES = ("bos", "eos", "unk", "pad")
# Every tokenizer file the readers below may open (also what `halfbyte convert` must not overwrite).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
SPECIAL_KEYS = {
    "bos": Keys.Tokenizer.BOS_ID,
    "eos": Keys.Tokenizer.EOS_ID,
    "unk": Keys.Tokenizer.UNK_ID,
    "pad": Keys.Tokenizer.PAD_ID,
    "eot": Keys.Tokenizer.EOT_ID,
    "eom": Keys.Tokenizer.EOM_ID,
}
# End-of-turn / end-of-message tokens as llama.cpp's vocabulary loader recognizes them by text.
EOM_TEXTS = ("<|eom_id|>",)
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")


def float_array(key: str, values: list[float]) -> MetadataEntry:
    return MetadataEntry(key, np.asarray(values, np.float32), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)


def int_array(key: str, values: list[int]) -> MetadataEntry:
    return MetadataEntry(key, np.asarray(values, np.int32), GGUFValueType.ARRAY, GGUFValueType.INT32)


def _read_json(path: Path) -> Any:
    try:
        return read_json(path, "JSON")
    except FileNotFoundError:
        raise file_error(path, "missing tokenizer file") from None


def _optional_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file: ``{}`` when absent; anything but an object is an error."""
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise file_error(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _token_id(path: Path, what: str, value: Any) -> int:
    """A token id from a tokenizer file: an integer in [0, MAX_VOCAB)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_VOCAB:
        raise file_error(path, f"{what}: token id must be an integer in [0, {MAX_VOCAB}), got {describe_value(value)}")
    return value


def _text(path: Path, what: str, value: str) -> str:
    """A string GGUF can store: JSON escapes can spell lone surrogates, which are not Unicode text."""
    try:
        value.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        raise file_error(path, f"{what} {describe_value(value)} is not valid Unicode (a lone surrogate)") from None
    return value


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_ids(
    directory: Path, config: Mapping[str, Any], lookup: Mapping[str, int], defaults: Mapping[str, int]
) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json strings, then config.json ids, then defaults."""
    tokenizer_config = _optional_json(directory / "tokenizer_config.json")
    special_map = _optional_json(directory / "special_tokens_map.json")
    cfg = ConfigReader(config, directory / "config.json")
    ids = dict(defaults)
    for name in SPECIAL_NAMES:
        config_id = cfg.token_id(f"{name}_token_id")
        if config_id is not None:
            ids[name] = config_id
        for source in (special_map, tokenizer_config):
            content = _token_content(source.get(f"{name}_token"))
            if content is not None and content in lookup:
                ids[name] = lookup[content]
    ids.update(_turn_ids(directory, tokenizer_config, lookup, ids.get("eos")))
    return ids


def _turn_ids(directory: Path, tokenizer_config: Mapping[str, Any], lookup: Mapping[str, int],
              eos: int | None) -> dict[str, int]:
    """eot/eom ids: ``eot_token``/``eom_token`` of tokenizer_config.json, else the end tokens that
    generation_config.json lists besides EOS (Llama 3.1 Instruct: ``[128001, 128008, 128009]``,
    ``<|eom_id|>`` and ``<|eot_id|>``), told apart by their text as llama.cpp's loader does."""
    found: dict[str, int] = {}
    for name in ("eot", "eom"):
        content = _token_content(tokenizer_config.get(f"{name}_token"))
        if content is not None and content in lookup:
            found[name] = lookup[content]
    path = directory / "generation_config.json"
    generation = ConfigReader(_optional_json(path), path)
    raw = generation.config.get("eos_token_id")
    listed = raw if isinstance(raw, list) else [raw] if raw is not None else []
    by_id = {token_id: text for text, token_id in lookup.items()}
    eot_candidates = []
    for token_id in listed:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise file_error(path, f"'eos_token_id' must be a token id or a list of them, got {describe_value(raw)}")
        text = by_id.get(token_id)
        if token_id == eos or text is None:
            continue
        if text in EOM_TEXTS:
            found.setdefault("eom", token_id)
        elif text in EOT_TEXTS:
            eot_candidates.append((EOT_TEXTS.index(text), token_id))
    if eot_candidates and "eot" not in found:
        found["eot"] = min(eot_candidates)[1]
    return found


def _special_entries(ids: Mapping[str, int], vocab_size: int, config_path: Path) -> list[MetadataEntry]:
    entries = []
    for name, token_id in ids.items():
        if 0 <= token_id < vocab_size:
            entries.append(u32(SPECIAL_KEYS[name], token_id))
        elif token_id >= 0:
            print(f"halfbyte: warning: {config_path}: {name} token id {token_id} is outside the vocabulary of "
                  f"{vocab_size} tokens: not written", file=sys.stderr)
    return entries


def _add_flags(directory: Path, default_bos: bool | None, default_eos: bool | None = False) -> list[MetadataEntry]:
    """add_bos/add_eos from tokenizer_config.json, else the defaults (None: not written)."""
    path = directory / "tokenizer_config.json"
    tokenizer_config = ConfigReader(_optional_json(path), path)
    entries = []
    for key, name, default in ((Keys.Tokenizer.ADD_BOS, "add_bos_token", default_bos),
                               (Keys.Tokenizer.ADD_EOS, "add_eos_token", default_eos)):
        value = tokenizer_config.bool_value(name, default=default)  # type: ignore[arg-type]
        if value is not None:
            entries.append(boolean(key, value))
    return entries


def _post_processor_adds(data: Mapping[str, Any], bos: str | None, eos: str | None) -> tuple[bool | None, bool | None]:
    """Whether tokenizer.json's post-processor adds BOS / EOS (None: it has no say). A
    ``TemplateProcessing`` adds BOS when its single-sequence template starts with the BOS token
    (Llama 3's ``<|begin_of_text|>``); a plain ``ByteLevel`` one adds nothing (llama.cpp's reading)."""
    post = data.get("post_processor")
    if not isinstance(post, dict):
        return None, None
    steps = post.get("processors") if post.get("type") == "Sequence" else [post]
    add_bos = add_eos = None
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "ByteLevel":
            add_bos = False if add_bos is None else add_bos
            add_eos = False if add_eos is None else add_eos
        elif step.get("type") == "TemplateProcessing":
            single = step.get("single")
            single = single if isinstance(single, list) else []

            def special(item: Any) -> Any:
                return item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None

            add_bos = len(single) > 1 and special(single[0]) is not None and special(single[0]) == bos
            add_eos = len(single) > 1 and special(single[-1]) is not None and special(single[-1]) == eos
    return add_bos, add_eos


def chat_template_entries(directory: Path) -> list[MetadataEntry]:
    """``tokenizer.chat_template`` (and ``tokenizer.chat_template.NAME`` for named alternatives), as
    llama.cpp's converter writes them: tokenizer_config.json's ``chat_template`` (a string, or a list
    of ``{name, template}``), else chat_template.jinja, else chat_template.json."""
    path = directory / "tokenizer_config.json"
    template = _optional_json(path).get("chat_template")
    if template is None:
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            path = jinja
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise file_error(jinja, f"cannot read: {exc}") from None
        else:
            path = directory / "chat_template.json"
            template = _optional_json(path).get("chat_template")
    if template is None:
        return []
    if isinstance(template, str):
        return [string(Keys.Tokenizer.CHAT_TEMPLATE, _text(path, "chat_template", template))]
    if not isinstance(template, list):
        raise file_error(path, f"'chat_template' must be a string or a list of {{name, template}}, got "
                               f"{describe_value(template)}")
    entries, names = [], []
    for choice in template:
        if (not isinstance(choice, dict) or not isinstance(choice.get("name"), str)
                or not isinstance(choice.get("template"), str)):
            raise file_error(path, f"chat_template entries must be {{name, template}} strings, got "
                                   f"{describe_value(choice)}")
        # llama.cpp keeps names to [A-Za-z0-9_] (they become part of a metadata key).
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice["name"])
        text = _text(path, f"chat_template {name!r}", choice["template"])
        if not name:
            continue
        if name == "default":
            entries.insert(0, string(Keys.Tokenizer.CHAT_TEMPLATE, text))
        elif name not in names:
            names.append(name)
            entries.append(string(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), text))
    if names:
        entries.append(MetadataEntry(Keys.Tokenizer.CHAT_TEMPLATES, names, GGUFValueType.ARRAY, GGUFValueType.STRING))
    return entries


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _vocab_size(directory: Path, config: Mapping[str, Any], n_tokens: int) -> int:
    """config.json's vocab_size (the embedding rows), at least the tokenizer's token count."""
    config_path = directory / "config.json"
    vocab_size = ConfigReader(config, config_path).int_value("vocab_size", default=n_tokens, minimum=1,
                                                             maximum=MAX_VOCAB)
    if vocab_size < n_tokens:
        raise file_error(config_path, f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens} tokens")
    return vocab_size


def _pad_vocab(tokens: list[str], types: list[int], vocab_size: int, scores: list[float] | None) -> None:
    # As llama.cpp's SentencePiece path: ids past the model are "[PAD<id>]", UNUSED, score -10000.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(-10000.0)


def sentencepiece_vocab(directory: Path, config: Mapping[str, Any]) -> list[MetadataEntry]:
    """``tokenizer.model`` (+ added_tokens.json) -> tokenizer.ggml.* for ``model = llama``."""
    import sentencepiece

    model_path = directory / "tokenizer.model"
    if not model_path.is_file():
        raise file_error(model_path, "missing tokenizer file (LLaMA checkpoints need tokenizer.model)")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_path))
    except (OSError, RuntimeError) as exc:
        raise file_error(model_path, f"not a SentencePiece model: {str(exc).splitlines()[0]}") from None

    tokens, scores, types = [], [], []
    for token_id in range(processor.GetPieceSize()):
        tokens.append(processor.IdToPiece(token_id))
        scores.append(processor.GetScore(token_id))
        if processor.IsUnknown(token_id):
            types.append(TokenType.UNKNOWN)
        elif processor.IsControl(token_id):
            types.append(TokenType.CONTROL)
        elif processor.IsUnused(token_id):
            types.append(TokenType.UNUSED)
        elif processor.IsByte(token_id):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)

    # Fine-tunes add tokens beyond the SentencePiece model (e.g. a pad token at 32000).
    added_path = directory / "added_tokens.json"
    added = _optional_json(added_path)
    for content, token_id in added.items():
        _text(added_path, "token", content)
        _token_id(added_path, f"token {describe_value(content)}", token_id)
    for content, token_id in sorted(added.items(), key=lambda item: item[1]):
        if token_id < len(tokens):
            continue
        if token_id != len(tokens):
            raise file_error(added_path, f"token {describe_value(content)} id {token_id} leaves a gap")
        tokens.append(content)
        scores.append(-1000.0)
        types.append(TokenType.USER_DEFINED)

    vocab_size = _vocab_size(directory, config, len(tokens))
    _pad_vocab(tokens, types, vocab_size, scores)

    defaults = {
        "bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id(), "pad": processor.pad_id(),
    }
    lookup = {piece: i for i, piece in enumerate(tokens)}
    ids = _special_ids(directory, config, lookup, defaults)
    # A SentencePiece model that adds a dummy prefix turns "x" into "▁x".
    add_space_prefix = processor.EncodeAsPieces("x")[:1] != ["x"]
    return [
        string(Keys.Tokenizer.MODEL, "llama"),
        string(Keys.Tokenizer.PRE, "default"),
        MetadataEntry(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        float_array(Keys.Tokenizer.SCORES, scores),
        int_array(Keys.Tokenizer.TOKEN_TYPE, types),
        *_special_entries(ids, vocab_size, directory / "config.json"),
        *_add_flags(directory, default_bos=True),
        boolean(Keys.Tokenizer.ADD_PREFIX, add_space_prefix),
        *chat_template_entries(directory),
    ]


def hf_bpe_vocab(directory: Path, config: Mapping[str, Any], needed_by: str) -> list[MetadataEntry]:
    """A byte-level BPE ``tokenizer.json`` whose pre-tokenizer is named from the file itself
    (``engine.tokenizer.identify``): Llama 3 (``llama-bpe``), Qwen2/3 (``qwen2``), ..."""
    from engine.tokenizer.identify import pre_from_tokenizer_json

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise file_error(path, f"missing tokenizer file ({needed_by} checkpoints without tokenizer.model "
                               "need tokenizer.json)")
    data = _read_json(path)
    _check_bpe(path, data)
    try:
        pre = pre_from_tokenizer_json(data)
    except Exception as exc:  # the fingerprint runs HF tokenizers on the file
        raise file_error(path, f"cannot identify the pre-tokenizer: {str(exc).splitlines()[0] if str(exc) else exc}"
                         ) from None
    if pre is None:
        raise file_error(path, "unknown pre-tokenizer (neither its structure nor llama.cpp's fingerprint names a "
                               "tokenizer.ggml.pre that halfbyte implements)")
    return bpe_vocab(directory, config, pre, data=data)


def _check_bpe(path: Path, data: Any) -> None:
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise file_error(path, "not a BPE tokenizer.json (expected model.type = BPE with a vocab)")


def bpe_vocab(directory: Path, config: Mapping[str, Any], pre: str, data: Any = None) -> list[MetadataEntry]:
    """``tokenizer.json`` (byte-level BPE) -> tokenizer.ggml.* for ``model = gpt2``."""
    path = directory / "tokenizer.json"
    if data is None:
        if not path.is_file():
            raise file_error(path, "missing tokenizer file (MPT and Falcon checkpoints need tokenizer.json)")
        data = _read_json(path)
    _check_bpe(path, data)
    model = data["model"]
    vocab: dict[str, int] = {}
    for content, token_id in model["vocab"].items():
        vocab[_text(path, "model.vocab entry", content)] = _token_id(
            path, f"model.vocab entry {describe_value(content)}", token_id)
    added_tokens = data.get("added_tokens") or []
    if not isinstance(added_tokens, list):
        raise file_error(path, f"'added_tokens' must be a list, got {describe_value(added_tokens)}")
    added = [t for t in added_tokens if isinstance(t, dict) and "id" in t and "content" in t]
    for token in added:
        if not isinstance(token["content"], str):
            raise file_error(path, f"added token content must be a string, got {describe_value(token['content'])}")
        content = _text(path, "added token", token["content"])
        vocab[content] = _token_id(path, f"added token {describe_value(content)}", token["id"])

    size = max(vocab.values(), default=-1) + 1
    vocab_size = _vocab_size(directory, config, size)
    by_id: dict[int, str] = {}
    for content, token_id in vocab.items():
        by_id[token_id] = content
    special = {t["id"]: t.get("special") is True for t in added}
    tokens, types = [], []
    for token_id in range(size):
        content = by_id.get(token_id)
        if content is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in special:
            tokens.append(content)
            control = special[token_id] or looks_special(content)
            types.append(TokenType.CONTROL if control else TokenType.USER_DEFINED)
        else:
            tokens.append(content)
            types.append(TokenType.NORMAL)
    _pad_vocab(tokens, types, vocab_size, None)

    merges = []
    raw_merges = model.get("merges") or []
    if not isinstance(raw_merges, list):
        raise file_error(path, f"'model.merges' must be a list, got {describe_value(raw_merges)}")
    for merge in raw_merges:
        # Older files store "a b", newer ones ["a", "b"] (where a space inside a part is written
        # as U+0120, as llama.cpp's converter does, so that "a b" stays unambiguous).
        if isinstance(merge, str):
            merges.append(_text(path, "merge", merge))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            first, second = (part.replace(" ", "\u0120") for part in merge)
            merges.append(_text(path, "merge", f"{first} {second}"))
        else:
            raise file_error(path, f"unreadable merge {describe_value(merge)}")

    endoftext = vocab.get("<|endoftext|>")
    defaults = {name: endoftext for name in ("bos", "eos", "unk")} if endoftext is not None else {}
    ids = _special_ids(directory, config, vocab, defaults)
    add_bos, add_eos = _post_processor_adds(data, by_id.get(ids["bos"]) if "bos" in ids else None,
                                            by_id.get(ids["eos"]) if "eos" in ids else None)
    return [
        string(Keys.Tokenizer.MODEL, "gpt2"),
        string(Keys.Tokenizer.PRE, pre),
        MetadataEntry(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        int_array(Keys.Tokenizer.TOKEN_TYPE, types),
        MetadataEntry(Keys.Tokenizer.MERGES, merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
        *_special_entries(ids, vocab_size, directory / "config.json"),
        *_add_flags(directory, default_bos=add_bos, default_eos=add_eos),
        *chat_template_entries(directory),
    ]


def check_vocab_fits(entries: list[MetadataEntry], n_vocab_rows: int, where: Path) -> None:
    """The embedding must have a row for every token id."""
    for entry in entries:
        if entry.key == Keys.Tokenizer.LIST and len(entry.value) > n_vocab_rows:
            raise HalfbyteError(
                f"{where}: tokenizer has {len(entry.value)} tokens but the embedding has {n_vocab_rows} rows"
            )


def metadata_entry(entries: list[MetadataEntry], key: str) -> MetadataEntry | None:
    return next((entry for entry in entries if entry.key == key), None)


def apply_added_tokens(directory: Path, entries: list[MetadataEntry], *, looks_special_too: bool, spaces: bool,
                       tokenizer_json: bool = False) -> None:
    """The added tokens of tokenizer_config.json's ``added_tokens_decoder`` (and, with
    ``tokenizer_json``, tokenizer.json's ``added_tokens``) over a SentencePiece vocabulary, as
    llama.cpp's converters apply them: each listed id gets the listed text with score -1000, as a
    CONTROL token when flagged special (``looks_special_too``: or when it looks special, as its
    generic SentencePiece path does), else USER_DEFINED (``spaces``: with "▁" written as a space)."""
    listed: list[tuple[Path, str, Any]] = []
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = read_json(config_path)
        decoder = tokenizer_config.get("added_tokens_decoder") if isinstance(tokenizer_config, dict) else None
        if decoder is not None and not isinstance(decoder, dict):
            raise file_error(config_path, f"'added_tokens_decoder' must be an object, got {describe_value(decoder)}")
        listed += [(config_path, key, data) for key, data in (decoder or {}).items()]
    json_path = directory / "tokenizer.json"
    if tokenizer_json and json_path.is_file():
        added = read_json(json_path).get("added_tokens") or []
        if not isinstance(added, list):
            raise file_error(json_path, f"'added_tokens' must be a list, got {describe_value(added)}")
        listed += [(json_path, str(data.get("id")) if isinstance(data, dict) else "?", data) for data in added]
    if not listed:
        return
    tokens = metadata_entry(entries, Keys.Tokenizer.LIST).value
    scores = metadata_entry(entries, Keys.Tokenizer.SCORES).value
    types = metadata_entry(entries, Keys.Tokenizer.TOKEN_TYPE).value
    for path, key, data in listed:
        content = data.get("content") if isinstance(data, dict) else None
        if not key.isdigit() or len(key) > 9 or not isinstance(content, str):
            raise file_error(path, f"added token {describe_value(key)}: expected a token id with "
                                   f"{{\"content\": ...}}, got {describe_value(data)}")
        token_id = int(key)
        if token_id >= len(tokens):
            continue  # as llama.cpp: beyond the vocabulary, ignored
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise file_error(path, f"added token {describe_value(content)} is not valid Unicode") from None
        if data.get("special") is True or (looks_special_too and looks_special(content)):
            types[token_id] = TokenType.CONTROL
        else:
            if spaces:
                content = content.replace("\u2581", " ")
            types[token_id] = TokenType.USER_DEFINED
        tokens[token_id] = content
        scores[token_id] = np.float32(-1000.0)
