"""The demo is a fixed amount of work: the same seed and thread count give the same metrics, and a
slower machine only takes longer (same steps, same data). Also: what a run says when it cannot
draw curves.png."""
import builtins
import json
import os
import time

import pytest
import torch

from fastclip import cli
from fastclip.train import StepHook, TrainConfig, Trainer
from fastclip.train.demo import ThreadTuner

TIMING_KEYS = ("elapsed_s", "images_per_s", "wall_time_s")


def _demo_config(out, *argv):
    """The CLI's demo configuration (``fastclip train`` + ``argv``), made short."""
    args = cli.build_parser().parse_args(["train", "--output", str(out), "--steps", "12", "--eval-every", "6",
                                          "--log-every", "1", "--demo-eval-samples", "48", "--progress", "none",
                                          "--no-plot", *argv])
    return cli.config_from_args(args)


def _rows(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS + ("checkpoint",)} for r in rows]


class SlowMachine(StepHook):
    """Makes every step take ``seconds`` longer, as on a slower or busier machine."""

    def __init__(self, seconds):
        self.seconds = seconds

    def after_step(self, trainer, step, step_seconds):
        time.sleep(self.seconds)


def test_same_seed_and_threads_give_identical_metrics(tmp_path):
    torch.set_num_threads(1)
    results = []
    for name in ("a", "b"):
        cfg = _demo_config(tmp_path / name, "--threads", "1", "--seed", "3")
        results.append((Trainer(cfg, log=lambda s: None).run(), _rows(cfg.output)))
    (ra, rows_a), (rb, rows_b) = results
    assert rows_a == rows_b
    assert [r["step"] for r in rows_a if r["type"] == "eval"] == [0, 6, 12]
    assert ra["steps"] == rb["steps"] == 12
    assert ra["zero_shot_shape_top1"] == rb["zero_shot_shape_top1"]
    # and another seed is another run
    cfg = _demo_config(tmp_path / "c", "--threads", "1", "--seed", "4")
    Trainer(cfg, log=lambda s: None).run()
    assert _rows(cfg.output) != rows_a


def test_step_count_does_not_depend_on_machine_speed(tmp_path):
    """The demo's own policies (thread tuning when --threads is not given) on a machine that is
    0.15 s slower per step: the same 12 steps on the same data; only the opt-in time budget
    shortens a slow run."""
    torch.set_num_threads(1)
    fast = _demo_config(tmp_path / "fast", "--threads", "1")
    Trainer(fast, log=lambda s: None).run()
    slow = _demo_config(tmp_path / "slow", "--threads", "1")
    Trainer(slow, log=lambda s: None, hooks=[SlowMachine(0.15)]).run()
    assert _rows(slow.output) == _rows(fast.output)  # same steps, same data, same numbers

    torch.set_num_threads(2)
    try:
        tuned = _demo_config(tmp_path / "tuned")  # no --threads: the thread tuner runs
        t = Trainer(tuned, log=lambda s: None)
        assert any(isinstance(h, ThreadTuner) for h in t.hooks)
        t.hooks.append(SlowMachine(0.15))
        r = t.run()
    finally:
        torch.set_num_threads(1)
    assert r["steps"] == 12
    assert [x["step"] for x in _rows(tuned.output) if x["type"] == "train"] == list(range(1, 13))

    budget = _demo_config(tmp_path / "budget", "--threads", "1", "--time-budget", "1")
    tb = Trainer(budget, log=lambda s: None)
    tb.hooks.append(SlowMachine(0.15))
    r = tb.run()
    assert r["steps"] < 12  # what the default no longer does


def test_missing_matplotlib_is_said_once(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-vit", output=str(tmp_path / "run"), steps=2, batch_size=16, warmup=1,
                      demo_train_samples=64, demo_eval_samples=16, progress="none", threads=1)
    lines = []
    r = Trainer(cfg, log=lines.append).run()
    said = [line for line in "\n".join(lines).splitlines() if "curves.png" in line]
    assert len(said) == 1 and "matplotlib" in said[0] and "not written" in said[0], lines
    assert r["curves"] is None and not os.path.exists(tmp_path / "run" / "curves.png")


def test_curves_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-vit", output=str(tmp_path / "run"), steps=2, batch_size=16, warmup=1,
                      demo_train_samples=64, demo_eval_samples=16, progress="none", threads=1,
                      eval_at_start=True, eval_every=1)
    lines = []
    r = Trainer(cfg, log=lines.append).run()
    assert r["curves"] and os.path.getsize(r["curves"]) > 1000
    assert not any("not written" in line for line in lines)
