"""``lorafleet simulate``: replay a trace on a described cluster under several policies and compare."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.cli import UserError

if TYPE_CHECKING:
    from policies.cluster import ClusterSpec

HELP = "replay a job trace on a simulated cluster under several scheduling policies and compare them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace CSV (see docs/policies.md)")
    parser.add_argument("--cluster", required=True, help="cluster YAML: workers, optional models and cost_model")
    parser.add_argument("--policy", default="fifo,priority,sjf,aspen",
                        help="comma-separated: built-in names, module:Class paths or policy YAML files "
                             "[fifo,priority,sjf,aspen]")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per policy (one per line) instead of a table")  # fmt: skip
    parser.add_argument("--plot", metavar="PNG", help="draw the JCT CDF of every policy into this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the memory prediction errors [0]")
    parser.add_argument("--memory-noise", type=float, default=0.10,
                        help="bound of the true/predicted memory error, a fraction [0.10]")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from policies.cluster import ClusterError, load_cluster
    from policies.config import PolicyConfigError, resolve_policy
    from policies.metrics import summarise
    from policies.reference import reference
    from policies.simulator import SimulationError, simulate
    from policies.trace import TraceError, read_trace

    specs = [s.strip() for s in args.policy.split(",")]
    if not any(specs):
        raise UserError("--policy: name at least one policy")
    if not all(specs):  # `fifo,,aspen`: a slip (a name left out?), not two policies
        raise UserError(f"--policy: {args.policy!r} has an empty entry (position {specs.index('') + 1}); give "
                        "comma-separated names with nothing between two commas or at either end")  # fmt: skip
    if not 0 <= args.memory_noise < 1:
        raise UserError(f"--memory-noise: must be in [0, 1) (got {args.memory_noise})")
    plot = _plot_path(args.plot) if args.plot else None  # checked before minutes of simulation
    try:
        trace = read_trace(args.trace)
        cluster = load_cluster(args.cluster)
    except (TraceError, ClusterError) as err:
        raise UserError(str(err)) from None
    policies, problems, warnings = [], [], []
    for spec in specs:  # every policy's every problem at once
        try:
            policies.append(resolve_policy(spec, warnings))
        except PolicyConfigError as err:
            problems.append(str(err))
    if problems:
        raise UserError("\n".join(problems))
    for line in warnings:  # e.g. a quota of 0: that owner's jobs never start, and the replay stalls
        print(f"warning: {line}", file=sys.stderr)
    results, ran, failed = [], [], []
    for policy, spec in zip(policies, specs, strict=True):
        try:
            results.append(simulate(trace, cluster, policy, seed=args.seed, memory_noise=args.memory_noise))
            ran.append(spec)
        except SimulationError as err:  # the other policies' results are still shown
            if str(err) not in failed:  # a trace's own fault (an unknown model) fails every policy alike
                failed.append(str(err))
    if not results:
        raise UserError("\n".join(failed))
    names = [r.policy for r in results]
    for r, spec in zip(results, ran, strict=True):
        # e.g. aspen and an aspen YAML, or a tuned fifo YAML that must not pass for the 'vs fifo' baseline
        if spec != r.policy and (names.count(r.policy) > 1 or spec.endswith((".yaml", ".yml"))):
            r.policy = f"{r.policy} ({spec})"
    metrics = [summarise(r) for r in results]
    # Every run of one trace shares its jobs' submit and solo times: the references are the trace's.
    # (on the workers a job fits on: one too small for every job of the trace would run nothing)
    ref = reference([(j.submit_s, j.run_s) for j in results[0].jobs], results[0].usable_workers)
    if args.json:
        for m in metrics:
            print(json.dumps({**m.as_dict(), "floor_mean_jct_s": ref.floor_mean_jct_s,
                              "srpt_mean_jct_s": ref.srpt_mean_jct_s}))  # fmt: skip
    else:
        _print_tables(metrics, len(trace), cluster.packing, ref)
        note = unusable_note(results[0].unusable_workers, cluster)
        if note:
            print(note)
    if plot:
        _plot(results, plot)
        if not args.json:
            print(f"JCT CDF written to {plot}", file=sys.stderr)
    for err in failed:  # after the tables, where they are seen
        print(f"lorafleet simulate: error: {err}", file=sys.stderr)
    return 2 if failed else 0


def _print_tables(metrics: list, jobs: int, packing: bool = False, ref: object = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from policies.reference import LIGHT_JOBS_PER_WORKER

    base = next((m for m in metrics if m.policy == "fifo"), metrics[0])
    layout = "sequences packed (cluster packing: true)" if packing else "rows padded (cluster packing: false)"
    table = Table(title=f"{jobs} jobs, {layout}; JCT in hours; 'vs {base.policy}' = mean JCT ratio")
    for col in ("policy", "mean JCT", f"vs {base.policy}", "p50 JCT", "p99 JCT", "mean queue", "makespan",
                "util", "OOMs", "preempt", "FTF mean/max"):  # fmt: skip
        table.add_column(col, justify="left" if col == "policy" else "right")
    h = 3600.0
    for m in metrics:
        table.add_row(m.policy, f"{m.mean_jct_s / h:.2f}", f"{m.mean_jct_s / base.mean_jct_s:.2f}x",
                      f"{m.p50_jct_s / h:.2f}", f"{m.p99_jct_s / h:.2f}", f"{m.mean_queue_s / h:.2f}",
                      f"{m.makespan_s / h:.1f}", f"{m.utilisation:.0%}", str(m.oom_count), str(m.preemptions),
                      f"{m.ftf_mean:.1f}/{m.ftf_max:.0f}")  # fmt: skip
    prios = sorted({p for m in metrics for p in m.per_priority})
    per = Table(title="per priority: mean / p99 JCT in hours (jobs)")
    per.add_column("policy")
    for p in prios:
        per.add_column(f"priority {p}", justify="right")
    for m in metrics:
        cells = []
        for p in prios:
            c = m.per_priority.get(p)
            cells.append("-" if c is None else f"{c.mean_jct_s / h:.2f} / {c.p99_jct_s / h:.2f} ({c.count})")
        per.add_row(m.policy, *cells)
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a pipe or file: never truncate
    console.print(table)
    console.print(per)
    if ref is not None:
        vs = base.mean_jct_s
        workers = f"{ref.workers} worker{'s' if ref.workers != 1 else ''}"
        console.print(f"What the trace allows (references, not policies; docs/policies.md): every job alone on "
                      f"arrival, its model loaded, {ref.floor_mean_jct_s / h:.2f} h = {ref.floor_mean_jct_s / vs:.2f}x "
                      f"{base.policy}, no policy beats it; ideal preemptive SRPT on {workers} (solo speed, free "
                      f"preemption, no fusion, no loads) {ref.srpt_mean_jct_s / h:.2f} h = "
                      f"{ref.srpt_mean_jct_s / vs:.2f}x.",
                      highlight=False, soft_wrap=True)  # fmt: skip
        per_worker = jobs / ref.workers
        if per_worker < LIGHT_JOBS_PER_WORKER:
            console.print(f"A light trace: {per_worker:.1f} jobs per worker (under about {LIGHT_JOBS_PER_WORKER}). "
                          f"{base.policy} queues less on such traces, so policies differ less in mean JCT and more "
                          f"from trace to trace (none gets below {ref.floor_mean_jct_s / vs:.2f}x here); compare policies on traces of "
                          f"20-40 or more jobs per worker (docs/policies.md, 'What makes a trace light').",
                          highlight=False, soft_wrap=True)  # fmt: skip


def unusable_note(unusable: Sequence[str], cluster: ClusterSpec) -> str:
    """A line naming the workers too small for every job of the trace (they run nothing), or ''."""
    if not unusable:
        return ""
    memory = {wid: mem for wid, mem, _, _ in cluster.worker_list()}
    shown = [f"{wid} ({memory[wid] / 2**30:.3g} GiB)" for wid in unusable[:8]]
    more = f" and {len(unusable) - 8} more" if len(unusable) > 8 else ""
    return (f"Note: {len(unusable)} of {len(memory)} workers fit no job of this trace even alone and ran nothing: "
            f"{', '.join(shown)}{more}; util and the SRPT reference leave them out (JSON: unusable_workers).")


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _plot_path(path: str) -> str:
    """``--plot``'s file: a known image suffix, or ``.png`` added where there is none."""
    suffix = Path(path).suffix.lower()
    if suffix and suffix not in PLOT_FORMATS:
        raise UserError(f"--plot: {path}: cannot draw a {suffix} file; use one of {', '.join(PLOT_FORMATS)}")
    folder = Path(path).parent
    if not folder.is_dir():  # found now, not after the whole replay
        what = "is not a directory" if folder.exists() else "does not exist"
        raise UserError(f"--plot: {path}: folder {folder} {what}; create it or name a file in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--plot: {path}: folder {folder} is not writable by you; name a file in a writable folder")
    return path if suffix else path + ".png"


def _plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = sorted(j.jct_s / 3600.0 for j in r.jobs)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF per policy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise UserError(f"--plot: cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
