"""RoPE scaling as llama.cpp reads it from a GGUF file (``{arch}.rope.scaling.*``), turned into
what the rotation kernel takes: a position scale, per-pair frequency divisors and a magnitude.

- ``linear``: positions divided by ``factor``.
- ``yarn`` (Qwen2.5 / Mistral long-context configs): each pair's frequency blends the
  interpolated (``/ factor``) and the original one along a ramp between the correction
  dimensions of ``beta_fast`` and ``beta_slow`` rotations over ``original_context`` positions;
  cos and sin are multiplied by ``0.1 ln(factor) + 1``. As ggml's ``rope_yarn`` (and the
  ``yarn_attn_factor`` llama.cpp ends up with), which is also transformers' YaRN.
- ``rope.scaling.attn_factor`` (Phi-3 LongRoPE files): a magnitude for cos and sin.
- Per-pair divisors from the file (``rope_freqs.weight``: Llama 3.1; ``rope_factors_long`` /
  ``rope_factors_short``: LongRoPE) multiply into the same divisors.

Dynamic NTK has no GGUF key: llama.cpp's converter writes no scaling for it (it only changes
positions past the training context), and so does ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.errors import file_error
from engine.hparams import HParams


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none, linear, yarn
    factor: float = 1.0
    original_context: int = 0
    ext_factor: float = 0.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attn_factor: float = 1.0

    @classmethod
    def from_hparams(cls, hp: HParams, n_ctx_train: int) -> RopeScaling:
        arch, path = hp.arch, hp.file.path
        factor = hp.float("rope.scaling.factor", 1.0, positive=True)  # checked even when unused
        kind = hp.str("rope.scaling.type", "none")
        if kind not in ("none", "linear", "yarn"):
            raise file_error(path, f"metadata {arch}.rope.scaling.type {kind!r} is not supported "
                                   "(supported: none, linear, yarn)")
        if hp.float("rope.scaling.yarn_log_multiplier", 0.0) != 0.0:
            raise file_error(path, f"metadata {arch}.rope.scaling.yarn_log_multiplier (DeepSeek's YaRN "
                                   "magnitude) is not supported")
        attn_factor = hp.float("rope.scaling.attn_factor", 1.0, positive=True)
        if kind != "yarn":
            return cls(kind, factor if kind == "linear" else 1.0, attn_factor=attn_factor)
        return cls(
            kind, factor,
            original_context=hp.int("rope.scaling.original_context_length", n_ctx_train),
            ext_factor=hp.float("rope.scaling.yarn_ext_factor", 1.0, minimum=0.0),
            beta_fast=hp.float("rope.scaling.yarn_beta_fast", 32.0, positive=True),
            beta_slow=hp.float("rope.scaling.yarn_beta_slow", 1.0, positive=True),
            attn_factor=attn_factor,
        )

    def rotation(self, n_rot: int, theta: float, divisors: np.ndarray | None) -> tuple[float, np.ndarray | None,
                                                                                         float]:
        """(position scale, per-pair frequency divisors or None, magnitude of cos and sin) for the
        kernel, ``divisors`` being the file's own (rope_freqs / LongRoPE factors) if any."""
        if self.kind == "linear":
            return self.factor, divisors, self.attn_factor
        if self.kind != "yarn":
            return 1.0, divisors, self.attn_factor
        # ggml_rope_yarn_corr_dims: the pairs that turn fewer than beta_slow times over the original
        # context are interpolated, those that turn more than beta_fast times are kept, a ramp between.
        def corr_dim(rotations: float) -> float:
            return n_rot * math.log(self.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(0.0, math.floor(corr_dim(self.beta_fast)))
        high = min(n_rot - 1.0, math.ceil(corr_dim(self.beta_slow)))
        pair = np.arange(n_rot // 2, dtype=np.float64)
        ramp = (1.0 - np.clip((pair - low) / max(0.001, high - low), 0.0, 1.0)) * self.ext_factor
        kept = (1.0 / self.factor) * (1.0 - ramp) + ramp  # the share of each pair's frequency kept
        yarn = (1.0 / kept) if divisors is None else np.asarray(divisors, np.float64) / kept
        magnitude = (0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0) if self.ext_factor else 1.0
        return 1.0, yarn.astype(np.float32), magnitude * self.attn_factor
