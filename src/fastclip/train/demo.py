"""The CPU demo's parts of a run, kept out of the generic loop: the synthetic shapes data and its
zero-shot sets, and two run policies: CPU thread tuning (on by default for a CPU run without
``--threads``) and the opt-in time budget.

The policies are step hooks (``fastclip.train.trainer.StepHook``): the loop calls
``after_step`` after every optimizer step and ``after_log`` at every logged step. Neither
changes the data or, without a time budget, the number of steps: the demo is a fixed amount
of work, and a slower machine only takes longer.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch

from .config import TrainConfig
from .data import TrainData, ZeroShotSet
from .dist_env import DistEnv, broadcast_int
from .trainer import StepHook


def shapes_train_data(cfg: TrainConfig, model) -> TrainData:
    """The synthetic shapes (``fastclip.datasets.shapes``) at the model's resolution, read in index
    order (random by construction; consecutive indices form the batches' blocks)."""
    from ..datasets.shapes import ShapesDataset
    ds = ShapesDataset(cfg.demo_train_samples, seed=cfg.seed, split="train", image_size=model.image_size,
                       context_length=model.context_length, design=cfg.demo_design,
                       group_size=cfg.demo_group_size, group_prob=cfg.demo_group_prob)
    return TrainData(ds, augment=False, shuffle=False, steps_per_epoch=None,
                     desc=f"synthetic shapes ({model.image_size}x{model.image_size}, generated on the fly)")


def shape_templates() -> List[str]:
    """Zero-shot templates of the shape task: the shape in each task colour, with and without a
    size ("a red {}", "a small red {}", ...): the captions' own wording, and every class gets the
    same colour and size mix."""
    from ..datasets.shapes import COLOR_NAMES, SIZES
    return [f"a {z}{c} {{}}" for c in COLOR_NAMES for z in ("", *(f"{z} " for z in SIZES))]


def color_templates() -> List[str]:
    """Zero-shot templates of the colour task: the colour on each task shape, with and without a size."""
    from ..datasets.shapes import SHAPES, SIZES
    return [f"a {z}{{}} {s}" for s in SHAPES for z in ("", *(f"{z} " for z in SIZES))]


def shapes_zeroshot_sets(cfg: TrainConfig, model) -> Dict[str, ZeroShotSet]:
    """Zero-shot shape (6 classes) and colour (8 classes) on images of the held-out (colour,
    shape) pairs."""
    from ..datasets.shapes import COLOR_NAMES, SHAPES, ShapesDataset
    held = ShapesDataset(cfg.demo_eval_samples, seed=cfg.seed + 1, split="heldout", image_size=model.image_size,
                         context_length=model.context_length)
    imgs, shapes, colors = held.eval_tensors()
    return {"shape": (imgs, shapes, list(SHAPES), shape_templates()),
            "color": (imgs, colors, list(COLOR_NAMES), color_templates())}


class ThreadTuner(StepHook):
    """Pick the faster CPU thread count by timing both.

    On a busy machine several OpenMP threads can be far slower than one (their barriers wait for
    descheduled threads; measured on a 2-core machine under load ~12: the demo's
    step took 167 ms with 2 threads, 78 ms with 1). Steps +2..+5 run with all threads, +6..+9
    with one (the median of each is compared); then the faster setting stays.
    """

    FIRST, PER_SETTING = 2, 4

    def __init__(self) -> None:
        self.times: Dict[int, List[float]] = {}
        self.done = False

    def after_step(self, trainer, step: int, step_seconds: float) -> None:
        if self.done:
            return
        k = step - trainer.start_step
        if k < self.FIRST:
            return
        n = torch.get_num_threads()
        self.times.setdefault(n, []).append(step_seconds)
        if k == self.FIRST + self.PER_SETTING - 1:
            torch.set_num_threads(1)
        elif k == self.FIRST + 2 * self.PER_SETTING - 1:
            med = {t: sorted(v)[len(v) // 2] for t, v in self.times.items()}
            best = min(med, key=med.get)
            torch.set_num_threads(best)
            if trainer.env.is_main:
                desc = ", ".join(f"{t} thread{'s' if t > 1 else ''} {1000 * v:.0f} ms/step"
                                 for t, v in sorted(med.items()))
                trainer.log(f"CPU threads: {desc}; using {best}")
            self.done = True


class TimeBudget(StepHook):
    """Shorten the run to fit ``budget`` seconds of training: after the first steps, measure the
    speed and, if the planned steps would not fit, lower the step count so that the whole cosine
    schedule (warmup, decay to 0) fits. The warmup keeps its share of the run: the default
    (``warmup`` None) is a tenth of the shortened run (at most 2000 steps), a given ``warmup``
    shrinks in proportion. Estimated at the 8th, 16th, 32nd, ... step of the run and at each
    logged step, until 3/4 of the way (announced again when the estimate moves by more than 5%):
    at logged steps alone, a long planned run (logged every 1/40 of it) trained far past its
    budget before the first estimate. All ranks agree because the estimates are taken at the
    same steps, from rank 0's. Runs with a budget are not step-reproducible: their length
    depends on the machine's speed."""

    def __init__(self, budget: float):
        self.budget = budget
        self.announced: Optional[int] = None
        self.estimated_at: Optional[int] = None

    def after_step(self, trainer, step: int, step_seconds: float) -> None:
        done = step - trainer.start_step
        if done >= 8 and done & (done - 1) == 0:
            self._estimate(trainer, step, trainer.elapsed_s(), trainer.progress)

    @staticmethod
    def warmup_for(total: int, warmup: Optional[int], planned: int) -> int:
        """The warmup of a run shortened from ``planned`` to ``total`` steps (the run's
        ``--warmup``: None for the default rule). The planned run's warmup kept whole made the
        shortened run mostly warmup (500 of 5000 planned steps, cut to 120: the peak at step
        78)."""
        if warmup is None:
            return min(2000, total // 10)
        return min(total, int(round(warmup * total / max(1, planned))))

    def after_log(self, trainer, step: int, elapsed: float, progress) -> None:
        if step != self.estimated_at:
            self._estimate(trainer, step, elapsed, progress)

    def _estimate(self, trainer, step: int, elapsed: float, progress) -> None:
        self.estimated_at = step
        done = step - trainer.start_step
        if done < 8 or step > 3 * trainer.total_steps // 4:
            return
        # Speed from the steps after the first (which pays for start-up), evaluations included;
        # the remaining budget decides the remaining steps.
        per_step = (time.time() - trainer.t_first_step) / (done - 1)
        fit = step + int(max(0.0, self.budget - elapsed) / per_step)
        fit = broadcast_int(trainer.env, fit)
        planned = trainer.planned_steps
        new_total = max(step + 1, min(planned, fit))
        if new_total != trainer.total_steps:
            warm = self.warmup_for(new_total, trainer.cfg.warmup, planned)
            # big cuts only, and again when the estimate has moved by more than 5%
            moved = self.announced is None or abs(new_total - self.announced) > 0.05 * self.announced
            if trainer.env.is_main and new_total < 0.95 * planned and moved:
                secs = f"{self.budget:.0f}" if self.budget >= 10 else f"{self.budget:.2g}"   # (0.5 read "0")
                progress.message(f"time budget {secs} s at {per_step:.2f} s/step: training about "
                                 f"{new_total} steps instead of {planned}, {warm} of them warmup "
                                 f"(re-estimated as the run goes)")
                self.announced = new_total
            trainer.total_steps = progress.total = new_total
            trainer.warmup_steps = warm
            trainer.refresh_lr()


def run_hooks(cfg: TrainConfig, env: DistEnv) -> List[StepHook]:
    """The default run policies: the thread tuner on a CPU in one process when ``--threads`` is not
    given and more than one thread is available, and the time budget when one is asked for."""
    hooks: List[StepHook] = []
    if (cfg.threads is None and env.device.type == "cpu" and torch.get_num_threads() > 1
            and not env.distributed):
        hooks.append(ThreadTuner())
    if cfg.time_budget:
        hooks.append(TimeBudget(cfg.time_budget))
    return hooks


__all__ = ["ThreadTuner", "TimeBudget", "color_templates", "run_hooks", "shape_templates", "shapes_train_data",
           "shapes_zeroshot_sets"]

