"""``lorafleet policy set FILE`` / ``lorafleet policy show`` / ``lorafleet policy explain JOB``: swap or
show the controller's scheduling policy at run time (running jobs are not stopped), or print the
policy's per-factor breakdown for one job, like Slurm's ``sprio``."""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.cli import UserError

HELP = "show the controller's scheduling policy, set a new one at run time, or explain a job's placement"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["set", "show", "explain"])
    parser.add_argument("file", nargs="?", help="policy YAML (for set); job id or name (for explain)")
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto]")


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.commands.up import read_policy

    if args.action in ("set", "explain") and not args.file:
        raise UserError("policy set: give the policy YAML file" if args.action == "set" else "policy explain: give a job")
    doc = read_policy(args.file) if args.action == "set" else None
    from orchestrator.auth import client_api_key

    try:
        client.connect(args.address)
        if args.action == "explain":  # the job's owner or an admin
            print(client.call("explain", args.file, api_key=client_api_key()))
            return 0
        if doc is not None:  # admin-only once users exist
            out = client.call("set_policy", doc, api_key=client_api_key())
        else:
            out = client.call("get_policy")
    except (client.ClusterError, client.NoControllerError, ValueError, PermissionError, LookupError) as exc:
        raise UserError(str(exc)) from None
    for line in out.get("dry_run") or ():  # set: its invalid decisions on the current queue (skipped when live)
        print(f"warning: {line}", file=sys.stderr)
    print(f"policy: {out['name']}")
    if out.get("failing"):  # its schedule() fails: fifo places jobs meanwhile (the controller's _decide)
        print(out["failing"])
    for line in out.get("skipped") or ():  # its invalid decisions of the last pass, each skipped
        print(f"skipped decision: {line}")
    print(json.dumps(out["config"], indent=1, sort_keys=True))
    return 0
