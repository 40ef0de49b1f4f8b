"""Training data: records from a file, prompt templates, tokenisation with loss masks, batch plans.

Formats (``data.format``):

* ``alpaca``: ``{instruction, input?, output}``; the prompt is ``PROMPT_TEMPLATE`` filled in,
  the completion ``output`` + EOS.
* ``text``: ``{text}`` (every token trained) or ``{prompt, completion}``.
* ``chat``: ``{messages: [{role, content}, ...]}`` through the tokenizer's chat template;
  assistant turns are the completion.
* ``tokens``: ``{input_ids: [int], labels?: [int]}`` (-100 = ignored; no labels = input_ids).
* ``auto``: chosen from the first record's keys.

Labels are -100 on prompt tokens (unless ``train_on_inputs``) and on pads, in every format.
The order of examples is a pure function of (seed, epoch), so a step's batch is known from the
step number alone: resume needs no iterator state.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actors.config import DataSettings, TrainSettings, held_out_count

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SUPPORTED_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """The data file or a record is unusable; the message names the file, record and field."""


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        # Token t's label is predicted from position t-1, so the first label never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def load_records(path: str, field: str = "data.path") -> list[dict[str, Any]]:
    """Read every record of a json/jsonl/csv/parquet file; errors name the spec's ``field``.

    JSON Lines and a JSON list of objects are read directly (no ``datasets`` import, which is slow
    and not needed for them); anything else goes through ``datasets``. Either way every record
    has every column (missing ones None), as ``datasets`` gives them.
    """
    try:
        return _load_records(path)
    except PermissionError as exc:  # a worker fails this job alone; validate and train name the field
        raise DataError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
    except DataError as exc:
        if field == "data.path" or not str(exc).startswith("data.path"):
            raise
        raise DataError(field + str(exc).removeprefix("data.path")) from exc


def _load_records(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if file.is_dir():
        raise DataError(f"data.path: {path} is a directory; give a .json, .jsonl, .csv or .parquet file")
    if not file.is_file():
        raise DataError(f"data.path: file not found: {path}")
    kind = SUPPORTED_SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise DataError(
            f"data.path: unsupported file type {file.suffix!r}; allowed: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    if kind == "parquet":
        records: list[dict[str, Any]] | None = _read_parquet_records(file, path)
    else:
        records = _read_json_records(file, path) if kind == "json" else None
    if records is None:
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(kind, data_files=str(file), split="train", keep_in_memory=True,
                                       **(_csv_as_text(file) if kind == "csv" else {}))  # fmt: skip
        except Exception as exc:  # datasets raises many types for a malformed file
            root = exc  # its message is often generic ("An error occurred while generating the dataset")
            while (root.__cause__ or root.__context__) is not None and root is not (root.__cause__ or root.__context__):
                root = root.__cause__ or root.__context__
            reason = f"{exc}" if root is exc else f"{exc} ({type(root).__name__}: {str(root).strip()})"
            raise DataError(f"data.path: cannot read {path} as {kind}: {reason}") from exc
        records = ds.to_list()
    if not records:
        raise DataError(f"data.path: {path} has no records")
    return records


def _csv_as_text(file: Path) -> dict[str, Any]:
    """``load_dataset("csv")`` options that keep every cell as written: pandas would read ``02108`` as
    the number 2108.0, ``2.50`` as 2.5 and ``NA`` or ``null`` as missing, so targets and answers
    changed silently. Every column is text and only an empty cell is missing (None)."""
    import csv

    import datasets

    try:
        with file.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error):  # not UTF-8 text, or not CSV: datasets' own error names it
        return {}
    if not header or len(set(header)) != len(header):  # empty, or a header pandas renames: let it say so
        return {}
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False, "na_values": [""]}


def max_decoded_bytes() -> int:
    """The most bytes a parquet data file may decode to (Arrow's in-memory size): ``LORAFLEET_MAX_DATA_GIB``
    (default 4) GiB. Every record is held in memory, in the worker process that the other jobs on
    its base model share, so a small file that decodes to much more would take them down with it."""
    raw = os.environ.get("LORAFLEET_MAX_DATA_GIB", "4")
    try:
        gib = float(raw)
    except ValueError:
        gib = float("nan")
    if not 0 < gib < float("inf"):
        raise DataError(f"LORAFLEET_MAX_DATA_GIB: must be a number of GiB > 0 (got {raw!r})")
    return int(gib * 2**30)


def _read_parquet_records(file: Path, path: str) -> list[dict[str, Any]]:
    """Every record of a parquet file (what ``datasets`` gives: one dict per row, every column),
    decoded a batch at a time: past :func:`max_decoded_bytes` of decoded data it stops and refuses
    the file. Parquet's own sizes cannot bound that beforehand: a dictionary-encoded column of one
    repeated text is a few KB on disk and in the footer whatever its row count."""
    import pyarrow.parquet as pq

    limit = max_decoded_bytes()
    records: list[dict[str, Any]] = []
    decoded = 0
    try:
        reader = pq.ParquetFile(file)
        for batch in reader.iter_batches(batch_size=1024):
            decoded += _decoded_nbytes(batch)
            if decoded > limit:
                raise DataError(f"data.path: {path} decodes to more than the {limit / 2**30:g} GiB a data file may "
                                f"hold in memory ({reader.metadata.num_rows} rows, {file.stat().st_size / 2**20:.1f} "
                                "MiB on disk); split it, or raise LORAFLEET_MAX_DATA_GIB")  # fmt: skip
            records.extend(batch.to_pylist())
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"data.path: cannot read {path} as parquet: {type(exc).__name__}: {exc}") from exc
    return records


def _decoded_nbytes(batch) -> int:
    """Arrow bytes of a record batch as its rows decode: a dictionary column counts its values per row,
    not its whole dictionary per batch (``nbytes`` does that: a categorical column of 50,000 distinct
    1 KB texts counted 2.4 GiB for 49 MiB)."""
    import pyarrow.types as pat

    total = 0
    for column in batch.columns:
        total += column.dictionary_decode().nbytes if pat.is_dictionary(column.type) else column.nbytes
    return total


def _read_json_records(file: Path, path: str) -> list[dict[str, Any]] | None:
    """Records of a JSON Lines file or a JSON list of objects; None for other JSON (left to ``datasets``).

    Raises DataError naming ``path`` as the spec gives it (``./data/x.jsonl``, not ``data/x.jsonl``) and
    the line of a malformed JSON Lines record.
    """
    try:
        text = file.read_text(encoding="utf-8-sig")  # a BOM (as Windows editors write) is not JSON
    except UnicodeDecodeError as exc:
        raise DataError(f"data.path: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return []
    try:
        doc = json.loads(text)  # a whole-file document: a list of records, or one record on one line
    except json.JSONDecodeError:
        doc = None  # several documents: JSON Lines
    if isinstance(doc, list):
        for number, item in enumerate(doc):
            if not isinstance(item, dict):
                raise DataError(f"data.path: {path}: item {number} of the JSON list is {_short(item)}, "
                                "not a record (a JSON object)")  # fmt: skip
        records = doc
    elif isinstance(doc, dict):
        records = [doc] if len(text.strip().splitlines()) == 1 else None  # a pretty-printed object: datasets
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data.path: cannot read {path} line {number} as JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"data.path: {path} line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if records:
        columns = list(dict.fromkeys(key for record in records for key in record))
        records = [{key: record.get(key) for key in columns} for record in records]
    return records


def detect_format(record: dict[str, Any]) -> str:
    """The format of a record from its keys; a key whose value is null counts as absent (a file's
    records carry every column of the file, missing ones null)."""
    keys = {key for key, value in record.items() if value is not None}
    if "input_ids" in keys:
        return "tokens"
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "text" in keys or {"prompt", "completion"} <= keys:
        return "text"
    nulls = " (null values count as absent)" if len(keys) < len(record) else ""
    raise DataError(
        f"data.format: cannot detect the format from record keys {sorted(keys)}{nulls}; use alpaca "
        "{instruction, input, output}, text {text} or {prompt, completion}, chat {messages}, "
        "tokens {input_ids, labels}, or set data.format"
    )


def build_prompt(record: dict[str, Any], fmt: str, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, completion) text of one record; the completion is what the model must produce.

    Used for training and for generation-based evaluation, so both see the same template.
    """
    if fmt == "alpaca":
        instruction = str(record.get("instruction") or "")
        extra = record.get("input")
        template = PROMPT_TEMPLATE_WITH_INPUT if extra else PROMPT_TEMPLATE
        return template.format(instruction=instruction, input=extra), str(record.get("output", ""))
    if fmt == "text":
        if record.get("prompt") is not None and record.get("completion") is not None:
            return str(record["prompt"]), str(record["completion"])
        return "", str(record["text"])
    if fmt == "chat":
        messages = record["messages"]
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
        return prompt, str(messages[-1]["content"])
    raise DataError(f"data.format: {fmt!r} has no text prompt")


def _check_fields(record: dict[str, Any], fmt: str, index: int, path: str) -> None:
    """A record has the fields its format needs, not null (a file's records carry every column of
    the file, missing ones null: a ``{text}`` record among ``{prompt, completion}`` ones has a null
    prompt, and trained on the text "None" before)."""
    if fmt == "text":
        if record.get("text") is None and (record.get("prompt") is None or record.get("completion") is None):
            raise DataError(f"{path}: record {index}: field 'text' (or 'prompt' and 'completion') is missing "
                            "or null (data.format: text)")  # fmt: skip
        for key in ("text", "prompt", "completion"):
            _text_field(record, key, index, path)
        return
    required = {"alpaca": ("instruction", "output"), "chat": ("messages",), "tokens": ("input_ids",)}.get(fmt, ())
    for key in required:
        if record.get(key) is None:
            raise DataError(f"{path}: record {index}: field {key!r} is missing or null (data.format: {fmt})")
    if fmt == "alpaca":
        for key in ("instruction", "input", "output"):
            _text_field(record, key, index, path)
    if fmt == "tokens":  # validate reads records without tokenising: the types are checked here
        for key in ("input_ids", "labels"):
            if record.get(key) is not None:
                try:
                    _token_ids(record[key], key)
                except DataError as exc:
                    raise DataError(f"{path}: record {index}: {exc}") from None
    if fmt == "chat":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}: record {index}: 'messages' must be a non-empty list of {{role, content}} objects")
        for number, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                    msg.get("content"), str):  # fmt: skip
                raise DataError(f"{path}: record {index}: messages[{number}] must be an object with a string "
                                f"'role' and a string 'content' (got {_short(msg)})")  # fmt: skip
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{path}: record {index}: 'messages' must end with an assistant turn "
                            f"(the last role is {msgs[-1]['role']!r})")  # fmt: skip


def _text_field(record: dict[str, Any], key: str, index: int, path: str) -> None:
    """A text field is text (a number is its digits: an answer of 4 is "4"); a list, an object or a
    boolean was trained as its Python repr (``['red', 'blue']``)."""
    value = record.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
        raise DataError(f"{path}: record {index}: field {key!r} must be text (got {_short(value)})")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokenize_record(record: dict[str, Any], fmt: str, tokenizer: Any, settings: DataSettings) -> Example:
    """One record as input ids and labels, truncated to ``max_seq_len``."""
    max_len = settings.max_seq_len
    if fmt == "tokens":
        ids = _token_ids(record["input_ids"], "input_ids")
        labels_src = record.get("labels")
        labels = list(ids) if labels_src is None else _token_ids(labels_src, "labels")
        if len(labels) != len(ids):  # before truncation: cut to one length, misaligned labels would pass
            raise DataError(f"labels has {len(labels)} tokens but input_ids has {len(ids)}")
        return Example(ids[:max_len], labels[:max_len])
    if fmt == "chat":
        return _tokenize_chat(record["messages"], tokenizer, settings)
    prompt, completion = build_prompt(record, fmt, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else _bos(tokenizer)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_len]
    prompt_labels = list(prompt_ids) if settings.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + completion_ids)[:max_len]
    return Example(ids, labels)


def _token_ids(values: Any, field: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise DataError(f"{field} must be a list of integer token ids (got {type(values).__name__})")
    out = []
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (numbers.Integral, float)) or (
            isinstance(t, float) and not t.is_integer()
        ):
            raise DataError(f"{field} has {t!r}, not an integer token id")
        out.append(int(t))
    return out


def _chat_ids(out: Any) -> list[int]:
    """Token ids from ``apply_chat_template(tokenize=True)``: a list, or (transformers 5) a
    ``BatchEncoding``, a mapping that is not a ``dict``, whose ``list()`` would be its key names."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(record: dict[str, Any], fmt: str, tokenizer: Any) -> list[int]:
    """The tokens a record's prompt is as training tokenises it (what generation continues from):
    the chat template with its generation prompt, else the text prompt with the tokenizer's special
    tokens, or BOS alone for an empty prompt (``{text}`` records)."""
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        messages = record["messages"][:-1]
        return _chat_ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    prompt, _ = build_prompt(record, fmt, tokenizer)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else _bos(tokenizer)


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, settings: DataSettings) -> Example:
    """The conversation as the chat template renders it whole, tokenised once (the ids
    ``apply_chat_template(tokenize=True)`` gives); labels on each assistant turn's content and
    end-of-turn, not on its header (the tokens ``add_generation_prompt`` writes, which the
    model is given at inference), nor on the other turns unless ``train_on_inputs``.

    Turn bounds come from rendering the conversation's prefixes; a template that renders
    earlier turns differently inside the whole conversation (e.g. one that drops earlier
    reasoning) is refused, since no token bound is right for it.
    """
    if not getattr(tokenizer, "chat_template", None):
        prompt, completion = build_prompt({"messages": messages}, "chat", None)
        return tokenize_record({"prompt": prompt, "completion": completion}, "text", tokenizer, settings)

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, False)
    spans: list[tuple[int, int]] = []  # character ranges of ``full`` whose tokens are trained
    if settings.train_on_inputs:
        spans.append((0, len(full)))
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant" or settings.train_on_inputs:
            continue
        upto = render(messages[: i + 1], False)
        if not full.startswith(upto):
            raise ValueError(
                f"the chat template renders the first {i + 1} messages differently inside the whole "
                "conversation (it rewrites earlier turns), so the assistant turns cannot be located; "
                "give each assistant turn its own record, or use format: tokens"
            )
        try:  # for a first turn: the template's own opening (a default system prompt) and the header
            head = render(messages[:i], True)
        except Exception:  # a template that refuses a conversation of this shape: train the header too
            head = ""
        if head and upto.startswith(head):
            start = len(head)
        elif i:
            start = len(render(messages[:i], False))
        else:  # a conversation that opens with the assistant: from its content on, where it can be found
            found = upto.find(msg["content"]) if msg.get("content") else -1
            start = found if found >= 0 else 0
        spans.append((start, len(upto)))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= first < b for a, b in spans) else IGNORE_INDEX
                  for t, (first, _) in zip(ids, enc["offset_mapping"], strict=True)]  # fmt: skip
    else:  # no character offsets: token the prefixes' renderings, turn by turn
        ids, labels = [], []
        for i, msg in enumerate(messages):
            upto = _chat_ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
            new = upto[len(ids) :]
            trained = msg.get("role") == "assistant" or settings.train_on_inputs
            ids.extend(new)
            labels.extend(new if trained else [IGNORE_INDEX] * len(new))
    return Example(ids[: settings.max_seq_len], labels[: settings.max_seq_len])


def load_examples(
    settings: DataSettings, tokenizer: Any, *, exclude: Sequence[int] = (), vocab_size: int | None = None,
    max_positions: int | None = None,
) -> list[Example]:
    """Read, validate and tokenise the data file, leaving out the records at ``exclude``.

    With ``vocab_size`` (the model's embedding rows: :func:`model_vocab_size`), every token id and
    label must be below it (labels may also be -100, ignored): an id out of range would fail the
    whole fused step deep in torch, so it is refused here, naming the record; so is a record longer
    than ``max_positions`` (:func:`model_max_positions`).

    Raises:
        DataError: missing or unreadable file, unknown format, a record missing a field, a record
            with no token, a token id or label outside the vocabulary.
    """
    records = load_records(settings.path)
    fmt = settings.format if settings.format != "auto" else detect_format(records[0])
    skip = set(exclude)
    examples = []
    for index, record in enumerate(records):
        if index in skip:
            continue
        _check_fields(record, fmt, index, settings.path)
        try:
            example = tokenize_record(record, fmt, tokenizer, settings)
        except Exception as exc:  # a chat template's own TemplateError too ("Unknown role: wizard")
            shown = exc if isinstance(exc, (KeyError, TypeError, ValueError)) else f"{type(exc).__name__}: {exc}"
            raise DataError(f"{settings.path}: record {index}: {shown}") from exc
        _check_example(example, index, settings.path, fmt, vocab_size, max_positions)
        examples.append(example)
    if not any(ex.num_label_tokens for ex in examples):
        raise DataError(f"{settings.path}: no record has a token to train on (check data.format / max_seq_len)")
    empty = [i for i, ex in zip((i for i in range(len(records)) if i not in skip), examples, strict=True)
             if not ex.num_label_tokens]  # fmt: skip
    if empty:  # they cost a step's share and teach nothing: a prompt that fills max_seq_len, labels all -100
        log.warning("%s: %d of %d records have no token to train on (e.g. record %d: its prompt fills "
                    "data.max_seq_len %d, or every label is -100); raise max_seq_len or drop them",
                    settings.path, len(empty), len(examples), empty[0], settings.max_seq_len)  # fmt: skip
    return examples


def check_records(settings: DataSettings) -> int:
    """The checks of :func:`load_examples` that need no tokenizer (``lorafleet validate``): the file
    reads, its format is known, every record has its format's fields. Returns the record count.

    Raises:
        DataError: naming the file, the record and the field.
    """
    count, problems = record_problems(settings, limit=1)
    if problems:
        raise DataError(problems[0])
    return count


def record_problems(settings: DataSettings, limit: int = 10) -> tuple[int, list[str]]:
    """:func:`check_records` that goes on past a bad record: ``(record count, the first `limit`
    problems)``, a last line counting the bad records beyond them. A file that cannot be read, or
    whose format cannot be told, still raises ``DataError``."""
    records = load_records(settings.path)
    fmt = settings.format if settings.format != "auto" else detect_format(records[0])
    problems: list[str] = []
    bad = 0
    for index, record in enumerate(records):
        try:
            _check_fields(record, fmt, index, settings.path)
        except DataError as exc:
            bad += 1
            if len(problems) < limit:
                problems.append(str(exc))
    if bad > len(problems):
        problems.append(f"{settings.path}: ... and {bad - len(problems)} more bad record(s)")
    return len(records), problems


def check_examples(
    examples: Sequence[Example], vocab_size: int | None, source: str, max_positions: int | None = None
) -> None:
    """The checks :func:`load_examples` makes, for examples built elsewhere (``source`` names them).

    Raises:
        DataError: an example with no token, a token id or label outside the vocabulary, or more
            tokens than the model has positions.
    """
    for index, example in enumerate(examples):
        _check_example(example, index, source, "tokens", vocab_size, max_positions)


def _check_example(
    example: Example, index: int, path: str, fmt: str, vocab_size: int | None, max_positions: int | None = None
) -> None:
    field = "input_ids" if fmt == "tokens" else "the tokenized record"
    if not example.input_ids:
        raise DataError(f"{path}: record {index}: {field} is empty; every record needs at least one token")
    if max_positions is not None and len(example.input_ids) > max_positions:
        raise DataError(f"{path}: record {index}: {len(example.input_ids)} tokens, more than the {max_positions} "
                        f"positions of the model's position table; set data.max_seq_len: {max_positions} "
                        "or less")  # fmt: skip
    if vocab_size is None:
        return
    for name, values, allowed in (("input_ids", example.input_ids, ()), ("labels", example.labels, (IGNORE_INDEX,))):
        bad = next((t for t in values if not 0 <= t < vocab_size and t not in allowed), None)
        if bad is not None:
            what = "a token id" if name == "input_ids" else "a label"
            also = "" if name == "input_ids" else f" or {IGNORE_INDEX} (ignored)"
            raise DataError(f"{path}: record {index}: {name} has {what} {bad} outside the model's vocabulary "
                            f"(allowed: 0 to {vocab_size - 1}{also})")  # fmt: skip


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # learned absolute positions, by module name


def model_max_positions(model: Any) -> int | None:
    """The longest sequence a model with a fixed position table takes (learned: GPT-2, GPT-BigCode,
    OPT; precomputed sinusoids indexed by position: GPT-J, CodeGen): a longer one fails with an index
    error deep in torch. None for rotary or ALiBi models, whose ``max_position_embeddings`` is no hard
    limit."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in POSITION_TABLES and isinstance(module, torch.nn.Embedding):
            return int(module.num_embeddings) - int(getattr(module, "offset", 0))  # OPT's table starts at 2
    for name, buffer in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "embed_positions":  # GPT-J, CodeGen: (positions, rotary dims)
            return int(buffer.shape[0])
    return None


def model_vocab_size(model: Any) -> int | None:
    """Token ids a model takes and predicts: the fewer of its input embedding's rows and its output
    head's rows (None where neither is found)."""
    sizes = []
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if inputs is not None and hasattr(inputs, "num_embeddings"):
        sizes.append(int(inputs.num_embeddings))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        sizes.append(int(head.out_features))
    return min(sizes) if sizes else None


def held_out_indices(num_records: int, fraction: float, seed: int) -> list[int]:
    """Indices of the records held out of training for evaluation (a seeded sample, sorted)."""
    count = held_out_count(num_records, fraction)
    if count <= 0:
        return []
    return sorted(random.Random(seed * 7_919 + 17).sample(range(num_records), count))


@dataclass(frozen=True)
class DataPlan:
    """Which examples form each micro-batch of each optimizer step.

    An epoch has ``ceil(N / batch_size)`` steps; the last step of an epoch may be smaller (it
    then has fewer micro-batches). The order of epoch ``e`` is a seeded shuffle.
    """

    num_examples: int
    batch_size: int
    micro_batch_size: int
    total_steps: int
    shuffle: bool
    seed: int

    @classmethod
    def create(cls, num_examples: int, train: TrainSettings, shuffle: bool) -> DataPlan:
        total = train.total_steps(num_examples)
        return cls(num_examples, train.batch_size, train.micro_batch_size, total, shuffle, train.seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_examples))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of each micro-batch of optimizer step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        chunk = order[pos * self.batch_size : (pos + 1) * self.batch_size]
        m = self.micro_batch_size
        return [chunk[i : i + m] for i in range(0, len(chunk), m)]


def collate(
    examples: Sequence[Example], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to ``length`` (default: the longest). Returns input_ids, labels, attention_mask (n, L)."""
    length = length or max(len(ex.input_ids) for ex in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex.input_ids)
        input_ids[i, :k] = torch.tensor(ex.input_ids)
        labels[i, :k] = torch.tensor(ex.labels)
        mask[i, :k] = 1
    return input_ids, labels, mask


@dataclass(frozen=True)
class PackedBatch:
    """Micro-batches of many jobs laid end to end in one row, with no padding.

    Sequence ``i`` occupies tokens ``[cu_seqlens[i], cu_seqlens[i+1])``; its position ids restart
    at 0 and the label of its first token is ``IGNORE_INDEX``, so the next-token loss (hidden
    ``t-1`` predicts label ``t``) never crosses from one sequence into the next.
    """

    input_ids: torch.Tensor  # (1, T)
    labels: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    cu_seqlens: torch.Tensor  # (S+1,) int32, sequence boundaries
    seq_lengths: tuple[int, ...]  # (S,) as Python ints
    spans: tuple[tuple[int, int], ...]  # per micro-batch: its tokens [start, stop)
    reals: tuple[torch.Tensor, ...]  # per micro-batch: (n, own length) bool, where its tokens sit unpacked

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack(batches: Sequence[Sequence[Example]]) -> PackedBatch:
    """Pack micro-batches (one per job, in order) into one padding-free row."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    spans: list[tuple[int, int]] = []
    reals: list[torch.Tensor] = []
    for batch in batches:
        start = len(ids)
        own = max(len(ex.input_ids) for ex in batch)
        real = torch.zeros((len(batch), own), dtype=torch.bool)
        for row, ex in enumerate(batch):
            k = len(ex.input_ids)
            if len(ex.labels) != k:
                raise ValueError(f"an example has {k} input ids but {len(ex.labels)} labels")
            ids.extend(ex.input_ids)
            labels.append(IGNORE_INDEX)  # the first token is never a target (and must not see the last sequence)
            labels.extend(ex.labels[1:])
            positions.extend(range(k))
            lengths.append(k)
            real[row, :k] = True
        spans.append((start, len(ids)))
        reals.append(real)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=cu,
        seq_lengths=tuple(lengths),
        spans=tuple(spans),
        reals=tuple(reals),
    )
