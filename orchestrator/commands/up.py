"""``lorafleet up``: start (or reattach to) the controller on a Ray cluster.

``lorafleet up --local --num-gpus 2`` first starts a single-machine Ray cluster bound to
127.0.0.1 (fake GPUs allowed). See docs/cluster.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from orchestrator.cli import UserError

HELP = "start (or reattach to) the lorafleet controller on a Ray cluster"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto: the one this machine runs]")
    parser.add_argument("--local", action="store_true", help="first start a one-machine Ray cluster on 127.0.0.1")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="with --local: GPUs the cluster advertises (fake ones allowed) [0]")
    parser.add_argument("--num-cpus", type=int, default=None, help="with --local: CPUs the cluster advertises")
    parser.add_argument("--port", type=int, default=0, help="with --local: GCS port [0: a free one]")
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (docs/policies.md) [the saved one, else fifo]")
    parser.add_argument("--store", default=None, help="job store (SQLite) on the head node [~/.lorafleet/jobs.db]")
    parser.add_argument("--storage", default=None,
                        help="artifact root: a path, or a pyarrow URI (s3://, gs://, file://) [~/.lorafleet/storage]")
    parser.add_argument("--memory-budget", type=int, default=None, metavar="BYTES",
                        help="CPU workers: peak RSS above this counts as an OOM")


def read_policy(path: str) -> dict:
    """The policy YAML as a dict, validated here so errors show before anything starts."""
    from policies import PolicyConfigError, parse_policy_config

    try:
        doc = yaml.safe_load(Path(path).read_text())
        parse_policy_config(doc, source=path)
    except OSError as exc:
        raise UserError(f"--policy: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    except PolicyConfigError as exc:  # its message already names the file and the field
        raise UserError(str(exc)) from None
    return doc


def run(args: argparse.Namespace) -> int:
    from orchestrator import client

    policy = read_policy(args.policy) if args.policy else None
    if args.num_gpus is not None and not args.local:
        raise UserError("--num-gpus only applies with --local (a running cluster has its own GPUs)")
    address = args.address
    if args.local:
        try:
            state = client.start_local_cluster(num_gpus=args.num_gpus or 0, num_cpus=args.num_cpus, port=args.port)
        except client.ClusterError as exc:
            raise UserError(str(exc)) from None
        address = state["address"]
        print(f"local Ray cluster at {address}, dashboard {state['dashboard']} "
              f"(pids {state['pids']}, temp dir {state['temp_dir']})")
    try:
        client.connect(address)
    except client.ClusterError as exc:
        raise UserError(str(exc)) from None
    options = {}
    if args.memory_budget is not None:
        options["worker_options"] = {"memory_budget_bytes": args.memory_budget}
    _handle, started = client.start_controller(
        args.store or client.DEFAULT_STORE, args.storage or client.DEFAULT_STORAGE, policy, **options
    )
    info = client.call("ping")
    verb = "started" if started else "reattached to"
    print(f"{verb} controller (policy {info['policy']}, store {info['store']}, storage {info['storage']}, "
          f"{info['recovered']} jobs recovered)")  # fmt: skip
    return 0
