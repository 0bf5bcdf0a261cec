"""Training curves from ``metrics.jsonl``: loss, logit scale and zero-shot accuracy vs step.

matplotlib is optional (``pip install "fastclip-fused[plot]"``); without it ``plot_curves`` returns None.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional


def read_metrics(path: str) -> List[Dict]:
    """The rows of ``metrics.jsonl``; a ``null`` value (the file's form of a NaN, e.g. a
    diverged loss) reads as NaN, which the plots leave as a gap."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: (math.nan if v is None else v) for k, v in r.items()} if isinstance(r, dict) else r
            for r in rows]


def plot_curves(metrics_jsonl: str, out_png: str) -> Optional[str]:
    """Write a 3-panel PNG (train loss, logit scale, zero-shot top-1 per task) to ``out_png``.
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_jsonl)
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], color="tab:blue")
    axes[0].set(title="contrastive loss", xlabel="step")
    axes[1].plot(steps, [r["scale"] for r in train], color="tab:orange")
    axes[1].set(title="logit scale", xlabel="step")
    tasks = sorted({k for r in evals for k in r if k.startswith("zeroshot/") and k.endswith("/top1")})
    for k in tasks:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        axes[2].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=k.split("/")[1])
    chance = sorted({r["chance/" + k.split("/")[1]] for r in evals for k in tasks if "chance/" + k.split("/")[1] in r})
    for c in chance:
        axes[2].axhline(100 * c, color="gray", lw=0.8, ls="--")
    axes[2].set(title="zero-shot top-1 (%)" + (" (dashed: chance)" if chance else ""), xlabel="step", ylim=(0, 100))
    if tasks:
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
