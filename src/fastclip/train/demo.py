"""The CPU demo's parts of a run, kept out of the generic loop: the synthetic shapes data and its
zero-shot sets, and the two run policies of a time budget (CPU thread tuning, shortening the
schedule to fit).

The policies are step hooks (``fastclip.train.trainer.StepHook``): the loop calls
``after_step`` after every optimizer step and ``after_log`` at every logged step.
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from .config import TrainConfig
from .data import TrainData, ZeroShotSet
from .dist_env import DistEnv, broadcast_int
from .trainer import StepHook


def shapes_train_data(cfg: TrainConfig, model) -> TrainData:
    """The synthetic shapes (``fastclip.datasets.shapes``) at the model's resolution, read in index
    order (random by construction; consecutive indices form the colour groups)."""
    from ..datasets.shapes import ShapesDataset
    ds = ShapesDataset(cfg.demo_train_samples, seed=cfg.seed, split="train", image_size=model.image_size,
                       context_length=model.context_length, group_size=cfg.demo_group_size,
                       group_prob=cfg.demo_group_prob, backgrounds=cfg.demo_backgrounds)
    return TrainData(ds, augment=False, shuffle=False, steps_per_epoch=None,
                     desc=f"synthetic shapes ({model.image_size}x{model.image_size}, generated on the fly)")


def shapes_zeroshot_sets(cfg: TrainConfig, model) -> Dict[str, ZeroShotSet]:
    """Zero-shot shape (6 classes) and colour (8 classes) on single-shape images of the held-out
    (colour, shape) pairs."""
    from ..datasets.shapes import COLOR_NAMES, SHAPES, ShapesDataset
    from ..eval.templates import COLOR_TEMPLATES, SHAPE_TEMPLATES
    held = ShapesDataset(cfg.demo_eval_samples, seed=cfg.seed + 1, split="heldout", image_size=model.image_size,
                         context_length=model.context_length, backgrounds=cfg.demo_backgrounds)
    imgs, shapes, colors = held.eval_tensors()
    # The shape ensemble adds "a red {}.", "a green {}.", ... (all eight colours for every
    # class): "a star" alone was only ever paired with stars of the seven colours it is
    # trained in, so its embedding leans away from the held-out colour; averaging over
    # every colour gives each class the same colour mix (held-out shape 0.12 -> 0.15 and
    # training pairs unchanged, demo model after 560 steps).
    shape_templates = SHAPE_TEMPLATES + [f"a {c} {{}}." for c in COLOR_NAMES]
    return {"shape": (imgs, shapes, list(SHAPES), shape_templates),
            "color": (imgs, colors, list(COLOR_NAMES), COLOR_TEMPLATES)}


class ThreadTuner(StepHook):
    """Pick the faster CPU thread count by timing both.

    On a busy machine several OpenMP threads can be far slower than one (their barriers wait for
    descheduled threads; measured here under load 8 on 2 cores: 7 img/s with 2 threads, 250 img/s
    with 1). Steps +2..+4 run with all threads, +5..+7 with one; then the faster setting stays.
    """

    def __init__(self) -> None:
        self.times: Dict[int, List[float]] = {}
        self.done = False

    def after_step(self, trainer, step: int, step_seconds: float) -> None:
        if self.done:
            return
        k = step - trainer.start_step
        if k < 2:
            return
        n = torch.get_num_threads()
        self.times.setdefault(n, []).append(step_seconds)
        if k == 4:
            torch.set_num_threads(1)
        elif k == 7:
            best = min(self.times, key=lambda t: sum(self.times[t]) / len(self.times[t]))
            torch.set_num_threads(best)
            if trainer.env.is_main:
                desc = ", ".join(f"{t} thread{'s' if t > 1 else ''} {1000 * sum(v) / len(v):.0f} ms/step"
                                 for t, v in sorted(self.times.items()))
                trainer.log(f"CPU threads: {desc}; using {best}")
            self.done = True


class TimeBudget(StepHook):
    """Shorten the run to fit ``budget`` seconds of training: after the first steps, measure the
    speed and, if the planned steps would not fit, lower the step count so that the whole cosine
    schedule (warmup, decay to 0) fits. Re-estimated at each logged step until 3/4 of the way;
    all ranks agree because the estimate is taken from rank 0. Runs with a budget are not
    step-reproducible: their length depends on the machine's speed."""

    def __init__(self, budget: float):
        self.budget = budget

    def after_log(self, trainer, step: int, elapsed: float, progress) -> None:
        done = step - trainer.start_step
        if done < 8 or step > 3 * trainer.total_steps // 4:
            return
        # Speed from the steps after the first (which pays for start-up), evaluations included;
        # the remaining budget decides the remaining steps.
        per_step = (time.time() - trainer.t_first_step) / (done - 1)
        fit = step + int(max(0.0, self.budget - elapsed) / per_step)
        fit = broadcast_int(trainer.env, fit)
        new_total = max(step + 1, min(trainer.cfg.steps or trainer.total_steps, fit))
        if new_total != trainer.total_steps:
            if trainer.env.is_main and new_total < 0.95 * trainer.total_steps:  # report big cuts only
                progress.message(f"time budget {self.budget:.0f} s at {per_step:.2f} s/step: training "
                                 f"{new_total} steps instead of {trainer.total_steps}")
            trainer.total_steps = progress.total = new_total
            trainer.warmup_steps = min(trainer.warmup_steps, new_total)


def time_budget_hooks(cfg: TrainConfig, env: DistEnv) -> list:
    """The hooks of ``cfg.time_budget`` (none without a budget): the budget itself and, on the
    CPU in one process with several threads and no ``--threads``, the thread tuner."""
    if not cfg.time_budget:
        return []
    hooks: list = []
    if (cfg.threads is None and env.device.type == "cpu" and torch.get_num_threads() > 1
            and not env.distributed):
        hooks.append(ThreadTuner())
    hooks.append(TimeBudget(cfg.time_budget))
    return hooks


__all__ = ["ThreadTuner", "TimeBudget", "shapes_train_data", "shapes_zeroshot_sets", "time_budget_hooks"]

