"""Two tiny random-weight LLaMA GGUF files (Q4_0 and Q8_0) for the arm64 emulated check.

    python bench/arm64/make_models.py OUT_DIR

Same generator as ``halfbyte bench --synthetic`` (converters/synthetic.py), with a shape small
enough to run in seconds under qemu: 2 layers, 256 wide, grouped-query attention (4 heads, 2 KV).
"""

from __future__ import annotations

import sys
from pathlib import Path

from converters.synthetic import LlamaShape, write_synthetic

SHAPE = LlamaShape(n_vocab=512, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=768, n_ctx=256)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for type_name in ("q4_0", "q8_0"):
        path = out / f"tiny-{type_name}.gguf"
        if not path.exists():
            write_synthetic(path, SHAPE, type_name, name=f"arm64 check {type_name}", seed=7)
        print(path)
