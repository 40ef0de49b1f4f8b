"""Built-in model shapes (from each model's transformers ``config.json``).

Names are lower-case; a few hub ids are accepted as aliases. A cluster YAML's ``models:`` map
adds to (and may override) these entries.
"""

from __future__ import annotations

from collections.abc import Mapping

from policies.memory_model import ModelShape

CATALOGUE: Mapping[str, ModelShape] = {
    "llama-2-7b": ModelShape(6_738_415_616, 4096, 32, 32, 11008, 32000, num_key_value_heads=32),
    "llama-2-13b": ModelShape(13_015_864_320, 5120, 40, 40, 13824, 32000, num_key_value_heads=40),
    "llama-3-8b": ModelShape(8_030_261_248, 4096, 32, 32, 14336, 128256, num_key_value_heads=8),
    "qwen2-7b": ModelShape(7_615_616_512, 3584, 28, 28, 18944, 152064, num_key_value_heads=4),
    "mistral-7b": ModelShape(7_241_732_096, 4096, 32, 32, 14336, 32000, num_key_value_heads=8),
    "smollm2-135m": ModelShape(134_515_008, 576, 30, 9, 1536, 49152, num_key_value_heads=3),
}

ALIASES: Mapping[str, str] = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "qwen/qwen2-7b": "qwen2-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "builtin:smollm2-135m-instruct": "smollm2-135m",
}


def canonical(name: str, extra: Mapping[str, ModelShape] | None = None) -> str | None:
    """The one name of the model ``name`` means, or None if unknown: an ``extra`` entry (exactly,
    else ignoring case), else the catalogue's lower-case name (a hub id through its alias), which
    an ``extra`` entry of that name (any case) overrides. Two spellings of one model (``LLaMA-2-7B``,
    ``meta-llama/Llama-2-7b-hf``, ``llama-2-7b``) give one name, so one loaded copy serves both."""
    extra = extra or {}
    if name in extra:
        return name
    folded = {k.lower(): k for k in extra}
    key = name.lower()
    if key in folded:
        return folded[key]
    key = ALIASES.get(key, key)
    if key not in CATALOGUE:
        return None
    return folded.get(key, key)


def lookup(name: str, extra: Mapping[str, ModelShape] | None = None) -> ModelShape | None:
    """The shape for ``name`` (see :func:`canonical`); None if unknown."""
    key = canonical(name, extra)
    if key is None:
        return None
    return extra[key] if extra and key in extra else CATALOGUE[key]


def known_names(extra: Mapping[str, ModelShape] | None = None) -> list[str]:
    """Every name :func:`lookup` accepts without an alias, sorted."""
    return sorted(set(CATALOGUE) | set(extra or {}))
