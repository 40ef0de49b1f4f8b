"""``make quality``: do the adapters really get better? A measured report on the embedded model.

On SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``) this trains, all FUSED in one engine
over one copy of the base model:

* single-task LoRA and single-task MixLoRA adapters on each of three bundled tasks
  (``reverse`` and ``arith``: synthetic, exact answers; ``fanoutqa``: real FanOutQA questions);
* one multi-task LoRA and one multi-task MixLoRA adapter on the shuffled mix of the three tasks'
  train splits;

then evaluates the base model and all eight adapters on each task's held-out test split (greedy
generation, exact match; again one fused batch per chunk, each row with its own adapter) and writes

* ``out/quality/report.md``: the table (per task and average; base, LoRA, MixLoRA; single-task
  and multi-task) plus held-out loss and the settings used;
* ``out/quality/quality.png``: the same numbers as a bar chart;
* ``out/quality/results.json``: every number, machine-readable.

Training resumes from checkpoints when interrupted (rerun the command). Settings are fixed here,
the same for every adapter kind, chosen before looking at the results: nothing is tuned to make
one kind win. Usage::

    python -m orchestrator.quality [--steps 100] [--eval-examples 100] [--out out/quality] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
BASE_MODEL = "builtin:smollm2-135m-instruct"
TASKS = {  # task -> (exact-match normalisation, synthetic?)
    "reverse": ("exact", True),
    "arith": ("exact", True),
    "fanoutqa": ("squad", False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # kind -> adapter section; same rank, alpha and targets for both kinds
    "lora": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS},
    "mixlora": {
        "type": "mixlora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS,
        "num_experts": 4, "top_k": 2,
    },
}  # fmt: skip
MIX_SEED = 7
LOSS_EXAMPLES = 50  # held-out loss on the first 50 test examples (exact match uses all --eval-examples)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_mix(out: Path) -> Path:
    """The multi-task training set: every train record of the three tasks, shuffled (fixed seed)."""
    records = [r for task in TASKS for r in _read_jsonl(DATA / f"{task}.train.jsonl")]
    random.Random(MIX_SEED).shuffle(records)
    path = out / "data" / "mix3.train.jsonl"
    _write_jsonl(path, records)
    return path


def job_specs(out: Path, steps: int, batch: int, lr: float) -> dict[str, dict]:
    """Job name -> spec dict for the eight adapters.

    Every adapter runs the same schedule (``steps``, cosine, ``lr``); a single-task adapter sees
    ``batch`` sequences per step and a multi-task one ``len(TASKS) * batch``, so each sees the same
    number of examples of every task (the MixLoRA paper's multi-task protocol: the union of the
    task datasets for the same number of epochs).
    """
    mix = write_mix(out)
    sources = {task: DATA / f"{task}.train.jsonl" for task in TASKS} | {"multi": mix}
    specs: dict[str, dict] = {}
    for kind, adapter in ADAPTERS.items():
        for task, path in sources.items():
            rows = batch * (len(TASKS) if task == "multi" else 1)
            name = f"{task}-{kind}"
            specs[name] = {
                "name": name, "base_model": BASE_MODEL, "adapter": adapter,
                "data": {"path": str(path), "format": "alpaca", "max_seq_len": 128},
                "train": {
                    "max_steps": steps, "batch_size": rows, "micro_batch_size": rows, "learning_rate": lr,
                    "lr_scheduler": "cosine", "warmup_steps": max(1, steps // 20),
                    "checkpoint_every": max(10, steps // 4), "seed": 1,
                },
                "output": str(out / "adapters" / name),
            }  # fmt: skip
    return specs


def train(out: Path, specs: dict[str, dict]) -> int:
    """Train every job fused with ``lorafleet train`` (resumes; skips finished jobs)."""
    from orchestrator.cli import main as cli_main

    paths = []
    for name, spec in specs.items():
        path = out / "jobs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        paths.append(str(path))
    return cli_main(["train", "--plain", *paths])


def evaluate(out: Path, specs: dict[str, dict], examples: int, max_new_tokens: int) -> dict:
    """Exact match and held-out loss of the base model and every adapter on every task's test split."""
    import torch

    from actors.config import DataSettings
    from actors.data import build_prompt, tokenize_record
    from actors.engine import FusedEngine
    from actors.evaluate import exact_match, generate_greedy
    from actors.models import load_base_model

    model, tokenizer = load_base_model(BASE_MODEL, device="cpu", dtype=torch.float32)
    engine = FusedEngine(model, tokenizer, base_model_id=BASE_MODEL)
    for name, spec in specs.items():
        engine.attach_adapter(name, spec["output"])
    columns: dict[str, str | None] = {"base": None}
    for kind in ADAPTERS:
        columns[f"{kind}/single"] = None  # filled per task below
        columns[f"{kind}/multi"] = f"multi-{kind}"
    results: dict = {"tasks": {}}
    for task, (normalize, _) in TASKS.items():
        started = time.perf_counter()
        records = _read_jsonl(DATA / f"{task}.test.jsonl")[:examples]
        names = {col: (f"{task}-{col.split('/')[0]}" if col.endswith("/single") else adapter)
                 for col, adapter in columns.items()}  # fmt: skip
        pairs = [build_prompt(r, "alpaca", tokenizer) for r in records]
        prompts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p, _ in pairs]
        outs = generate_greedy(engine, list(names.values()), prompts, max_new_tokens=max_new_tokens, batch_size=16)
        settings = DataSettings(path=str(DATA / f"{task}.test.jsonl"), format="alpaca", max_seq_len=128)
        tokenized = [tokenize_record(r, "alpaca", tokenizer, settings) for r in records[:LOSS_EXAMPLES]]
        losses = engine.evaluate(list(names.values()), tokenized, micro_batch_size=16)
        row: dict = {"examples": len(records), "exact_match": {}, "loss": {}, "samples": []}
        for (col, _), generated, (loss, _) in zip(names.items(), outs, losses, strict=True):
            texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
            hits = sum(exact_match(t, ans, normalize) for t, (_, ans) in zip(texts, pairs, strict=True))
            row["exact_match"][col] = hits / max(1, len(pairs))
            row["loss"][col] = loss
            if col in ("base", "lora/single", "mixlora/multi"):
                row["samples"].append({"column": col, "outputs": [t.strip() for t in texts[:3]]})
        row["answers"] = [a for _, a in pairs[:3]]
        row["seconds"] = round(time.perf_counter() - started, 1)
        results["tasks"][task] = row
        print(f"evaluated {task}: {len(records)} examples x {len(names)} in {row['seconds']} s "
              + " ".join(f"{c}={v:.2f}" for c, v in row["exact_match"].items()), flush=True)  # fmt: skip
    cols = list(columns)
    results["average"] = {
        col: sum(r["exact_match"][col] for r in results["tasks"].values()) / len(TASKS) for col in cols
    }
    return results


def report_markdown(results: dict, settings: dict) -> str:
    """The report: exact match per task and on average, held-out loss, and the settings used."""
    head = ["task", "base", "LoRA single-task", "MixLoRA single-task", "LoRA multi-task", "MixLoRA multi-task"]
    order = ["base", "lora/single", "mixlora/single", "lora/multi", "mixlora/multi"]
    lines = ["# lorafleet quality report", "",
             f"Base model `{BASE_MODEL}`; held-out test splits; greedy decoding; exact match in % "
             "(fanoutqa: SQuAD normalisation: lowercase, no punctuation or articles).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for task, row in results["tasks"].items():
        lines.append(f"| {task} (n={row['examples']}) | " + " | ".join(
            f"{100 * row['exact_match'][c]:.1f}" for c in order) + " |")  # fmt: skip
    lines.append("| **average** | " + " | ".join(f"**{100 * results['average'][c]:.1f}**" for c in order) + " |")
    lines += ["", f"Held-out mean token loss (answer tokens only; first {LOSS_EXAMPLES} test examples per task):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for task, row in results["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{row['loss'][c]:.3f}" for c in order) + " |")
    lines += ["", "## Verdicts", ""]
    for task, (_, synthetic) in TASKS.items():
        if not synthetic:
            continue
        em = results["tasks"][task]["exact_match"]
        gains = {c: 100 * (em[c] - em["base"]) for c in order[1:]}
        ok = all(g >= 30 for g in gains.values())
        lines.append(f"* {task}: every adapter beats the base model by >= 30 points: **{'yes' if ok else 'NO'}** "
                     f"(gains " + ", ".join(f"{c} {g:+.1f}" for c, g in gains.items()) + ")")  # fmt: skip
    avg = results["average"]
    diff = 100 * (avg["mixlora/multi"] - avg["lora/multi"])
    lines.append(f"* Multi-task: MixLoRA {'beats' if diff > 0 else 'does not beat'} LoRA on average exact match "
                 f"({100 * avg['mixlora/multi']:.1f} vs {100 * avg['lora/multi']:.1f}, {diff:+.1f} points).")  # fmt: skip
    diff1 = 100 * (avg["mixlora/single"] - avg["lora/single"])
    lines.append(f"* Single-task: MixLoRA vs LoRA on average: {diff1:+.1f} points.")
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)


def plot(results: dict, output: Path) -> Path:
    """Grouped bar chart: exact match per task (and average) for the five columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["base", "lora/single", "mixlora/single", "lora/multi", "mixlora/multi"]
    labels = ["base", "LoRA single", "MixLoRA single", "LoRA multi", "MixLoRA multi"]
    groups = [*results["tasks"], "average"]
    values = [[100 * (results["average"] if g == "average" else results["tasks"][g]["exact_match"])[c]
               for g in groups] for c in order]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    width = 0.8 / len(order)
    for i, (label, vals) in enumerate(zip(labels, values, strict=True)):
        xs = [g + (i - (len(order) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title("lorafleet on SmolLM2-135M-Instruct: base vs LoRA vs MixLoRA")
    ax.legend(fontsize=8, ncols=3)
    ax.grid(axis="y", alpha=0.3)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "quality"), help="output folder [out/quality]")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per adapter [100]")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step per single-task adapter (multi-task: 3x) [4]")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine) [1e-3]")
    parser.add_argument("--eval-examples", type=int, default=100, help="held-out examples per task [100]")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy generation length [16]")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 8 eval examples")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_examples, args.out = 4, 8, str(Path(args.out) / "quick")
    if args.steps < 1 or args.batch_size < 1 or args.eval_examples < 1:
        parser.error("--steps, --batch-size and --eval-examples must be >= 1")
    out = Path(args.out)
    started = time.perf_counter()
    specs = job_specs(out, args.steps, args.batch_size, args.lr)
    if train(out, specs) != 0:
        print("training failed: see the messages above", file=sys.stderr)
        return 1
    trained = time.perf_counter()
    results = evaluate(out, specs, args.eval_examples, args.max_new_tokens)
    settings = {
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "schedule": "cosine",
        "adapters": ADAPTERS, "eval_examples_per_task": args.eval_examples, "max_new_tokens": args.max_new_tokens,
        "multi_task_data": "reverse + arith + fanoutqa train splits, shuffled; 3x the batch of a single-task adapter",
        "train_minutes": round((trained - started) / 60, 1),
        "eval_minutes": round((time.perf_counter() - trained) / 60, 1),
    }  # fmt: skip
    results["settings"] = settings
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    report = report_markdown(results, settings)
    (out / "report.md").write_text(report, encoding="utf-8")
    png = plot(results, out / "quality.png")
    print(report)
    print(f"wrote {out / 'report.md'}, {png}, {out / 'results.json'} in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
