"""``lorafleet policy set FILE`` / ``lorafleet policy show`` / ``lorafleet policy explain JOB``: swap or
show the controller's scheduling policy at run time (running jobs are not stopped), or print the
policy's per-factor breakdown for one job, like Slurm's ``sprio``."""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.cli import UserError

HELP = "show the controller's scheduling policy, set a new one at run time, or explain a job's placement"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["set", "show", "explain"])
    parser.add_argument("file", nargs="?", help="policy YAML (for set); job id or name (for explain)")
    parser.add_argument("--address", default="auto",
                        help="Ray cluster address [auto]; show and explain also take the dashboard's "
                             "http://HOST:8265 (or RAY_ADDRESS set to it), as the laptop commands do")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.commands.up import head_policy_error, read_policy
    from policies import PolicyConfigError

    if args.action in ("set", "explain") and not args.file:
        raise UserError("policy set: give the policy YAML file" if args.action == "set" else "policy explain: give a job")
    if args.action == "show" and args.file:
        raise UserError(f"policy show: takes no argument (got {args.file!r}); it prints the controller's policy")
    doc = read_policy(args.file) if args.action == "set" else None
    from orchestrator.auth import client_api_key

    try:
        if args.action != "set" and _dashboard(args.address):  # a laptop: through the dashboard, as `status`
            from orchestrator.remote import Client, RemoteError

            try:
                remote = Client(None if args.address == "auto" else args.address)
                if args.action == "explain":
                    print(remote.explain(args.file))
                    return 0
                out = remote.policy()
            except RemoteError as err:
                raise UserError(str(err)) from None
        else:
            client.connect(args.address)
            if args.action == "explain":  # the job's owner or an admin
                print(client.call("explain", args.file, api_key=client_api_key()))
                return 0
            if doc is not None:  # admin-only once users exist
                out = client.call("set_policy", doc, api_key=client_api_key())
            else:
                out = client.call("get_policy")
    except PolicyConfigError as exc:  # the head parses it again and may not import what this machine does
        raise head_policy_error(exc, args.file) from None
    except (client.ClusterError, client.NoControllerError, ValueError, PermissionError, LookupError) as exc:
        raise UserError(str(exc)) from None
    for line in out.get("dry_run") or ():  # set: its invalid decisions on the current queue (skipped when live)
        print(f"warning: {line}", file=sys.stderr)
    notes = [out["failing"]] if out.get("failing") else []  # its schedule() fails: fifo places jobs meanwhile
    notes += [f"skipped decision: {line}" for line in out.get("skipped") or ()]  # the last pass's invalid ones
    print(policy_yaml(out["name"], out["config"]) + "".join(f"# {note}\n" for note in notes), end="")
    return 0


def _dashboard(address: str | None) -> bool:
    """Whether ``show`` / ``explain`` go through a Ray dashboard URL: ``--address http(s)://...``, or with
    ``auto`` a ``RAY_ADDRESS`` (or ``RAY_API_SERVER_ADDRESS``) URL as a laptop exports it."""
    from orchestrator.remote import ADDRESS_VARIABLES

    if address and address != "auto":
        return address.startswith(("http://", "https://"))
    return any(os.environ.get(name, "").strip().startswith(("http://", "https://")) for name in ADDRESS_VARIABLES)


def policy_yaml(name: str, config: dict | None) -> str:
    """The controller's policy as YAML ``lorafleet policy set`` reads back (the configuration as given,
    ``policy:`` first); a custom policy's own name, where it differs, as a comment."""
    import yaml

    doc = dict(config or {"policy": name})
    doc = {"policy": doc.pop("policy", name), **doc}
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    if doc["policy"] != name:
        text += f"# its name: {name}\n"
    return text
