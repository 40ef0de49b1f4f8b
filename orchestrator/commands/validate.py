"""``lorafleet validate A.yaml ...``: check job specs (and that their data files exist) without training."""

from __future__ import annotations

import argparse
from pathlib import Path

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
        if not Path(spec.data.path).is_file():
            problems.append(f"{path}: data.path: file not found: {spec.data.path}")
        if spec.eval is not None and spec.eval.data is not None and not Path(spec.eval.data).is_file():
            problems.append(f"{path}: eval.data: file not found: {spec.eval.data}")
        if spec.adapter.init_from and not Path(spec.adapter.init_from, "adapter_config.json").is_file():
            problems.append(f"{path}: adapter.init_from: no adapter_config.json in {spec.adapter.init_from}")
        if problems:
            bad += 1
            print("\n".join(problems))
        else:
            print(f"{path}: ok ({spec.name}, {spec.adapter.type}, base {spec.base_model})")
    return 1 if bad else 0
