"""``make demo``: the whole path a laptop user takes, on one machine.

1. start a local Ray cluster on 127.0.0.1 with 2 fake GPUs and the lorafleet controller
   (``lorafleet up --local --num-gpus 2``), with a private ``LORAFLEET_HOME`` under ``out/demo``;
2. submit four jobs through the Ray dashboard, as ``lorafleet submit`` does from a laptop: three
   LoRA jobs on different bundled tasks and one MixLoRA job on their mix, on the embedded
   SmolLM2-135M-Instruct; show live progress;
3. fetch the adapters, evaluate base vs each adapter on its held-out test split (all adapters in
   fused batches over one copy of the base model), print a summary and write ``out/demo/loss.png``;
4. stop the controller and the cluster it started.

``python -m orchestrator.demo --local`` trains the same jobs in this process instead
(``lorafleet train``, no cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JOBS = {  # job spec -> held-out test split
    "reverse": "examples/data/reverse.test.jsonl",
    "arith": "examples/data/arith.test.jsonl",
    "fanoutqa": "examples/data/fanoutqa.test.jsonl",
    "mix-mixlora": "examples/data/mix.test.jsonl",
}
OUT = ROOT / "out" / "demo"
EVAL_EXAMPLES = 40


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


def evaluate_before_after(adapters: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """Mean token loss of the base model and of each adapter on its task's test split, fused."""
    from actors.config import DataSettings
    from actors.data import load_examples
    from actors.engine import FusedEngine
    from actors.models import load_base_model

    model, tokenizer = load_base_model("builtin:smollm2-135m-instruct")
    engine = FusedEngine(model, tokenizer, base_model_id="builtin:smollm2-135m-instruct")
    for name, directory in adapters.items():
        engine.attach_adapter(name, directory)
    out = {}
    for name in adapters:
        data = DataSettings(str(ROOT / JOBS[name]), format="alpaca", max_seq_len=128)
        examples = load_examples(data, tokenizer)[:EVAL_EXAMPLES]
        (before, _), (after, _) = engine.evaluate([None, name], examples, micro_batch_size=8)
        out[name] = (before, after)
    return out


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
        console.rule("3. fetch adapters, evaluate base vs adapter on held-out data (fused)")
        adapters, records = {}, {}
        for job in jobs:
            records[job.name] = client.status(job.id)
            if records[job.name]["state"] == "SUCCEEDED":
                adapters[job.name] = client.fetch(job.id, OUT / "adapters" / job.name)
        evals = evaluate_before_after(adapters) if adapters else {}
        table = Table(title="lorafleet demo: 4 jobs fused on SmolLM2-135M-Instruct")
        for col in ("job", "adapter", "state", "steps", "final loss", "held-out loss before -> after", "adapter dir"):
            table.add_column(col)
        curves = {}
        for name, r in records.items():
            kind = "mixlora" if "mixlora" in name else "lora"
            before_after = "-"
            if name in evals:
                before, after = evals[name]
                before_after = f"{before:.3f} -> {after:.3f}"
                curves[name] = read_metrics(adapters[name])
            table.add_row(name, kind, r["state"], f"{r.get('step') or 0}/{r.get('total_steps') or '?'}",
                          f"{r['loss']:.3f}" if r.get("loss") is not None else "-", before_after,
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
