"""``lorafleet admin add-user NAME [--admin] | remove-user NAME | users | whoami``: identities on a
shared cluster (``orchestrator.auth``). Runs where ``lorafleet up`` runs (it talks to the
controller through Ray). The first user must be an admin; afterwards only an admin, presenting
its key (``LORAFLEET_API_KEY`` or ``~/.lorafleet/api_key``), may add or remove users."""

from __future__ import annotations

import argparse

from orchestrator.cli import UserError

HELP = "users and API keys: add-user NAME [--admin] (prints the key once), remove-user NAME, users, whoami"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add-user", "remove-user", "users", "whoami"])
    parser.add_argument("name", nargs="?", help="user name (add-user, remove-user): [A-Za-z0-9._-]{1,64}")
    parser.add_argument("--admin", action="store_true", help="add-user: may act on every job, set the policy, stop")
    parser.add_argument("--key-file", metavar="FILE",
                        help="add-user: also write the new key to FILE (mode 600) instead of only printing it")
    parser.add_argument("--address", default="auto", help="Ray cluster address [auto]")


def run(args: argparse.Namespace) -> int:
    from orchestrator import client
    from orchestrator.auth import client_api_key, write_secret

    if args.action in ("add-user", "remove-user") and not args.name:
        raise UserError(f"admin {args.action}: give the user NAME")
    try:
        client.connect(args.address)
        key = client_api_key()
        if args.action == "add-user":
            out = client.call("add_user", args.name, admin=args.admin, api_key=key)
            role = "admin" if out["admin"] else "user"
            if args.key_file:
                path = write_secret(args.key_file, out["key"])
                print(f"added {role} {out['name']}; API key written to {path} (mode 600)")
            else:
                print(f"added {role} {out['name']}; API key (shown once, store it now):\n{out['key']}")
            print("the user sets LORAFLEET_API_KEY to it, or writes it to ~/.lorafleet/api_key (chmod 600)")
        elif args.action == "remove-user":
            client.call("remove_user", args.name, api_key=key)
            print(f"removed {args.name}: its key no longer works; its jobs keep their owner")
        elif args.action == "users":
            for u in client.call("list_users", api_key=key):
                print(f"{u['name']}\t{'admin' if u['admin'] else 'user'}")
        else:
            me = client.call("whoami", api_key=key)
            print(f"{me['name']} ({'admin' if me['admin'] else 'user'}, {me['mode']} mode)")
    except (client.ClusterError, client.NoControllerError, ValueError, LookupError, PermissionError) as exc:
        raise UserError(str(exc)) from None
    return 0
