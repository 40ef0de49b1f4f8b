"""Laptop commands over Ray Job Submission: submit, list, status, logs, cancel, retry, wait, fetch, plot.

One module serves these subcommands (``COMMANDS`` maps each to it); the subcommand's name is the
last word of its parser's ``prog``. Every one takes ``--address`` (else ``RAY_API_SERVER_ADDRESS`` /
``RAY_ADDRESS``, else the dashboard of the running local cluster ``lorafleet up --local`` recorded in
``LORAFLEET_HOME``, else http://127.0.0.1:8265: ``remote.address_and_source``), ``--token`` (else
Ray's own token variables) and ``--owner`` (else ``LORAFLEET_OWNER`` or the login name). On a cluster with users the API key comes
from ``LORAFLEET_API_KEY`` / ``LORAFLEET_API_KEY_FILE`` / ``~/.lorafleet/api_key`` (never a flag:
command lines are visible to other local users) and decides the owner.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from orchestrator.cli import UserError
from orchestrator.progress import ProgressView, fmt_duration, fmt_float, log_console, summary_table
from orchestrator.remote import TERMINAL, Client, RemoteError
from orchestrator.spec import SpecError

HELP = "laptop commands over Ray Job Submission"


def _command(parser: argparse.ArgumentParser) -> str:
    return parser.prog.rsplit(" ", 1)[-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray dashboard address, e.g. http://HEAD:8265 [RAY_ADDRESS, else the "
                        "local cluster `lorafleet up --local` started, else http://127.0.0.1:8265]")
    parser.add_argument("--token", help="Ray auth token (default: RAY_AUTH_TOKEN / ~/.ray/auth_token)")
    parser.add_argument("--owner", help="your identity on a single-user cluster (default: LORAFLEET_OWNER or login); "
                        "with an API key the key decides, and only an admin may name another owner")
    command = _command(parser)
    if command == "submit":
        parser.add_argument("specs", nargs="+", metavar="SPEC")
        parser.add_argument("--wait", action="store_true", help="follow the jobs; exit 1 if one fails")
    elif command == "list":
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--all", action="store_true", help=ALL_HELP)
        parser.add_argument("--limit", type=_count, default=LIST_LIMIT,
                            help=f"the newest N jobs (default {LIST_LIMIT}; 0: all, slow on a store of 10^4 jobs)")
    elif command == "status":
        parser.add_argument("job", nargs="?", help="job id or name (default: your newest jobs)")
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--all", action="store_true", help="without a job: " + ALL_HELP)
        parser.add_argument("--limit", type=_count, default=LIST_LIMIT,
                            help=f"without a job: the newest N (default {LIST_LIMIT}; 0: all)")
    elif command == "logs":
        parser.add_argument("job")
        parser.add_argument("-f", "--follow", action="store_true",
                            help="then print each new line once, in order, until the job ends")
        parser.add_argument("-n", "--lines", type=_count, default=50,
                            help="print the last N lines first (default 50; 0: none, with -f only the new "
                                 "ones; the controller keeps the last 200)")
    elif command in ("cancel", "wait"):
        parser.add_argument("job")
    elif command == "retry":
        parser.add_argument("jobs", nargs="+", metavar="JOB", help="FAILED or CANCELLED jobs (ids or names), each queued again under its id: it "
                            "resumes from its newest checkpoint (at most train.checkpoint_every steps are lost). "
                            "It runs the same spec on the same files: data you uploaded from this machine is the "
                            "copy made at submission (to change data or any field, submit a new job)")
    elif command == "fetch":
        parser.add_argument("job")
        parser.add_argument("dest")
        parser.add_argument("--replace", action="store_true",
                            help="DEST holds something else (another job's adapter, other files): move it to "
                                 "DEST.previous-<time> and fetch into DEST (default: refuse, write nothing)")
    elif command == "plot":
        parser.add_argument("jobs", nargs="+", metavar="JOB")
        parser.add_argument("-o", "--output", default="loss.png")


ALL_HELP = ("every owner's jobs, not only yours (another owner's job shows only its public fields: id, name, "
            "owner, state, priority, times, worker; an admin sees everything)")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of lines (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        client = Client(args.address, token=args.token, owner=args.owner)
        if client.address_source == "local cluster":  # not the default: say which cluster this talks to
            print(f"(the local cluster `lorafleet up --local` started: {client.address})", file=sys.stderr)
        return HANDLERS[args.command](client, args)
    except SpecError as err:
        raise UserError("\n".join(err.errors)) from None
    except RemoteError as err:
        raise UserError(str(err)) from None


def _row(record: dict) -> dict:
    row = {k: record.get(k) for k in ("id", "name", "state", "step", "total_steps", "loss", "tokens_per_s",
                                       "worker", "priority", "owner", "error", "output")}  # fmt: skip
    row["eval"] = (record.get("extra") or {}).get("eval")
    if record.get("redacted"):  # `--all`: another owner's job, its private fields withheld (not unknown)
        row = {k: v for k, v in row.items() if k in record}
        row["redacted"] = True
    if record.get("waiting"):  # why a queued job of the caller's cannot start anywhere
        row["waiting"] = record["waiting"]
    return row


def eval_lines(evaluation: dict | None) -> list[str]:
    """The held-out evaluation of a finished job (its spec's ``eval:``) as ``metric: base -> adapter`` lines."""
    if not evaluation:
        return []
    if evaluation.get("error"):
        return [f"eval: {evaluation['error']}"]
    took = ""
    if isinstance(evaluation.get("seconds"), int | float):
        took = f" in {evaluation['seconds']:.0f} s, jobs beside it trained {evaluation.get('trained_steps_meanwhile', 0)} steps meanwhile"
    lines = [f"eval on {evaluation.get('examples', '?')} held-out examples{took} (base -> adapter):"]
    metrics = evaluation.get("metrics") or {}
    order = ["loss", "perplexity", "exact_match", "multiple_choice"]
    for metric in sorted(metrics, key=lambda m: (order.index(m) if m in order else len(order), m)):
        base, adapter = metrics[metric].get("base"), metrics[metric].get("adapter")
        if isinstance(base, int | float) and isinstance(adapter, int | float):
            lines.append(f"  {metric}: {base:.4f} -> {adapter:.4f}")
    return lines


def _eta(record: dict) -> str:
    step, total, start = record.get("step") or 0, record.get("total_steps"), record.get("start_time")
    if not (step and total and start) or record["state"] in TERMINAL:
        return "-"
    return fmt_duration((time.time() - start) / step * (total - step))


COLUMNS = ("id", "name", "state", "step", "loss", "tok/s", "ETA", "worker", "prio", "owner")


def _cells(r: dict) -> list[str]:
    if r.get("redacted"):  # another owner's job (`--all`): its progress is not shown to you
        return [str(r["id"]), str(r["name"]), str(r["state"]), "-", "-", "-", "-", str(r.get("worker") or "-"),
                str(r.get("priority", 0)), str(r.get("owner") or "-")]  # fmt: skip
    return [str(r["id"]), str(r["name"]), str(r["state"]), f"{r.get('step') or 0}/{r.get('total_steps') or '?'}",
            fmt_float(r.get("loss")), fmt_float(r.get("tokens_per_s"), 0), _eta(r), str(r.get("worker") or "-"),
            str(r.get("priority", 0)), str(r.get("owner") or "-")]  # fmt: skip


def _table(records: list[dict]) -> tuple[Table, int]:
    """The jobs as a table whose id and name columns are never cut (the id is what status, logs,
    cancel and fetch take), and the narrowest width it fits: the other columns wrap down to
    ``SOFT_MIN_WIDTH`` characters to fit a terminal."""
    rows = [_cells(r) for r in records]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    need = 2 * (len(COLUMNS) - 1)  # two spaces between columns
    for i, col in enumerate(COLUMNS):
        longest = max([len(col), *(len(row[i]) for row in rows)])
        if i < 2:
            table.add_column(col, no_wrap=True, min_width=longest)
            need += longest
        else:
            table.add_column(col, overflow="fold", min_width=min(longest, SOFT_MIN_WIDTH))
            need += min(longest, SOFT_MIN_WIDTH)
    for row in rows:
        table.add_row(*row)
    return table, need


SOFT_MIN_WIDTH = 4


def print_jobs(records: list[dict], console: Console | None = None, notes: bool = False) -> None:
    """The jobs table on a terminal; elsewhere (a pipe, a file) a header and one tab-separated line
    per job, never wrapped nor cut. On a terminal narrower than the id and name columns and the
    narrowest other columns, lines run past its edge (it wraps them) rather than cut an id
    (``console``'s width is raised to what the table needs). ``notes``: on a terminal, a line under
    the table for each queued job that says why it waits (the tab-separated form stays one line per job)."""
    console = console or Console()
    if not console.is_terminal:
        for row in [list(COLUMNS), *(_cells(r) for r in records)]:
            console.file.write("\t".join(" ".join(cell.split()) or "-" for cell in row) + "\n")
        console.file.flush()
        return
    table, need = _table(records)
    if console.width < need:
        console.width = need  # print() caps a table at the console's width
    console.print(table, crop=False)
    for r in records if notes else ():  # `status JOB` prints its job's note with its events
        if r.get("waiting"):
            console.print(f"{r['id']} ({r.get('name')}) waiting: {r['waiting']}", markup=False, highlight=False,
                          crop=False, soft_wrap=True)  # fmt: skip


def do_submit(client: Client, args: argparse.Namespace) -> int:
    import warnings

    from orchestrator.checks import SpecWarning

    with warnings.catch_warnings(record=True) as caught:  # printed once each, as a line (not Python's form)
        warnings.simplefilter("always", SpecWarning)
        try:
            jobs = client.submit_many(args.specs)
        finally:
            for warning in caught:
                if issubclass(warning.category, SpecWarning):
                    print(f"lorafleet submit: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    for job in jobs:
        print(f"{job.id}\t{job.name}")
    if not args.wait:
        return 0
    return follow(client, [j.id for j in jobs])


def follow(client: Client, job_ids: list[str], poll_s: float = 3.0) -> int:
    """Live progress bars until every job ends; 1 if any did not succeed."""
    console = log_console()
    final: dict[str, dict] = {}
    labels: dict[str, str] = {}  # job id -> row label (the name, or "name (id)" if names repeat)
    with ProgressView(console) as view:
        while len(final) < len(job_ids):
            for job_id in job_ids:
                if job_id in final:
                    continue
                r = client.status(job_id)
                if job_id not in labels:
                    label = r["name"] if r["name"] not in labels.values() else f"{r['name']} ({job_id})"
                    labels[job_id] = label
                    view.add(label, r.get("total_steps") or 0)
                view.update(labels[job_id], step=r.get("step") or 0, total_steps=r.get("total_steps") or 0,
                            loss=r.get("loss"), tokens_per_s=r.get("tokens_per_s"), state=r["state"].lower(),
                            message=r.get("error") or "", output=r.get("output"))  # fmt: skip
                if r["state"] in TERMINAL:
                    final[job_id] = r
                    view.jobs[labels[job_id]].eval = (r.get("extra") or {}).get("eval")  # the worker's eval: result
            if len(final) < len(job_ids):
                time.sleep(poll_s)
    console.print(summary_table(list(view.jobs.values())))
    failed = [final[job_id] for job_id in job_ids if final[job_id]["state"] == "FAILED"]
    for line in retry_hints(failed):
        console.print(line)
    return 0 if all(r["state"] == "SUCCEEDED" for r in final.values()) else 1


def retry_hints(failed: list[dict]) -> list[str]:
    """What the follow and wait commands print after failed jobs: how to retry those a retry can
    help, and that a job failed on its own spec (a target its base model lacks) needs a corrected one."""
    spec = [r["id"] for r in failed if (r.get("extra") or {}).get("spec_error")]
    rest = [r["id"] for r in failed if r["id"] not in spec]
    lines = []
    if rest:
        jobs = " ".join(rest) if len(rest) <= 3 else "JOB..."
        lines.append(f"once the cause is fixed, `lorafleet retry {jobs}` queues each failed job again; it resumes "
                     "from its newest checkpoint with the same spec and files (data uploaded from a laptop is the "
                     "copy made at submission: to change it, submit the job again)")  # fmt: skip
    if spec:
        lines.append(f"{' '.join(spec)}: failed on the spec itself (see the error); a retry would run the same spec: "
                     "fix it and submit it as a new job")  # fmt: skip
    return lines


LIST_LIMIT = 100  # the store keeps every job: listing 10^4 took ~1 s, 10^5 ~10 s


def _newest(client: Client, limit: int, all_owners: bool = False) -> list[dict]:
    """The caller's (``all_owners``: everyone's) newest ``limit`` jobs (0: all); a note on stderr
    when there are more."""
    limit_arg = limit + 1 if limit else None
    records = client.list(limit=limit_arg, all=True) if all_owners else client.list(limit=limit_arg)
    if limit and len(records) > limit:
        records = records[:limit]
        print(f"(the newest {limit} jobs; --limit 0 lists all)", file=sys.stderr)
    return records


def do_list(client: Client, args: argparse.Namespace) -> int:
    records = _newest(client, args.limit, getattr(args, "all", False))
    if args.json:
        print(json.dumps([_row(r) for r in records], indent=2))
    else:
        print_jobs(records, notes=True)
    return 0


def do_status(client: Client, args: argparse.Namespace) -> int:
    if args.job and getattr(args, "all", False):
        raise UserError(f"--all: lists every owner's jobs, so it takes no JOB (got {args.job!r}); "
                        "drop one of them")  # fmt: skip
    records = [client.status(args.job)] if args.job else _newest(client, args.limit, getattr(args, "all", False))
    if args.json:
        print(json.dumps([_row(r) for r in records], indent=2))
        return 0
    print_jobs(records, notes=not args.job)
    if args.job:
        for event in records[0].get("events", []):
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            print(f"  {stamp} {event['from'] or '-'} -> {event['to']}  {event.get('reason') or ''}")
        if records[0].get("error"):
            print(f"  error: {records[0]['error']}")
        if (records[0].get("extra") or {}).get("spec_error") and records[0]["state"] == "FAILED":
            print("  retry: none; it failed on the spec itself: fix it and submit it as a new job")
        elif records[0]["state"] in ("FAILED", "CANCELLED"):
            step = records[0].get("checkpoint_step")
            where = f"from checkpoint step {step}" if step else "from step 0 (no checkpoint)"
            print(f"  retry: `lorafleet retry {records[0]['id']}` queues it again, {where}")
        if records[0].get("waiting"):
            print(f"  waiting: {records[0]['waiting']}")
        for line in eval_lines((records[0].get("extra") or {}).get("eval")):
            print(f"  {line}")
    return 0


def do_logs(client: Client, args: argparse.Namespace, poll_s: float = 3.0) -> int:
    """The last ``-n`` lines; with ``-f`` then every new line exactly once, in order, until the job ends.

    The controller keeps a sliding window of numbered lines (``Controller.logs_since``): each page
    asks for the lines after the last one printed, so a window that slid between two polls repeats
    nothing; lines it dropped before they could be fetched are counted on stderr.
    """
    job, since, epoch = args.job, None, None
    ended = False
    while True:
        page = client.logs_since(job, since=since, epoch=epoch, lines=args.lines)
        job = page["id"]  # a name resolves once: a later job of that name is not this one
        if page["missed"]:
            print(f"[{page['missed']} lines no longer kept by the controller]", file=sys.stderr, flush=True)
        for line in page["lines"]:
            print(line, flush=True)
        since, epoch = page["next"], page["epoch"]
        if not args.follow or ended:
            return 0
        # The state is read before the lines: one more page after the end gets the last lines.
        ended = page["state"] in TERMINAL
        if not ended:
            time.sleep(poll_s)


def do_cancel(client: Client, args: argparse.Namespace) -> int:
    r = client.cancel(args.job)
    ended = "\t(had already ended: nothing to cancel)" if r.get("already_ended") else ""
    print(f"{r['id']}\t{r['name']}\t{r['state']}{ended}")
    return 0


def do_retry(client: Client, args: argparse.Namespace) -> int:
    """Each job in turn; one that is refused is reported (stderr) and the others are still retried."""
    refused = 0
    for job in args.jobs:
        try:
            r = client.retry(job)
        except RemoteError as err:
            if len(args.jobs) == 1:
                raise
            print(f"{job}: {err}", file=sys.stderr)
            refused += 1
            continue
        if r.get("already_live"):
            print(f"{r['id']}\t{r['name']}\t{r['state']}\t(still live: nothing to retry)")
            continue
        step = r.get("resume_step") or 0
        where = f"resumes from checkpoint step {step}" if step else "starts from step 0 (it wrote no checkpoint)"
        print(f"{r['id']}\t{r['name']}\t{r['state']}\t{where}; follow it with `lorafleet logs -f {r['id']}`")
    return 2 if refused else 0


def do_wait(client: Client, args: argparse.Namespace) -> int:
    r = client.wait(args.job)
    print(f"{r['id']}\t{r['name']}\t{r['state']}" + (f"\t{r['error']}" if r.get("error") else ""))
    if r["state"] == "FAILED":
        for line in retry_hints([r]):
            print(line, file=sys.stderr)
    return 0 if r["state"] == "SUCCEEDED" else 1


def do_fetch(client: Client, args: argparse.Namespace) -> int:
    dest = client.fetch(args.job, args.dest, replace=args.replace)
    print(f"adapter of {args.job} in {dest} ({load_hint(dest)})")
    return 0


def load_hint(dest: Path) -> str:
    """How to load the adapter in ``dest``: PEFT for LoRA, lorafleet or the mixlora package for MixLoRA."""
    try:
        kind = json.loads((dest / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind == "MIXLORA":
        return (f"MixLoRA: lorafleet eval --adapter {dest} ..., or the mixlora package after saving "
                "adapter_model.safetensors as adapter_model.bin: docs/mixlora.md")
    return f"load with peft.PeftModel.from_pretrained(base, '{dest}')"


def do_plot(client: Client, args: argparse.Namespace) -> int:
    """Loss curves: a finished job's metrics.jsonl (fetched), a live or ended one's records as the
    controller has them (``Controller.job_metrics``: its metrics.jsonl, or the steps it polled)."""
    from orchestrator.plot import plot_losses, read_metrics

    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs:
            record = client.status(job)
            if record["state"] == "SUCCEEDED":
                curves[record["name"]] = read_metrics(client.fetch(job, f"{tmp}/{record['id']}"))
            else:
                curves[record["name"]] = client.job_metrics(record["id"])
            if not any(r.get("loss") is not None for r in curves[record["name"]]):
                print(f"{record['name']} ({record['id']}, {record['state']}): no loss recorded yet",
                      file=sys.stderr)  # fmt: skip
    out = plot_losses(curves, args.output)
    print(f"wrote {out}", file=sys.stderr)
    return 0


HANDLERS = {"submit": do_submit, "list": do_list, "status": do_status, "logs": do_logs, "cancel": do_cancel,
            "retry": do_retry, "wait": do_wait, "fetch": do_fetch, "plot": do_plot}  # fmt: skip
