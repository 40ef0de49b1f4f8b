"""``lorafleet up``: start (or reattach to) the controller on a Ray cluster.

``lorafleet up --local --num-gpus 2`` first starts a single-machine Ray cluster bound to
127.0.0.1 (fake GPUs allowed); ``--auth token`` turns on Ray token authentication for it.
Admission settings (``--allow-path-prefix``, ``--allow-remote-code``, ``--max-upload-bytes``)
and ``--worker-tflops`` (the workers' speed the policy assumes) apply when the controller starts. See docs/cluster.md and docs/admin.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from actors.config import EngineSettings
from orchestrator.cli import UserError
from orchestrator.commands.engine_flags import add_engine_arguments, engine_options

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
                        help="CPU workers: peak RSS above this counts as an OOM, and the scheduler sizes "
                             "each worker (also one not started yet) at it")  # fmt: skip
    add_engine_arguments(parser, "workers: ")
    parser.add_argument("--auth", choices=["disabled", "token"], default="disabled",
                        help="with --local: Ray token authentication; token: a fresh token in "
                             "~/.lorafleet/ray-auth-token (mode 600) [disabled]")
    parser.add_argument("--allow-path-prefix", action="append", default=[], metavar="DIR",
                        help="absolute directory (or URI prefix) that job data, and with users a local base_model, "
                        "may name besides uploads; repeatable")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="admit specs with trust_remote_code: true (runs Python shipped with models)")
    parser.add_argument("--max-upload-bytes", type=int, default=None, metavar="BYTES",
                        help="largest uploaded data file [1 GiB]")
    parser.add_argument("--worker-tflops", type=float, default=None, metavar="TFLOPS",
                        help="peak bf16 TFLOP/s of each GPU, as the policy sees workers and estimates the work of "
                        "jobs that have not reported yet (A100 312, H100 989; as in `lorafleet simulate`'s "
                        "cluster YAML) [100]")


def read_policy(path: str) -> dict:
    """The policy YAML as a dict, validated here so errors show before anything starts.

    Read as ``lorafleet simulate --policy`` reads one (``policies.values.read_yaml``): a missing file,
    bytes that are not UTF-8, bad YAML, a huge integer or deep nesting are one-line errors naming the file.
    An invalid one is refused with every problem at once; warnings (``policies.config.config_warnings``)
    are printed to stderr.
    """
    from policies import PolicyConfigError, parse_policy_config
    from policies.values import read_yaml

    warnings: list[str] = []
    try:
        doc = read_yaml(path, PolicyConfigError)
        parse_policy_config(doc, source=path, warnings=warnings)
    except PolicyConfigError as exc:  # its lines already name the file and the field, every problem one line
        raise UserError(str(exc)) from None
    for line in warnings:  # valid but probably not meant (a quota of 0 blocks an owner): said, not refused
        print(f"warning: {line}", file=sys.stderr)
    return doc  # a mapping: parse_policy_config refuses anything else


def head_policy_error(exc: ValueError, path: str) -> UserError:
    """The controller's refusal of a policy this machine accepted (``set_policy`` parses it again
    on the head, its lines prefixed ``policy: ``): each line names ``path`` instead, once, and a
    module the head cannot import says where it must be importable."""
    lines = getattr(exc, "errors", None) or str(exc).splitlines()
    out = []
    for line in lines:
        line = line.removeprefix("policy: ")  # the controller's source name (Controller.set_policy)
        if "cannot import module" in line:
            line += " (this machine imports it, the head does not: install it on the head or put it on the head's PYTHONPATH)"
        out.append(f"{path}: on the head: {line}")
    return UserError("\n".join(out))


def worker_options_from(args: argparse.Namespace) -> dict:
    """The ``TrainingWorker`` keyword arguments ``up``'s flags ask for (only those that differ from the defaults)."""
    options: dict = {}
    if args.memory_budget is not None:
        options["memory_budget_bytes"] = args.memory_budget
    return {**options, **engine_options(args)}


def run(args: argparse.Namespace) -> int:
    from orchestrator import client

    policy = read_policy(args.policy) if args.policy else None
    if args.num_gpus is not None and not args.local:
        raise UserError("--num-gpus only applies with --local (a running cluster has its own GPUs)")
    if args.auth != "disabled" and not args.local:
        raise UserError("--auth only applies with --local; a running cluster's token auth is set where Ray "
                        "starts (RAY_AUTH_MODE=token, docs/admin.md)")
    address = args.address
    if args.local:
        try:
            state = client.start_local_cluster(num_gpus=args.num_gpus or 0, num_cpus=args.num_cpus, port=args.port,
                                               auth=args.auth)
        except client.ClusterError as exc:
            raise UserError(str(exc)) from None
        address = state["address"]
        print(f"local Ray cluster at {address}, dashboard {state['dashboard']} "
              f"(pids {state['pids']}, temp dir {state['temp_dir']})")
        if state.get("token_path"):
            print(f"Ray token authentication on: token in {state['token_path']} (mode 600); clients set "
                  f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state['token_path']}")  # fmt: skip
        client.use_local_auth(state)
    try:
        client.connect(address)
    except client.ClusterError as exc:
        raise UserError(str(exc)) from None
    options: dict = {}
    worker_options = worker_options_from(args)
    if worker_options:
        options["worker_options"] = worker_options
    if args.memory_budget is not None:  # the GPUs without a worker yet are sized as their workers will report
        options["worker_memory_bytes"] = args.memory_budget
    if args.allow_path_prefix:
        options["allowed_prefixes"] = list(args.allow_path_prefix)
    if args.allow_remote_code:
        options["allow_remote_code"] = True
    if args.max_upload_bytes is not None:
        options["max_upload_bytes"] = args.max_upload_bytes
    if args.worker_tflops is not None:
        if not 0 < args.worker_tflops < float("inf"):
            raise UserError(f"--worker-tflops: must be a number > 0 (got {args.worker_tflops:g})")
        options["worker_tflops"] = args.worker_tflops
    from orchestrator.auth import client_api_key

    try:
        _handle, started = client.start_controller(
            args.store or client.DEFAULT_STORE, args.storage or client.DEFAULT_STORAGE, policy,
            api_key=client_api_key(), **options,
        )
    except PermissionError as exc:  # reattaching with --policy needs an admin key once users exist
        raise UserError(str(exc)) from None
    except ValueError as exc:  # reattaching with --policy: the head refused what this machine accepted
        from policies import PolicyConfigError

        if isinstance(exc, PolicyConfigError) and args.policy:
            raise head_policy_error(exc, args.policy) from None
        raise UserError(f"{args.policy}: {exc}" if args.policy else str(exc)) from None  # e.g. its dry run
    info = client.call("ping")
    verb = "started" if started else "reattached to"
    print(f"{verb} controller (policy {info['policy']}, store {info['store']}, storage {info['storage']}, "
          f"{info['recovered']} jobs recovered)")  # fmt: skip
    print(f"admission: {info['auth']} mode, path prefixes {info['allowed_prefixes'] or 'none'}, "
          f"remote code {'allowed' if info['allow_remote_code'] else 'refused'}, "
          f"uploads up to {info['max_upload_bytes']} bytes, workers at {info.get('worker_tflops', 100.0):g} TFLOP/s"
          + ("" if started else " (a running controller keeps its settings)"))  # fmt: skip
    engine = {**dataclasses.asdict(EngineSettings()), **info.get("worker_engine", {})}
    print("workers' fused step: " + ", ".join(f"{k.replace('_', ' ')} {'on' if v else 'off'}" for k, v in engine.items()))
    if args.local:
        print("lorafleet submit/status/... and Client() with this LORAFLEET_HOME use this cluster's dashboard "
              "by themselves; elsewhere (another LORAFLEET_HOME, `ray job submit`):")  # fmt: skip
        print(f"export RAY_ADDRESS={state['dashboard']}")
    return 0
