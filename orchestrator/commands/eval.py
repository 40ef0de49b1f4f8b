"""``lorafleet eval``: mean token loss and perplexity of adapters (or the base model) on a data file.

All adapters given, LoRA and MixLoRA mixed, are attached to ONE copy of the base model and
evaluated in fused batches (each forward carries the same examples once per adapter). The data
goes through the same formats, prompt templates and loss masks as training::

    lorafleet eval --base-model builtin:smollm2-135m-instruct \\
        --adapter out/reverse --adapter out/reverse-mix --data examples/data/reverse.jsonl [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HELP = "mean token loss and perplexity of adapters (LoRA, MixLoRA) or the base model on a data file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", required=True, help="builtin:NAME, a local model directory, or a hub id")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="an exported adapter directory (repeatable); none: evaluate the base model",
    )
    parser.add_argument("--data", required=True, metavar="FILE", help=".json, .jsonl, .csv or .parquet")
    parser.add_argument(
        "--format", default="auto", choices=["auto", "alpaca", "text", "chat", "tokens"], help="record layout"
    )
    parser.add_argument("--max-seq-len", type=int, default=512, help="longer examples are truncated [512]")
    parser.add_argument("--train-on-inputs", action="store_true", help="count prompt tokens in the loss too")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per adapter per forward [8]")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... [auto: cuda if available]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print a JSON list of {adapter, loss, perplexity, tokens}")


def run(args: argparse.Namespace) -> int:
    import torch

    from actors.config import DataSettings
    from actors.data import DataError, load_examples, model_vocab_size
    from actors.engine import FusedEngine
    from actors.models import load_base_model
    from orchestrator.cli import UserError

    if args.batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1 (got {args.batch_size})")
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len: must be >= 2 (got {args.max_seq_len})")
    for directory in args.adapter:
        path = Path(directory)
        if not (path / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {directory}: not an adapter directory (no adapter_config.json)")
    device = resolve_device(args.device)
    if not Path(args.data).is_file():  # before the model loads (tens of seconds)
        raise UserError(f"--data: file not found: {args.data}")
    try:
        model, tokenizer = load_base_model(args.base_model, device=device, dtype=getattr(torch, args.dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"--base-model: cannot load {args.base_model}: {str(exc).removeprefix('base_model: ')}") from None
    settings = DataSettings(
        path=args.data, format=args.format, max_seq_len=args.max_seq_len, train_on_inputs=args.train_on_inputs
    )
    try:
        examples = load_examples(settings, tokenizer, vocab_size=model_vocab_size(model))
    except DataError as exc:  # its messages name the spec's fields: here they are flags
        raise UserError(_as_flags(str(exc))) from None
    engine = FusedEngine(model, tokenizer, base_model_id=args.base_model)
    names: list[str | None] = []
    for index, directory in enumerate(args.adapter):
        name = f"adapter{index}"
        try:
            engine.attach_adapter(name, directory)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--adapter: {directory}: {exc}") from None
        names.append(name)
    if not names:
        names = [None]
    results = engine.evaluate(names, examples, micro_batch_size=args.batch_size)
    labels = list(args.adapter) or [None]
    rows = [
        {"adapter": label, "loss": loss, "perplexity": _perplexity(loss), "tokens": tokens}
        for label, (loss, tokens) in zip(labels, results, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(str(r["adapter"] or "(base model)")) for r in rows)
    print(f"{'adapter':<{width}}  {'loss':>9}  {'perplexity':>12}  {'tokens':>8}")
    for r in rows:
        print(f"{r['adapter'] or '(base model)':<{width}}  {r['loss']:9.4f}  {r['perplexity']:12.3f}  {r['tokens']:8d}")
    return 0


SPEC_FLAGS = {"data.path": "--data", "data.format": "--format", "data.max_seq_len": "--max-seq-len"}


def _as_flags(message: str) -> str:
    """A data error that names a spec field (``data.path: ...``), naming this command's flag instead."""
    for field, flag in SPEC_FLAGS.items():
        message = message.replace(f"{field}:", f"{flag}:").replace(f"set {field}", f"give {flag}")
    return message


def resolve_device(device: str | None) -> str:
    """``--device`` checked before the model loads: auto (None), cpu, cuda or cuda:N that torch can use.

    Raises ``UserError`` naming ``--device``, with the same words as ``lorafleet train`` when CUDA is missing.
    """
    import torch

    from orchestrator.cli import UserError

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise UserError(f"--device: must be auto, cpu, cuda or cuda:N (got {device!r})")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is visible to torch")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device}: torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return device


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
