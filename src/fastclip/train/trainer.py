"""The CLIP trainer behind ``fastclip train``: the synthetic shapes demo on a CPU, or real data
(CSV / webdataset shards) on one or many GPUs with torchrun.

What it does per step, as the CLIP paper and open_clip: AdamW with decoupled weight decay
(none on gains, biases, embeddings, the logit scale), cosine schedule with linear warmup,
optional bf16/fp16 autocast (fp16 with a GradScaler), the logit scale clamped to ln(100) after
each optimizer step, and fastclip's fused loss: the model returns raw features
(``forward(normalize=False)``) and ``ClipLoss(normalize=True)`` normalises inside the kernel.

Data order and determinism. For map-style data (shapes, CSV) the global batch of step ``s`` is
a slice of ``randperm(len, seed, epoch)`` with ``epoch = s // steps_per_epoch`` (the shapes dataset,
random by construction, is read in index order), and rank ``r``
takes its ``r``-th sub-slice; random augmentation is seeded per (seed, epoch, index). The data
position is therefore the step, and a resumed run (model, optimizer, scheduler, scaler, RNG
states restored) continues exactly: on the CPU a killed-and-resumed run ends with the same
weights as an uninterrupted one (tests/train/test_resume.py). W ranks with per-rank batch B
see the same global batches as one process with batch W·B, and fastclip's sharded loss makes
their averaged gradients the full-batch gradient (tests/train/test_ddp.py).

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
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .optim import cosine_lr, create_optimizer

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Every knob of ``fastclip train`` (the CLI flags are these names with dashes).

    Defaults are the CPU demo's: the ``demo`` model on the synthetic shapes dataset.
    ``batch_size`` is per rank (as open_clip); the global batch is ``batch_size * world_size``.
    ``steps`` wins over ``epochs``; webdataset shards need ``steps`` or ``train_num_samples``.
    ``time_budget`` (the demo's default in the CLI): after the first steps the trainer measures
    its speed and, if ``steps`` would not fit in the budget, lowers the step count so the whole
    cosine schedule (warmup, decay to 0) fits; runs with a budget are then not step-reproducible.
    """

    output: Optional[str] = None
    model: str = "demo"
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    train_data: Optional[str] = None  # None: the synthetic shapes demo
    dataset_type: str = "auto"  # auto | shapes | csv | webdataset
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ","
    train_num_samples: Optional[int] = None
    val_data: Optional[str] = None
    val_num_samples: Optional[int] = None
    zeroshot_data: Optional[str] = None
    zeroshot_classes: Optional[str] = None
    zeroshot_templates: str = "imagenet"
    demo_train_samples: int = 1_000_000
    demo_eval_samples: int = 480
    demo_group_size: int = 16  # colour groups: see fastclip.datasets.shapes
    demo_group_prob: float = 1.0
    demo_backgrounds: str = "neutral"
    batch_size: int = 128
    steps: Optional[int] = 1000
    epochs: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 30
    grad_clip_norm: Optional[float] = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False
    accum_micro_batch: Optional[int] = None
    loss_backend: str = "auto"
    dist_impl: str = "gather"
    device: str = "auto"
    workers: int = 0
    threads: Optional[int] = None
    seed: int = 0
    log_every: Optional[int] = None
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    plot: bool = True
    progress: str = "auto"  # auto | bar | lines | none
    time_budget: Optional[float] = None  # seconds of training; fewer steps (same schedule shape) if slower


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (absent: one process) and, for
    several processes, initialise the default group from ``MASTER_ADDR``/``MASTER_PORT``: nccl on
    CUDA, gloo on the CPU. ``device="auto"``: ``cuda:LOCAL_RANK`` when CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def _all_reduce_grads(params: List[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer (what DDP does, without its hooks)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- data


class StepBatches:
    """Map-style batches as a function of the step (see the module docstring).

    Yields lists of dataset keys for steps ``start_step .. total_steps-1``: ints, or
    ``(index, aug_seed)`` when ``augment`` (the dataset seeds its random transform with it).
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int,
                 total_steps: int, augment: bool = False, shuffle: bool = True):
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise ValueError(f"the dataset has {n} samples, fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks)")
        self.n, self.batch_size, self.rank, self.seed = n, batch_size, rank, seed
        self.start_step, self.total_steps, self.augment, self.shuffle = start_step, total_steps, augment, shuffle
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def keys(self, step: int) -> List:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perm, self._perm_epoch = perm, epoch
        lo = b * self.global_batch + self.rank * self.batch_size
        idx = self._perm[lo:lo + self.batch_size].tolist()
        if self.augment:
            return [(i, (self.seed * 1_000_003 + epoch) * 10_000_019 + i) for i in idx]
        return idx

    def __iter__(self) -> Iterator[List]:
        for s in range(self.start_step, self.total_steps):
            yield self.keys(s)

    def __len__(self) -> int:
        return self.total_steps - self.start_step


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding (0) in every row of ``tokens`` [B, L].

    Exact for CLIP's causal text encoder: the EOT feature only attends to earlier positions.
    The demo's captions are 8-20 tokens in a context of 32, so this saves ~40% of the text
    encoder's work.
    """
    nonzero = (tokens != 0).any(dim=0)  # [L]
    if not bool(nonzero.any()):
        return tokens
    last = int(nonzero.nonzero().max()) + 1
    return tokens[:, :last]


def _collate_pairs(samples):
    from ..datasets.csv_dataset import collate_skipping
    return collate_skipping(samples)


def detect_dataset_type(path: Optional[str], dataset_type: str = "auto") -> str:
    """``auto``: no path -> shapes; ``.csv``/``.tsv`` -> csv; ``.tar`` in the spec -> webdataset."""
    if dataset_type != "auto":
        return dataset_type
    if path is None:
        return "shapes"
    low = path.lower()
    if low.endswith((".csv", ".tsv")):
        return "csv"
    if ".tar" in low:
        return "webdataset"
    raise ValueError(f"cannot tell the type of --train-data/--val-data {path!r} (expected a .csv/.tsv file "
                     f"or .tar shards); pass --dataset-type csv|webdataset")


# ----------------------------------------------------------------------------- progress


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line ``\\r`` bar on a TTY, or one plain line every ``every`` steps otherwise."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", stream=None, every: int = 10):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.total, self.start, self.mode, self.every = total, start, mode, max(1, every)
        self.t0, self._last_draw, self._line = time.time(), 0.0, ""

    def update(self, step: int, **stats: float) -> None:
        """``step`` = optimizer steps done so far (1-based)."""
        if self.mode == "none":
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"loss {stats['loss']:.3f}", f"scale {stats['scale']:.1f}", f"{stats['images_per_s']:.0f} img/s"]
        if self.mode == "bar":
            now = time.time()
            if now - self._last_draw < 0.1 and step < self.total:
                return
            self._last_draw = now
            width = 24
            fill = int(width * step / self.total)
            line = (f"\rstep {step}/{self.total} [{'#' * fill}{'.' * (width - fill)}] " + " | ".join(parts)
                    + f" | {_fmt_time(elapsed)} ETA {_fmt_time(eta)}")
            pad = max(0, len(self._line) - len(line))
            self.stream.write(line + " " * pad)
            self._line = line
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) " + " | ".join(parts)
                              + f" | elapsed {_fmt_time(elapsed)} ETA {_fmt_time(eta)}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print ``text`` on its own line without breaking the bar."""
        if self.mode == "bar" and self._line:
            self.stream.write("\n")
            self._line = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar" and self._line:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything from a ``TrainConfig``; ``run()`` trains and returns the final metrics.

    Attributes after construction: ``model`` (the CLIP module), ``optimizer``, ``scheduler``,
    ``scaler``, ``env`` (rank, world size, device), ``total_steps``, ``start_step``.
    """

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = None):
        from ..loss import ClipLoss
        from ..models import create_model

        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
        if cfg.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
        if cfg.accum_micro_batch is not None and cfg.accum_micro_batch <= 0:
            raise ValueError(f"accum_micro_batch must be positive, got {cfg.accum_micro_batch}")
        self.cfg = cfg
        self.env = env = init_distributed(cfg.device)
        self._print = log or (lambda s: print(s, flush=True))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.output is None:
            cfg.output = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if env.is_main:
            os.makedirs(cfg.output, exist_ok=True)
        self.data_type = detect_dataset_type(cfg.train_data, cfg.dataset_type)

        # Same seed on every rank: identical initial weights (DDP also broadcasts them).
        self._seed_all(cfg.seed)
        if env.device.type == "cpu":
            # Cheap on the CPU, and what makes resume bit-exact.
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model = create_model(cfg.model, **cfg.model_overrides).to(env.device)
        # ResNet towers run in channels_last: the demo's step (batch 128) takes 0.27 s instead of
        # 0.43 s on a 2-core Zen 4 (oneDNN's NHWC convolutions); images are converted to match.
        self.memory_format = torch.channels_last if self.model.config.is_resnet else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.step_model, device_ids=ids)
        else:
            self.train_model = self.step_model
        self.loss_fn = ClipLoss(rank=env.rank, world_size=env.world_size, normalize=True,
                                backend=cfg.loss_backend, dist_impl=cfg.dist_impl)
        self.optimizer = create_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

        self._build_train_data()
        self.warmup_steps = min(cfg.warmup, self.total_steps)
        # The schedule reads self.total_steps at each step, so a time budget can shorten it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, self.warmup_steps, self.total_steps))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        self.start_step, self.skipped_before = 0, 0
        self.resumed_from = None
        if cfg.resume:
            path = ckpt.resolve_resume(cfg.resume, cfg.output)
            if path is not None:
                state = ckpt.load_training_state(path, self.model, self.optimizer, self.scheduler,
                                                 self.scaler, map_location=env.device)
                self.start_step = int(state["step"])
                self.skipped_before = int(state["extra"].get("skipped", 0))
                self.resumed_from = path
        self._eval_sets_ready = False

    # -- setup helpers

    @staticmethod
    def _seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _transform(self, train: bool):
        from ..transforms import image_transform
        return image_transform(self.model.image_size, train=train)

    def _build_train_data(self) -> None:
        cfg, env = self.cfg, self.env
        ctx = self.model.context_length
        global_batch = cfg.batch_size * env.world_size
        if self.data_type == "webdataset":
            if cfg.steps is None and cfg.train_num_samples is None:
                raise ValueError("webdataset shards are streamed: pass --steps or --train-num-samples")
            n = cfg.train_num_samples
            self.steps_per_epoch = max(1, n // global_batch) if n else None
            self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch
            self.dataset = None
            self.data_desc = f"webdataset {cfg.train_data}"
            return
        if self.data_type == "shapes":
            from ..datasets.shapes import ShapesDataset
            self.dataset = ShapesDataset(cfg.demo_train_samples, seed=cfg.seed, split="train",
                                         image_size=self.model.image_size, context_length=ctx,
                                         group_size=cfg.demo_group_size, group_prob=cfg.demo_group_prob,
                                         backgrounds=cfg.demo_backgrounds)
            self.augment = False
            self.data_desc = f"synthetic shapes ({self.model.image_size}x{self.model.image_size}, generated on the fly)"
        elif self.data_type == "csv":
            from ..datasets.csv_dataset import CsvDataset
            self.dataset = CsvDataset(cfg.train_data, self._transform(True), cfg.csv_img_key, cfg.csv_caption_key,
                                      cfg.csv_separator, ctx)
            self.augment = True
            self.data_desc = f"CSV {cfg.train_data} ({len(self.dataset)} rows)"
        else:
            raise ValueError(f"unknown dataset type {self.data_type!r}; expected shapes, csv or webdataset")
        self.steps_per_epoch = len(self.dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.data_desc}: {len(self.dataset)} samples is less than one global batch "
                             f"({global_batch})")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * self.steps_per_epoch

    def _train_batches(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        cfg, env = self.cfg, self.env
        if self.data_type == "webdataset":
            from ..datasets.webdataset import WebDataset
            ds = WebDataset(cfg.train_data, cfg.batch_size, self._transform(True), self.model.context_length,
                            seed=cfg.seed, rank=env.rank, world_size=env.world_size, skip_batches=self.start_step)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                                                 persistent_workers=cfg.workers > 0)
            return iter(loader)
        sampler = StepBatches(len(self.dataset), cfg.batch_size, env.rank, env.world_size, cfg.seed,
                              self.start_step, self.total_steps, augment=self.augment,
                              shuffle=self.data_type != "shapes")
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_collate_pairs,
                                             num_workers=cfg.workers)
        return iter(loader)

    def _autocast(self):
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    # -- one step

    def forward_backward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Loss of the (local part of the) batch and parameter gradients in ``.grad`` (averaged
        over ranks); returns the detached loss. Uses micro-batches when ``accum_micro_batch``
        is smaller than the batch."""
        k = self.cfg.accum_micro_batch
        if k is None or k >= images.shape[0]:
            with self._autocast():
                img, txt, scale = self.train_model(images, tokens, normalize=False)
                loss = self.loss_fn(img, txt, scale)
            self.scaler.scale(loss).backward()
            return loss.detach()
        return self._forward_backward_micro(images, tokens, k)

    def _forward_backward_micro(self, images: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        model = self.step_model
        chunks = [(i, min(i + k, images.shape[0])) for i in range(0, images.shape[0], k)]
        # 1. features of the whole batch, k samples at a time, no activations kept
        with torch.no_grad(), self._autocast():
            feats = [model(images[a:b], tokens[a:b], normalize=False)[:2] for a, b in chunks]
        img = torch.cat([f[0] for f in feats]).detach().requires_grad_(True)  # [B, D] leaf
        txt = torch.cat([f[1] for f in feats]).detach().requires_grad_(True)  # [B, D] leaf
        # 2. loss and d loss / d features (+ the logit scale's gradient, once) over the full batch
        with self._autocast():
            scale = self.model.logit_scale.exp().clamp(max=100)
            loss = self.loss_fn(img, txt, scale)
        self.scaler.scale(loss).backward()
        # 3. re-run each micro-batch with grad and push its slice of the feature gradients
        for a, b in chunks:
            with self._autocast():
                i_c, t_c, _ = model(images[a:b], tokens[a:b], normalize=False)
            torch.autograd.backward([i_c, t_c], [img.grad[a:b].to(i_c.dtype), txt.grad[a:b].to(t_c.dtype)])
        if self.env.distributed:  # DDP's hooks were bypassed: average like DDP would
            _all_reduce_grads(list(self.model.parameters()), self.env.world_size)
        return loss.detach()

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
        self.zs_sets: Dict[str, Tuple[torch.Tensor, torch.Tensor, List[str], List]] = {}
        self.eval_skipped = 0
        if self.data_type == "shapes":
            from ..datasets.shapes import COLOR_NAMES, SHAPES, ShapesDataset
            from ..eval.templates import COLOR_TEMPLATES, SHAPE_TEMPLATES
            held = ShapesDataset(cfg.demo_eval_samples, seed=cfg.seed + 1, split="heldout",
                                 image_size=self.model.image_size, context_length=self.model.context_length,
                                 backgrounds=cfg.demo_backgrounds)
            imgs, shapes, colors = held.eval_tensors()
            # The shape ensemble adds "a red {}.", "a green {}.", ... (all eight colours for every
            # class): "a star" alone was only ever paired with stars of the seven colours it is
            # trained in, so its embedding leans away from the held-out colour; averaging over
            # every colour gives each class the same colour mix (held-out shape 0.12 -> 0.15 and
            # training pairs unchanged, demo model after 560 steps).
            shape_templates = SHAPE_TEMPLATES + [f"a {c} {{}}." for c in COLOR_NAMES]
            self.zs_sets["shape"] = (imgs, shapes, list(SHAPES), shape_templates)
            self.zs_sets["color"] = (imgs, colors, list(COLOR_NAMES), COLOR_TEMPLATES)
        if cfg.zeroshot_data:
            from ..datasets.folder import ImageFolderDataset, read_classnames
            from ..eval import templates as T
            ds = ImageFolderDataset(cfg.zeroshot_data, self._transform(False), read_classnames(cfg.zeroshot_classes))
            imgs, labels, skipped = ds.load_tensors()
            self.eval_skipped += skipped
            tmpl = {"imagenet": T.IMAGENET_TEMPLATES, "cifar": T.CIFAR_TEMPLATES,
                    "simple": T.SIMPLE_TEMPLATES}[cfg.zeroshot_templates]
            name = os.path.basename(os.path.normpath(cfg.zeroshot_data)) or "zeroshot"
            self.zs_sets[name] = (imgs, labels, ds.classnames, tmpl)
        self.val_batches = None
        if cfg.val_data:
            self.val_batches = self._load_val()

    def _load_val(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        kind = detect_dataset_type(cfg.val_data, "auto" if cfg.dataset_type == "shapes" else cfg.dataset_type)
        limit = cfg.val_num_samples or 10_000
        out, n = [], 0
        if kind == "csv":
            from ..datasets.csv_dataset import CsvDataset, collate_skipping
            ds = CsvDataset(cfg.val_data, self._transform(False), cfg.csv_img_key, cfg.csv_caption_key,
                            cfg.csv_separator, self.model.context_length)
            for a in range(0, min(len(ds), limit), cfg.batch_size):
                imgs, toks, skipped = collate_skipping([ds[i] for i in range(a, min(a + cfg.batch_size, len(ds), limit))])
                self.eval_skipped += skipped
                if len(imgs):
                    out.append((imgs, toks))
        else:
            from ..datasets.webdataset import WebDataset
            ds = WebDataset(cfg.val_data, cfg.batch_size, self._transform(False), self.model.context_length,
                            seed=cfg.seed, shuffle_buffer=0, max_epochs=1)
            for imgs, toks, skipped in ds:
                self.eval_skipped += skipped
                if len(imgs):
                    out.append((imgs, toks))
                n += len(imgs) + skipped
                if n >= limit:
                    break
        return out

    @torch.no_grad()
    def evaluate(self, step: int) -> Dict[str, float]:
        """Zero-shot top-1/top-5 per task (+ chance level), and val loss / retrieval recall when
        ``val_data`` is set. Runs on the main rank only."""
        from ..eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot
        self._prepare_eval()
        model, dev = self.model, self.env.device
        was_training = model.training
        model.eval()
        out: Dict[str, float] = {"type": "eval", "step": step}
        try:
            with self._autocast():
                for name, (imgs, labels, classes, templates) in self.zs_sets.items():
                    clf = build_zeroshot_classifier(model, classes, templates, device=dev)
                    r = evaluate_zeroshot(model, imgs, labels, classifier=clf, batch_size=256, device=dev)
                    out[f"zeroshot/{name}/top1"] = r["top1"]
                    out[f"zeroshot/{name}/top5"] = r["top5"]
                    out[f"chance/{name}"] = 1.0 / len(classes)
                if self.val_batches:
                    out.update(self._val_metrics())
        finally:
            model.train(was_training)
        tops = [v for k, v in out.items() if k.startswith("zeroshot/") and k.endswith("/top1")]
        if tops:
            out["zeroshot/mean_top1"] = sum(tops) / len(tops)
        return out

    def _val_metrics(self) -> Dict[str, float]:
        from ..eval.retrieval import retrieval_metrics
        from ..ops.contrastive_loss import clip_loss
        imgs_f, txts_f, losses, ns = [], [], [], []
        for imgs, toks in self.val_batches:
            i, t, s = self.model(imgs.to(self.env.device), toks.to(self.env.device), normalize=False)
            losses.append(clip_loss(i.float(), t.float(), s.float(), normalize=True, backend=self.cfg.loss_backend).item())
            ns.append(len(imgs))
            imgs_f.append(i.float().cpu())
            txts_f.append(t.float().cpu())
        out = {"val/loss": sum(l * n for l, n in zip(losses, ns)) / sum(ns), "val/n": sum(ns)}
        for k, v in retrieval_metrics(torch.cat(imgs_f), torch.cat(txts_f)).items():
            out[f"val/{k}"] = v
        return out

    # -- the loop

    def run(self) -> Dict[str, Any]:
        cfg, env = self.cfg, self.env
        out_dir = cfg.output
        n_params = sum(p.numel() for p in self.model.parameters())
        log_every = cfg.log_every or max(1, self.total_steps // 40)
        if env.is_main:
            over = f" {json.dumps(cfg.model_overrides)}" if cfg.model_overrides else ""
            msg = (f"fastclip train: model {cfg.model}{over} ({n_params / 1e6:.1f}M params) on {self.data_desc}\n"
                   f"  {self.total_steps} steps x batch {cfg.batch_size * env.world_size}"
                   f" ({env.world_size} rank{'s' if env.world_size > 1 else ''}), device {env.device}, "
                   f"precision {cfg.precision}, threads {torch.get_num_threads()}, output {out_dir}")
            if self.resumed_from:
                msg += f"\n  resumed from {self.resumed_from} at step {self.start_step}"
            self._print(msg)
            with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump({"train": dataclasses.asdict(cfg), "model": self.model.config.to_dict(),
                           "world_size": env.world_size}, f, indent=2)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        mlog = open(metrics_path, "a", encoding="utf-8") if env.is_main else None
        progress = Progress(self.total_steps, self.start_step, cfg.progress if env.is_main else "none",
                            every=log_every)

        def record(row):
            if mlog is not None:
                mlog.write(json.dumps(row) + "\n")
                mlog.flush()

        skipped = 0
        t_start = time.time()
        t_window, n_window = time.time(), 0
        last_eval: Dict[str, float] = {}
        last_ips = 0.0
        self.model.train()
        batches = self._train_batches()
        step = self.start_step
        # CPU threads: on a busy machine several OpenMP threads can be far slower than one (their
        # barriers wait for descheduled threads; measured here under load 8 on 2 cores: 7 img/s
        # with 2 threads, 250 img/s with 1). With a time budget and no --threads, time 3 steps
        # each way and keep the faster.
        tune = ({"threads": torch.get_num_threads(), "times": {}}
                if cfg.time_budget and cfg.threads is None and env.device.type == "cpu"
                and torch.get_num_threads() > 1 and not env.distributed else None)
        try:
            while step < self.total_steps:
                images, tokens, n_skip = next(batches)
                skipped += n_skip
                if images.shape[0] == 0:
                    raise RuntimeError(f"step {step}: every sample of this rank's batch failed to load "
                                       f"(rank {env.rank}); check the data")
                images = images.to(env.device, non_blocking=True, memory_format=self.memory_format)
                tokens = trim_padding(tokens).to(env.device, non_blocking=True)
                t_step = time.time()
                loss = self.forward_backward(images, tokens)
                self.optimizer_step()
                step += 1
                if step == self.start_step + 1:
                    self._t_first_step = time.time()
                if tune is not None:
                    tune = self._tune_threads(tune, step, time.time() - t_step)
                n_window += images.shape[0] * env.world_size
                if step % log_every == 0 or step == self.total_steps or step == self.start_step + 1:
                    now = time.time()
                    row = {"type": "train", "step": step, "epoch": (step - 1) // max(1, self.steps_per_epoch or 1),
                           "loss": loss.float().item(), "scale": self.model.logit_scale.exp().item(),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           "images_per_s": n_window / max(now - t_window, 1e-9),
                           "elapsed_s": now - t_start}
                    t_window, n_window = now, 0
                    self._apply_time_budget(step, now - t_start, progress)
                    row["total_steps"] = self.total_steps
                    record(row)
                    last_ips = row["images_per_s"]
                    progress.update(step, loss=row["loss"], scale=row["scale"], images_per_s=last_ips)
                elif progress.mode == "bar" and env.device.type == "cpu":  # .item() is free on the CPU
                    progress.update(step, loss=loss.item(), scale=self.model.logit_scale.exp().item(),
                                    images_per_s=last_ips)
                eval_every = cfg.eval_every or max(1, self.total_steps // 4)  # total may shrink (time budget)
                # A periodic eval a few steps before the final one (the budget moved the end
                # onto it) repeats it: the demo evaluated at steps 760 and 763, ~2 s each.
                periodic = step % eval_every == 0 and self.total_steps - step >= max(1, eval_every // 4)
                if (periodic or step == self.total_steps) and env.is_main:
                    last_eval = self.evaluate(step)
                    record(last_eval)
                    progress.message(_format_eval(last_eval))
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    total_skipped = self._sum_over_ranks(skipped) + self.skipped_before
                    if env.is_main:
                        ckpt.save_training_state(out_dir, step, self.model, self.optimizer, self.scheduler,
                                                 self.scaler, extra={"skipped": total_skipped},
                                                 keep=cfg.keep_checkpoints)
        finally:
            progress.close()
        wall = time.time() - t_start
        total_skipped = self._sum_over_ranks(skipped) + self.skipped_before
        result: Dict[str, Any] = {}
        if env.is_main:
            from ..models import save_checkpoint
            model_path = os.path.join(out_dir, "model.safetensors")
            save_checkpoint(self.model, model_path)
            result = {"steps": self.total_steps, "global_batch": cfg.batch_size * env.world_size,
                      "wall_time_s": wall, "train_samples_skipped": total_skipped,
                      "eval_samples_skipped": getattr(self, "eval_skipped", 0),
                      "final_loss": loss.float().item() if self.total_steps > self.start_step else None,
                      "checkpoint": model_path}
            for k, v in last_eval.items():
                if k.startswith("zeroshot/") and k.endswith("top1"):
                    result[k.replace("zeroshot/", "zero_shot_").replace("/top1", "_top1").replace("mean_top1", "top1_mean")] = v
                elif k.startswith("val/"):
                    result[k] = v
            record({"type": "final", **result})
            mlog.close()
            with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            if cfg.plot:
                from .plots import plot_curves
                png = plot_curves(metrics_path, os.path.join(out_dir, "curves.png"))
                result["curves"] = png
            self._print(_format_final(result, out_dir))
        if env.distributed:
            dist.barrier()
        return result

    def _tune_threads(self, tune: Dict[str, Any], step: int, seconds: float) -> Optional[Dict[str, Any]]:
        """Steps +2..+4 run with all threads, +5..+7 with one; then keep the faster setting."""
        k = step - self.start_step
        if k < 2:
            return tune
        n = torch.get_num_threads()
        tune["times"].setdefault(n, []).append(seconds)
        if k == 4:
            torch.set_num_threads(1)
        elif k == 7:
            best = min(tune["times"], key=lambda t: sum(tune["times"][t]) / len(tune["times"][t]))
            torch.set_num_threads(best)
            if self.env.is_main:
                desc = ", ".join(f"{t} thread{'s' if t > 1 else ''} {1000 * sum(v) / len(v):.0f} ms/step"
                                 for t, v in sorted(tune["times"].items()))
                self._print(f"CPU threads: {desc}; using {best}")
            return None
        return tune

    def _apply_time_budget(self, step: int, elapsed: float, progress: "Progress") -> None:
        """Shorten the run to fit ``time_budget`` (re-estimated until 3/4 of the way; all ranks agree
        because the estimate is taken from rank 0)."""
        budget = self.cfg.time_budget
        done = step - self.start_step
        if not budget or done < 8 or step > 3 * self.total_steps // 4:
            return
        # Speed from the steps after the first (which pays for start-up), evaluations included;
        # the remaining budget decides the remaining steps.
        per_step = (time.time() - self._t_first_step) / (done - 1)
        fit = step + int(max(0.0, budget - elapsed) / per_step)
        if self.env.distributed:
            t = torch.tensor([fit], dtype=torch.long, device=self.env.device)
            dist.broadcast(t, 0)
            fit = int(t.item())
        new_total = max(step + 1, min(self.cfg.steps or self.total_steps, fit))
        if new_total != self.total_steps:
            if self.env.is_main and new_total < 0.95 * self.total_steps:  # report big cuts only
                progress.message(f"time budget {budget:.0f} s at {per_step:.2f} s/step: training "
                                 f"{new_total} steps instead of {self.total_steps}")
            self.total_steps = progress.total = new_total
            self.warmup_steps = min(self.warmup_steps, new_total)

    def _sum_over_ranks(self, n: int) -> int:
        if not self.env.distributed:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.env.device)
        dist.all_reduce(t)
        return int(t.item())


def _format_eval(ev: Dict[str, float]) -> str:
    parts = []
    for k, v in ev.items():
        if k.startswith("zeroshot/") and k.endswith("/top1") and k != "zeroshot/mean_top1":
            name = k.split("/")[1]
            chance = ev.get(f"chance/{name}")
            parts.append(f"{name} {100 * v:.1f}%" + (f" (chance {100 * chance:.1f}%)" if chance else ""))
    if "val/loss" in ev:
        parts.append(f"val loss {ev['val/loss']:.3f}, val mean recall {100 * ev['val/mean_recall']:.1f}%")
    return f"eval @ step {ev['step']}: zero-shot top-1 " + ", ".join(parts) if parts else f"eval @ step {ev['step']}"


def _format_final(r: Dict[str, Any], out_dir: str) -> str:
    lines = [f"done: {r['steps']} steps in {_fmt_time(r['wall_time_s'])} ({r['wall_time_s']:.1f} s)"]
    zs = {k: v for k, v in r.items() if k.startswith("zero_shot_") and k != "zero_shot_top1_mean"}
    if zs:
        lines.append("zero-shot top-1: " + ", ".join(f"{k[len('zero_shot_'):-len('_top1')]} {100 * v:.1f}%"
                                                     for k, v in zs.items())
                     + (f", mean {100 * r['zero_shot_top1_mean']:.1f}%" if "zero_shot_top1_mean" in r else ""))
    if r.get("train_samples_skipped") or r.get("eval_samples_skipped"):
        lines.append(f"skipped (missing/corrupt): {r['train_samples_skipped']} training, "
                     f"{r['eval_samples_skipped']} evaluation samples")
    lines.append(f"wrote {r['checkpoint']}, {os.path.join(out_dir, 'metrics.json')}"
                 + (f", {r['curves']}" if r.get("curves") else ""))
    return "\n".join(lines)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train with ``cfg`` and return the final metrics (``metrics.json``'s content; empty on
    ranks other than 0)."""
    return Trainer(cfg).run()
