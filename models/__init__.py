"""One file per architecture; the runtime picks one by ``general.architecture``."""

from __future__ import annotations

from typing import Any

from engine.errors import file_error
from engine.gguf_file import GGUFFile
from models.falcon import Falcon
from models.gemma import Gemma, Gemma2
from models.gpt2 import Gpt2
from models.gptneox import GptNeoX
from models.llama import Llama
from models.mpt import Mpt
from models.phi3 import Phi3
from models.qwen2 import Qwen2
from models.qwen3 import Qwen3
from models.stablelm import StableLm

ARCHITECTURES: dict[str, type] = {"llama": Llama, "mpt": Mpt, "falcon": Falcon, "qwen2": Qwen2, "qwen3": Qwen3,
                                 "gptneox": GptNeoX, "gpt2": Gpt2,
                                 "stablelm": StableLm, "phi3": Phi3, "gemma": Gemma, "gemma2": Gemma2}


def load_architecture(file: GGUFFile) -> Any:
    """Build the forward pass for ``file``; unknown architectures name the supported ones."""
    arch = file.architecture
    if arch is None:
        raise file_error(file.path, "missing metadata key 'general.architecture'")
    try:
        model_class = ARCHITECTURES[arch]
    except KeyError:
        raise file_error(
            file.path, f"unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        ) from None
    return model_class(file)
