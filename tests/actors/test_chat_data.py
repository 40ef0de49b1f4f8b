"""Chat records with a tokenizer that has a chat template, and the prompts evaluation generates from.

In transformers 5 ``apply_chat_template(tokenize=True)`` returns a ``BatchEncoding``, a mapping that
is not a ``dict``: the records were read as the key names (``['input_ids', 'attention_mask']``), so
every chat job failed, SmolLM2's included. Evaluation tokenised a chat prompt's rendered text again
with the tokenizer's specials (two BOS where the template writes one) and an empty ``{text}``
prompt as no token at all; it now takes the tokens training sees.
"""

from __future__ import annotations

import copy

import pytest
import torch

from actors.config import AdapterSettings, DataSettings, EvalSettings, JobConfig, LoraSettings, TrainSettings
from actors.data import IGNORE_INDEX, load_examples, prompt_ids, tokenize_record
from actors.engine import FusedEngine
from tests.conftest import WORDS, make_tiny_llama, make_tokenizer, write_jsonl

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")  # fmt: skip


def chat_tokenizer():
    """A LLaMA-style tokenizer: it adds BOS itself, and its chat template writes ``bos_token`` too."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                                  special_tokens=[("<s>", 1)])  # fmt: skip
    tok.chat_template = TEMPLATE
    return tok


def chat_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3)]
        out.append({"messages": [{"role": "user", "content": " ".join(words)},
                                 {"role": "assistant", "content": " ".join(reversed(words))}]})  # fmt: skip
    return out


def test_chat_records_tokenise_to_ids_with_only_the_assistant_trained():
    tok = chat_tokenizer()
    record = chat_records(1)[0]
    ex = tokenize_record(record, "chat", tok, DataSettings("x", format="chat", max_seq_len=64))
    assert all(isinstance(t, int) for t in ex.input_ids) and ex.input_ids[0] == 1
    assert ex.input_ids.count(1) == 1  # one BOS
    rendered = tok.apply_chat_template(record["messages"], tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]  # the template's tokens, exactly
    prompt = prompt_ids(record, "chat", tok)
    user_turn = len(tok(tok.apply_chat_template(record["messages"][:1], tokenize=False),
                        add_special_tokens=False)["input_ids"])  # fmt: skip
    assert ex.input_ids[: len(prompt)] == prompt  # generation continues from what training saw
    assert len(prompt) == user_turn + 2  # the user turn and the assistant header "assistant :"
    # the user turn and the header the model is given at inference are not trained; the answer and its </s> are
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and ex.labels[len(prompt) :] == ex.input_ids[len(prompt) :]


def test_an_empty_text_prompt_is_the_bos_training_starts_from():
    tok = make_tokenizer()
    record = {"text": "alpha beta"}
    ex = tokenize_record(record, "text", tok, DataSettings("x", format="text", max_seq_len=64))
    assert prompt_ids(record, "text", tok) == [1] == ex.input_ids[:1]


def test_a_chat_job_trains_and_evaluates(tmp_path):
    from actors.evaluate import evaluate_job

    tok = chat_tokenizer()
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    held = write_jsonl(tmp_path / "held.jsonl", chat_records(3))
    settings = DataSettings(str(data), format="chat", max_seq_len=64)
    config = JobConfig("c", "tiny", AdapterSettings("lora", LoraSettings(4, 8, 0.0), ("q_proj", "v_proj")), settings,
                       TrainSettings(max_steps=2, batch_size=4, micro_batch_size=2, learning_rate=1e-2),
                       str(tmp_path / "out"), eval=EvalSettings(data=str(held), metrics=("loss", "exact_match"),
                                                                max_new_tokens=3))  # fmt: skip
    engine = FusedEngine(copy.deepcopy(make_tiny_llama()), tok)
    job = engine.add_job(config)
    assert job.examples == load_examples(settings, tok)
    engine.run()
    assert job.error is None and job.step == 2 and torch.isfinite(torch.tensor(job.last_loss))
    result = evaluate_job(engine, "c", config)
    assert result["examples"] == 3 and result["metrics"]["loss"]["tokens"] > 0
    assert 0.0 <= result["metrics"]["exact_match"]["adapter"] <= 1.0
    assert result["samples"][0]["prompt"].startswith("<s>user : ")  # the rendered template, one BOS


def test_chat_without_a_template_falls_back_to_role_lines():
    tok = make_tokenizer()  # no chat_template
    record = chat_records(1)[0]
    ex = tokenize_record(record, "chat", tok, DataSettings("x", format="chat", max_seq_len=64))
    prompt = prompt_ids(record, "chat", tok)
    assert all(isinstance(t, int) for t in ex.input_ids) and ex.input_ids[: len(prompt)] == prompt


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip


def bpe_chatml_tokenizer():
    """A byte-level BPE tokenizer (as Qwen2's and SmolLM2's) with a ChatML template, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "system user assistant reply answer question",
              "What is two plus two? Four. And three plus three? Six.", "You are a helpful assistant."] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, the quick answer."},
]


def trained_runs(tok, ex) -> list[str]:
    """The decoded text of each run of trained tokens."""
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return [tok.decode(run) for run in [*runs, current] if run]


def test_a_multi_turn_chatml_conversation_trains_each_answer_and_its_end_of_turn():
    """The ids are the template's tokens for the whole conversation (byte-level BPE, tokenised once),
    and exactly each assistant turn's content and ``<|im_end|>`` are trained: not the system and user
    turns, nor the ``<|im_start|>assistant`` header the model is given at inference."""
    tok = bpe_chatml_tokenizer()
    ex = tokenize_record({"messages": CONVERSATION}, "chat", tok, DataSettings("x", format="chat", max_seq_len=512))
    assert ex.input_ids == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert trained_runs(tok, ex) == ["Four.<|im_end|>\n", "Six, the quick answer.<|im_end|>\n"]
    prompt = prompt_ids({"messages": CONVERSATION}, "chat", tok)
    assert ex.input_ids[: len(prompt)] == prompt and ex.labels[len(prompt) - 1] == IGNORE_INDEX
    with_inputs = tokenize_record({"messages": CONVERSATION}, "chat", tok,
                                  DataSettings("x", format="chat", max_seq_len=512, train_on_inputs=True))  # fmt: skip
    assert with_inputs.labels == with_inputs.input_ids


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_a_conversation_that_opens_with_the_assistant_trains_its_content_not_the_opening(system):
    """The first turn's span started at character 0: a conversation opening with an assistant
    greeting trained its header and a template's default system prompt too."""
    tok = bpe_chatml_tokenizer()
    if system:  # a template that writes a default system turn when the conversation has none (as SmolLM2's)
        tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + system +
                             "<|im_end|>\n{% endif %}" + CHATML)  # fmt: skip
    turns = [{"role": "assistant", "content": "the quick answer"}, {"role": "user", "content": "What is two?"},
             {"role": "assistant", "content": "Four."}]  # fmt: skip
    ex = tokenize_record({"messages": turns}, "chat", tok, DataSettings("x", format="chat", max_seq_len=512))
    assert trained_runs(tok, ex) == ["the quick answer<|im_end|>\n", "Four.<|im_end|>\n"]


def test_a_template_that_rewrites_earlier_turns_is_refused_by_record(tmp_path):
    """A template that renders earlier assistant turns differently once the conversation goes on
    (here: it drops their reasoning, as Qwen3's does) has no token bound for the earlier turns:
    before, the labels were cut at the wrong tokens without a word."""
    from actors.data import DataError

    tok = bpe_chatml_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    turns = [{"role": "user", "content": "What is two plus two?"},
             {"role": "assistant", "content": "<think>two and two</think>Four."},
             {"role": "user", "content": "And three plus three?"},
             {"role": "assistant", "content": "Six."}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": turns}])
    with pytest.raises(DataError, match=r"record 1: the chat template renders the first 2 messages differently"):
        load_examples(DataSettings(str(path), format="chat"), tok)


def test_multiple_choice_on_a_chat_job_asks_the_question_as_the_template_renders_a_user_turn(monkeypatch):
    """Alpaca jobs got their template around the question; chat jobs were scored on the raw question,
    not the conversation form their adapter was trained on."""
    from types import SimpleNamespace

    from actors import evaluate

    tok = bpe_chatml_tokenizer()
    seen = []
    monkeypatch.setattr(evaluate, "choice_logprobs",
                        lambda engine, names, items, **kw: seen.extend(items) or [[[0.0, 1.0]], [[0.0, 1.0]]])  # fmt: skip
    record = {"question": "What is two plus two?", "choices": ["Four.", "Six."], "answer": 0}
    ev = SimpleNamespace(batch_size=2)
    evaluate._multiple_choice(SimpleNamespace(tokenizer=tok), [None, "a"], [record], "chat", ev)
    want = tok.apply_chat_template([{"role": "user", "content": record["question"]}], tokenize=True,
                                   add_generation_prompt=True)["input_ids"]  # fmt: skip
    assert seen[0].prompt == list(want) and tok.decode(seen[0].prompt).endswith("<|im_start|>assistant\n")
