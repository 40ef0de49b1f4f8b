"""Fused multi-LoRA training vs the frozen-base floor and vs PEFT, fixed and mixed sequence lengths.

Every measurement runs in its own subprocess so peak memory (``VmHWM`` on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is clean. Printed side by side, for N jobs of
``--micro`` sequences each (r=16 LoRA on all seven projections, dropout 0):

* floor: the frozen base model's forward + backward (to activations only, as LoRA needs) over
  exactly the tokens of one fused step, packed the same way (no adapters, no optimizer);
* fused: lorafleet with N LoRA jobs in one batch (one engine step = one micro-batch per job);
  ``fused ckpt`` is the same with activation checkpointing (for its peak memory);
* PEFT-seq: the same N jobs trained one after another with PEFT + torch AdamW (fused, as the engine's);
* PEFT-par: the same N jobs as N separate PEFT processes at once (peak = sum of their peaks).

On CPU, steps are timed by each process's CPU time (``--clock cpu``): on a shared machine wall
time mostly measures the other tenants. Use ``--threads 1`` there for the cleanest figures.

Two tables in one run: every sequence ``--seq-len`` tokens, then lengths drawn from 32..512.

Usage::

    python bench/bench_fused.py              # SmolLM2-135M (all 30 layers), N = 1 4 8, L = 128, 2 per job
    python bench/bench_fused.py --quick      # 4 of 30 layers, 1 timed step, fewer baselines: for development
    python bench/bench_fused.py --model tiny --jobs 1 4
    python bench/bench_fused.py --device cuda --model DIR --autocast --jobs 1 4 8 16 32   # a GPU

On CUDA every measurement runs in ONE process, one after another (fresh model each, peak stats
reset, memory freed in between; PEFT-par's peak is the sum of each job's own peak alone, i.e. N
processes without their CUDA contexts), more steps are timed (``--steps 10 --warmup 3``), and the
table adds model FLOPs utilisation (MFU) against the dense bf16 peak (``--peak-tflops``, 989 for an
H100/H200 SXM). ``--model`` takes a local transformers directory too; ``bench/random_model.py``
makes a random-weight copy of a model from its config (same shapes, same step time).

Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXED = (32, 512)
GIB = 1 << 30


def peak_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def lengths_of(args: argparse.Namespace, job: int) -> list[int]:
    """The sequence lengths of job ``job``'s micro-batch (the same every step)."""
    if not args.mixed:
        return [args.seq_len] * args.micro
    rng = random.Random(1000 + job)
    return [rng.randint(*MIXED) for _ in range(args.micro)]


def micro_batch(args: argparse.Namespace, job: int, vocab: int) -> list:
    from actors.data import Example

    rng = random.Random(job)
    out = []
    for length in lengths_of(args, job):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def load(args: argparse.Namespace):
    import torch

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from tests.conftest import make_tiny_llama, make_tokenizer

        model, tok = make_tiny_llama(hidden_size=256, intermediate_size=704, num_hidden_layers=4), make_tokenizer()
        model = model.to(args.device)
    else:
        from actors.models import load_base_model

        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        name = "builtin:smollm2-135m-instruct" if args.model == "builtin" else args.model
        model, tok = load_base_model(name, device=args.device, dtype=dtype)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    return model, tok


def timed(args: argparse.Namespace, step) -> list[float]:
    """Seconds of each of ``args.steps`` steps after a warm-up: this process's CPU time (all its
    threads) with ``--clock cpu``, robust to other processes on a shared machine; else wall time."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.warmup):
        step()
    _sync(args)
    times = []
    for _ in range(args.steps):
        t0 = clock()
        step()
        _sync(args)
        times.append(clock() - t0)
    return times


def run_fused(args: argparse.Namespace) -> dict:
    from actors.config import (
        AdapterSettings,
        DataSettings,
        EngineSettings,
        JobConfig,
        LoraSettings,
        TrainSettings,
    )
    from actors.engine import FusedEngine

    model, tok = load(args)
    settings = EngineSettings(packing=not args.no_packing, autocast=args.autocast,
                              activation_checkpointing=args.checkpointing)
    engine = FusedEngine(model, tok, base_model_id=args.model, settings=settings)
    for j in range(args.n):
        cfg = JobConfig(
            name=f"job{j}",
            base_model=args.model,
            adapter=AdapterSettings("lora", LoraSettings(args.rank, 2 * args.rank, 0.0), ALL_TARGETS),
            data=DataSettings("unused", format="tokens", shuffle=False),
            train=TrainSettings(max_steps=10_000, batch_size=args.micro, micro_batch_size=args.micro,
                                checkpoint_every=10_000_000, seed=j),
            output=f"/tmp/lorafleet-bench/job{j}",
        )
        engine.add_job(cfg, examples=micro_batch(args, j, model.config.vocab_size) * 2, resume=False)
    results = []
    times = timed(args, lambda: results.append(engine.step()))
    last = results[-1]
    return {"seconds_per_step": min(times), "tokens_per_s": last.tokens * len(times) / sum(times),
            "peak": peak_bytes(args.device), "padding": 1 - last.tokens / max(1, last.padded_tokens)}


def run_floor(args: argparse.Namespace) -> dict:
    """The fused step's forward + backward with no adapter: the same packed tokens through the same code."""
    import torch

    from actors.data import pack
    from actors.fused_model import FusedModel
    from actors.lora import BatchLayout

    model, _tok = load(args)
    fused = FusedModel(model)
    batches = [micro_batch(args, j, model.config.vocab_size) for j in range(args.n)]
    packed = pack(batches)
    device = args.device
    # gradients flow to the activations (as LoRA needs), never to the frozen weights
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.autocast):
            hidden = fused.hidden_states(
                packed.input_ids.to(device), None, BatchLayout((), packed=True),
                position_ids=packed.position_ids.to(device), cu_seqlens=packed.cu_seqlens,
            )  # (1, T, H)
            sums = fused.packed_loss_sums(hidden, packed.labels, packed.spans)  # host labels, as the engine
        sum(s for s, _ in sums).backward()

    times = timed(args, step)
    return {"seconds_per_step": min(times), "tokens_per_s": packed.num_tokens * len(times) / sum(times),
            "peak": peak_bytes(args.device)}


def peft_jobs(args: argparse.Namespace, base, tok, jobs: list[int]) -> tuple[float, int, list[int]]:
    """Train each job in ``jobs`` alone with PEFT + AdamW (warm-up + ``steps``); (timed seconds, tokens,
    each job's own peak bytes: on CUDA measured from a clean state per job, as its own process would)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from actors.data import collate

    total_time, tokens, peaks = 0.0, 0, []
    for j in jobs:
        _reset_peak(args)
        model = get_peft_model(
            base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(ALL_TARGETS))
        )
        # the same fused AdamW the engine gives every job: the comparison is about the model, not the optimizer loop
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        batch = micro_batch(args, j, base.config.vocab_size)
        ids, labels, mask = (t.to(args.device) for t in collate(batch, tok.pad_token_id or 0))

        def step(model=model, opt=opt, ids=ids, labels=labels, mask=mask) -> None:
            with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.autocast):
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad()

        times = timed(args, step)
        total_time += sum(times)
        tokens += int(mask.sum()) * len(times)
        peaks.append(peak_bytes(args.device))
        base = model.unload()  # the base model without this job's LoRA layers
        del model, opt, step
    return total_time, tokens, peaks


def run_peft_sequential(args: argparse.Namespace) -> dict:
    base, tok = load(args)
    total_time, tokens, peaks = peft_jobs(args, base, tok, list(range(args.n)))
    return {"seconds_per_step": total_time / args.steps, "tokens_per_s": tokens / total_time,
            "peak": max(peaks), "job_peaks": peaks}


def run_peft_one(args: argparse.Namespace) -> dict:
    base, tok = load(args)
    total_time, tokens, peaks = peft_jobs(args, base, tok, [args.job])
    return {"seconds": total_time, "tokens": tokens, "peak": peaks[0]}


def _sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _reset_peak(args: argparse.Namespace) -> None:
    """Free what earlier measurements left and restart the peak counter (CUDA; on CPU a process is fresh)."""
    if args.device == "cuda":
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_flops(args: argparse.Namespace, config, n: int, adapters: bool = True) -> float:
    """FLOPs of one fused step of ``n`` jobs: frozen-base forward + backward to the activations (4 FLOPs per
    weight per token, output head included), causal attention (score and value products, forward and
    backward: 6 L^2 d per sequence and layer), and with ``adapters`` each LoRA's forward and backward
    (6 r (in + out) per token and projection). A documented analytic count, not a profile."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (config.num_key_value_heads or heads) * head_dim
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    weights = layers * sum(i * o for i, o in shapes.values()) + config.vocab_size * hidden
    lengths = [length for j in range(n) for length in lengths_of(args, j)]
    tokens = sum(lengths)
    flops = 4 * weights * tokens + 6 * layers * heads * head_dim * sum(length * length for length in lengths)
    if adapters:
        flops += 6 * args.rank * layers * sum(i + o for i, o in shapes.values()) * tokens
    return float(flops)


MODES = {"fused": run_fused, "floor": run_floor, "peft-seq": run_peft_sequential, "peft-one": run_peft_one}


def child_command(mode: str, n: int, args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--model", args.model, "--device", args.device,
           "--seq-len", str(args.seq_len), "--micro", str(args.micro), "--rank", str(args.rank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--layers", str(args.layers), "--threads", str(args.threads),
           "--clock", args.clock, *extra]
    flags = {"--mixed": args.mixed, "--autocast": args.autocast, "--no-packing": args.no_packing}
    return cmd + [flag for flag, on in flags.items() if on]


def measure(mode: str, n: int, args: argparse.Namespace, *extra: str) -> dict:
    if args.in_process:  # in this process, one measurement after another (see the module docstring)
        child = argparse.Namespace(**{**vars(args), "n": n, "checkpointing": "--checkpointing" in extra})
        _reset_peak(child)
        import torch

        torch.manual_seed(0)
        try:
            return MODES[mode](child)
        finally:
            _reset_peak(child)
    out = subprocess.run(child_command(mode, n, args, *extra), capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_parallel(n: int, args: argparse.Namespace, seq: dict) -> dict:
    """N separate PEFT processes at once, one job each: summed peak (on CUDA: each job's own peak from
    the sequential run, which is what its own process would reach, CUDA context aside)."""
    if args.in_process:
        return {"peak": sum(seq["job_peaks"])}
    procs = [subprocess.Popen(child_command("peft-one", n, args, "--job", str(j)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for j in range(n)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"peft-one failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return {"peak": sum(r["peak"] for r in results)}


def _cell(result: dict | None, key: str, unit: float, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if result is None else f"{result[key] / unit:>{width}.{digits}f}"


def padded_fraction(args: argparse.Namespace, n: int) -> float:
    """Pads / processed tokens if the N jobs' rows were right-padded to the longest row."""
    lengths = [length for j in range(n) for length in lengths_of(args, j)]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def mfu_cells(args: argparse.Namespace, n: int, floor: dict, fused: dict, seq: dict) -> str:
    """Floor, fused and sequential-PEFT model FLOPs utilisation (see :func:`model_flops`)."""
    from transformers import AutoConfig

    from actors.models import resolve_base_model

    if args.model == "tiny":
        return ""
    config = AutoConfig.from_pretrained(resolve_base_model(
        "builtin:smollm2-135m-instruct" if args.model == "builtin" else args.model))
    if args.layers:
        config.num_hidden_layers = args.layers
    peak = args.peak_tflops * 1e12
    tokens = sum(sum(lengths_of(args, j)) for j in range(n))
    with_adapters = model_flops(args, config, n)
    cells = (model_flops(args, config, n, adapters=False) / floor["seconds_per_step"],
             with_adapters / fused["seconds_per_step"], with_adapters * seq["tokens_per_s"] / tokens)
    return "".join(f" | {100 * c / peak:>{w}.1f}" for c, w in zip(cells, (11, 11, 14), strict=True))


def table(args: argparse.Namespace) -> None:
    lengths = f"mixed {MIXED[0]}..{MIXED[1]}" if args.mixed else str(args.seq_len)
    print(f"\n== L={lengths}, micro={args.micro}/job, r={args.rank}, layers={args.layers or 'all'}, "
          f"steps={args.steps} (+{args.warmup} warm-up), threads={args.threads}, clock={args.clock}, "
          f"packing={'off' if args.no_packing else 'on'}")
    print("s/step: the fastest timed step (fused/floor and MFU use it); tok/s: the mean over the timed steps")
    header = (f"{'jobs':>4} | {'floor s/step':>12} | {'fused s/step':>12} | {'fused/floor':>11} | "
              f"{'fused tok/s':>11} | {'PEFT-seq tok/s':>14} | {'fused/PEFT-seq':>14} | "
              f"{'fused GiB':>9} | {'ckpt GiB':>8} | {'PEFT-seq GiB':>12} | {'PEFT-par GiB':>12} | "
              f"{'pad %':>5} | {'pad % padded':>12}")
    if args.device == "cuda":
        header += f" | {'floor MFU %':>11} | {'fused MFU %':>11} | {'PEFT-seq MFU %':>14}"
    print(header)
    print("-" * len(header), flush=True)
    rows = {}
    first, last = min(args.jobs), max(args.jobs)
    for n in args.jobs:
        every = not args.quick or n in (first, last)  # --quick: checkpointing and PEFT-par at the ends only
        floor = measure("floor", n, args)
        fused = measure("fused", n, args)
        ckpt = measure("fused", n, args, "--checkpointing") if every else None
        seq = measure("peft-seq", n, args)
        par = measure_parallel(n, args, seq) if every else None
        rows[n] = (floor, fused, ckpt, seq, par)
        print(f"{n:>4} | {floor['seconds_per_step']:>12.3f} | {fused['seconds_per_step']:>12.3f} | "
              f"{fused['seconds_per_step'] / floor['seconds_per_step']:>11.2f} | {fused['tokens_per_s']:>11.0f} | "
              f"{seq['tokens_per_s']:>14.0f} | {fused['tokens_per_s'] / seq['tokens_per_s']:>14.2f} | "
              f"{fused['peak'] / GIB:>9.2f} | "
              f"{_cell(ckpt, 'peak', GIB, 8, 2)} | {seq['peak'] / GIB:>12.2f} | {_cell(par, 'peak', GIB, 12, 2)} | "
              f"{100 * fused['padding']:>5.1f} | {100 * padded_fraction(args, n):>12.1f}"
              + (mfu_cells(args, n, floor, fused, seq) if args.device == "cuda" else ""), flush=True)
    floor, fused, ckpt, seq, par = rows[last]
    ratio = fused["seconds_per_step"] / floor["seconds_per_step"]
    print(f"fused/floor step time, {last} jobs: {ratio:.2f}x (target <= 1.15x)")
    print(f"fused / sequential PEFT throughput, {last} jobs: {fused['tokens_per_s'] / seq['tokens_per_s']:.2f}x "
          f"(target >= 1.3x)")
    print(f"peak memory {last} jobs / {first} job: fused {fused['peak'] / rows[first][1]['peak']:.2f}x, "
          f"with checkpointing {ckpt['peak'] / rows[first][2]['peak']:.2f}x (target <= 1.2x); "
          f"{last} PEFT processes at once: {par['peak'] / GIB:.2f} GiB = {par['peak'] / fused['peak']:.2f}x fused")
    print(f"padding, {last} jobs: {100 * fused['padding']:.1f}% of processed tokens "
          f"({100 * padded_fraction(args, last):.1f}% if right-padded to the longest row; target < 5%)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--model", default="builtin",
                        help="builtin (SmolLM2-135M-Instruct), tiny (random 4-layer test model) or a local model directory")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2, help="sequences per job per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU (989: H100/H200 SXM datasheet)")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first K decoder layers (0: all)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads per process")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="time steps by process CPU time (default on CPU) or wall time (default on CUDA)")
    parser.add_argument("--quick", action="store_true",
                        help="--layers 4 --steps 1, checkpointing and PEFT-par for the fewest and most jobs only")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                        help="all measurements in this process (default on CUDA; on CPU peak RSS is then not per run)")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (fused, floor and PEFT alike)")
    parser.add_argument("--no-packing", action="store_true", help="fused: right-pad instead of packing")
    parser.add_argument("--only", choices=["fixed", "mixed"], help="print one table only")
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--job", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps = args.layers or 4, 1
    args.in_process = args.device == "cuda" if args.in_process is None else args.in_process
    args.steps = args.steps or (10 if args.device == "cuda" else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    args.clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    if args.child:
        import torch

        torch.manual_seed(0)
        print(json.dumps(MODES[args.child](args)))
        return
    start = time.perf_counter()
    load_avg = os.getloadavg()[0]
    print(f"model={args.model} device={args.device} cores={os.cpu_count()} load average at start={load_avg:.2f}")
    for mixed in (False, True):
        if args.only and args.only != ("mixed" if mixed else "fixed"):
            continue
        args.mixed = mixed
        table(args)
    print(f"\nbench time {time.perf_counter() - start:.0f} s, load average at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
