"""What can be checked of a job spec without loading its base model: its data files' records, its
``eval:`` section, and ``data.max_seq_len`` against the positions the model's ``config.json`` states.

``lorafleet validate`` prints these; ``lorafleet submit`` (``remote.Client``) runs them on the local
files it would upload and queues nothing when one fails; ``lorafleet train`` runs them before it
loads a base model, failing the jobs they refuse alone. One code path, so the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.spec import JobSpec


class SpecWarning(UserWarning):
    """A spec that will run, but likely not as meant (``Client.submit`` warns with it; the CLI prints it)."""


def data_problems(spec: JobSpec, *, with_eval: bool = True) -> list[str]:
    """Every problem of the job's data that needs no tokenizer: the file reads (JSON Lines line by
    line), its format is known, every record has its format's fields (the first ten bad records, then
    a count), and, when those pass and ``with_eval``, what its ``eval:`` section needs of its records.

    Returns lines that name the field and the file as the spec gives it (``data.path: cannot read
    data/x.jsonl line 2 as JSON: ...``); empty when all is well. Reads every record: as the worker
    will, and as slow (a parquet file is held to ``LORAFLEET_MAX_DATA_GIB`` decoded).
    """
    from actors.data import DataError, record_problems
    from actors.evaluate import check_eval

    config = spec.to_job_config()
    try:
        records, problems = record_problems(config.data)
    except DataError as exc:
        return [str(exc)]
    except OSError as exc:  # unreadable (permissions), a device error
        return [f"data.path: cannot read {spec.data.path}: {exc.strerror or exc}"]
    if records and not problems and with_eval and spec.eval is not None:
        try:
            check_eval(config)
        except DataError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"eval.data: cannot read {spec.eval.data}: {exc.strerror or exc}")
    return problems


@dataclass(frozen=True)
class LengthCheck:
    """``data.max_seq_len`` beyond the base model's positions (:func:`max_seq_len_check`)."""

    message: str  # names data.max_seq_len, its value, the model's limit and its config field
    refuse: bool  # True: a record that long fails the job (a fixed position table); False: a warning


def max_seq_len_check(spec: JobSpec) -> LengthCheck | None:
    """``data.max_seq_len`` against the positions of the base model, when its ``config.json`` is
    readable here without loading it (``actors.models.local_model_config``: a local directory, a
    converted ``builtin:`` model, a hub id in the local cache); None when within them, or unknown.

    Past a fixed position table (GPT-2, OPT, GPT-J, ...: ``actors.models.FIXED_POSITION_TYPES``) a
    record that long fails its job once the model is loaded, so this is a refusal; past a RoPE
    model's ``max_position_embeddings`` nothing fails (positions are extrapolated, and quality usually
    drops), so it is a warning.
    """
    from actors.models import local_model_config, position_limit

    config = local_model_config(spec.base_model)
    limit = position_limit(config) if config is not None else None
    value = spec.data.max_seq_len
    if limit is None or value <= limit.positions:
        return None
    head = (f"data.max_seq_len: {value} is more than the {limit.positions} positions of base model "
            f"{spec.base_model} ({limit.field} in its config.json)")  # fmt: skip
    if limit.fixed:
        return LengthCheck(f"{head}; its positions index a fixed table ({config.get('model_type')}), so a record "
                           f"that long would fail the job; set data.max_seq_len: {limit.positions} or less",
                           refuse=True)  # fmt: skip
    return LengthCheck(f"{head}; records longer than that run past the positions it was trained on (no error, "
                       f"but quality usually drops); set data.max_seq_len: {limit.positions} or less unless you "
                       "mean to", refuse=False)  # fmt: skip


JSON_LIST_COUNT_LIMIT = 64 << 20  # bytes: a larger JSON list is not parsed on the head just to count it
_COUNTS: dict[tuple[str, int, int], int | None] = {}  # (path, size, mtime_ns) -> record_count's answer


def record_count(path: str) -> int | None:
    """:func:`count_records`, once per version of a file (its size and modification time): many specs
    naming one shared dataset count it once."""
    import os

    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _COUNTS:
        if len(_COUNTS) >= 1024:
            _COUNTS.clear()
        _COUNTS[key] = count_records(path)
    return _COUNTS[key]


def count_records(path: str) -> int | None:
    """The records of a local data file, counted cheaply (no tokenizer, no ``datasets``, no torch): a
    JSON Lines file's non-blank lines, a JSON list's items (up to :data:`JSON_LIST_COUNT_LIMIT` bytes), a
    parquet file's row count (its footer), a
    CSV file's non-blank rows after the header. None for a URI, a file that cannot be read or counted
    so (a pretty-printed JSON object), or any error: the count only sizes an estimate
    (:func:`planned_steps`); the worker reads the file itself and reports the real step count."""
    import csv
    import json
    from pathlib import Path

    if "://" in path:
        return None
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(file).metadata.num_rows) or None
        if suffix == ".csv":
            with file.open(newline="", encoding="utf-8") as fh:
                rows = sum(1 for row in csv.reader(fh) if any(cell.strip() for cell in row))
            return rows - 1 if rows > 1 else None
        if suffix not in (".json", ".jsonl"):
            return None
        with file.open("rb") as fh:
            if fh.read(4096).lstrip().startswith(b"["):  # a JSON list of records
                if file.stat().st_size > JSON_LIST_COUNT_LIMIT:  # parsed whole: held in the head's memory
                    return None
                doc = json.loads(file.read_bytes())
                return len(doc) if isinstance(doc, list) and doc else None
            fh.seek(0)
            count, first = 0, None
            for line in fh:
                if line.strip():
                    count += 1
                    first = line if first is None else first
        # JSON Lines when its first line is a whole record (else a pretty-printed object: datasets reads it)
        return count if first is not None and isinstance(json.loads(first), dict) else None
    except Exception:  # OSError, a bad JSON record, csv.Error, pyarrow's errors for a damaged file: not counted
        return None


def planned_steps(spec: JobSpec, num_records: int) -> int:
    """Optimizer steps the worker will plan for ``spec`` over a data file of ``num_records`` records:
    the records less those ``eval.held_out_fraction`` holds out, then ``TrainSettings.total_steps``
    (``max_steps``, else ``epochs * ceil(examples / batch_size)``), the arithmetic of ``DataPlan``."""
    from actors.config import held_out_count

    config = spec.to_job_config()
    examples = num_records
    if config.eval is not None and config.eval.data is None:
        examples -= held_out_count(num_records, config.eval.held_out_fraction)
    return max(1, config.train.total_steps(max(1, examples)))
