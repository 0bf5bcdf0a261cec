"""The CLIP trainer behind ``fastclip train``: the synthetic shapes demo on a CPU, or real data
(CSV / webdataset shards) on one or many GPUs with torchrun.

The trainer is split as open_clip's is: ``config`` (the arguments), ``data`` (sampler, batches,
dataset wiring, skipped batches), ``dist_env`` (distributed set-up), ``model`` (the run's model,
new or ``--pretrained``), ``resume`` (``--resume``: the checkpoint against the command),
``progress`` (what a run prints), this module (the generic loop: optimizer, one step,
evaluation, logging) and ``demo`` (the CPU demo's dataset and zero-shot sets, and the time
budget's policies, plugged in as step hooks).

What it does per step, as the CLIP paper and open_clip: AdamW with decoupled weight decay
(none on gains, biases, embeddings, the logit scale), cosine schedule with linear warmup,
optional bf16/fp16 autocast (fp16 with a GradScaler), the logit scale clamped to ln(100) after
each optimizer step, and fastclip's fused loss: the model returns raw features
(``forward(normalize=False)``) and ``ClipLoss(normalize=True)`` normalises inside the kernel.

Determinism. The data position is the step (``fastclip.train.data``), and a resumed run (model,
optimizer, scheduler, scaler, RNG states restored) continues exactly: on the CPU a
killed-and-resumed run ends with the same weights as an uninterrupted one
(tests/train/test_resume.py). W ranks with per-rank batch B see the same global batches as one
process with batch W·B, and fastclip's sharded loss makes their averaged gradients the
full-batch gradient (tests/train/test_ddp.py).

Large batches (``accum_micro_batch=K``): features of the whole batch are computed K samples at
a time without grad; the loss and its gradients w.r.t. the features (leaf tensors) and the
logit scale are computed once over the full batch; each micro-batch is then re-run with grad
and back-propagates its slice of the feature gradients. Parameter gradients equal those of one
big batch (tests/train/test_accum.py); activation memory is that of K samples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .._fileio import atomic_write, strict_json
from ..models.vit import VisionTransformer
from . import checkpoint as ckpt
from .config import PRECISIONS, TrainConfig, plain_fields, validate_config
from .data import (
    BatchDraws,
    StepBatches,
    TrainData,
    ZeroShotSet,
    build_train_data,
    data_fingerprint,
    detect_dataset_type,
    folder_zeroshot_task,
    load_val_batches,
    train_batches,
    trim_padding,
)
from .dist_env import DistEnv, all_reduce_grads, init_distributed, shutdown_distributed, sum_over_ranks
from .model import build_model
from .optim import cosine_lr, create_optimizer
from .progress import Progress, format_eval, format_final
from .resume import resume_from_checkpoint
from .run_folder import (
    RunFolderLock,
    check_not_running,
    check_run_folder,
    fresh_run_folder,
    prepare_run_folder,
    set_aside_later_steps,
    truncate_metrics,
)

__all__ = ["PRECISIONS", "TrainConfig", "Trainer", "StepHook", "train", "DistEnv", "init_distributed",
           "shutdown_distributed", "StepBatches", "trim_padding", "detect_dataset_type", "Progress"]


class StepHook:
    """A run policy the loop calls into (the demo's thread tuning and time budget are hooks).

    ``after_step``: after every optimizer step, with that step's compute time in seconds.
    ``after_log``: at every logged step, with the seconds since training started; a hook may
    shorten ``trainer.total_steps`` here or in ``after_step`` (and then sets ``progress.total``
    to match and calls ``trainer.refresh_lr()``). During the loop ``trainer.progress`` is the
    run's progress display and ``trainer.elapsed_s()`` the seconds since training started.
    """

    def after_step(self, trainer: "Trainer", step: int, step_seconds: float) -> None:
        pass

    def after_log(self, trainer: "Trainer", step: int, elapsed: float, progress: Progress) -> None:
        pass


class Trainer:
    """Builds everything from a ``TrainConfig``; ``run()`` trains and returns the final metrics.

    Attributes after construction: ``model`` (the CLIP module), ``optimizer``, ``scheduler``,
    ``scaler``, ``env`` (rank, world size, device), ``total_steps``, ``start_step``.
    ``hooks``: the run policies (default: ``fastclip.train.demo.run_hooks``: thread tuning, time budget).
    """

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = None, hooks: Optional[List[StepHook]] = None):
        from ..loss import LOSS_MODULES
        from ..ops.losses import get_loss

        plain_fields(cfg)
        validate_config(cfg)     # the CLI's checks, for a config built in Python
        if cfg.steps is not None and cfg.epochs != 1:
            raise ValueError(f"TrainConfig: steps={cfg.steps} and epochs={cfg.epochs} both set the length of the "
                             f"run (steps wins, and epochs was ignored); pass steps=None to train for epochs")
        if cfg.loss not in LOSS_MODULES:
            raise ValueError(f"loss must be one of {sorted(LOSS_MODULES)}, got {cfg.loss!r}")
        self.cfg = cfg
        self.env = env = init_distributed(cfg.device)
        self.log = log or (lambda s: print(s, flush=True))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.output is None:   # claimed by the main rank (the others write nothing there)
            cfg.output = (fresh_run_folder() if env.is_main
                          else os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
        if env.is_main:  # one run per folder: refused now, replaced (--overwrite) once all is built
            check_run_folder(cfg.output, cfg.resume, cfg.overwrite)
            check_not_running(cfg.output)
        self.data_type = detect_dataset_type(cfg.train_data, cfg.dataset_type)

        # Same seed on every rank: identical initial weights (DDP also broadcasts them).
        self._seed_all(cfg.seed)
        if env.device.type == "cpu":
            # Cheap on the CPU, and what makes resume bit-exact.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model = build_model(cfg).to(env.device)
        from ..tokenizer import VOCAB_SIZE
        if self.model.config.vocab_size < VOCAB_SIZE:
            raise ValueError(f"model vocab_size {self.model.config.vocab_size} is smaller than the tokenizer's "
                             f"{VOCAB_SIZE} ids")
        if "logit_bias" in get_loss(cfg.loss).params and self.model.logit_bias is None:
            raise ValueError(f"loss {cfg.loss!r} learns a logit_bias: the model needs one (init_logit_bias must "
                             f"not be None)")
        if "logit_bias" not in get_loss(cfg.loss).params and self.model.logit_bias is not None:
            # it would stay at its initial value, and the model be taken for a sigmoid-loss one
            raise ValueError(f"loss {cfg.loss!r} uses no logit_bias: the model has one (init_logit_bias "
                             f"{self.model.config.init_logit_bias}); drop it or train with loss 'siglip'")
        # ResNet towers run in channels_last: the demo's step (batch 128) takes 0.27 s instead of
        # 0.43 s on a 2-core Zen 4 (oneDNN's NHWC convolutions); images are converted to match.
        self.memory_format = torch.channels_last if self.model.config.is_resnet else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        # BatchNorm (the ResNet towers) needs two samples per forward in training: batches and
        # micro-batches are kept at two or more (a lone sample is skipped or merged).
        self.has_batchnorm = self.model.has_batchnorm
        # A batch of one pair in one process also teaches nothing with the softmax loss: its
        # loss is exactly 0 (a run whose batches kept one loadable sample trained on nothing).
        lone_pair_is_zero = cfg.loss == "clip" and env.world_size == 1
        self.min_batch = 2 if self.has_batchnorm or lone_pair_is_zero else 1
        self.min_batch_why = ("the model's BatchNorm needs 2" if self.has_batchnorm else
                              "the softmax loss of one pair is 0: nothing to contrast")
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.step_model, device_ids=ids)
        else:
            self.train_model = self.step_model
        self.loss_fn = LOSS_MODULES[cfg.loss](rank=env.rank, world_size=env.world_size, normalize=True,
                                backend=cfg.loss_backend, dist_impl=cfg.dist_impl)
        self.optimizer = create_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

        if cfg.loss == "clip" and cfg.batch_size * env.world_size == 1:
            raise ValueError("--batch-size 1 in one process: the softmax loss of a batch of one pair is "
                             "always 0 (nothing to contrast), the model would learn nothing; use a global "
                             "batch of 2 or more")
        self.data: TrainData = build_train_data(cfg, self.data_type, self.model, env)
        try:
            self.data_fingerprint = data_fingerprint(cfg, self.data_type, self.data)
        except OSError:
            self.data_fingerprint = None
        self.dataset, self.data_desc = self.data.dataset, self.data.desc
        self.steps_per_epoch = self.data.steps_per_epoch
        if cfg.steps is not None:
            self.total_steps = cfg.steps
        elif self.steps_per_epoch is not None:
            self.total_steps = cfg.epochs * self.steps_per_epoch
        else:
            raise ValueError("pass --steps (or --train-num-samples for streamed shards)")
        self.planned_steps = self.total_steps       # before a time budget shortens it
        warm = cfg.warmup if cfg.warmup is not None else min(2000, self.total_steps // 10)
        self.warmup_steps = min(warm, self.total_steps)
        # The schedule reads self.total_steps at each step, so a hook (time budget) can shorten it
        # (and then calls refresh_lr).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, self.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        self.start_step, self.skipped_before = 0, 0
        # Carried over from the checkpoint: batches with no loadable sample, the data position
        # (batches drawn: ahead of the step when batches were skipped; the step in checkpoints
        # that predate it) and the wall time.
        self.batches_skipped_before, self.data_position, self.wall_before = 0, 0, 0.0
        self.resumed_from = None
        self.resume_notes: List[str] = []
        if cfg.resume:
            resume_from_checkpoint(self)
        if hooks is None:
            from .demo import run_hooks
            hooks = run_hooks(cfg, env)
        self.hooks: List[StepHook] = list(hooks)
        self.t_first_step: Optional[float] = None
        self._eval_sets_ready = False
        if env.is_main:
            # The evaluation sets are read now (they are the main rank's alone), so that a
            # fault in them is reported before --overwrite deletes the old run (run() does,
            # once the first training batch has loaded).
            self._prepare_eval()

    # -- setup helpers

    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _train_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        return train_batches(self.cfg, self.data, self.model, self.env, self.data_position, self.total_steps)

    def _autocast(self):
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    # -- one step

    def forward_backward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Loss of the (local part of the) batch and parameter gradients in ``.grad`` (averaged
        over ranks); returns the detached loss. Uses micro-batches when ``accum_micro_batch``
        is smaller than the configured batch (``batch_size``, not this batch's size: a rank whose
        batch lost samples to unreadable images took the other path than its peers, and their
        collectives never met: a hang)."""
        k = self.cfg.accum_micro_batch
        if k is None or k >= self.cfg.batch_size:
            with self._autocast():
                img, txt, *params = self.train_model(images, tokens, normalize=False)
                loss = self.loss_fn(img, txt, *params)
            self.scaler.scale(loss).backward()
            return loss.detach()
        return self._forward_backward_micro(images, tokens, k)

    def _forward_backward_micro(self, images: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        model = self.step_model
        chunks = [(i, min(i + k, images.shape[0])) for i in range(0, images.shape[0], k)]
        if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < self.min_batch:
            chunks[-2:] = [(chunks[-2][0], chunks[-1][1])]      # a lone last sample joins the chunk before
        # 1. features of the whole batch, k samples at a time, no activations kept. BatchNorm's
        # running statistics are restored afterwards: step 3 runs the same micro-batches again
        # and updates them once, as a training step without accumulation would.
        bn_state = self._batchnorm_buffers()
        with torch.no_grad(), self._autocast():
            feats = [model(images[a:b], tokens[a:b], normalize=False)[:2] for a, b in chunks]
        self._restore_buffers(bn_state)
        img = torch.cat([f[0] for f in feats]).detach().requires_grad_(True)  # [B, D] leaf
        txt = torch.cat([f[1] for f in feats]).detach().requires_grad_(True)  # [B, D] leaf
        # 2. loss and d loss / d features (+ the scale's and bias's gradients, once) over the
        # full batch
        with self._autocast():
            loss = self.loss_fn(img, txt, *self.model.loss_params())
        self.scaler.scale(loss).backward()
        # 3. re-run each micro-batch with grad and push its slice of the feature gradients
        for a, b in chunks:
            with self._autocast():
                i_c, t_c = model(images[a:b], tokens[a:b], normalize=False)[:2]
            torch.autograd.backward([i_c, t_c], [img.grad[a:b].to(i_c.dtype), txt.grad[a:b].to(t_c.dtype)])
        if self.env.distributed:  # DDP's hooks were bypassed: average like DDP would
            all_reduce_grads(list(self.model.parameters()), self.env.world_size)
        return loss.detach()

    def _batchnorm_buffers(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of every BatchNorm buffer (running mean/var, batches tracked)."""
        if not self.has_batchnorm:
            return []
        return [(b, b.detach().clone()) for m in self.model.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]

    @staticmethod
    def _restore_buffers(saved: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)

    def optimizer_step(self) -> None:
        if self.cfg.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():  # OpenAI: clip the temperature so logits are at most 100x cosine
            self.model.logit_scale.clamp_(0, math.log(100))

    # -- evaluation

    def _prepare_eval(self) -> None:
        if self._eval_sets_ready:
            return
        self._eval_sets_ready = True
        cfg = self.cfg
        self.zs_sets: Dict[str, ZeroShotSet] = {}
        self.eval_skipped = 0
        if self.data_type == "shapes":
            from .demo import shapes_zeroshot_sets
            self.zs_sets.update(shapes_zeroshot_sets(cfg, self.model))
        self.zs_folder = None           # (name, ImageFolderDataset, templates), decoded at each eval
        self._folder_skipped_counted = False
        if cfg.zeroshot_data:
            self.zs_folder = folder_zeroshot_task(cfg, self.model, self.zs_sets)
            # now, not at the first evaluation (after --overwrite)
            self.zs_folder[1].check_decodable(f"--zeroshot-data {cfg.zeroshot_data!r}")
        self.val_batches = None
        if cfg.val_data:
            self.val_batches, skipped = load_val_batches(cfg, self.model, log=self.log)
            self.eval_skipped += skipped

    def _has_eval(self) -> bool:
        """Whether there is anything to evaluate (zero-shot sets or validation data)."""
        self._prepare_eval()
        return bool(self.zs_sets or self.zs_folder or self.val_batches)

    @torch.no_grad()
    def evaluate(self, step: int) -> Dict[str, float]:
        """Zero-shot top-1/top-5 per task (+ chance level), and val loss / retrieval recall when
        ``val_data`` is set (fastclip.eval.evaluate). Runs on the main rank only."""
        from ..eval._checks import eval_mode
        from ..eval.evaluate import add_mean_top1, folder_zeroshot_metrics, val_metrics, zeroshot_metrics
        self._prepare_eval()
        model, dev = self.model, self.env.device
        out: Dict[str, float] = {"type": "eval", "step": step}
        with eval_mode(model):
            with self._autocast():
                out.update(zeroshot_metrics(model, self.zs_sets, device=dev))
                if self.zs_folder is not None:
                    name, ds, tmpl = self.zs_folder
                    m, skipped = folder_zeroshot_metrics(model, ds, name, tmpl, 256, dev, self.cfg.workers)
                    out.update(m)
                    add_mean_top1(out)
                    if not self._folder_skipped_counted:     # the same files at every evaluation
                        self.eval_skipped += skipped
                        self._folder_skipped_counted = True
                if self.val_batches:
                    out.update(val_metrics(model, self.val_batches, self.cfg.loss, dev, self.cfg.loss_backend))
        return out

    # -- the loop

    def _announce(self) -> None:
        """The run's first lines and ``config.json`` (main rank)."""
        cfg, env = self.cfg, self.env
        n_params = sum(p.numel() for p in self.model.parameters())
        over = f" {json.dumps(cfg.model_overrides)}" if cfg.model_overrides else ""
        name = f"{cfg.model}{over}" if cfg.pretrained is None else f"from {cfg.pretrained}"
        from .demo import ThreadTuner
        threads = (f"{torch.get_num_threads()} or 1 (the faster, timed at steps 2-9)"
                   if any(isinstance(h, ThreadTuner) for h in self.hooks) else str(torch.get_num_threads()))
        msg = (f"fastclip train: model {name} ({n_params / 1e6:.1f}M params) on {self.data_desc}\n"
               f"  {self.total_steps} steps x batch {cfg.batch_size * env.world_size}"
               f" ({env.world_size} rank{'s' if env.world_size > 1 else ''}), device {env.device}, "
               f"precision {cfg.precision}, threads {threads}, output {cfg.output}")
        if cfg.resume == "latest" and not self.resumed_from:
            msg += f"\n  --resume latest: no checkpoint in {cfg.output} yet: a new run"
        if self.resumed_from:
            msg += f"\n  resumed from {self.resumed_from} at step {self.start_step}"
            for note in self.resume_notes:
                msg += f"\n  note: {note}"
        for note in self.data.notes:
            msg += f"\n  {note}"
        if self.start_step == 0 and self.total_steps > 1 and self.warmup_steps >= self.total_steps:
            msg += (f"\n  note: --warmup {cfg.warmup} is not shorter than the run: the warmup is cut to its "
                    f"{self.total_steps} steps, the learning rate rises to its peak at the last step and "
                    f"never decays (a smaller --warmup leaves room for the cosine decay)")
        if cfg.save_every and self.start_step + cfg.save_every >= self.total_steps:
            # (checkpoints are for resuming: none is written at the last step, whose model is
            # model.safetensors; --steps 3 --save-every 10 wrote none, unannounced)
            msg += (f"\n  note: --save-every {cfg.save_every} reaches no step before the run's last "
                    f"({self.total_steps}): no checkpoint is written")
        if cfg.grad_checkpointing and not isinstance(self.model.visual, VisionTransformer):
            msg += ("\n  note: --grad-checkpointing recomputes transformer blocks: the text tower's here; "
                    "the ResNet image tower keeps its activations")
        self.log(msg)
        # cwd: what the relative paths of "train" are relative to (fastclip eval reads them).
        text = json.dumps({"train": dataclasses.asdict(cfg), "model": self.model.config.to_dict(),
                           "world_size": env.world_size, "cwd": os.getcwd()}, indent=2)
        path = os.path.join(cfg.output, "config.json")
        try:        # atomic: a full disk tore it, and a torn config.json barred the folder to --overwrite
            atomic_write(path, lambda tmp: _write_text(tmp, text), suffix=".json")
        except OSError as e:
            raise ckpt.CheckpointError(f"cannot write {path}: {e}") from None

    def run(self) -> Dict[str, Any]:
        lock = RunFolderLock(self.cfg.output) if self.env.is_main else None
        try:
            return self._run(lock)
        finally:
            if lock is not None:
                lock.release()

    def refresh_lr(self) -> None:
        """Set the next step's learning rate from the schedule as it now stands: the scheduler
        set it after the last step, from the ``total_steps``/``warmup_steps`` a hook has since
        changed (one step at the old schedule's rate)."""
        sch = self.scheduler
        for g, base, f in zip(self.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            g["lr"] = base * f(sch.last_epoch)
        sch._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _run(self, lock: Optional[RunFolderLock]) -> Dict[str, Any]:
        cfg, env = self.cfg, self.env
        out_dir = cfg.output
        log_every = cfg.log_every or max(1, self.total_steps // 40)
        progress = Progress(self.total_steps, self.start_step, cfg.progress if env.is_main else "none",
                            every=log_every)
        self.model.train()
        batches = self._train_batches()
        draw = BatchDraws(self, batches, self.data_position)
        # The first usable batch before the run folder is touched: data found unusable only
        # when read (every image missing, empty or unreadable shards) fails the command with
        # the old run in place, as --overwrite promises.
        try:
            first = (draw.next_usable(self.start_step, progress.message)
                     if self.start_step < self.total_steps else None)
        except ValueError:        # DataError: the data's notes (said by _announce, not reached) explain it
            if env.is_main:
                for note in self.data.notes:
                    self.log(f"  {note}")
            raise
        if env.is_main:
            os.makedirs(cfg.output, exist_ok=True)
            lock.acquire()      # held until the run ends: no second run writes here meanwhile
            prepare_run_folder(cfg.output, cfg.resume, cfg.overwrite, self.log)
            self._announce()
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if env.is_main and cfg.resume:  # the steps after the checkpoint are trained, and logged, again
            moved = set_aside_later_steps(out_dir, self.start_step)
            if moved:
                self.log(f"  what the run made after step {self.start_step} (the timeline resumed from an "
                         f"earlier checkpoint leaves: {', '.join(sorted(os.listdir(moved)))}) moved to {moved}")
            # Resumed at the last step, the final evaluation runs again: its earlier row goes.
            dropped = truncate_metrics(metrics_path, self.start_step,
                                       evals_at_step=self.start_step < self.total_steps)
            if dropped:
                self.log(f"  metrics.jsonl: dropped {dropped} row(s) after step {self.start_step} (trained again)")
        mlog = open(metrics_path, "a", encoding="utf-8") if env.is_main else None

        def record(row):
            if mlog is not None:
                try:
                    mlog.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
                    mlog.flush()
                except OSError as e:     # a full disk: one line, as for the checkpoints
                    raise ckpt.CheckpointError(f"cannot write {metrics_path}: {e}") from None

        t_start = time.time()
        self.progress = progress
        self.elapsed_s = lambda: self.wall_before + time.time() - t_start    # the run's seconds so far
        # images/s counts training alone: the seconds spent evaluating and writing checkpoints
        # inside a log window are left out of it (a window holding an eval read 1 img/s).
        t_window, n_window, paused = time.time(), 0, 0.0
        last_eval: Dict[str, float] = {}
        last_ips = 0.0
        diverged = False        # warned once that the loss is not finite
        if cfg.eval_at_start and self.start_step == 0 and env.is_main and self._has_eval():
            t_pause = time.time()
            last_eval = self.evaluate(0)
            record(last_eval)
            progress.message(format_eval(last_eval))
            paused += time.time() - t_pause
        self.model.train()
        step = self.start_step
        try:
            while step < self.total_steps:
                if first is not None:
                    (images, tokens), first = first, None
                else:
                    images, tokens = draw.next_usable(step, progress.message)
                images = images.to(env.device, non_blocking=True, memory_format=self.memory_format)
                tokens = trim_padding(tokens).to(env.device, non_blocking=True)
                t_step = time.time()
                loss = self.forward_backward(images, tokens)
                lr = self.optimizer.param_groups[0]["lr"]        # this step's (the scheduler moves on)
                self.optimizer_step()
                step += 1
                if step == self.start_step + 1:
                    self.t_first_step = time.time()
                step_seconds = time.time() - t_step
                for h in self.hooks:
                    h.after_step(self, step, step_seconds)
                n_window += images.shape[0] * env.world_size
                if step % log_every == 0 or step == self.total_steps or step == self.start_step + 1:
                    now = time.time()
                    epoch = None if self.steps_per_epoch is None else (step - 1) // max(1, self.steps_per_epoch)
                    row = {"type": "train", "step": step, "epoch": epoch,
                           "loss": loss.float().item(), "scale": self.model.logit_scale.exp().item(),
                           "lr": lr,
                           "images_per_s": n_window / max(now - t_window - paused, 1e-9),
                           "elapsed_s": self.wall_before + now - t_start}
                    if self.model.logit_bias is not None:
                        row["bias"] = self.model.logit_bias.item()
                    t_window, n_window, paused = now, 0, 0.0
                    for h in self.hooks:
                        h.after_log(self, step, row["elapsed_s"], progress)
                    row["total_steps"] = self.total_steps
                    if not math.isfinite(row["loss"]) and not diverged and env.is_main:
                        # (a run at --lr 1e9 logged nan from step 2 and ended "done", exit 0, silent)
                        diverged = True
                        self.log(f"warning: the loss is {row['loss']} at step {step} (lr {lr:.3g}): the run "
                                 f"has diverged (it trains on to the end); a lower --lr, --grad-clip-norm or "
                                 f"another --precision may avoid it")
                    record(row)
                    last_ips = row["images_per_s"]
                    progress.update(step, loss=row["loss"], scale=row["scale"], bias=row.get("bias"),
                                    images_per_s=last_ips)
                elif progress.mode == "bar" and env.device.type == "cpu":  # .item() is free on the CPU
                    bias = self.model.logit_bias
                    progress.update(step, loss=loss.item(), scale=self.model.logit_scale.exp().item(),
                                    bias=None if bias is None else bias.item(), images_per_s=last_ips)
                if not cfg.log_every:       # 1/40 of the run, as the run is now (a time budget shortens it)
                    log_every = progress.every = max(1, self.total_steps // 40)
                eval_every = cfg.eval_every or max(1, self.total_steps // 4)  # total may shrink (time budget)
                # A periodic eval a few steps before the final one (the budget moved the end
                # onto it) repeats it: the demo evaluated at steps 760 and 763, ~2 s each.
                periodic = step % eval_every == 0 and self.total_steps - step >= max(1, eval_every // 4)
                t_pause = time.time()
                if (periodic or step == self.total_steps) and env.is_main and self._has_eval():
                    last_eval = self.evaluate(step)
                    record(last_eval)
                    progress.message(format_eval(last_eval))
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    total_skipped = sum_over_ranks(env, draw.skipped) + self.skipped_before
                    if env.is_main:
                        extra = {"skipped": total_skipped,
                                 "skipped_batches": self.batches_skipped_before + draw.skipped_batches,
                                 "data_position": draw.drawn,
                                 "wall_time_s": self.wall_before + time.time() - t_start,
                                 "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                                 "global_batch": cfg.batch_size * env.world_size,
                                 "world_size": env.world_size, "data": self.data_fingerprint,
                                 "config": dataclasses.asdict(cfg), "model_config": self.model.config.to_dict()}
                        ckpt.save_training_state(out_dir, step, self.model, self.optimizer, self.scheduler,
                                                 self.scaler, extra=extra, keep=cfg.keep_checkpoints)
                paused += time.time() - t_pause
            if self.start_step >= self.total_steps and env.is_main and self._has_eval():
                # Resumed at the last step: nothing to train, the final evaluation still runs.
                last_eval = self.evaluate(step)
                record(last_eval)
                progress.message(format_eval(last_eval))
        finally:
            progress.close()
        wall = self.wall_before + time.time() - t_start
        total_skipped = sum_over_ranks(env, draw.skipped) + self.skipped_before
        result: Dict[str, Any] = {}
        if env.is_main:
            result = self._final_metrics(loss if self.total_steps > self.start_step else None, wall,
                                         total_skipped, last_eval)
            result["train_batches_skipped"] = self.batches_skipped_before + draw.skipped_batches
            record({"type": "final", **result})
            mlog.close()
            self._write_outputs(result, metrics_path)
        if env.distributed:
            dist.barrier()
        return result

    def _final_metrics(self, loss: Optional[torch.Tensor], wall: float, total_skipped: int,
                       last_eval: Dict[str, float]) -> Dict[str, Any]:
        """Main rank: save the model; the content of ``metrics.json``."""
        from ..models import save_checkpoint
        cfg = self.cfg
        model_path = os.path.join(cfg.output, "model.safetensors")
        # The step in the metadata: fastclip eval tells this model from newer checkpoints by it.
        from safetensors import SafetensorError
        try:
            save_checkpoint(self.model, model_path,
                            metadata={"fastclip_step": str(self.total_steps)})
        except (OSError, SafetensorError) as e:    # a full disk, as for the checkpoints
            raise ckpt.CheckpointError(f"cannot write the model {model_path}: {e}") from None
        result: Dict[str, Any] = {
            "steps": self.total_steps, "global_batch": cfg.batch_size * self.env.world_size,
            "wall_time_s": wall, "train_samples_skipped": total_skipped,
            "eval_samples_skipped": getattr(self, "eval_skipped", 0),
            "final_loss": loss.float().item() if loss is not None else None,
            "checkpoint": model_path}
        for k, v in last_eval.items():
            if k.startswith("zeroshot/") and k.endswith("top1"):
                name = k.replace("zeroshot/", "zero_shot_").replace("/top1", "_top1")
                result[name.replace("mean_top1", "top1_mean")] = v
            elif k.startswith("val/"):
                result[k] = v
        return result

    def _write_outputs(self, result: Dict[str, Any], metrics_path: str) -> None:
        """Main rank: ``metrics.json``, ``curves.png`` and the closing lines."""
        cfg, out_dir = self.cfg, self.cfg.output
        path = os.path.join(out_dir, "metrics.json")
        text = json.dumps(strict_json(result), indent=2, allow_nan=False)
        try:
            atomic_write(path, lambda tmp: _write_text(tmp, text), suffix=".json")
        except OSError as e:
            raise ckpt.CheckpointError(f"cannot write {path}: {e}") from None
        if cfg.plot:
            from .plots import plot_curves
            png_path = os.path.join(out_dir, "curves.png")
            try:
                png = plot_curves(metrics_path, png_path)
            except OSError as e:
                raise ckpt.CheckpointError(f"cannot write {png_path}: {e}") from None
            result["curves"] = png
            if png is None:
                self.log("curves.png not written: matplotlib is not installed (pip install \"fastclip-fused[plot]\")")
        self.log(format_final(result, out_dir))


def train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train with ``cfg`` and return the final metrics (``metrics.json``'s content, plus
    ``output``, the run folder, and ``curves``, the path of ``curves.png`` or None, when
    ``cfg.plot``; empty on ranks other than 0). ``log``: where the run's announcements and
    summary go (default ``print``); the progress display and the lines between steps
    (evaluations, skipped batches) go to stderr.

    ``cfg`` is checked first (ValueError/TypeError naming a field the CLI would refuse) and not
    modified: with ``output=None`` each call trains into a new ``runs/<date>-<time>`` folder.
    The run trains with gradients on and float32 as torch's default dtype whatever the caller's
    context (``no_grad``, ``inference_mode``, ``set_default_dtype(torch.float64)``). The
    process-wide settings the run changes are restored when it returns or raises: torch's CPU
    thread count (``cfg.threads``, the demo's thread choice), its deterministic-algorithms mode
    (on for a CPU run, for bit-exact resume) and its default dtype. The random generators stay
    as the run left them.
    """
    run_cfg = dataclasses.replace(cfg)
    try:
        return _train(run_cfg, log)
    except BaseException:
        # The runs/<date>-<time> folder made for output=None, left empty by a refused config.
        if cfg.output is None and run_cfg.output and os.path.isdir(run_cfg.output):
            with contextlib.suppress(OSError):
                os.rmdir(run_cfg.output)          # only an empty folder: a run's files stay
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _train(cfg: TrainConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """:func:`train` on ``cfg`` itself: ``cfg.output`` is set to the folder chosen for
    ``output=None`` (the CLI removes that folder again when the run fails before using it)."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    dtype = torch.get_default_dtype()
    try:
        # A caller's no_grad/inference_mode made the first backward fail ("element 0 of tensors
        # does not require grad") after the run folder was written; its default dtype of
        # float64 trained a float64 model labelled fp32.
        torch.set_default_dtype(torch.float32)
        with torch.inference_mode(False), torch.enable_grad():
            out = Trainer(cfg, log=log).run()
        if out:
            out["output"] = cfg.output
    except BaseException:
        shutdown_distributed(clean=False)     # a peer may be gone: no barrier
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_default_dtype(dtype)
    shutdown_distributed()
    return out
