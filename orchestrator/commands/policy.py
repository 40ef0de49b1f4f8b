"""``lorafleet policy set FILE`` / ``lorafleet policy show``: swap or show the controller's
scheduling policy at run time; running jobs are not stopped."""

from __future__ import annotations

import argparse
import json

from orchestrator.cli import UserError

HELP = "show the controller's scheduling policy, or set a new one at run time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["set", "show"])
    parser.add_argument("file", nargs="?", help="policy YAML (for set)")
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto]")


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.commands.up import read_policy

    if args.action == "set" and not args.file:
        raise UserError("policy set: give the policy YAML file")
    doc = read_policy(args.file) if args.action == "set" else None
    from orchestrator.auth import client_api_key

    try:
        client.connect(args.address)
        if doc is not None:  # admin-only once users exist
            out = client.call("set_policy", doc, api_key=client_api_key())
        else:
            out = client.call("get_policy")
    except (client.ClusterError, client.NoControllerError, ValueError, PermissionError) as exc:
        raise UserError(str(exc)) from None
    print(f"policy: {out['name']}")
    print(json.dumps(out["config"], indent=1, sort_keys=True))
    return 0
