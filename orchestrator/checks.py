"""What can be checked of a job spec without loading its base model: its data files' records, its
``eval:`` section, and ``data.max_seq_len`` against the positions the model's ``config.json`` states.

``lorafleet validate`` prints these; ``lorafleet submit`` (``remote.Client``) runs them on the local
files it would upload and queues nothing when one fails; ``lorafleet train`` runs them before it
loads a base model, failing the jobs they refuse alone. One code path, so the three agree.
"""

from __future__ import annotations

from orchestrator.spec import JobSpec


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
