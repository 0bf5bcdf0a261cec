"""PNG plots of a loss benchmark: time and peak memory against N.

One figure per quantity (``<prefix>-time.png``: forward+backward median ms;
``<prefix>-memory.png``: peak extra MiB), one panel per (dtype, D), log-log axes, one
line per method (the floor dashed). matplotlib is optional: without it nothing is
drawn and the caller is told why. Rows are those of the benchmark CSV (strings or
numbers); only rows with status "ok" are drawn.

Usage: ``python -m fastclip.bench.plot RESULT.csv [--prefix OUT_PREFIX]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["plot_rows", "main"]

# The two reference lines keep their look; every other method (fastclip's backends from
# the registry, the loss's peers) takes the next colour in order of appearance.
_FIXED = {"floor": dict(color="black", linestyle="--", marker="."),
          "naive": dict(color="tab:red", marker="s")}
_CYCLE = [dict(color=c, marker=m) for c, m in
          (("tab:orange", "^"), ("tab:blue", "o"), ("tab:green", "o"), ("tab:purple", "o"),
           ("tab:brown", "D"), ("tab:pink", "v"), ("tab:olive", "P"), ("tab:cyan", "X"))]


def _styles(methods: list[str]) -> dict[str, dict]:
    out, k, seen = {}, 0, set()
    for m in methods:
        base = m.split(",")[0]          # "floor, 2 threads": the floor's look
        if base in _FIXED:
            # the same method at another thread count: its look, fainter
            out[m] = dict(_FIXED[base], **({"alpha": 0.5} if base in seen else {}))
            seen.add(base)
        else:
            out[m] = _CYCLE[k % len(_CYCLE)]
            k += 1
    return out


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def plot_rows(rows: list[dict], prefix: str, log=print) -> list[str]:
    """Write ``prefix-time.png`` and ``prefix-memory.png``; returns the paths written."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        log(f"plots skipped: matplotlib is not installed ({e}); pip install matplotlib")
        return []
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        log("plots skipped: no successful measurement")
        return []
    device = ok[0].get("device", "")
    name = ok[0].get("device_name", "")
    loss = ok[0].get("loss") or "clip"
    from .report import method_label  # noqa: PLC0415
    # One line per method, and per thread count where --append merged runs of several.
    series = {id(r): method_label(r, ok) for r in ok}
    methods = list(dict.fromkeys(series[id(r)] for r in ok))
    styles = _styles(methods)
    panels = []
    for r in ok:
        key = (r["dtype"], int(r["D"]))
        if key not in panels:
            panels.append(key)
    paths = []
    for col, ylabel, suffix in (("fwd_bwd_ms", "forward+backward, ms (median)", "time"),
                                ("peak_extra_mb", "peak extra memory, MiB", "memory")):
        k = len(panels)
        ncols = min(3, k)
        nrows = math.ceil(k / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows),
                                 squeeze=False)
        for i, (dt, d) in enumerate(panels):
            ax = axes[i // ncols][i % ncols]
            drawn = 0
            for m in methods:
                pts = sorted((int(r["N"]), _num(r.get(col))) for r in ok
                             if series[id(r)] == m and r["dtype"] == dt and int(r["D"]) == d)
                pts = [(n, v) for n, v in pts if v is not None]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m,
                        **styles[m])
                drawn += 1
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dt}, D={d}")
            ax.set_xlabel("N (batch)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if drawn:
                ax.legend(fontsize=8)
            else:      # e.g. peak memory rounds to 0 MiB at tiny N: nothing to put on log axes
                ax.text(0.5, 0.5, "no positive values", ha="center", transform=ax.transAxes)
        for j in range(k, nrows * ncols):
            axes[j // ncols][j % ncols].axis("off")
        fig.suptitle(f"fastclip {loss} loss, {device}: {name}")
        fig.tight_layout()
        path = f"{prefix}-{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclip.bench.plot",
                                description="Plot a fastclip benchmark CSV (time, memory vs N).")
    p.add_argument("csv", help="result CSV written by fastclip.bench.contrastive_loss")
    p.add_argument("--prefix", default=None,
                   help="output prefix (default: the CSV path without .csv)")
    a = p.parse_args(argv)
    import csv  # noqa: PLC0415

    from .report import read_table, table_problem  # noqa: PLC0415
    try:
        columns, rows = read_table(a.csv)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        p.error(f"{a.csv!r}: cannot read it ({e.strerror if isinstance(e, OSError) and e.strerror else e})")
    # The checks of `fastclip bench --summarize`: a row cut short was dropped without a word.
    why, overhead = table_problem(columns, rows)
    if overhead:
        why = ("an --overhead table, not a sweep's results CSV (fastclip bench without --overhead); "
               "the overhead, distributed and tokenizer tables are not plotted")
    if why and rows:
        p.error(f"{a.csv!r}: {why}")
    prefix = a.prefix or os.path.splitext(a.csv)[0]
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        p.error(f"--prefix {prefix!r}: folder {folder!r} does not exist")
    try:
        paths = plot_rows(rows, prefix)
    except (ValueError, KeyError, TypeError) as e:     # e.g. N "1k" in a hand-edited row
        p.error(f"{a.csv!r}: a value the plot cannot read ({type(e).__name__}: {e}), a truncated or "
                f"edited file?")
    for path in paths:
        print(path)
    return 0 if paths else 1


if __name__ == "__main__":
    sys.exit(main())
