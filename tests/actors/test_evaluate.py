"""Exact match and multiple-choice scoring; fused multi-adapter evaluation equals one-by-one."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from actors.config import AdapterSettings, LoraSettings
from actors.engine import FusedEngine
from actors.evaluate import (
    ChoiceItem,
    choice_logprobs,
    exact_match,
    generate_greedy,
    multiple_choice_accuracy,
    normalize_answer,
)
from tests.actors.test_mixlora import ALL, FFN, _export, mix_settings
from tests.conftest import make_tiny_llama, make_tokenizer

EXACT_CASES = [
    # prediction, answer, mode, match?
    ("table on apple red", "table on apple red", "exact", True),
    ("  table   on apple red \n### Instruction: more", "table on apple red", "exact", True),  # first line only
    ("Table on apple red", "table on apple red", "exact", False),  # case matters in exact mode
    ("522.", "522", "exact", False),
    ("522.", "522", "squad", True),
    ("The Eiffel Tower", "eiffel tower", "squad", True),
    ("", "x", "exact", False),
    ("RED APPLE", "RED APPLE", "exact", True),
    ("def f():\n    return 1", "def f():\n    return 2", "exact", False),  # a multi-line answer is compared whole
    ("1. eggs", "1. eggs\n2. milk", "exact", False),
    ("1. eggs\n2.  milk\n### Instruction: next", "1. eggs\n2. milk", "exact", True),  # then what follows it
]


@pytest.mark.parametrize(("pred", "answer", "mode", "want"), EXACT_CASES)
def test_exact_match(pred, answer, mode, want):
    assert exact_match(pred, answer, mode) is want


def test_normalize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="normalize: must be one of exact, squad"):
        normalize_answer("x", "fuzzy")


def test_multiple_choice_accuracy_hand_made():
    scores = [[-1.0, -0.5, -3.0], [-2.0, -2.5, -0.1], [-0.2, -0.9, -0.3], [-5.0, -4.0, -4.5]]
    # argmaxes: 1, 2, 0, 1 ; answers 1, 2, 1, 1 -> 3 of 4 right
    assert multiple_choice_accuracy(scores, [1, 2, 1, 1]) == 0.75
    assert multiple_choice_accuracy([], []) == 0.0


@pytest.fixture(scope="module")
def engine_with_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    base = make_tiny_llama(seed=8)
    maker = FusedEngine(copy.deepcopy(base), make_tokenizer())
    lora = _export(maker, "l", AdapterSettings("lora", LoraSettings(4, 8), ALL), tmp / "l", 1)
    mix = _export(maker, "m", mix_settings(targets=("q_proj", "v_proj", *FFN)), tmp / "m", 2)
    engine = FusedEngine(copy.deepcopy(base), make_tokenizer())
    engine.attach_adapter("l", lora)
    engine.attach_adapter("m", mix)
    return base, engine


PROMPTS = [[1, 5, 9, 17, 33], [1, 6, 8], [1, 40, 41, 7, 8, 9, 10, 11], [1, 12]]


def test_fused_generation_equals_one_prompt_at_a_time(engine_with_adapters):
    _base, engine = engine_with_adapters
    names = ["l", None, "m"]
    fused = generate_greedy(engine, names, PROMPTS, max_new_tokens=6, batch_size=3)
    for a, name in enumerate(names):
        for i, prompt in enumerate(PROMPTS):
            alone = generate_greedy(engine, [name], [prompt], max_new_tokens=6, batch_size=1)[0][0]
            assert fused[a][i] == alone, (name, i)
    assert fused[0] != fused[1] or fused[2] != fused[1]  # adapters change what is generated


def test_base_generation_equals_transformers_generate(engine_with_adapters):
    base, engine = engine_with_adapters
    ours = generate_greedy(engine, [None], PROMPTS, max_new_tokens=5, batch_size=4)[0]
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        want = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        want = want[: want.index(2)] if 2 in want else want
        assert ours[i] == want, i


def test_choice_logprobs_fused_equal_alone_and_manual(engine_with_adapters):
    _base, engine = engine_with_adapters
    items = [ChoiceItem([1, 5, 9], [[10], [11, 12], [13, 14, 15]], 1), ChoiceItem([1, 7], [[20, 21], [22]], 0)]
    fused = choice_logprobs(engine, ["l", None, "m"], items, batch_size=3)
    for a, name in enumerate(["l", None, "m"]):
        alone = choice_logprobs(engine, [name], items, batch_size=1)[0]
        for i in range(len(items)):
            for c in range(len(items[i].choices)):
                assert fused[a][i][c] == pytest.approx(alone[i][c], rel=1e-5, abs=1e-5)
    # manual: log p(choice | prompt) from full logits of the one adapter
    item, c = items[0], 2
    ids = torch.tensor([item.prompt + item.choices[c]])
    logits = engine.logits("l", ids, torch.ones_like(ids))[0]
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(item.prompt) - 1 + k, t]) for k, t in enumerate(item.choices[c]))
    assert fused[0][0][c] == pytest.approx(want, rel=1e-5)
    assert all(math.isfinite(v) for row in fused for item in row for v in item)
