"""``lorafleet estimate A.yaml [B.yaml ...]``: predicted peak memory of jobs trained together.

For each job: the exact adapter state (weights, gradients, AdamW moments) plus its fitted
activation ``b0 + b1*B*L + b2*B*L^2`` at its micro-batch size and the group's padded length;
for the group: the static part (base model + framework) plus the jobs' dynamic parts, as
``lorafleet train`` runs them (one process, rows padded to the longest job). Profiles that are
not cached yet are measured first (a few real steps per shape, in fresh processes; cached
under ``~/.cache/lorafleet/profiles``), unless ``--no-profile`` asks for the analytic default: the
shapes' count of what the engine keeps for backward (``policies.memory_model.engine_activation``,
reported as ``analytic``; not the trace simulator's formula). See docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any

HELP = "predict the peak memory of jobs trained together (and the largest micro-batch that fits)"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="job spec files (YAML or JSON), one group")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the group trains [cpu]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="base model dtype [auto: bfloat16 on cuda, float32 on cpu]")  # fmt: skip
    parser.add_argument("--budget", metavar="SIZE", help="memory budget (e.g. 20GiB): print the largest micro-batch that fits")
    parser.add_argument("--margin", type=float, default=0.0, help="safety margin on the dynamic part [0.0]")
    parser.add_argument("--seq-len", choices=["data", "max"], default="data",
                        help="planned L per job: longest example of its data (capped by max_seq_len), "
                             "or data.max_seq_len [data]")  # fmt: skip
    parser.add_argument("--profiles", metavar="DIR", help="profile cache directory [~/.cache/lorafleet/profiles]")
    parser.add_argument("--no-profile", action="store_true", help="do not measure missing shapes: estimate them from the shapes (engine count)")
    parser.add_argument("--measure", action="store_true",
                        help="also train the group for a few steps and print the measured peak and the error")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="fused steps for --measure [3]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.3f} GiB"


def _planned_len(config: Any, mode: str) -> int:
    """The padded length a job's rows reach: its longest example (truncated), or max_seq_len."""
    if mode == "max":
        return config.data.max_seq_len
    from actors.data import DataError, load_examples
    from actors.models import resolve_base_model

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(config.base_model))
        examples = load_examples(config.data, tokenizer)
    except (DataError, OSError, ValueError) as err:
        log.warning("%s: cannot read the data (%s); planning L = data.max_seq_len", config.name, err)
        return config.data.max_seq_len
    return max(len(e.input_ids) for e in examples)


def run(args: argparse.Namespace) -> int:
    from actors.profiler import GroupMember, ProfileError, Profiler, measure_group, parse_bytes
    from orchestrator.cli import UserError
    from orchestrator.spec import SpecError, load_spec

    configs = []
    for path in args.specs:
        try:
            configs.append(load_spec(path).to_job_config())
        except SpecError as err:
            raise UserError("\n".join(err.errors)) from None
    bases = {c.base_model for c in configs}
    if len(bases) > 1:
        raise UserError(f"base_model: a group shares one base model; these specs name {sorted(bases)}")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserError(f"name: each job of a group needs its own name (got {names})")
    if not 0 <= args.margin < math.inf:  # "not 0 <=" also refuses NaN
        raise UserError(f"--margin: must be a finite number >= 0 (got {args.margin})")
    if args.measure and args.steps < 1:
        raise UserError(f"--steps: --measure needs at least 1 fused step (got {args.steps})")
    budget = None
    if args.budget is not None:
        try:
            budget = parse_bytes(args.budget)
        except ValueError as err:
            raise UserError(f"--budget: {err}") from None
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    base = configs[0].base_model
    profiler = Profiler(args.profiles, device=args.device, dtype=dtype, profile=not args.no_profile)
    members = [(c.name, c.adapter, c.train.micro_batch_size, min(_planned_len(c, args.seq_len), c.data.max_seq_len))
               for c in configs]  # fmt: skip
    measured = None
    if args.measure:  # first: the run also tells whether the engine packs this model, which the prediction uses
        group = [GroupMember(c.name, c.adapter, b, seq, data=c.data) for c, (_n, _a, b, seq) in zip(configs, members, strict=True)]
        try:
            measured = measure_group(base, group, device=args.device, dtype=dtype, steps=args.steps)
        except ProfileError as err:
            raise UserError(f"--measure: {err}") from None
        profiler.record(base, measured, save=True)
    try:
        pred = profiler.predict(base, members, args.margin)
        best = profiler.max_micro_batch(base, members, budget, args.margin) if budget is not None else None
    except (ProfileError, ValueError) as err:
        raise UserError(str(err)) from None

    out: dict[str, Any] = {
        "base_model": base, "device": args.device, "dtype": dtype, "margin": args.margin,
        "static_bytes": pred.static_bytes, "static_source": pred.static_source, "seq_len": pred.seq_len,
        "packed": pred.packed, "group_peak_bytes": pred.group_peak_bytes,
        "jobs": [
            {"name": j.name, "peak_bytes": j.alone_peak_bytes, "micro_batch_size": j.batch, "seq_len": j.seq_len,
             "adapter_bytes": j.adapter_bytes, "activation_bytes": j.activation_bytes,
             "dynamic_bytes": j.dynamic_bytes, "profile": j.source}
            for j in pred.jobs
        ],
    }  # fmt: skip
    if budget is not None:
        out["budget_bytes"] = budget
        out["max_micro_batch_size"] = best
    if measured is not None:
        out["measured_peak_bytes"] = measured.peak_bytes
        out["measured_static_bytes"] = measured.static_bytes
        out["relative_error"] = (pred.group_peak_bytes - measured.peak_bytes) / measured.peak_bytes
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    w = sys.stdout.write
    w(f"base model {base} on {args.device} ({dtype}); static {_gib(pred.static_bytes)} ({pred.static_source}); "
      f"margin {args.margin:g}\n")  # fmt: skip
    act = "activation" if pred.packed else "activation@Lpad"
    w(f"{'job':24} {'B':>4} {'L':>6} {'adapter':>12} {act:>16} {'alone peak':>14}  profile\n")
    for j in pred.jobs:
        w(f"{j.name:24} {j.batch:>4} {j.seq_len:>6} {_gib(j.adapter_bytes):>12} {_gib(j.activation_bytes):>16} "
          f"{_gib(j.alone_peak_bytes):>14}  {j.source}\n")  # fmt: skip
    layout = "sequences packed, no padding" if pred.packed else f"rows padded to L={pred.seq_len}"
    w(f"group peak ({layout}): {_gib(pred.group_peak_bytes)}\n")
    if not pred.packed and not profiler.packing_measured(base) and len({j.seq_len for j in pred.jobs}) > 1:
        w("  (the engine packs most models, which costs less; whether it packs this one is known once a profile or\n"
          "   --measure has run it on this device: until then the prediction assumes padded rows, the safe side)\n")
    if budget is not None:
        w(f"largest micro-batch (every job) within {_gib(budget)}: {best}\n")
    if args.measure:
        w(f"measured peak: {_gib(out['measured_peak_bytes'])}  relative error {out['relative_error']:+.1%}\n")
    return 0
