"""``lorafleet validate A.yaml ...``: check job specs, their data files' records and their ``eval:`` sections
without a model (tokenisation is checked when a job joins), and ``data.max_seq_len`` against the base
model's positions where its ``config.json`` is on this machine (``orchestrator.checks``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actors.models import check_base_model
from orchestrator.checks import data_problems, max_seq_len_check
from orchestrator.spec import SpecError, load_spec

HELP = "check job spec files and print every error"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="job spec files (YAML or JSON)")


def run(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as err:
            bad += 1
            print("\n".join(err.errors))
            continue
        # files, formats, fields (no tokenizer needed), every bad record up to ten; then the eval: section
        problems = [f"{path}: {line}" for line in data_problems(spec)]
        try:
            check_base_model(spec.base_model)  # a builtin name, a local model directory (nothing is loaded)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
        if spec.adapter.init_from:
            problem = _init_from_problem(spec)
            if problem:
                problems.append(f"{path}: {problem}")
        length = max_seq_len_check(spec)  # against the model's positions, where its config.json is here
        if length is not None and length.refuse:
            problems.append(f"{path}: {length.message}")
        elif length is not None:
            print(f"{path}: warning: {length.message}")
        if problems:
            bad += 1
            print("\n".join(problems))
        else:
            print(f"{path}: ok ({spec.name}, {spec.adapter.type}, base {spec.base_model})")
    return 1 if bad else 0


def _init_from_problem(spec) -> str | None:
    """Why ``adapter.init_from`` cannot continue this job, from its ``adapter_config.json`` alone (the
    settings a worker would refuse when the job joins: type, r, alpha, rsLoRA, DoRA, experts, routing,
    and PEFT fields lorafleet does not implement), or None."""
    source = spec.adapter.init_from
    file = Path(source, "adapter_config.json")
    if not file.is_file():
        return f"adapter.init_from: no adapter_config.json in {source}"
    from actors.engine import check_init_settings
    from actors.mixlora import settings_from_export

    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            return f"adapter.init_from: {file} is not a JSON object"
        check_init_settings(spec.to_job_config().adapter, settings_from_export(saved, source), source)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # json, the adapter checks, unreadable file
        return str(exc) if str(exc).startswith("adapter.") else f"adapter.init_from: {exc}"
    return None
