"""Operator count per training step: floor vs lorafleet fused vs PEFT, the launch-bound view.

On a GPU a small model's step is bound by how many kernels the host issues, not by FLOPs (the H200
run in docs/performance.md: MFU under 3%). This counts the ATen operators one step dispatches,
forward and backward (each is at least one kernel launch on a GPU), for the frozen base (the
floor), lorafleet fused with N LoRA jobs, and one PEFT job; and times the step on a narrow model
(SmolLM2-135M's 30 layers and projections, hidden width cut) where CPU time is mostly dispatch.
Runs in a minute on a CPU, so operator-count work can be measured without a GPU.

    python bench/bench_dispatch.py [--jobs 1 8] [--hidden 64]

Benchmarks are not tests: nothing here asserts a count or a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# operators that only make a new view of existing memory: no kernel on a GPU (still host dispatch time)
VIEWS = {"view", "_unsafe_view", "transpose", "t", "select", "slice", "detach", "unsqueeze", "squeeze", "expand",
         "as_strided", "alias", "permute", "unbind", "split", "split_with_sizes", "_reshape_alias", "narrow",
         "unflatten", "chunk", "lift_fresh", "_to_copy_noop", "numpy_T"}  # fmt: skip


def narrow_smollm(hidden: int):
    """SmolLM2-135M's depth and layout (30 layers, 9 heads / 3 KV heads, SwiGLU) at a narrow width."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = 9 if hidden % 9 == 0 else 4
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=30, num_attention_heads=heads, num_key_value_heads=heads // 3 or 1,
                         tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    return model


class OpCounter:
    """Counts ATen operators dispatched while active (forward and backward alike)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[str(func.overloadpacket.__name__)] += 1
                return func(*args, **(kwargs or {}))

        self.ops: Counter[str] = Counter()
        self.mode = _Mode()

    def __enter__(self) -> OpCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def batches(n: int, micro: int, length: int, vocab: int) -> list:
    import random

    from actors.data import Example

    out = []
    for job in range(n):
        rng = random.Random(job)
        rows = []
        for _ in range(micro):
            ids = [rng.randrange(4, vocab) for _ in range(length)]
            rows.append(Example(ids, list(ids)))
        out.append(rows)
    return out


def floor_step(model, n: int, args):
    from actors.data import pack
    from actors.fused_model import FusedModel
    from actors.lora import BatchLayout

    fused = FusedModel(model)
    packed = pack(batches(n, args.micro, args.seq_len, model.config.vocab_size))
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))

    def step() -> None:
        hidden = fused.hidden_states(packed.input_ids, None, BatchLayout((), packed=True),
                                     position_ids=packed.position_ids, cu_seqlens=packed.cu_seqlens)  # fmt: skip
        sum(s for s, _ in fused.packed_loss_sums(hidden, packed.labels, packed.spans)).backward()

    return step


def fused_step(model, n: int, args):
    from actors.config import AdapterSettings, DataSettings, JobConfig, LoraSettings, TrainSettings
    from actors.engine import FusedEngine
    from tests.conftest import make_tokenizer

    engine = FusedEngine(model, make_tokenizer(), base_model_id="narrow")
    for j, rows in enumerate(batches(n, args.micro, args.seq_len, model.config.vocab_size)):
        cfg = JobConfig(
            name=f"job{j}", base_model="narrow",
            adapter=AdapterSettings("lora", LoraSettings(args.rank, 2 * args.rank, 0.0), ALL_TARGETS),
            data=DataSettings("unused", format="tokens", shuffle=False),
            train=TrainSettings(max_steps=10_000, batch_size=args.micro, micro_batch_size=args.micro,
                                checkpoint_every=10**9, log_every=10**9, seed=j),
            output=f"/tmp/lorafleet-bench-dispatch/job{j}",
        )  # fmt: skip
        engine.add_job(cfg, examples=rows * 2, resume=False)
    return engine.step


def peft_step(model, _n: int, args):
    import torch
    from peft import LoraConfig, get_peft_model

    from actors.data import collate

    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                  target_modules=list(ALL_TARGETS)))  # fmt: skip
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids, labels, mask = collate(batches(1, args.micro, args.seq_len, model.config.vocab_size)[0], 0)

    def step() -> None:
        peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def kernels(counts: Counter) -> int:
    """Operators that are not pure views (each at least one kernel launch on a GPU, or an allocation)."""
    return sum(count for name, count in counts.items() if name not in VIEWS)


def measure(make, n: int, args) -> tuple[int, float, Counter]:
    import torch

    torch.set_num_threads(1)
    step = make(narrow_smollm(args.hidden), n, args)
    step()  # warm-up
    with OpCounter() as counter:
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0)
    return sum(counter.ops.values()), statistics.median(times), counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hidden", type=int, default=72, help="model width (SmolLM2-135M: 576)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent operators of each")
    args = parser.parse_args()
    print(f"narrow SmolLM2 (30 layers, hidden {args.hidden}), L={args.seq_len}, micro={args.micro}/job, r={args.rank}, "
          f"all seven projections; CPU time, 1 thread, median of {args.steps}")  # fmt: skip
    print(f"{'what':<16} | {'ops/step':>8} | {'ops/floor':>9} | {'non-view ops':>12} | {'non-view/floor':>14} | "
          f"{'ms/step':>8} | {'time/floor':>10}")
    rows = [("PEFT, 1 job", peft_step, 1)]
    for n in args.jobs:
        rows += [(f"floor, {n} jobs", floor_step, n), (f"fused, {n} jobs", fused_step, n)]
    floors: dict[int, tuple[int, int, float]] = {}
    for label, make, n in rows:
        ops, seconds, counts = measure(make, n, args)
        real = kernels(counts)
        if make is floor_step:
            floors[n] = (ops, real, seconds)
        base = floors.get(n)
        rel = (f"{ops / base[0]:>9.2f} | {real:>12} | {real / base[1]:>14.2f} | {1000 * seconds:>8.1f} | "
               f"{seconds / base[2]:>10.2f}") if base else \
            f"{'':>9} | {real:>12} | {'':>14} | {1000 * seconds:>8.1f} | {'':>10}"  # fmt: skip
        print(f"{label:<16} | {ops:>8} | {rel}", flush=True)
        if args.top:
            print("   " + ", ".join(f"{name} {count}" for name, count in counts.most_common(args.top)))


if __name__ == "__main__":
    main()
