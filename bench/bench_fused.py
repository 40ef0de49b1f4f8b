"""Fused multi-LoRA training vs the same jobs one after another with PEFT, and vs the floor.

Every measurement runs in its own subprocess so peak memory (``VmHWM`` on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is clean. Printed side by side:

* floor: the frozen base model's forward + backward (to activations only, as LoRA needs) over
  exactly the tokens of one fused step;
* fused: lorafleet with N LoRA jobs in one batch (one engine step = one micro-batch per job);
* peft-seq: the same N jobs trained one after another with PEFT + torch AdamW.

Usage::

    python bench/bench_fused.py                       # SmolLM2-135M, N = 1 4 8, L = 128, B = 2 per job
    python bench/bench_fused.py --jobs 1 4 --steps 2 --model tiny
    python bench/bench_fused.py --mixed               # per-job lengths drawn from 32..512

Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def job_lengths(args: argparse.Namespace, n: int) -> list[int]:
    if not args.mixed:
        return [args.seq_len] * n
    rng = random.Random(7)
    return [rng.choice([32, 64, 128, 256, 512]) for _ in range(n)]


def load(args: argparse.Namespace):
    import torch

    if args.model == "tiny":
        from tests.conftest import make_tiny_llama, make_tokenizer

        return make_tiny_llama(hidden_size=256, intermediate_size=704, num_hidden_layers=4), make_tokenizer()
    from actors.models import load_base_model

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return load_base_model("builtin:smollm2-135m-instruct", device=args.device, dtype=dtype)


def examples_for(n_rows: int, length: int, vocab: int, seed: int):
    from actors.data import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n_rows):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        out.append(Example(ids, list(ids)))
    return out


def run_fused(args: argparse.Namespace) -> dict:
    from actors.config import AdapterSettings, DataSettings, JobConfig, LoraSettings, TrainSettings
    from actors.engine import FusedEngine

    model, tok = load(args)
    engine = FusedEngine(model, tok, base_model_id=args.model)
    lengths = job_lengths(args, args.n)
    vocab = model.config.vocab_size
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
        engine.add_job(cfg, examples=examples_for(args.micro * 4, lengths[j], vocab, j), resume=False)
    engine.step()  # warm-up
    _sync(args)
    times, tokens = [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        result = engine.step()
        _sync(args)
        times.append(time.perf_counter() - t0)
        tokens += result.tokens
    pad = 1 - result.tokens / max(1, result.padded_tokens)
    return {"seconds_per_step": min(times), "tokens_per_s": tokens / sum(times), "peak": peak_bytes(args.device),
            "padding": pad}


def run_floor(args: argparse.Namespace) -> dict:
    import torch

    model, _tok = load(args)
    lengths = job_lengths(args, args.n)
    length = max(lengths)
    rows = args.n * args.micro
    ids = torch.randint(4, model.config.vocab_size, (rows, length), device=args.device)
    mask = torch.zeros_like(ids)
    for j, ln in enumerate(lengths):
        mask[j * args.micro : (j + 1) * args.micro, :ln] = 1
    embed = model.get_input_embeddings()
    decoder = model.get_decoder()
    head = model.get_output_embeddings()

    def step() -> None:
        x = embed(ids).detach().requires_grad_(True)  # gradients flow to activations, not frozen weights
        hidden = decoder(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        keep = mask[:, 1:].bool()
        logits = head(hidden[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep])
        loss.backward()

    step()
    _sync(args)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        _sync(args)
        times.append(time.perf_counter() - t0)
    real = int(mask.sum())
    return {"seconds_per_step": min(times), "tokens_per_s": real * len(times) / sum(times),
            "peak": peak_bytes(args.device)}


def run_peft_sequential(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from actors.data import collate

    base, tok = load(args)
    lengths = job_lengths(args, args.n)
    total_time, tokens = 0.0, 0
    for j in range(args.n):
        model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(ALL_TARGETS)),
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = examples_for(args.micro, lengths[j], base.config.vocab_size, j)
        ids, labels, mask = (t.to(args.device) for t in collate(batch, tok.pad_token_id or 0))

        def step(model=model, opt=opt, ids=ids, labels=labels, mask=mask) -> None:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()

        step()
        _sync(args)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            _sync(args)
            total_time += time.perf_counter() - t0
            tokens += int(mask.sum())
        del model, opt
    return {"seconds_per_step": total_time / args.steps, "tokens_per_s": tokens / total_time,
            "peak": peak_bytes(args.device)}


def _sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


MODES = {"fused": run_fused, "floor": run_floor, "peft-seq": run_peft_sequential}


def measure(mode: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--n", str(n), "--model", args.model, "--device", args.device,
           "--seq-len", str(args.seq_len), "--micro", str(args.micro), "--rank", str(args.rank),
           "--steps", str(args.steps)] + (["--mixed"] if args.mixed else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--model", default="builtin", choices=["builtin", "tiny"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2, help="sequences per job per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed", action="store_true", help="per-job sequence lengths from 32..512")
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.manual_seed(0)
        print(json.dumps(MODES[args.child](args)))
        return

    gib = 1 << 30
    print(f"model={args.model} device={args.device} L={'mixed 32..512' if args.mixed else args.seq_len} "
          f"micro={args.micro}/job r={args.rank} steps={args.steps}")
    header = (f"{'jobs':>4} | {'floor s/step':>12} | {'fused s/step':>12} | {'fused/floor':>11} | "
              f"{'fused tok/s':>11} | {'PEFT-seq tok/s':>14} | {'fused/PEFT':>10} | {'fused peak GiB':>14} | "
              f"{'PEFT peak GiB':>13} | {'pad %':>5}")
    print(header)
    print("-" * len(header))
    one_job_peak = None
    for n in args.jobs:
        floor = measure("floor", n, args)
        fused = measure("fused", n, args)
        seq = measure("peft-seq", n, args)
        one_job_peak = one_job_peak or fused["peak"]
        print(f"{n:>4} | {floor['seconds_per_step']:>12.3f} | {fused['seconds_per_step']:>12.3f} | "
              f"{fused['seconds_per_step'] / floor['seconds_per_step']:>11.2f} | {fused['tokens_per_s']:>11.0f} | "
              f"{seq['tokens_per_s']:>14.0f} | {fused['tokens_per_s'] / seq['tokens_per_s']:>10.2f} | "
              f"{fused['peak'] / gib:>14.2f} | {seq['peak'] / gib:>13.2f} | {100 * fused['padding']:>5.1f}",
              flush=True)
    if one_job_peak:
        print(f"peak memory with {args.jobs[-1]} fused jobs / 1 job: {fused['peak'] / one_job_peak:.2f}x")


if __name__ == "__main__":
    main()
