"""``lorafleet trace synth``: write a synthetic job trace (see policies.trace.synth_trace)."""

from __future__ import annotations

import argparse
import math
import sys

from orchestrator.cli import UserError

HELP = "job traces for the simulator: 'trace synth' writes a synthetic one"


# A bound on what is written. Replaying a trace costs about O(jobs x queue length): 8,000 jobs take
# 20-45 s per policy on 2 cores (docs/policies.md, "Simulator"), so far fewer than this replay in minutes.
MAX_JOBS = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="write a synthetic trace (Poisson arrivals, heavy-tailed lengths)")
    synth.add_argument("--jobs", type=int, required=True, help="number of jobs")
    synth.add_argument("--seed", type=int, default=0, help="random seed [0]")
    synth.add_argument("-o", "--output", required=True, help="CSV file to write")
    synth.add_argument("--load", type=float, default=2.0,
                       help="offered work / what --workers GPUs can do running jobs alone [2.0]")  # fmt: skip
    synth.add_argument("--workers", type=int, default=8, help="GPUs the load is relative to [8]")
    synth.add_argument("--gpu-memory-gib", type=float, default=80.0, help="every job fits alone on this [80]")
    synth.add_argument("--tflops", type=float, default=312.0, help="peak TFLOP/s of those GPUs [312]")
    synth.add_argument("--mixlora-share", type=float, default=0.25, help="fraction of MixLoRA jobs [0.25]")


def run(args: argparse.Namespace) -> int:
    from policies.reference import LIGHT_JOBS_PER_WORKER
    from policies.trace import synth_trace, write_trace

    if not 1 <= args.jobs <= MAX_JOBS:
        raise UserError(f"--jobs: must be in [1, {MAX_JOBS}] (got {args.jobs})")
    for flag, value in (("--load", args.load), ("--workers", args.workers),
                        ("--gpu-memory-gib", args.gpu_memory_gib), ("--tflops", args.tflops)):  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag}: must be a finite number > 0 (got {value})")
    if not 0 <= args.mixlora_share <= 1:
        raise UserError(f"--mixlora-share: must be in [0, 1] (got {args.mixlora_share})")
    try:
        jobs = synth_trace(args.jobs, args.seed, load=args.load, workers=args.workers,
                           gpu_memory_gib=args.gpu_memory_gib, tflops=args.tflops,
                           mixlora_share=args.mixlora_share)  # fmt: skip
    except ValueError as err:  # a GPU too small for every model of the mix
        raise UserError(str(err).replace("gpu_memory_gib:", "--gpu-memory-gib:", 1)) from None
    try:
        write_trace(jobs, args.output)
    except OSError as err:
        raise UserError(f"-o: cannot write {args.output}: {err.strerror or err}") from None
    span = jobs[-1].submit_time_s / 3600.0
    print(f"wrote {len(jobs)} jobs over {span:.1f} h to {args.output}", flush=True)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.base_model] = counts.get(job.base_model, 0) + 1
    # a small --gpu-memory-gib swaps jobs to smaller models of the mix: say what the trace holds
    print("models: " + ", ".join(f"{m} {c}" for m, c in sorted(counts.items(), key=lambda mc: -mc[1])), flush=True)
    per_worker = len(jobs) / args.workers
    if per_worker < LIGHT_JOBS_PER_WORKER:
        print(f"note: {per_worker:.1f} jobs per worker (--workers {args.workers}) makes a light trace: fifo queues "
              f"little on it and policies differ less in mean JCT; for a comparison use --jobs "
              f"{LIGHT_JOBS_PER_WORKER * args.workers} or more (docs/policies.md, 'What makes a trace light')",
              file=sys.stderr)  # fmt: skip
    return 0
