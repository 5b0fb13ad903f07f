"""Which ``tokenizer.ggml.pre`` name a Hugging Face tokenizer.json calls for.

For converters. Two ways, tried in order:

1. By structure: the tokenizer.json's pre-tokenizer is one we know (the regex of a
   ``PRE_TOKENIZERS`` entry followed by the byte-level mapping, GPT-2's ByteLevel, ...).
   ``model.ignore_merges`` tells Llama 3 (``llama-bpe``) from Smaug-style copies of its
   pattern (``smaug-bpe``), as llama.cpp's flags for those names differ in exactly that.
2. By llama.cpp's fingerprint (convert_hf_to_gguf.py's ``get_vocab_base_pre``): the
   SHA-256 of ``str(ids)`` for a fixed check text, looked up in ``CHECK_HASHES``. A
   Llama 3 tokenizer.json that adds BOS in its post-processor hashes to ``llama-bpe``,
   one that does not to ``smaug-bpe``, which is why structure comes first.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Any

from engine.tokenizer.bpe import LLAMA3_PATTERN, QWEN2_PATTERN, QWEN35_PATTERN

# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs,
# emoji, digit runs, Khmer, CJK, Cyrillic, punctuation runs and contractions in any case.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)

# Fingerprint -> name, from llama.cpp's table (the names this package implements).
CHECK_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    # MPT and OLMo share a fingerprint; llama.cpp's table names the last match, "olmo".
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}

_SPLIT_PATTERNS = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2", QWEN35_PATTERN: "qwen35"}


def _by_structure(data: dict[str, Any]) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [step.get("type") for step in steps]
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            return None
        name = _SPLIT_PATTERNS.get(pattern)
        if name == "llama-bpe" and not (data.get("model") or {}).get("ignore_merges"):
            return "smaug-bpe"
        return name
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        normalizer = (data.get("normalizer") or {}).get("type")
        return "olmo" if normalizer == "NFC" else "gpt-2" if normalizer is None else None
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "starcoder"
    return None


def check_hash(data: dict[str, Any]) -> str:
    """llama.cpp's fingerprint of a tokenizer.json (needs the ``tokenizers`` package)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(json.dumps(data)).encode(CHECK_TEXT).ids
    return sha256(str(ids).encode()).hexdigest()


def pre_from_tokenizer_json(data: dict[str, Any]) -> str | None:
    """The ``tokenizer.ggml.pre`` name for a parsed tokenizer.json, or None if unknown."""
    return _by_structure(data) or CHECK_HASHES.get(check_hash(data))


__all__ = ["CHECK_HASHES", "CHECK_TEXT", "check_hash", "pre_from_tokenizer_json"]
