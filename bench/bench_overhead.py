"""Scheduling overhead of the control plane: 8 jobs on 2 fake GPUs of a local Ray cluster.

Starts a one-node Ray cluster on 127.0.0.1 (2 fake GPUs, private temp dir), the controller,
submits 8 small jobs on a tiny random Llama, waits until all succeed, and prints for each
worker the share of its busy wall time (model loaded, minus time with nothing to train) not
spent inside ``engine.step()``, plus the end-to-end figures.

    .venv/bin/python bench/bench_overhead.py [--steps 30] [--jobs 8] [--gpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp")
    os.environ.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator import client
    from tests.conftest import make_tiny_llama, make_tokenizer, token_records, write_jsonl

    client.use_loopback()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    model_dir = work / "model"
    make_tiny_llama(hidden_size=args.hidden, intermediate_size=args.hidden * 2).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    specs = []
    for i in range(args.jobs):
        data = write_jsonl(work / f"d{i}.jsonl", token_records(64, i, 16, 48))
        specs.append({
            "name": f"bench-{i}", "base_model": str(model_dir),
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"path": str(data), "format": "tokens", "max_seq_len": 64},
            "train": {"max_steps": args.steps, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3,
                      "seed": i, "checkpoint_every": 10},
        })  # fmt: skip

    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 2, "num_gpus": args.gpus, "temp_dir": f"{tmp}/ray",
        "include_dashboard": False})  # fmt: skip
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="lorafleet", log_to_driver=False)
    try:
        client.start_controller(work / "jobs.db", work / "storage", {"policy": "fifo"}, loop_interval_s=0.5,
                                worker_idle_s=600.0, worker_options={"device": "cpu", "profile": "off"})  # fmt: skip
        t0 = time.time()
        ids = [client.call("submit", s, "bench")["id"] for s in specs]
        last_workers = []
        while True:
            recs = [client.call("status", i) for i in ids]
            workers = client.call("workers")
            if workers:
                last_workers = workers
            if all(r["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") for r in recs):
                break
            time.sleep(0.5)
        elapsed = time.time() - t0
        last_workers = client.call("workers") or last_workers
        bad = [(r["name"], r["state"], r["error"]) for r in recs if r["state"] != "SUCCEEDED"]
        rows = []
        for w in last_workers:
            t = w["timing"] or {}
            busy = t.get("wall_s", 0.0) - t.get("idle_s", 0.0)
            rows.append({"worker": w["worker_id"], "node": (w["node_id"] or "")[:8], "load_s": t.get("load_s"),
                         "join_s": t.get("join_s"), "record_s": t.get("record_s"),
                         "busy_s": busy, "step_s": t.get("step_s"), "steps": t.get("steps"),
                         "overhead_share": w["overhead_share"]})  # fmt: skip
        placed = {}
        for r in recs:
            for e in client.call("status", r["id"])["events"]:
                if e["to"] == "PROFILING":
                    placed[r["name"]] = e["reason"]
        out = {"jobs": args.jobs, "gpus": args.gpus, "steps": args.steps, "elapsed_s": elapsed, "failed": bad,
               "workers": rows, "placement": placed}  # fmt: skip
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(f"{args.jobs} jobs x {args.steps} steps on {args.gpus} fake GPUs: {elapsed:.1f} s end to end")
            for r in rows:
                print(f"  {r['worker']}: model load {r['load_s']:.1f} s, busy {r['busy_s']:.1f} s, in steps "
                      f"{r['step_s']:.1f} s over {r['steps']} fused steps -> overhead {100 * r['overhead_share']:.1f}% "
                      f"(joins {r['join_s']:.1f} s, per-step bookkeeping {r['record_s']:.2f} s)")
            if bad:
                print(f"  not succeeded: {bad}")
        client.stop_controller()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
