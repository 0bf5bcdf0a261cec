"""Run the demo (``fastclip train``, its defaults) for several seeds and write the table of results.

    python scripts/demo_seeds.py                    # seeds 0-4, one after the other (make demo-seeds)
    python scripts/demo_seeds.py --seeds 0 1 --jobs 2 -- --threads 1

Each seed runs exactly what ``make demo`` runs, plus ``--seed k --output OUT/seed-k``; arguments
after ``--`` are passed on to ``fastclip train``. After each run the trained model is also scored
on drawings of a second, independently written renderer (``tests/train/alt_shapes.py``: other
proportions, positions anywhere, any gray background, other RGB values per colour name), on the
held-out pairs and on all 48 pairs. Writes ``OUT/table.md`` (the per-seed table with mean,
standard deviation, min and max) and ``OUT/summary.json``; prints the table. Wall time and CPU time
(user + sys) are those of each ``fastclip train`` process; the load average is read before and
after each run, since wall time on a shared machine depends on it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [("held-out shape", "zero_shot_shape_top1"), ("held-out colour", "zero_shot_color_top1"),
           ("2nd renderer held-out shape", "alt_heldout_shape"), ("2nd renderer held-out colour", "alt_heldout_color"),
           ("2nd renderer all pairs shape", "alt_all_shape"), ("2nd renderer all pairs colour", "alt_all_color")]


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def second_renderer_scores(model_path: str) -> dict:
    """Zero-shot top-1 of the model at ``model_path`` on the second renderer's drawings, with the
    demo's own prompts."""
    sys.path.insert(0, ROOT)
    import torch

    from fastclip.datasets.shapes import COLOR_NAMES, SHAPES
    from fastclip.eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot
    from fastclip.models import load_checkpoint
    from fastclip.train.demo import color_templates, shape_templates
    from tests.train import alt_shapes

    model = load_checkpoint(model_path).eval()
    out = {}
    with torch.no_grad():
        clf_shape = build_zeroshot_classifier(model, list(SHAPES), shape_templates())
        clf_color = build_zeroshot_classifier(model, list(COLOR_NAMES), color_templates())
        for name, (imgs, shapes, colors) in (("heldout", alt_shapes.heldout_set(480, model.image_size)),
                                              ("all", alt_shapes.all_pairs_set(480, model.image_size))):
            out[f"alt_{name}_shape"] = evaluate_zeroshot(model, imgs, shapes, classifier=clf_shape)["top1"]
            out[f"alt_{name}_color"] = evaluate_zeroshot(model, imgs, colors, classifier=clf_color)["top1"]
    return out


def _start(seed: int, out: str, extra: list) -> tuple:
    run_dir = os.path.join(out, f"seed-{seed}")
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "train.log"), "w", encoding="utf-8")
    # --overwrite: a rerun replaces the previous run of that seed (a run folder holds one run)
    cmd = [sys.executable, "-m", "fastclip", "train", "--seed", str(seed), "--output", run_dir, "--overwrite",
           "--progress", "none", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, log, run_dir, time.time(), _loadavg()


def _finish(seed: int, proc, log, run_dir: str, t0: float, load0: float) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    log.close()
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"seed {seed}: fastclip train exited with {proc.returncode}\n{tail}")
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    row = {"seed": seed, "steps": metrics["steps"], "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
           "load_before": load0, "load_after": _loadavg(),
           "zero_shot_shape_top1": metrics["zero_shot_shape_top1"],
           "zero_shot_color_top1": metrics["zero_shot_color_top1"]}
    row.update(second_renderer_scores(metrics["checkpoint"]))
    with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
        row["threads"] = next((line.strip() for line in f if line.startswith("CPU threads:")), "")
    return row


def table(rows: list) -> str:
    head = "| seed | steps | " + " | ".join(c for c, _ in COLUMNS) + " | wall s | CPU s | load |"
    lines = [head, "|" + "---:|" * (len(COLUMNS) + 5)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['steps']} | " + " | ".join(f"{100 * r[k]:.1f}%" for _, k in COLUMNS)
                     + f" | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    if len(rows) > 1:
        for name, fn in (("mean", statistics.mean), ("sd", statistics.stdev), ("min", min), ("max", max)):
            lines.append(f"| {name} | | " + " | ".join(f"{100 * fn([r[k] for r in rows]):.1f}%" for _, k in COLUMNS)
                         + f" | {fn([r['wall_s'] for r in rows]):.0f} | {fn([r['cpu_s'] for r in rows]):.0f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [-h] [--seeds K [K ...]] [--out OUT] [--jobs J] "
                                      "[-- FASTCLIP_TRAIN_ARGS ...]",
                                epilog="arguments after -- go to every `fastclip train` run, e.g. "
                                       "-- --threads 1 or -- --loss siglip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=os.path.join("runs", "demo-seeds"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: each run as make demo runs it)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    rows, pending, running = [], list(args.seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            print(f"seed {seed}: fastclip train --seed {seed} {' '.join(extra)}".rstrip(), flush=True)
            running.append((seed, *_start(seed, out, extra)))
        seed, *rest = running.pop(0)
        row = _finish(seed, *rest)
        rows.append(row)
        print(f"seed {seed}: held-out shape {100 * row['zero_shot_shape_top1']:.1f}%, colour "
              f"{100 * row['zero_shot_color_top1']:.1f}%; 2nd renderer {100 * row['alt_heldout_shape']:.1f}% / "
              f"{100 * row['alt_heldout_color']:.1f}%; {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU"
              + (f"; {row['threads']}" if row["threads"] else ""), flush=True)
    rows.sort(key=lambda r: r["seed"])
    text = table(rows)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"args": extra, "rows": rows}, f, indent=2)
    print(text)
    print(f"wrote {os.path.join(out, 'table.md')}, {os.path.join(out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
