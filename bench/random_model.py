"""A random-weight copy of a causal LM from its config: same shapes, hence the same step time and memory.

For benchmarks on machines the real weights cannot reach (the GPU machine here gets a 64 MiB
working tree; SmolLM2-135M is 540 MB in fp32). Copies the tokenizer files too.

    python bench/random_model.py SRC_DIR OUT_DIR [--dtype bfloat16]

``SRC_DIR`` needs ``config.json`` (and the tokenizer files, if the benchmark needs a tokenizer).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


def make_random_model(src: Path, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write ``out`` = ``src``'s config with freshly initialised weights (transformers' own init) in ``dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    print(make_random_model(args.src, args.out, args.dtype))


if __name__ == "__main__":
    main()
