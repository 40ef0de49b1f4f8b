"""``make demo``: train the bundled example jobs together on the embedded SmolLM2-135M-Instruct.

Three LoRA jobs on different tasks and one MixLoRA job on their mix train fused in one process,
with live progress; then a summary (state, steps, loss, adapter paths) and ``out/demo-loss.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.cli import main as cli_main
from orchestrator.plot import plot_losses, read_metrics
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["reverse", "arith", "fanoutqa", "mix-mixlora"]


def main() -> int:
    specs = [str(ROOT / "examples" / "jobs" / f"{name}.yaml") for name in JOBS]
    code = cli_main(["train", *specs])
    curves = {}
    for path in specs:
        spec = load_spec(path)
        try:
            curves[spec.name] = read_metrics(spec.output_dir())
        except FileNotFoundError:
            continue
    if curves:
        png = plot_losses(curves, "out/demo-loss.png", title="lorafleet demo: 4 jobs fused on SmolLM2-135M")
        print(f"loss curves: {png}")
    return code


if __name__ == "__main__":
    sys.exit(main())
