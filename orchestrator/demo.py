"""``make demo``: the whole path a laptop user takes, on one machine.

1. start a local Ray cluster on 127.0.0.1 with 2 fake GPUs and the lorafleet controller
   (``lorafleet up --local --num-gpus 2``), with a private ``LORAFLEET_HOME`` under ``out/demo``;
2. submit four jobs through the Ray dashboard, as ``lorafleet submit`` does from a laptop: three
   LoRA jobs on different bundled tasks and one MixLoRA job on their mix, on the embedded
   SmolLM2-135M-Instruct; show live progress;
3. fetch the adapters and print a summary with each job's held-out evaluation (its spec's ``eval:``:
   loss and exact match, base vs adapter, run on the worker before the adapter leaves the engine);
   write ``out/demo/loss.png``;
4. stop the controller and the cluster it started.

``python -m orchestrator.demo --local`` trains the same jobs in this process instead
(``lorafleet train``, no cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("reverse", "arith", "fanoutqa", "mix-mixlora")  # examples/jobs/NAME.yaml
OUT = ROOT / "out" / "demo"


def spec_paths() -> list[str]:
    return [str(ROOT / "examples" / "jobs" / f"{name}.yaml") for name in JOBS]


def run_local() -> int:
    from orchestrator.cli import main as cli_main
    from orchestrator.plot import plot_losses, read_metrics
    from orchestrator.spec import load_spec

    code = cli_main(["train", *spec_paths()])
    curves = {}
    for path in spec_paths():
        spec = load_spec(path)
        if (Path(spec.output_dir()) / "metrics.jsonl").is_file():
            curves[spec.name] = read_metrics(spec.output_dir())
    print(f"loss curves: {plot_losses(curves, OUT / 'loss.png', title='lorafleet demo (local)')}")
    return code


def before_after(record: dict, metric: str, fmt: str = "{:.3f}") -> str:
    """``base -> adapter`` for one metric of a finished job's held-out evaluation (its spec's ``eval:``,
    run on the worker and stored with the job), or ``-``."""
    values = ((record.get("extra") or {}).get("eval") or {}).get("metrics", {}).get(metric) or {}
    base, adapter = values.get("base"), values.get("adapter")
    if not isinstance(base, int | float) or not isinstance(adapter, int | float):
        return "-"
    return f"{fmt.format(base)} -> {fmt.format(adapter)}"


def run_cluster(num_gpus: int) -> int:
    from orchestrator.cli import main as cli_main
    from orchestrator.commands.jobs import follow
    from orchestrator.plot import plot_losses, read_metrics
    from orchestrator.remote import Client

    console = Console()
    if not console.is_terminal:  # keep table rows on one line in log files
        console = Console(width=150)
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LORAFLEET_HOME", str(OUT / "home"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    home = Path(os.environ["LORAFLEET_HOME"])
    if (home / "local-cluster.json").exists():  # a previous demo was interrupted: stop what it started
        cli_main(["down", "--local"])
    console.rule("1. local Ray cluster (127.0.0.1, fake GPUs) and the lorafleet controller")
    if cli_main(["up", "--local", "--num-gpus", str(num_gpus),
                 "--store", str(OUT / "jobs.db"), "--storage", str(OUT / "storage")]) != 0:  # fmt: skip
        return 1
    try:
        url = json.loads((home / "local-cluster.json").read_text())["dashboard"]
        console.rule(f"2. submit 4 jobs through the Ray dashboard at {url}")
        client = Client(url, owner="demo")
        jobs = client.submit_many(spec_paths())
        for job in jobs:
            console.print(f"  {job.id}  {job.name}")
        code = follow(client, [j.id for j in jobs], poll_s=2.0)
        console.rule("3. fetch the adapters; held-out evaluation (each spec's eval:, run on the workers)")
        adapters, records = {}, {}
        # the copies an earlier demo fetched (their originals stay in storage/jobs/): fetch refuses to mix two
        shutil.rmtree(OUT / "adapters", ignore_errors=True)
        for job in jobs:
            records[job.name] = client.status(job.id)
            if records[job.name]["state"] == "SUCCEEDED":
                adapters[job.name] = client.fetch(job.id, OUT / "adapters" / job.name)
        table = Table(title="lorafleet demo: 4 jobs fused on SmolLM2-135M-Instruct (held-out: base -> adapter)")
        for col in ("job", "adapter", "state", "steps", "final loss", "held-out loss", "exact match", "adapter dir"):
            table.add_column(col)
        curves = {}
        for name, r in records.items():
            kind = "mixlora" if "mixlora" in name else "lora"
            if name in adapters and (adapters[name] / "metrics.jsonl").is_file():
                curves[name] = read_metrics(adapters[name])
            table.add_row(name, kind, r["state"], f"{r.get('step') or 0}/{r.get('total_steps') or '?'}",
                          f"{r['loss']:.3f}" if r.get("loss") is not None else "-", before_after(r, "loss"),
                          before_after(r, "exact_match", "{:.0%}"),
                          str(adapters.get(name, r.get("error") or "")))  # fmt: skip
        console.print(table)
        if curves:
            png = plot_losses(curves, OUT / "loss.png", title="lorafleet demo: training loss")
            console.print(f"loss curves: {png}")
        return code
    finally:
        console.rule("4. stop the controller and the local cluster")
        cli_main(["down", "--local"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="train in this process (no cluster)")
    parser.add_argument("--num-gpus", type=int, default=2, help="fake GPUs of the local cluster [2]")
    args = parser.parse_args()
    return run_local() if args.local else run_cluster(args.num_gpus)


if __name__ == "__main__":
    sys.exit(main())
