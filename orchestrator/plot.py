"""Loss curves of one or more jobs on one chart (matplotlib, no display needed)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl``), oldest first."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(curves: Mapping[str, Sequence[dict]], output: str | Path, *, title: str = "training loss") -> Path:
    """Draw ``loss`` against ``step`` for each named curve and write a PNG to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, records in curves.items():
        steps = [r["step"] for r in records if r.get("loss") is not None]
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        ax.plot(steps, losses, label=name, linewidth=1.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output
