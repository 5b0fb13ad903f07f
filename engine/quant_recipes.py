"""llama-quantize's per-tensor type choice for its quantization mixes (Q4_K_M and friends).

A transcription of llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp, build 0c1e570) for the
mixes below, without an importance matrix, ``--pure``, ``--tensor-type``/``--output-tensor-type``/
``--token-embedding-type`` overrides or ``--leave-output-tensor``.  Pure functions; nothing here
quantizes.  ``tensor_types`` gives every tensor of a model its type, as llama-quantize does;
``tensor_type`` is the rule for one tensor given the counters llama-quantize keeps while walking the
tensors (by default those of a plain model: one attn_v and one ffn_down per layer).

Checked against llama-quantize itself on small multi-layer models (tests/test_kquant_quantize.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

# mix name -> (llama_ftype, stored as general.file_type; the default tensor type)
MIXES: dict[str, tuple[int, QT]] = {
    "q4_0": (2, QT.Q4_0),
    "q4_1": (3, QT.Q4_1),
    "q8_0": (7, QT.Q8_0),
    "q5_0": (8, QT.Q5_0),
    "q5_1": (9, QT.Q5_1),
    "q2_k": (10, QT.Q2_K),
    "q3_k_s": (11, QT.Q3_K),
    "q3_k_m": (12, QT.Q3_K),
    "q3_k_l": (13, QT.Q3_K),
    "q4_k_s": (14, QT.Q4_K),
    "q4_k_m": (15, QT.Q4_K),
    "q5_k_s": (16, QT.Q5_K),
    "q5_k_m": (17, QT.Q5_K),
    "q6_k": (18, QT.Q6_K),
    "iq4_nl": (25, QT.IQ4_NL),
    "iq4_xs": (30, QT.IQ4_XS),
}
FILE_TYPES: dict[str, int] = {name: value for name, (value, _) in MIXES.items()}

# where a type's block does not divide the row (tensor_type_fallback); then F16 if that does not fit either
_FALLBACK = {QT.IQ4_XS: QT.IQ4_NL, QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1,
             QT.Q6_K: QT.Q8_0}

# substrings / names of tensors llama-quantize never quantizes (besides 1-D tensors and names not ending
# in "weight"; tensor_allows_quantization, the architecture-independent part)
_NEVER_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_NAMES = ("position_embd.weight", "token_types.weight")


def _category(name: str) -> str:
    """tensor_get_category: the first match wins, by substring except for the two exact names."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, category in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                          ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                          ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                          ("ffn_down", "ffn_down")):
        if key in name:
            return category
    return "other"


def _is_attn_v(category: str) -> bool:
    return category in ("attn_v", "attn_qkv", "attn_kv_b")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """Whether llama-quantize quantizes this tensor at all (else it keeps the input's type)."""
    dims = [int(d) for d in shape]
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims counts up to the last dimension > 1 (numpy order: first)
        dims.pop(0)
    if len(dims) < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in _NEVER_SUBSTRINGS) and name not in _NEVER_NAMES


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _layer_of(name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def tensor_type(
    name: str,
    shape: Sequence[int],
    ftype: str,
    n_layer: int,
    *,
    n_head: int = 1,
    n_head_kv: int | None = None,
    n_expert: int = 0,
    arch: str = "llama",
    tied_embeddings: bool = False,
    i_attention_wv: int | None = None,
    n_attention_wv: int | None = None,
    i_ffn_down: int | None = None,
    input_type: QT = QT.F32,
) -> QT:
    """The type llama-quantize gives tensor ``name`` of numpy-order ``shape`` (last axis = row =
    ggml ne[0]) in mix ``ftype`` (a key of MIXES) for a model of ``n_layer`` layers.

    ``tied_embeddings``: the model has no output.weight (token_embd.weight then gets output's type).
    ``i_attention_wv`` / ``i_ffn_down``: how many attn_v (attn_qkv, attn_kv_b) / ffn_down tensors
    llama-quantize saw before this one (default: the layer number in the name), ``n_attention_wv``:
    how many the model has (default n_layer).  ``input_type``: kept for tensors never quantized.
    Model-type rule: a LLaMA with 80 layers and n_head != n_head_kv is "70B" (attn_v Q3_K/Q4_K -> Q5_K).
    """
    try:
        _, default = MIXES[ftype.lower()]
    except KeyError:
        raise ValueError(f"unknown quantization mix {ftype!r} (known: {', '.join(MIXES)})") from None
    ftype = ftype.lower()
    if not allows_quantization(name, shape):
        return input_type
    layer = _layer_of(name)
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    falcon = arch == "falcon"
    model_70b = n_layer == 80 and (arch in ("qwen2", "deci", "olmo") or arch == "llama" and n_head != n_head_kv)
    category = _category(name)
    ncols = int(shape[-1])
    new = default

    if category == "output" or (tied_embeddings and category == "token_embd"):
        if falcon or ncols % _block(new):
            new = QT.Q8_0
        elif new != QT.Q8_0:
            new = QT.Q6_K
    elif category == "token_embd":
        pass
    elif _is_attn_v(category):
        i = (layer or 0) if i_attention_wv is None else i_attention_wv
        n = n_layer if n_attention_wv is None else n_attention_wv
        if ftype == "q2_k":
            new = QT.Q4_K if n_gqa >= 4 else QT.Q3_K
        elif ftype == "q3_k_m":
            new = QT.Q5_K if i < 2 else QT.Q4_K
        elif ftype == "q3_k_l":
            new = QT.Q5_K
        elif ftype in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
            new = QT.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new = QT.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            new = QT.Q5_K
        if model_70b and new in (QT.Q3_K, QT.Q4_K):
            new = QT.Q5_K
        if n_expert == 8:
            new = QT.Q8_0
    elif category == "attn_k":
        if n_expert == 8:
            new = QT.Q8_0
    elif category == "ffn_down":
        if n_expert > 1:  # experts' tensors: the layer from the name
            i = layer if layer is not None else -1
            if not 0 <= i < n_layer:
                raise ValueError(f"cannot tell the layer (< {n_layer}) of tensor {name}")
        else:
            i = (layer or 0) if i_ffn_down is None else i_ffn_down
        n = n_layer
        if ftype == "q2_k":
            new = QT.Q3_K
        elif ftype == "q3_k_m":
            new = QT.Q5_K if i < n // 16 else QT.Q4_K if not falcon or _use_more_bits(i, n) else QT.Q3_K
        elif ftype == "q3_k_l":
            new = QT.Q4_K if falcon else QT.Q5_K
        elif ftype == "q4_k_m":
            if falcon:
                new = QT.Q6_K if i < n // 16 else QT.Q5_K if _use_more_bits(i, n) else QT.Q4_K
            elif _use_more_bits(i, n):
                new = QT.Q6_K
        elif i < n // 8 and ftype in ("iq4_nl", "iq4_xs"):
            new = QT.Q5_K
        elif ftype == "q5_k_m" and _use_more_bits(i, n):
            new = QT.Q6_K
        elif ftype == "q4_k_s" and not falcon and i < n // 8:
            new = QT.Q5_K
    elif category == "attn_output":
        if not falcon:
            if n_expert == 8:
                if ftype in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs"):
                    new = QT.Q5_K
            elif ftype == "q2_k":
                new = QT.Q3_K
            elif ftype == "q3_k_m":
                new = QT.Q4_K
            elif ftype == "q3_k_l":
                new = QT.Q5_K
        elif ftype == "q3_k_l":
            new = QT.Q4_K
    # (llama.cpp's attn_qkv branch after this is unreachable: attn_qkv takes the attn_v branch above)

    if ncols % _block(new):  # tensor_type_fallback
        new = _FALLBACK.get(new, new)
        if ncols % _block(new):
            new = QT.F16
    return new


def tensor_types(
    tensors: Iterable[tuple[str, Sequence[int]]],
    ftype: str,
    n_layer: int,
    **hparams,
) -> dict[str, QT]:
    """Types of all ``(name, shape)`` tensors of a model, walking them in llama-quantize's order (by
    layer, non-layer tensors first, then by name) to keep its attn_v / ffn_down counters.  ``hparams``:
    the keyword arguments of ``tensor_type`` (n_head, n_head_kv, n_expert, arch, input_type);
    ``tied_embeddings`` is derived (no ``output.weight``)."""
    tensors = list(tensors)
    names = [name for name, _ in tensors]

    def order(name: str) -> tuple[int, str]:
        layer = _layer_of(name)
        return (-1 if layer is None else layer, name)

    shapes = dict(tensors)
    n_attention_wv = sum(1 for name in names if _is_attn_v(_category(name)))
    tied = "output.weight" not in shapes
    i_attention_wv = i_ffn_down = 0
    types: dict[str, QT] = {}
    for name in sorted(names, key=order):
        shape = shapes[name]
        types[name] = tensor_type(name, shape, ftype, n_layer, tied_embeddings=tied, i_attention_wv=i_attention_wv,
                                  n_attention_wv=n_attention_wv, i_ffn_down=i_ffn_down, **hparams)
        if allows_quantization(name, shape):
            category = _category(name)
            i_attention_wv += _is_attn_v(category)
            i_ffn_down += category == "ffn_down"
    return types
