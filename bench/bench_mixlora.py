"""MixLoRA fused beside two LoRA jobs vs each job alone: tokens/s and peak memory.

Usage::

    .venv/bin/python bench/bench_mixlora.py [--model builtin|random] [--steps 4] [--seq 128] [--micro 4]

``builtin`` (default when cached) is SmolLM2-135M-Instruct from ``~/.cache/lorafleet``; ``random``
is a random Llama of the same shape. Each scenario runs in its own process so peak memory is its
own (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU). One warm-up step is not timed.
Prints figures side by side; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_model(kind: str, device: str):
    import torch

    from actors.models import cache_root, load_base_model

    if kind == "builtin" and (cache_root() / "models" / "smollm2-135m-instruct" / "config.json").exists():
        model, _tok = load_base_model("builtin:smollm2-135m-instruct", device=device)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)


def job_configs(args):
    from actors.config import (
        AdapterSettings,
        DataSettings,
        JobConfig,
        LoraSettings,
        MixLoraSettings,
        TrainSettings,
    )

    expert = LoraSettings(8, 16, 0.05)
    adapters = {
        "mixlora": AdapterSettings(
            "mixlora", expert, ALL, mixlora=MixLoraSettings(num_experts=8, top_k=2, expert=expert)
        ),
        "lora-qv": AdapterSettings("lora", LoraSettings(8, 16, 0.05), ("q_proj", "v_proj")),
        "lora-all": AdapterSettings("lora", LoraSettings(16, 32, 0.05), ALL),
    }
    out = {}
    for name, adapter in adapters.items():
        out[name] = JobConfig(
            name=name, base_model="bench", adapter=adapter,
            data=DataSettings("unused", format="tokens", shuffle=False),
            train=TrainSettings(max_steps=args.steps + 1, batch_size=args.micro, micro_batch_size=args.micro,
                                checkpoint_every=10**6),
            output=f"/tmp/lorafleet-bench-mixlora/{name}",
        )  # fmt: skip
    return out


def run_scenario(args) -> dict:
    import resource

    import torch

    from actors.data import Example
    from actors.engine import FusedEngine

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device)
    vocab = model.config.vocab_size
    engine = FusedEngine(model, SimpleNamespace(pad_token_id=0))
    for name in args.jobs.split(","):
        cfg = job_configs(args)[name]
        rng = random.Random(zlib.crc32(name.encode()))  # a job's data is the same fused and alone
        n = args.micro * (args.steps + 1)
        examples = []
        for _ in range(n):
            ids = [rng.randrange(4, vocab) for _ in range(rng.randint(args.seq // 2, args.seq))]
            examples.append(Example(ids, [-100] * 8 + ids[8:]))
        engine.add_job(cfg, examples=examples, resume=False)
    engine.step()  # warm-up, not timed
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter if device == "cuda" else time.process_time  # CPU time: a shared CPU's load stays out
    tokens, start = 0, clock()
    for _ in range(args.steps):
        tokens += engine.step().tokens
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = clock() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"jobs": args.jobs, "tokens": tokens, "seconds": seconds, "peak_mib": peak, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", choices=["builtin", "random"])
    parser.add_argument("--steps", type=int, default=4, help="timed fused steps per scenario")
    parser.add_argument("--seq", type=int, default=128, help="max tokens per example")
    parser.add_argument("--micro", type=int, default=4, help="examples per job per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", default=None, help=argparse.SUPPRESS)  # internal: run one scenario
    args = parser.parse_args()
    if args.jobs:
        print(json.dumps(run_scenario(args)))
        return
    common = [f"--model={args.model}", f"--steps={args.steps}", f"--seq={args.seq}", f"--micro={args.micro}",
              f"--threads={args.threads}"]  # fmt: skip
    results = []
    for jobs in ["mixlora,lora-qv,lora-all", "mixlora", "lora-qv", "lora-all"]:
        done = subprocess.run([sys.executable, __file__, *common, f"--jobs={jobs}"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"scenario {jobs} failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    fused, alone = results[0], results[1:]
    alone_tokens = sum(r["tokens"] for r in alone)
    alone_seconds = sum(r["seconds"] for r in alone)
    print(f"model={args.model} device={fused['device']} steps={args.steps} micro={args.micro} seq<={args.seq}")
    print(f"{'scenario':<28} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'peak MiB':>9}")
    for r in results:
        print(f"{r['jobs']:<28} {r['tokens']:8d} {r['seconds']:8.2f} {r['tokens'] / r['seconds']:9.1f} {r['peak_mib']:9.0f}")
    print(f"{'alone, one after another':<28} {alone_tokens:8d} {alone_seconds:8.2f} "
          f"{alone_tokens / alone_seconds:9.1f} {max(r['peak_mib'] for r in alone):9.0f}")  # fmt: skip
    print(f"fused speed-up over alone: {(fused['tokens'] / fused['seconds']) / (alone_tokens / alone_seconds):.2f}x")


if __name__ == "__main__":
    main()
