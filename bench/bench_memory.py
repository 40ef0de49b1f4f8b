"""How good is the memory model? Fit profiles, then predict held-out fused groups and measure them.

1. Profile three adapter shapes (``lorafleet``'s profiler: each shape alone at a small grid of
   (B, L), fit ``b0 + b1*B*L + b2*B*L^2`` by NNLS).
2. For >= 12 held-out (group, B, L) points (1-4 jobs, mixed ranks/targets/dropout, B and L off
   the fitting grid, mixed L within a group so padding matters) predict the group's peak
   (``Profiler.predict``, margin 0) and measure it: each point trains the real group for a few
   fused steps in a fresh process (peak RSS on CPU; NVML + torch peak on CUDA).
3. Print a table and the median / worst relative error of the whole peak, and of the dynamic
   part (peak minus static) which is the harder number.

Usage::

    .venv/bin/python bench/bench_memory.py                 # random Llama, CPU: 14 min on 2 cores at load ~6 (less when idle)
    .venv/bin/python bench/bench_memory.py --model builtin # SmolLM2-135M (slow on CPU: ~1 h)
    .venv/bin/python bench/bench_memory.py --device cuda   # against NVML on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.config import AdapterSettings, LoraSettings
from actors.profiler import GroupMember, Profiler, measure_group

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES: dict[str, AdapterSettings] = {
    "A": AdapterSettings("lora", LoraSettings(r=8, alpha=16, dropout=0.05), ALL),
    "B": AdapterSettings("lora", LoraSettings(r=16, alpha=32, dropout=0.05), ("q_proj", "v_proj")),
    "C": AdapterSettings("lora", LoraSettings(r=4, alpha=8, dropout=0.0), ("q_proj", "k_proj", "v_proj", "o_proj")),
}
# The fitting grid: every shape alone at these (B, L). Nothing below reuses an L from here.
FIT_GRID = ((1, 64), (4, 64), (2, 128), (1, 256))
# Held-out groups: (shape, B, L) per job.
HELD_OUT: list[list[tuple[str, int, int]]] = [
    [("A", 2, 96)],
    [("B", 3, 160)],
    [("C", 1, 320)],
    [("A", 3, 176)],
    [("A", 1, 200), ("B", 2, 200)],
    [("A", 2, 80), ("C", 2, 144)],
    [("B", 4, 48), ("C", 1, 192)],
    [("A", 1, 96), ("B", 1, 96), ("C", 1, 96)],
    [("A", 2, 112), ("B", 1, 112), ("C", 2, 112)],
    [("A", 1, 72), ("B", 2, 150), ("C", 1, 240)],
    [("A", 1, 100), ("A", 2, 100), ("B", 1, 100), ("C", 1, 100)],
    [("B", 1, 288), ("C", 4, 40)],
    [("A", 2, 60), ("B", 2, 60), ("C", 2, 60), ("A", 2, 60)],
    [("C", 3, 220)],
    # strongly mixed lengths: the engine packs them (no padding); a padded prediction was 87-234 % over
    [("A", 2, 32), ("B", 2, 384)],
    [("C", 4, 40), ("A", 1, 448), ("B", 2, 64)],
    [("A", 2, 48), ("A", 2, 48), ("C", 1, 512)],
]


def make_tiny_model(path: Path) -> str:
    """A random Llama (hidden 256, 4 layers, vocab 8192; ~4.2 M params) saved with a tokenizer."""
    if (path / "config.json").is_file():
        return str(path)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(8188)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)  # fmt: skip
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random Llama), builtin (SmolLM2-135M), or a path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=2, help="fused steps per measurement [2]")
    parser.add_argument("--cache", help="profile cache dir (default: a fresh temporary dir, so fitting runs)")
    parser.add_argument("--shared-process", action="store_true",
                        help="profile each shape in one process (grid points in sequence) instead of one each")
    parser.add_argument("--points", type=int, default=len(HELD_OUT),
                        help=f"held-out points to run (<= {len(HELD_OUT)}) [all]")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    if args.model == "tiny":
        base = make_tiny_model(work / "tiny-llama")
    elif args.model == "builtin":
        base = "builtin:smollm2-135m-instruct"
    else:
        base = args.model
    profiler = Profiler(args.cache or work / "profiles", device=args.device, dtype=args.dtype, grid=FIT_GRID,
                        steps=args.steps, isolate=not args.shared_process)  # fmt: skip
    t0 = time.perf_counter()
    for name, adapter in SHAPES.items():
        fit, source = profiler.activation(base, adapter)
        print(f"fit {name} {profiler.key(base, adapter).adapter}: b0={fit.b0 / 2**20:.1f} MiB "
              f"b1={fit.b1 / 1024:.2f} KiB/token b2={fit.b2:.1f} B/token^2 ({source})", flush=True)  # fmt: skip
    static, static_source = profiler.static(base)
    print(f"static {static / 2**20:.1f} MiB ({static_source}); profiling took {time.perf_counter() - t0:.0f} s "
          f"in {profiler.runs} processes\n", flush=True)  # fmt: skip

    rows = []
    header = f"{'#':>2} {'group (shape B L)':44} {'Lmax':>5} {'pred MiB':>9} {'meas MiB':>9} {'err':>7} " \
             f"{'dyn pred':>9} {'dyn meas':>9} {'dyn err':>8}"  # fmt: skip
    print(header)
    for i, group in enumerate(HELD_OUT[: args.points]):
        members = [(f"j{k}-{s}", SHAPES[s], b, seq) for k, (s, b, seq) in enumerate(group)]
        pred = profiler.predict(base, members, margin=0.0)
        m = measure_group(base, [GroupMember(n, a, b, seq) for n, a, b, seq in members], device=args.device,
                          dtype=args.dtype, steps=args.steps)  # fmt: skip
        dyn_pred = pred.group_peak_bytes - pred.static_bytes
        err = (pred.group_peak_bytes - m.peak_bytes) / m.peak_bytes
        dyn_err = (dyn_pred - m.dynamic_bytes) / m.dynamic_bytes
        desc = " + ".join(f"{s}{b}x{seq}" for s, b, seq in group) + ("" if pred.packed else " (padded)")
        rows.append({"group": desc, "l_pad": pred.seq_len, "predicted_bytes": pred.group_peak_bytes,
                     "measured_bytes": m.peak_bytes, "measured_static_bytes": m.static_bytes,
                     "predicted_static_bytes": pred.static_bytes, "error": err, "dynamic_error": dyn_err,
                     "seconds": m.seconds})  # fmt: skip
        print(f"{i + 1:>2} {desc:44} {pred.seq_len:>5} {pred.group_peak_bytes / 2**20:>9.1f} "
              f"{m.peak_bytes / 2**20:>9.1f} {err:>+7.1%} {dyn_pred / 2**20:>9.1f} "
              f"{m.dynamic_bytes / 2**20:>9.1f} {dyn_err:>+8.1%}", flush=True)  # fmt: skip
    errs = [abs(r["error"]) for r in rows]
    dyn = [abs(r["dynamic_error"]) for r in rows]
    print(f"\n{len(rows)} held-out points on {base} ({args.device}, {args.dtype}); total {time.perf_counter() - t0:.0f} s")
    print(f"whole peak:   median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%}")
    print(f"dynamic part: median |error| {statistics.median(dyn):.1%}, worst {max(dyn):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base_model": base, "device": args.device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
