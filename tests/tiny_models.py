"""Tiny random Hugging Face checkpoints, made with transformers at test time (fixed seeds).

Each builder writes a real checkpoint directory (config.json, tokenizer files, weights
as safetensors or PyTorch .bin, optionally sharded) and returns the directory; the
transformers model itself is rebuilt from that directory by ``load_reference``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
LLAMA_TOKENIZER = FIXTURES / "llama2-tokenizer.model"
BPE_TOKENIZERS = {"mpt": FIXTURES / "tokenizers" / "mpt" / "tokenizer.json",
                  "falcon": FIXTURES / "tokenizers" / "falcon" / "tokenizer.json"}


def llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def mpt_config(**overrides):
    from transformers import MptConfig

    settings = dict(
        d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=256, vocab_size=50432,
        attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None},
    )
    settings.update(overrides)
    return MptConfig(**settings)


def falcon_config(new_decoder: bool = False, **overrides):
    from transformers import FalconConfig

    settings = dict(
        vocab_size=65024, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, layer_norm_epsilon=1e-5,
        bias=False, alibi=False, parallel_attn=True, bos_token_id=11, eos_token_id=11,
    )
    if new_decoder:
        settings.update(new_decoder_architecture=True, num_kv_heads=2, multi_query=False)
    else:
        settings.update(new_decoder_architecture=False, multi_query=True)
    settings.update(overrides)
    return FalconConfig(**settings)


def build_model(config, seed: int = 0):
    """A transformers model with random weights; norms get non-trivial weights too."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "ln_" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif is_norm:
                param.normal_(0, 0.1)
            elif param.dim() >= 2:
                param.normal_(0, 0.08)
    model.eval()
    return model


def write_tokenizer(directory: Path, arch: str) -> None:
    if arch == "llama":
        shutil.copy(LLAMA_TOKENIZER, directory / "tokenizer.model")
        (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    else:
        shutil.copy(BPE_TOKENIZERS[arch], directory / "tokenizer.json")


def save_checkpoint(model, directory: Path, arch: str, fmt: str = "safetensors", shards: int = 1,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as a HF checkpoint: config, tokenizer and weights in ``fmt``
    ("safetensors" or "bin"), split into ``shards`` files with an index when > 1."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # As save_pretrained does for a model (real checkpoints name their class here).
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    write_tokenizer(directory, arch)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for index, group in enumerate(groups):
        file_name = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            save_file(part, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file_name)
        weight_map.update({k: file_name for k in group})
    if shards > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return directory


def load_reference(directory: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    return model
