"""How many traces could meet issue 5's targets at all? aspen next to clairvoyant references.

Not a test and not a policy: an offline reference for reading aspen's misses on light traces. For
each synthetic trace it runs fifo and aspen in the simulator, then two idealised schedulers that know
in advance what no online policy can: fifo's *final* p99 JCT of every priority class. Each job gets
a hard latest finish ``submit + share x 1.10 x fifo's class p99`` (share 0.9: a little inside the
target); a job whose slack (latest finish - now - work left) falls under two time steps runs first,
least slack first; the other workers go to the shortest remaining work. Both run every job at its
solo speed, on any worker, with no model loads (``JobRecord.run_s``), in time steps of ``--dt``
seconds:

* ``clairvoyant``: preemption is free and instant (a job can be stopped and resumed at any step);
* ``clairvoyant, no preemption``: a started job runs to its end.

Beside them, ideal preemptive SRPT (``policies/reference.py``), which ignores classes. A trace
meets the targets when the mean JCT is at most 0.70x fifo's and every class's p99 at most 1.10x.
The schedulers are heuristics, not optima: a count here is what such a scheduler reaches, not a
bound. docs/policies.md ("A clairvoyant reference") has the figures of 2026-12-07.

    python bench/bench_clairvoyant.py --jobs 50,100,150 --seeds 7001-7100
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.builtin import aspen, fifo
from policies.cluster import load_cluster
from policies.metrics import percentile, summarise
from policies.reference import srpt_jcts
from policies.simulator import simulate
from policies.trace import synth_trace

SHARE = 0.9  # latest finishes at 0.9 x the 1.10 x fifo p99 target


def clairvoyant_jcts(jobs: list[tuple[float, float, float]], workers: int, *, preempt: bool,
                     dt: float) -> list[float]:  # fmt: skip
    """JCTs of ``(submit_s, work_s, latest_finish_s)`` jobs under the rule in the module docstring."""
    n = len(jobs)
    left = [work for _, work, _ in jobs]
    jct = [0.0] * n
    order = sorted(range(n), key=lambda i: jobs[i][0])
    running: set[int] = set()  # started and not preemptible (preempt=False)
    active: list[int] = []
    t, k = 0.0, 0
    while k < n or active:
        while k < n and jobs[order[k]][0] <= t:
            active.append(order[k])
            k += 1
        if not active:
            t = jobs[order[k]][0]
            continue
        slack = {i: jobs[i][2] - t - left[i] for i in active}
        urgent = sorted((i for i in active if slack[i] <= 2 * dt), key=lambda i: slack[i])
        rest = sorted((i for i in active if slack[i] > 2 * dt), key=lambda i: (left[i], jobs[i][0]))
        if preempt:
            run = (urgent + rest)[:workers]
        else:
            waiting = [i for i in urgent + rest if i not in running]
            run = [*running, *waiting[: max(0, workers - len(running))]]
            running.update(run)
        step = min([dt] + [left[i] for i in run] + ([max(1e-6, jobs[order[k]][0] - t)] if k < n else []))
        t += step
        for i in run:
            left[i] -= step
            if left[i] <= 1e-9:
                jct[i] = t - jobs[i][0]
                active.remove(i)
                running.discard(i)
    return jct


def one_trace(case: tuple[int, int, str, float]) -> dict:
    n, seed, cluster_path, dt = case
    cluster = load_cluster(cluster_path)
    trace = synth_trace(n, seed)
    base = simulate(trace, cluster, fifo())
    f = summarise(base)
    a = summarise(simulate(trace, cluster, aspen()))
    classes = {p: c.p99_jct_s for p, c in f.per_priority.items()}
    prio = [j.priority for j in base.jobs]

    def ratios(jcts: list[float]) -> tuple[float, float]:
        mean = sum(jcts) / len(jcts) / f.mean_jct_s
        worst = max(percentile([x for x, p in zip(jcts, prio, strict=True) if p == c], 99) / classes[c]
                    for c in classes)  # fmt: skip
        return mean, worst

    work = [(j.submit_s, j.run_s) for j in base.jobs]
    latest = [(s, w, s + SHARE * 1.10 * classes[p]) for (s, w), p in zip(work, prio, strict=True)]
    return {
        "jobs": n, "seed": seed,
        "aspen": (a.mean_jct_s / f.mean_jct_s, max(a.per_priority[p].p99_jct_s / classes[p] for p in classes)),
        "ideal SRPT": ratios(srpt_jcts(work, base.num_workers)),
        "clairvoyant": ratios(clairvoyant_jcts(latest, base.num_workers, preempt=True, dt=dt)),
        "clairvoyant, no preemption": ratios(clairvoyant_jcts(latest, base.num_workers, preempt=False, dt=dt)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="50,100,150", help="trace sizes, comma-separated [50,100,150]")
    parser.add_argument("--seeds", default="7001-7100", help="seed range FIRST-LAST [7001-7100]")
    parser.add_argument("--cluster", default=str(Path(__file__).resolve().parents[1] / "examples" / "cluster.yaml"),
                        help="cluster YAML [the repository's examples/cluster.yaml]")
    parser.add_argument("--dt", type=float, default=60.0, help="time step of the clairvoyant schedulers, s [60]")
    args = parser.parse_args()
    first, last = (int(x) for x in args.seeds.split("-"))
    sizes = [int(x) for x in args.jobs.split(",")]
    cases = [(n, s, args.cluster, args.dt) for n in sizes for s in range(first, last + 1)]
    with Pool(2) as pool:
        results = pool.map(one_trace, cases, chunksize=1)
    names = [k for k in results[0] if k not in ("jobs", "seed")]
    print(f"traces meeting every target (mean <= 0.70x fifo and every class p99 <= 1.10x); seeds {args.seeds}")
    print(f"{'jobs':>5} {'traces':>6}  " + "  ".join(f"{name:>27}" for name in names))
    for n in sizes:
        rows = [r for r in results if r["jobs"] == n]
        cells = [f"{sum(r[k][0] <= 0.70 and r[k][1] <= 1.10 for r in rows):>27}" for k in names]
        print(f"{n:>5} {len(rows):>6}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
