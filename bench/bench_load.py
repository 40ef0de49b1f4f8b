"""Load test of the control plane (a benchmark, not a test): many small jobs from concurrent clients.

    python bench/bench_load.py                       # 1,000 jobs from 10 clients on a local cluster
    python bench/bench_load.py --jobs 100 --clients 4

What it does, on a fresh local Ray cluster on 127.0.0.1 (2 fake GPUs, its own temp dir and
LORAFLEET_HOME, stopped at the end; never ``ray stop``):

1. builds a tiny random Llama (2 layers, hidden 32) and one small token data file per client;
2. starts the controller (fifo, CPU workers) and registers an admin and one user per client, so
   every call goes through API-key identification as on a shared cluster;
3. ``--clients`` threads each submit ``--jobs / --clients`` jobs (``max_steps`` 2) to the
   controller, each with its own key, as fast as the controller accepts them;
4. meanwhile a prober calls ``status`` (a random submitted job, admin key) every 50 ms and
   records each answer's latency, from the first submission until every job was placed on a
   worker and, budget permitting (``--budget-s``), until every job ended; the p99 must stay
   under 1 s in each phase (submitting, until all scheduled, until all finished), not only overall;
5. checks the store: every job recorded, with its owner, and every job placed on a worker
   (a PROFILING event), and prints submit throughput, time to schedule all, time to finish
   all, and the status latency p50/p99/max during submission and overall.

The clients are threads of one driver (each call is a Ray actor call to the controller, the same
path ``lorafleet`` commands on the head use). Pass criteria printed at the end: all accepted, all
recorded, all scheduled, status p99 < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tiny_model(path: Path) -> Path:
    from tests.conftest import make_tiny_llama, make_tokenizer

    make_tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def job_spec(name: str, model: Path, data: Path, seed: int) -> dict:
    return {"name": name, "base_model": str(model),
            "adapter": {"type": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"path": str(data), "format": "tokens", "max_seq_len": 16},
            "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "learning_rate": 1e-2, "seed": seed,
                      "checkpoint_every": 1000}}  # fmt: skip


class Prober(threading.Thread):
    """Calls ``status`` on a random known job every ``period_s``; keeps (time, latency) pairs."""

    def __init__(self, ids: list[str], key: str, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.ids, self.key, self.period_s = ids, key, period_s
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from orchestrator import client

        while not self.stop.is_set():
            if self.ids:
                job = random.choice(self.ids)
                t0 = time.perf_counter()
                try:
                    client.call("status", job, api_key=self.key, timeout=30)
                except Exception as exc:  # recorded, not fatal: the figure reports them
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.samples.append((time.time(), time.perf_counter() - t0))
            self.stop.wait(self.period_s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--gpus", type=int, default=2, help="fake GPUs of the local cluster")
    ap.add_argument("--budget-s", type=float, default=900.0, help="stop waiting for jobs to finish after this")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lf-bench-load-", dir="/tmp"))
    os.environ["LORAFLEET_HOME"] = str(work / "home")  # before orchestrator.client computes its paths
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "disabled"

    from orchestrator import client
    from tests.conftest import token_records, write_jsonl

    model = tiny_model(work / "model")
    data = [write_jsonl(work / "data" / f"c{i}.jsonl", token_records(8, 100 + i, 6, 14)) for i in range(args.clients)]
    state = client.start_local_cluster(num_gpus=args.gpus, num_cpus=2)
    print(f"local cluster {state['address']} (temp dir {state['temp_dir']}), work dir {work}", flush=True)
    try:
        client.connect(state["address"])
        client.start_controller(work / "store" / "jobs.db", work / "storage", {"policy": "fifo"},
                                loop_interval_s=0.5, worker_idle_s=600.0,
                                worker_options={"device": "cpu", "profile": "off"},
                                allowed_prefixes=[str(work)])  # fmt: skip
        admin = client.call("add_user", "admin", admin=True)["key"]
        keys = [client.call("add_user", f"user{i}", api_key=admin)["key"] for i in range(args.clients)]
        return run_load(args, model, data, admin, keys, work)
    finally:
        try:
            client.stop_controller(timeout_s=60, api_key=locals().get("admin"))
        except Exception as exc:
            print(f"note: controller stop: {exc}")
        import ray

        ray.shutdown()
        client.stop_local_cluster()


def run_load(args: argparse.Namespace, model: Path, data: list[Path], admin: str, keys: list[str], work: Path) -> int:
    from orchestrator import client

    per_client = args.jobs // args.clients
    ids: list[str] = []
    expected_owner: dict[str, str] = {}
    accepted = [0] * args.clients
    refused: list[str] = []
    lock = threading.Lock()
    prober = Prober(ids, admin)

    def submitter(i: int) -> None:
        for j in range(per_client):
            spec = job_spec(f"c{i}-j{j}", model, data[i], seed=j)
            try:
                rec = client.call("submit", spec, api_key=keys[i], timeout=120)
            except Exception as exc:
                with lock:
                    refused.append(f"client {i} job {j}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                ids.append(rec["id"])
                expected_owner[rec["id"]] = f"user{i}"
                accepted[i] += 1

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(args.clients)]
    t0 = time.time()
    prober.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_submitted = time.time()
    total = sum(accepted)
    print(f"submitted: {total}/{per_client * args.clients} accepted in {t_submitted - t0:.1f} s "
          f"({total / max(1e-9, t_submitted - t0):.1f} jobs/s), {len(refused)} refused", flush=True)  # fmt: skip

    store = work / "store" / "jobs.db"
    t_scheduled = t_finished = None
    last_print = 0.0
    while time.time() - t0 < args.budget_s:
        counts = client.call("counts", timeout=60)
        if t_scheduled is None and counts["QUEUED"] == 0:
            t_scheduled = time.time()
        live = counts["QUEUED"] + counts["PROFILING"] + counts["RUNNING"] + counts["PREEMPTED"]
        if live == 0:
            t_finished = time.time()
            break
        if time.time() - last_print > 15:
            last_print = time.time()
            print(f"  t+{time.time() - t0:.0f}s {json.dumps(counts)}", flush=True)
        time.sleep(1.0)
    prober.stop.set()
    prober.join()

    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT id, owner, state FROM jobs").fetchall()
        placed = {r[0] for r in db.execute("SELECT DISTINCT job_id FROM events WHERE to_state='PROFILING'")}
    by_id = {r[0]: r for r in rows}
    owners_ok = all(i in by_id and by_id[i][1] == owner for i, owner in expected_owner.items())
    states: dict[str, int] = {}
    for _, _, s in rows:
        states[s] = states.get(s, 0) + 1

    end = time.time()
    phases = {
        "submitting": (t0, t_submitted),
        "until all scheduled": (t_submitted, t_scheduled or end),
        "until all finished": (t_scheduled or end, end),
        "whole run": (t0, end),
    }
    lat_by_phase = {name: [lat for t, lat in prober.samples if lo <= t <= hi] for name, (lo, hi) in phases.items()}
    print("\n=== bench_load ===")
    print(f"jobs: {args.jobs} from {args.clients} concurrent clients ({per_client} each), fake GPUs {args.gpus}")
    print(f"accepted {total}, refused {len(refused)}, recorded in store {len(rows)}, owners from keys {owners_ok}")
    print(f"scheduled (placed on a worker): {len(placed & set(ids))}/{total}"
          + (f", all by t+{t_scheduled - t0:.1f} s" if t_scheduled else ", NOT all within the budget"))  # fmt: skip
    print(f"finished: {states}" + (f", all by t+{t_finished - t0:.1f} s" if t_finished else " (budget reached)"))
    print(f"submit phase {t_submitted - t0:.1f} s: {total / max(1e-9, t_submitted - t0):.1f} jobs/s")
    for label, lat in lat_by_phase.items():
        if lat:
            print(f"status latency {label}: n={len(lat)} p50 {percentile(lat, 50) * 1000:.0f} ms, "
                  f"p99 {percentile(lat, 99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms, "
                  f"mean {statistics.fmean(lat) * 1000:.0f} ms")  # fmt: skip
    if prober.errors:
        print(f"status errors: {len(prober.errors)}, first: {prober.errors[0]}")
    for line in refused[:5]:
        print(f"refused: {line}")
    worst = max((percentile(lat, 99) for lat in lat_by_phase.values() if lat), default=float("inf"))
    ok = (total == per_client * args.clients and len(rows) == total and len(placed & set(ids)) == total
          and worst < 1.0 and not prober.errors)  # fmt: skip
    print("PASS" if ok else "FAIL", f"(all accepted, recorded and scheduled; status p99 < 1 s in every phase: "
          f"worst {worst * 1000:.0f} ms)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
