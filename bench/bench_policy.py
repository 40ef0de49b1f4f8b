"""Policy benchmark: fifo / priority / sjf / aspen side by side on the bundled trace and synthetic
traces of other seeds and sizes, and the time of one aspen decision with 10,000 queued jobs and
512 workers.

    .venv/bin/python bench/bench_policy.py [--quick] [--sizes 100,200,400] [--seeds 1,2,3] [--no-timing | --timing-only]

Not a test: it prints figures and asserts nothing. Per trace: mean JCT of each policy (hours), the
ratio aspen/fifo, the lower bound on that ratio (mean solo time / fifo's mean: no policy can do
better, since fusing never makes a job faster than alone), the ideal preemptive SRPT reference
(``policies/reference.py``: solo speed, free preemption, no model switching, no fusion), OOMs (fifo/aspen) and aspen's p99 JCT
per priority class as a ratio to fifo's. ``ok`` marks traces meeting all of issue 5's targets
(mean <= 0.70x, zero OOMs, every class's p99 <= 1.10x).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.builtin import AspenSettings, aspen, fifo, priority, sjf
from policies.catalogue import CATALOGUE
from policies.cluster import load_cluster
from policies.fairstart import FifoClock
from policies.memory_model import (
    GIB,
    AdapterShape,
    adapter_bytes,
    analytic_activation,
    loss_head_bytes_per_token,
    static_bytes,
)
from policies.metrics import summarise
from policies.reference import reference
from policies.simulator import simulate
from policies.snapshot import ClusterView, JobView, WorkerView
from policies.trace import read_trace, synth_trace

ROOT = Path(__file__).resolve().parents[1]


def compare(sizes: list[int], seeds: list[int]) -> None:
    cluster = load_cluster(ROOT / "examples/cluster.yaml")
    cases = [("bundled (200)", read_trace(ROOT / "examples/trace.csv"))]
    cases += [(f"seed {s} ({n})", synth_trace(n, s)) for n in sizes for s in seeds]
    print(f"{'trace':<15} {'fifo h':>7} {'prio h':>7} {'sjf h':>7} {'aspen h':>8} {'a/f':>5} {'bound':>5} {'srpt':>5} "
          f"{'OOM f/a':>7}  {'aspen/fifo p99 by priority':<28} ok")  # fmt: skip
    passed = 0
    tally: dict[str, list[int]] = {}  # size -> [traces, all met, mean met, p99 met, ruled out by the bound, srpt miss]
    for name, trace in cases:
        runs = {p.name: simulate(trace, cluster, p) for p in (fifo(), priority(), sjf(), aspen())}
        m = {k: summarise(r) for k, r in runs.items()}
        f, a = m["fifo"], m["aspen"]
        ref = reference([(j.submit_s, j.run_s) for j in runs["fifo"].jobs], runs["fifo"].num_workers)
        bound, srpt = ref.floor_mean_jct_s / f.mean_jct_s, ref.srpt_mean_jct_s / f.mean_jct_s
        ratios = {p: a.per_priority[p].p99_jct_s / c.p99_jct_s for p, c in f.per_priority.items()}
        p99 = " ".join(f"p{p}:{r:.2f}" for p, r in ratios.items())
        ratio = a.mean_jct_s / f.mean_jct_s
        ok = ratio <= 0.70 and a.oom_count == 0 and max(ratios.values()) <= 1.10
        passed += ok
        t = tally.setdefault("bundled" if name.startswith("bundled") else name.split("(")[-1].rstrip(")"), [0] * 6)
        for i, hit in enumerate((True, ok, ratio <= 0.70, max(ratios.values()) <= 1.10, bound > 0.70, srpt > 0.70)):
            t[i] += hit
        print(f"{name:<15} {f.mean_jct_s / 3600:7.2f} {m['priority'].mean_jct_s / 3600:7.2f} "
              f"{m['sjf'].mean_jct_s / 3600:7.2f} {a.mean_jct_s / 3600:8.2f} {ratio:5.2f} {bound:5.2f} {srpt:5.2f} "
              f"{f.oom_count:>4}/{a.oom_count:<2}  {p99:<28} {'ok' if ok else '--'}", flush=True)  # fmt: skip
    print(f"{passed}/{len(cases)} traces meet every target")
    print("per size: jobs  traces  all targets  mean <= 0.70x  every class p99 <= 1.10x  mean out of reach "
          "(bound > 0.70)  ideal SRPT > 0.70x")  # fmt: skip
    for size, (n, ok, mean_ok, p99_ok, out, srpt_out) in tally.items():
        print(f"          {size:>7}  {n:6d}  {ok:11d}  {mean_ok:13d}  {p99_ok:24d}  {out:30d}  {srpt_out:17d}")


def big_view(queued: int, workers: int, idle_fraction: float, seed: int = 0) -> ClusterView:
    """``queued`` jobs and ``workers`` workers; a fraction of workers idle, the rest running groups."""
    rng = random.Random(seed)
    models = ["llama-2-7b", "llama-3-8b", "mistral-7b", "smollm2-135m"]
    info = {}
    for m in models:
        shape = AdapterShape("lora", 16)
        info[m] = (static_bytes(CATALOGUE[m]), adapter_bytes(CATALOGUE[m], shape), analytic_activation(CATALOGUE[m], shape),
                   loss_head_bytes_per_token(CATALOGUE[m]))  # fmt: skip

    def job(i: int, worker: str | None = None, model: str | None = None) -> JobView:
        m = model or rng.choice(models)
        st, ab, act, head = info[m]
        work = rng.lognormvariate(7, 1.5)
        return JobView(f"j{i}", f"u{i % 50}", rng.choice((0, 0, 1, 2)), rng.uniform(0, 36000), m, st, ab, act,
                       rng.choice((1, 2, 4)), rng.choice((256, 512, 1024, 2048)), work, work * 2,
                       worker, 0.0 if worker else None, loss_head_per_token=head)  # fmt: skip

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
    # FIFO-fair start deadlines as the simulator gives them: book in submission order, then each
    # deadline with its class's tail as estimated at the view
    clock = FifoClock(workers)
    booked = [(j, clock.book(j.submit_time_s, j.total_work_s, j.priority))
              for j in sorted(running + queue, key=lambda j: j.submit_time_s)]  # fmt: skip
    fair = {j.job_id: clock.deadline(j.submit_time_s, wait, j.total_work_s, j.priority) for j, wait in booked}
    running = [replace(j, fair_start_s=fair[j.job_id]) for j in running]
    queue = [replace(j, fair_start_s=fair[j.job_id]) for j in queue]
    usage = {f"u{i}": rng.uniform(0, 1e5) for i in range(50)}
    return ClusterView(40000.0, tuple(queue), tuple(running), tuple(ws), usage)


def time_decisions(repeats: int) -> None:
    """Wall-clock (perf_counter) and CPU (process_time) time of one ``schedule`` call."""
    quota = aspen(AspenSettings(gpu_quotas={"default": 16}, quotas={"default": 64}))
    for label, idle, policy in (("steady (5% idle)", 0.05, aspen()), ("busy (0% idle)", 0.0, aspen()),
                                ("cold (100% idle)", 1.0, aspen()), ("steady + quotas", 0.05, quota)):  # fmt: skip
        view = big_view(10_000, 512, idle)
        wall, cpu, starts = [], [], 0
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            decisions = policy.schedule(view)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            starts = len(decisions)
        print(f"aspen decision, 10,000 queued x 512 workers, {label:<17}: median {statistics.median(wall):5.1f} ms, "
              f"min {min(wall):5.1f}, max {max(wall):5.1f} (CPU median {statistics.median(cpu):5.1f}) over {repeats}, "
              f"{starts} starts")  # fmt: skip
    view = big_view(10_000, 512, 0.05)
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fifo().schedule(view)
        wall.append((time.perf_counter() - t0) * 1000)
    print(f"fifo  decision, same steady view: median {statistics.median(wall):.1f} ms, min {min(wall):.1f}, "
          f"max {max(wall):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 1 at 200 jobs only, fewer timing repeats")
    parser.add_argument("--sizes", default="100,200,400", help="synthetic trace sizes (comma-separated)")
    parser.add_argument("--seeds", default="1,2,3,4", help="synthetic trace seeds (comma-separated)")
    parser.add_argument("--no-timing", action="store_true", help="skip the decision-time benchmark")
    parser.add_argument("--timing-only", action="store_true", help="only the decision-time benchmark")
    args = parser.parse_args()
    sizes = [200] if args.quick else [int(x) for x in args.sizes.split(",") if x]
    seeds = [1] if args.quick else [int(x) for x in args.seeds.split(",") if x]
    if not args.timing_only:
        compare(sizes, seeds)
    if not args.no_timing:
        time_decisions(3 if args.quick else 9)


if __name__ == "__main__":
    main()
