"""LLaMA 1/2/3 and Mistral (GGUF ``llama``): the shared pre-norm decoder (models/blocks.py) with
ggml's "normal" RoPE (adjacent pairs; the converter permuted Q and K rows to match).

    x = embed(tokens)
    for each layer:
        h = rms_norm(x) ; q, k, v = h Wq, h Wk, h Wv ; rope(q, k)
        x = x + attention(q, k, v) Wo
        h = rms_norm(x) ; x = x + (silu(h Wgate) * h Wup) Wdown
    logits = rms_norm(x) Woutput

Llama 3.1's RoPE scaling comes as ``rope_freqs.weight``, Mistral's sliding window as
``llama.attention.sliding_window``, Mistral-Nemo's head size as ``llama.attention.key_length``.
"""

from __future__ import annotations

from models.blocks import PreNormDecoder


class Llama(PreNormDecoder):
    ARCH = "llama"
    NEOX = False
