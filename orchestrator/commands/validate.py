"""``lorafleet validate A.yaml ...``: check job specs, their data files' records and their ``eval:`` sections
without a model (tokenisation is checked when a job joins)."""

from __future__ import annotations

import argparse
from pathlib import Path

from actors.data import DataError, check_records
from actors.evaluate import check_eval
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
        problems = []
        try:
            records = check_records(spec.to_job_config().data)  # files, formats, fields (no tokenizer needed)
        except DataError as exc:
            problems.append(f"{path}: {exc}")
            records = 0
        if records and spec.eval is not None:
            try:
                check_eval(spec.to_job_config())
            except DataError as exc:
                problems.append(f"{path}: {exc}")
        if spec.adapter.init_from and not Path(spec.adapter.init_from, "adapter_config.json").is_file():
            problems.append(f"{path}: adapter.init_from: no adapter_config.json in {spec.adapter.init_from}")
        if problems:
            bad += 1
            print("\n".join(problems))
        else:
            print(f"{path}: ok ({spec.name}, {spec.adapter.type}, base {spec.base_model})")
    return 1 if bad else 0
