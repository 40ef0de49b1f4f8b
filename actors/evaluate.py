"""Quality metrics beyond loss: generation exact match and multiple-choice accuracy, fused.

Both evaluate many adapters (LoRA and MixLoRA, any mix, ``None`` = the base model) on one copy of
the base model: every batch holds the same examples once per adapter, each row with its own
adapter, so one base forward serves them all. Results equal evaluating each adapter alone.

* ``generate_greedy``: greedy decoding with a KV cache. Prompts are left-padded and carry explicit
  position ids (counted over real tokens), so a row's output does not depend on its neighbours.
* ``exact_match``: the first line of the completion, whitespace-normalised, equals the answer
  (``normalize="squad"`` also lowercases and drops punctuation and articles).
* ``choice_logprobs`` / ``multiple_choice_accuracy``: the sum of log-probabilities of each choice's
  tokens after the prompt; the highest-scoring choice is the prediction (ARC / BoolQ / PIQA style).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors.data import IGNORE_INDEX, Example, collate
from actors.lora import BatchLayout, Segment

BASE_KEY = "@base"  # the layout name of rows that use no adapter (never a module name)


def _keys(names: Sequence[str | None]) -> list[str]:
    return [BASE_KEY if n is None else n for n in names]


@torch.no_grad()
def generate_greedy(
    engine,
    names: Sequence[str | None],
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    between: Callable[[], None] | None = None,
) -> list[list[list[int]]]:
    """Greedy completions: ``out[a][i]`` is the token ids adapter ``names[a]`` generates for prompt ``i``.

    Generation of a row stops at EOS (not included) or after ``max_new_tokens``. ``between`` is
    called after each batch of prompts (the worker trains its other jobs there).
    """
    from transformers import DynamicCache

    fused = engine.fused
    eos = engine.tokenizer.eos_token_id
    keys = _keys(names)
    out: list[list[list[int]]] = [[[] for _ in prompts] for _ in names]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        n, width = len(chunk), max(len(prompts[i]) for i in chunk)
        ids = torch.full((n, width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: the next token is always at the end
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        rows = len(keys) * n
        ids = ids.repeat(len(keys), 1).to(fused.device)  # (A*n, W)
        mask = mask.repeat(len(keys), 1).to(fused.device)  # (A*n, W)
        segments = tuple(Segment(k, a * n, (a + 1) * n) for a, k in enumerate(keys))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (A*n, W)
        cache = DynamicCache()
        layout = BatchLayout(segments, training=False, padding_mask=mask.bool())
        hidden = fused.hidden_states(ids, mask, layout, position_ids=positions, cache=cache)
        next_ids = fused.logits(hidden[:, -1]).argmax(-1)  # (A*n,)
        finished = torch.zeros(rows, dtype=torch.bool, device=fused.device)
        generated = []
        step_layout = BatchLayout(segments, training=False, padding_mask=None)  # new tokens are all real
        for _ in range(max_new_tokens):
            if eos is not None:
                finished |= next_ids == eos
            generated.append(torch.where(finished, torch.full_like(next_ids, -1), next_ids))
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            hidden = fused.hidden_states(
                next_ids[:, None], mask, step_layout, position_ids=positions, cache=cache
            )
            next_ids = fused.logits(hidden[:, -1]).argmax(-1)
        tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(rows)]
        for a in range(len(keys)):
            for row, i in enumerate(chunk):
                seq = tokens[a * n + row]
                out[a][i] = [t for t in seq[: seq.index(-1)] if t >= 0] if -1 in seq else seq
        if between is not None and start + batch_size < len(order):
            between()
    return out


def normalize_answer(text: str, mode: str = "exact", lines: int = 1) -> str:
    """The first ``lines`` lines, whitespace collapsed; ``squad`` also lowercases and drops punctuation
    and articles."""
    text = "\n".join(text.strip().split("\n")[:lines]) if text.strip() else ""
    if mode == "squad":
        text = text.lower()
        text = "".join(ch for ch in text if ch not in set(string.punctuation))
        text = re.sub(r"\b(a|an|the)\b", " ", text)
    elif mode != "exact":
        raise ValueError(f"normalize: must be one of exact, squad (got {mode!r})")
    return " ".join(text.split())


def exact_match(prediction: str, answer: str, mode: str = "exact") -> bool:
    """Whether the completion's first lines, as many as the answer has (what a model writes after its
    answer, e.g. a next ``### Instruction:``, is not held against it), equal the whole answer once both
    are normalised: a multi-line answer (code, a list) is compared whole, not by its first line."""
    lines = answer.strip().count("\n") + 1
    return normalize_answer(prediction, mode, lines) == normalize_answer(answer, mode, lines)


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice record: prompt token ids, each choice's token ids, the right index."""

    prompt: list[int]
    choices: list[list[int]]
    answer: int


@torch.no_grad()
def choice_logprobs(
    engine, names: Sequence[str | None], items: Sequence[ChoiceItem], *, batch_size: int = 16,
    between: Callable[[], None] | None = None,
) -> list[list[list[float]]]:
    """``out[a][i][c]``: the summed log-probability of choice ``c`` of item ``i`` under adapter ``a``."""
    flat = [(i, c) for i, item in enumerate(items) for c in range(len(item.choices))]
    examples = [
        Example(items[i].prompt + items[i].choices[c], [IGNORE_INDEX] * len(items[i].prompt) + items[i].choices[c])
        for i, c in flat
    ]
    scores = row_logprob_sums(engine, names, examples, batch_size=batch_size, between=between)
    out: list[list[list[float]]] = [[[0.0] * len(item.choices) for item in items] for _ in names]
    for a in range(len(names)):
        for (i, c), value in zip(flat, scores[a], strict=True):
            out[a][i][c] = value
    return out


@torch.no_grad()
def row_logprob_sums(
    engine, names: Sequence[str | None], examples: Sequence[Example], *, batch_size: int = 16,
    between: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Per adapter, per example: the sum of log p(label token | prefix) over the example's label tokens."""
    fused = engine.fused
    keys = _keys(names)
    out = [[0.0] * len(examples) for _ in names]
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        ids, labels, mask = collate(batch, engine.pad_id)
        n = len(batch)
        segments = tuple(Segment(k, a * n, (a + 1) * n) for a, k in enumerate(keys))
        ids, labels, mask = (t.repeat(len(keys), 1).to(fused.device) for t in (ids, labels, mask))
        hidden = fused.hidden_states(ids, mask, BatchLayout(segments, training=False, padding_mask=mask.bool()))
        logp = F.log_softmax(fused.logits(hidden[:, :-1]).float(), dim=-1)  # (A*n, L-1, V)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * keep  # (A*n, L-1)
        sums = picked.sum(-1).tolist()
        for a in range(len(keys)):
            for row in range(n):
                out[a][start + row] = sums[a * n + row]
        if between is not None and start + batch_size < len(examples):
            between()
    return out


def multiple_choice_accuracy(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of items whose highest-scoring choice is the answer."""
    if not answers:
        return 0.0
    right = sum(1 for s, ans in zip(scores, answers, strict=True) if max(range(len(s)), key=s.__getitem__) == ans)
    return right / len(answers)


# ---------------------------------------------------------------- a job's held-out evaluation


def _eval_records(config) -> tuple[list[dict], str]:
    from actors.data import DataError, detect_format, held_out_indices, load_records

    ev = config.eval
    train_records = load_records(config.data.path)
    fmt = config.data.format if config.data.format != "auto" else detect_format(train_records[0])
    if ev.data is not None:
        records = load_records(ev.data, "eval.data")
    else:
        picked = held_out_indices(len(train_records), ev.held_out_fraction, config.train.seed)
        if not picked:
            raise DataError(f"eval.held_out_fraction: {config.data.path} has {len(train_records)} record(s), too few "
                            "to hold one out and train on the rest; give eval.data")  # fmt: skip
        records = [train_records[i] for i in picked]
    if ev.max_examples is not None:
        records = records[: ev.max_examples]
    return records, fmt


def check_eval(config) -> tuple[list[dict], str]:
    """What ``config.eval`` needs of its records, checked before training (``add_job``, ``lorafleet
    validate``) rather than found after it: the file, a held-out share that holds a record out,
    metrics the data format allows, and well-formed multiple-choice records. Returns the records and
    the data format it checked (``[]`` without an ``eval:`` section), for :func:`check_eval_fits`.

    Raises:
        DataError: naming the field (``eval.data``, ``eval.held_out_fraction``, ``eval.metrics``).
    """
    from actors.data import DataError

    ev = config.eval
    if ev is None:
        return [], config.data.format
    records, fmt = _eval_records(config)
    source = "eval.data" if ev.data is not None else "eval (held out of data.path)"
    if ev.data is not None:  # held-out records are data.path's, checked as training reads them
        from actors.data import _check_fields

        for i, r in enumerate(records):
            if r.get("choices") is None:  # a multiple-choice record's fields are checked below
                _check_fields(r, fmt, i, f"eval.data: {ev.data}")
    if "exact_match" in ev.metrics and fmt == "tokens":
        raise DataError("eval.metrics: exact_match needs text records (data.format is tokens); use loss")
    if "exact_match" in ev.metrics and fmt == "text":
        for i, r in enumerate(records):
            if r.get("choices") is None and (r.get("prompt") is None or r.get("completion") is None):
                raise DataError(f"{source}: record {i}: exact_match needs a prompt and an answer ({{prompt, "
                                "completion}, alpaca or chat records); a {text} record has none (it scored 0 "
                                "whatever the model wrote); use loss for it")  # fmt: skip
    if "multiple_choice" in ev.metrics:
        for i, r in enumerate(records):
            _choice_fields(r, i, source)
    if "loss" in ev.metrics and "multiple_choice" not in ev.metrics and all(r.get("choices") is not None
                                                                            for r in records):  # fmt: skip
        raise DataError(f"{source}: every record is a multiple-choice record (loss skips them); "
                        "add multiple_choice to eval.metrics")  # fmt: skip
    return records, fmt


def check_eval_fits(config, records: list[dict], fmt: str, tokenizer, vocab_size: int | None,
                    max_positions: int) -> None:  # fmt: skip
    """On a model with a learned position table (GPT-2, OPT, GPT-BigCode), the evaluation's records
    fit it, checked when the job joins: a loss record as training truncates it, and an exact_match
    prompt together with ``eval.max_new_tokens`` (generation past the table failed in torch with an
    IndexError after the whole training, losing every metric of the evaluation).

    ``records`` and ``fmt``: what :func:`check_eval` read and checked.

    Raises:
        DataError: naming the record and what to change.
    """
    from actors.data import DataError, check_examples, prompt_ids, tokenize_record

    ev = config.eval
    if ev is None:
        return
    source = "eval.data" if ev.data is not None else "eval (held out of data.path)"
    usable = [(i, r) for i, r in enumerate(records) if r.get("choices") is None]
    if "loss" in ev.metrics:
        check_examples([tokenize_record(r, fmt, tokenizer, config.data) for _, r in usable], vocab_size, source,
                       max_positions)  # fmt: skip
    if "exact_match" in ev.metrics and fmt != "tokens":
        for i, r in usable:
            need = len(prompt_ids(r, fmt, tokenizer)) + ev.max_new_tokens
            if need > max_positions:
                raise DataError(f"{source}: record {i}: its prompt ({need - ev.max_new_tokens} tokens) and "
                                f"eval.max_new_tokens ({ev.max_new_tokens}) need {need} positions, more than the "
                                f"{max_positions} of the model's position table; shorten the prompt or lower "
                                "eval.max_new_tokens")  # fmt: skip


def _choice_fields(record: dict, index: int, source: str) -> tuple[str, list[str], int]:
    """(question, choices, index of the right choice) of a multiple-choice record: ``choices`` a list
    of at least two texts, ``answer`` the text of the right one or its 0-based index (an integer, or
    an integer written as text or as a whole float; a text that is also a choice is that choice)."""
    from actors.data import DataError

    where = f"{source}: record {index}"
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if question is None or choices is None or answer is None:
        missing = [k for k, v in (("question", question), ("choices", choices), ("answer", answer)) if v is None]
        raise DataError(f"{where}: multiple_choice needs question, choices, answer ({', '.join(missing)} missing)")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) and
                                                                     not isinstance(c, bool) for c in choices):  # fmt: skip
        raise DataError(f"{where}: choices must be a list of at least two texts (got {choices!r})")
    texts = [str(c) for c in choices]
    if isinstance(answer, str) and answer in texts:  # the text of the right choice
        return str(question), texts, texts.index(answer)
    index = answer
    if isinstance(answer, str) and answer.strip().lstrip("-").isdigit():
        index = int(answer.strip())  # "1": an index written as text, as files converted from CSV have it
    elif isinstance(answer, float) and answer.is_integer():
        index = int(answer)
    if isinstance(index, int) and not isinstance(index, bool):
        if not 0 <= index < len(texts):
            raise DataError(f"{where}: answer {answer!r} is not a choice index (allowed: 0 to {len(texts) - 1})")
        return str(question), texts, index
    raise DataError(f"{where}: answer must be the 0-based index of the right choice or its text "
                    f"(got {answer!r}; choices {texts})")  # fmt: skip


def evaluate_job(engine, name: str | None, config, between: Callable[[], None] | None = None) -> dict:
    """Evaluate the base model and adapter ``name`` side by side on ``config.eval``'s held-out records.

    Returns ``{"examples": n, "metrics": {metric: {"base": x, "adapter": y}}, "samples": [...]}``;
    loss also reports ``perplexity``. Raises ``DataError`` for unusable evaluation data.
    ``between`` is called between batches (the worker runs a training step of its other jobs
    there, so an evaluation does not stall them); it must leave the adapter ``name`` attached.
    """
    from actors.data import DataError, build_prompt, check_examples, prompt_ids, tokenize_record

    ev = config.eval
    records, fmt = _eval_records(config)
    tok = engine.tokenizer
    names = [None, name]
    result: dict = {"examples": len(records), "metrics": {}, "samples": []}
    if "loss" in ev.metrics:
        usable = [r for r in records if r.get("choices") is None]  # a file's records carry every column
        examples = [tokenize_record(r, fmt, tok, config.data) for r in usable]
        check_examples(examples, engine.vocab_size, "eval.data", engine.max_positions)  # else: failing in torch
        if examples:
            (base, _), (adapter, count) = engine.evaluate(names, examples, micro_batch_size=ev.batch_size,
                                                          between=between)  # fmt: skip
            result["metrics"]["loss"] = {"base": base, "adapter": adapter, "tokens": count}
            result["metrics"]["perplexity"] = {"base": math.exp(min(base, 50)), "adapter": math.exp(min(adapter, 50))}
    if "exact_match" in ev.metrics:
        if fmt == "tokens":
            raise DataError("eval.metrics: exact_match needs text records (data.format is tokens); use loss")
        pairs = [build_prompt(r, fmt, tok) for r in records]
        prompts = [prompt_ids(r, fmt, tok) for r in records]  # as training tokenises them (one BOS, chat template)
        outs = generate_greedy(engine, names, prompts, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                               between=between)  # fmt: skip
        scores = {}
        for key, generated in zip(("base", "adapter"), outs, strict=True):
            texts = [tok.decode(g, skip_special_tokens=True) for g in generated]
            scores[key] = sum(exact_match(t, ans, ev.normalize) for t, (_, ans) in zip(texts, pairs, strict=True))
            scores[key] /= max(1, len(pairs))
            if key == "adapter":
                base_texts = [tok.decode(g, skip_special_tokens=True) for g in outs[0]]
                result["samples"] = [
                    {"prompt": p, "answer": a, "base": b.strip(), "adapter": t.strip()}
                    for (p, a), b, t in list(zip(pairs, base_texts, texts, strict=True))[:5]
                ]
        result["metrics"]["exact_match"] = scores
    if "multiple_choice" in ev.metrics:
        result["metrics"]["multiple_choice"] = _multiple_choice(engine, names, records, fmt, ev, between)
    return result


def _multiple_choice(engine, names, records, fmt, ev, between=None) -> dict:
    from actors.data import build_prompt, prompt_ids

    tok = engine.tokenizer
    items = []
    for i, r in enumerate(records):
        question, choices, answer = _choice_fields(r, i, "eval.data")
        if fmt == "alpaca":  # the job's own prompt template
            prompt, _ = build_prompt({"instruction": question, "input": ""}, "alpaca")
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        elif fmt == "chat":  # the question as a user turn, as training renders one (template, generation prompt)
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
            ids = prompt_ids({"messages": turns}, "chat", tok)
        else:
            ids = tok(question, add_special_tokens=True)["input_ids"]
        items.append(ChoiceItem(
            ids,
            [tok(c, add_special_tokens=False)["input_ids"] for c in choices],
            answer,
        ))
    scores = choice_logprobs(engine, names, items, batch_size=ev.batch_size * 2, between=between)
    answers = [it.answer for it in items]
    return {key: multiple_choice_accuracy(s, answers) for key, s in zip(("base", "adapter"), scores, strict=True)}
