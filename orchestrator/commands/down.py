"""``lorafleet down [--local]``: stop the controller (jobs checkpoint and requeue; the store keeps
everything) and, with ``--local``, the Ray cluster ``lorafleet up --local`` started."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli import UserError

HELP = "stop the controller (and with --local the local Ray cluster); nothing recorded is lost"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto]")
    parser.add_argument("--local", action="store_true", help="also stop the local cluster `up --local` started")


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.auth import AccessError, client_api_key

    try:
        client.connect(args.address)
        out = client.stop_controller(api_key=client_api_key())
        print(f"controller stopped; {len(out.get('requeued', []))} running jobs checkpointed and requeued")
        if out.get("warning"):
            print(f"warning: {out['warning']}", file=sys.stderr)
    except AccessError as exc:
        raise UserError(str(exc)) from None
    except (client.ClusterError, client.NoControllerError) as exc:
        if not args.local:
            raise UserError(str(exc)) from None
        print(f"note: {exc}")
    if args.local:
        import ray

        ray.shutdown()
        try:
            stopped = client.stop_local_cluster()
        except client.ClusterError as exc:
            raise UserError(str(exc)) from None
        removed = f"; deleted its temp dir {stopped['temp_dir']}" if stopped["removed"] else ""
        print(f"local Ray cluster stopped (pids {stopped['pids']}){removed}")
        if stopped.get("warning"):
            print(f"warning: {stopped['warning']}", file=sys.stderr)
    return 0
