"""Shared fixtures: tiny random causal LMs and a word-level tokenizer, built on the fly (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The device the engine runs on in the device-aware correctness tests (fused == PEFT alone, MixLoRA fused ==
# alone, packed == padded): ``LORAFLEET_TEST_DEVICE=cuda pytest ...`` runs them on a GPU, references stay on CPU.
TEST_DEVICE = os.environ.get("LORAFLEET_TEST_DEVICE", "cpu")


def pytest_configure(config) -> None:
    # Tests use tiny models: one intra-op thread is faster than two and keeps 2-core CI machines responsive.
    import torch

    torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(90)]


def make_tokenizer():
    """A word-level fast tokenizer over WORDS plus specials: ids 0 pad, 1 bos, 2 eos, 3 unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in [*WORDS, "###", "Instruction:", "Input:", "Response:", ":"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer directory that ``from_pretrained`` loads."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def token_records(n: int, seed: int, min_len: int, max_len: int, vocab: int = 128) -> list[dict]:
    """Random token sequences; the first 3 tokens of each are a prompt (labels -100)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_len, max_len)
        ids = [rng.randrange(4, vocab) for _ in range(k)]
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out
