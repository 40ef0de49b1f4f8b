"""Policy benchmark: aspen vs fifo on the bundled trace and other synthetic traces, and the
time of one scheduling decision with 10,000 queued jobs and 512 workers.

    .venv/bin/python bench/bench_policy.py [--quick]

Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.builtin import aspen, fifo
from policies.catalogue import CATALOGUE
from policies.cluster import load_cluster
from policies.memory_model import GIB, adapter_bytes, analytic_activation, static_bytes
from policies.metrics import summarise
from policies.simulator import simulate
from policies.snapshot import ClusterView, JobView, WorkerView
from policies.trace import read_trace, synth_trace

ROOT = Path(__file__).resolve().parents[1]


def compare(quick: bool) -> None:
    cluster = load_cluster(ROOT / "examples/cluster.yaml")
    cases = [("bundled (200)", read_trace(ROOT / "examples/trace.csv"))]
    sizes = [(200, 4), (200, 5), (200, 6), (400, 7)] if not quick else [(200, 5)]
    cases += [(f"seed {s} ({n})", synth_trace(n, s)) for n, s in sizes]
    print(f"{'trace':<16} {'fifo mean h':>11} {'aspen mean h':>12} {'ratio':>6} {'p99 ratio by priority':>30} "
          f"{'OOM f/a':>8}")  # fmt: skip
    for name, trace in cases:
        f = summarise(simulate(trace, cluster, fifo()))
        a = summarise(simulate(trace, cluster, aspen()))
        p99 = " ".join(f"p{p}:{a.per_priority[p].p99_jct_s / c.p99_jct_s:.2f}" for p, c in f.per_priority.items())
        print(f"{name:<16} {f.mean_jct_s / 3600:11.2f} {a.mean_jct_s / 3600:12.2f} "
              f"{a.mean_jct_s / f.mean_jct_s:6.2f} {p99:>30} {f.oom_count:>4}/{a.oom_count}")  # fmt: skip


def big_view(queued: int, workers: int, idle_fraction: float, seed: int = 0) -> ClusterView:
    """``queued`` jobs and ``workers`` workers; a fraction of workers idle, the rest running groups."""
    rng = random.Random(seed)
    models = ["llama-2-7b", "llama-3-8b", "mistral-7b", "smollm2-135m"]
    info = {}
    for m in models:
        from policies.memory_model import AdapterShape

        shape = AdapterShape("lora", 16)
        info[m] = (static_bytes(CATALOGUE[m]), adapter_bytes(CATALOGUE[m], shape), analytic_activation(CATALOGUE[m], shape))

    def job(i: int, worker: str | None = None, model: str | None = None) -> JobView:
        m = model or rng.choice(models)
        st, ab, act = info[m]
        work = rng.lognormvariate(7, 1.5)
        return JobView(f"j{i}", f"u{i % 50}", rng.choice((0, 0, 1, 2)), rng.uniform(0, 36000), m, st, ab, act,
                       rng.choice((1, 2, 4)), rng.choice((256, 512, 1024, 2048)), work, work * 2,
                       worker, 0.0 if worker else None)  # fmt: skip

    ws, running = [], []
    n = 0
    for w in range(workers):
        wid = f"w{w:03d}"
        if rng.random() < idle_fraction:
            ws.append(WorkerView(wid, 80 * GIB, 312.0, rng.choice(models), ()))
            continue
        m = rng.choice(models)
        group = [job(n + k, wid, m) for k in range(2)]
        n += 2
        running += group
        ws.append(WorkerView(wid, 80 * GIB, 312.0, m, tuple(j.job_id for j in group)))
    queue = [job(n + i) for i in range(queued)]
    usage = {f"u{i}": rng.uniform(0, 1e5) for i in range(50)}
    return ClusterView(40000.0, tuple(queue), tuple(running), tuple(ws), usage)


def time_decisions(repeats: int) -> None:
    policy = aspen()
    for label, idle in (("steady (5% idle)", 0.05), ("busy (0% idle)", 0.0), ("cold (100% idle)", 1.0)):
        view = big_view(10_000, 512, idle)
        times, starts = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            decisions = policy.schedule(view)
            times.append((time.perf_counter() - t0) * 1000)
            starts = len(decisions)
        print(f"aspen decision, 10,000 queued x 512 workers, {label:<17}: median {statistics.median(times):7.1f} ms, "
              f"max {max(times):7.1f} ms over {repeats} ({starts} starts per decision)")  # fmt: skip
    view = big_view(10_000, 512, 0.05)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fifo().schedule(view)
        times.append((time.perf_counter() - t0) * 1000)
    print(f"fifo  decision, same steady view: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one synthetic trace, fewer timing repeats")
    args = parser.parse_args()
    if not args.quick:
        compare(args.quick)
    time_decisions(3 if args.quick else 7)


if __name__ == "__main__":
    main()
