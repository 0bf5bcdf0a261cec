"""Resuming a run (``--resume``): load the checkpoint into a built ``Trainer`` and reconcile it
with the command that resumes it.

What a resumed run takes from its checkpoint, whatever the command line says: the weights,
the optimizer's state and hyperparameters, the data position, the skip counts and the wall
time. What it takes from the command: the schedule's length and warmup (the first resumed
step already follows the new schedule, with a note), except under ``--time-budget``, where
the checkpoint's shortened schedule is kept. Whatever a resume cannot continue exactly (other
data settings, a run that had finished) is said in ``trainer.resume_notes``, printed at start.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

from . import checkpoint as ckpt
from .data import detect_dataset_type
from .run_folder import finished_steps

# The optimizer's hyperparameters live in its saved state; config.json records those that run.
OPTIMIZER_FIELDS = ("lr", "weight_decay", "beta1", "beta2", "eps")
# Settings a resume may change, with a note (note_changed_data).
STEP_FIELDS = ("precision", "grad_clip_norm")


def resume_from_checkpoint(t) -> None:
    """Load ``t.cfg.resume`` (a path or "latest") into the ``Trainer`` ``t``: sets
    ``start_step``, ``resumed_from`` and the carried-over counters, and adjusts the schedule
    and config as the module docstring says. Raises ``CheckpointError`` naming the file."""
    cfg = t.cfg
    path = ckpt.resolve_resume(cfg.resume, cfg.output)
    if path is None:
        return
    try:
        state = ckpt.load_training_state(path, t.model, t.optimizer, t.scheduler, t.scaler,
                                         map_location=t.env.device)
    except ckpt.CheckpointError as e:
        # Not a silent fall-back to an older checkpoint (that would retrain steps
        # unannounced): the error names the one a user can pass instead.
        differ = _model_settings_differ(cfg, ckpt.saved_run_config(path)) if "does not match" in str(e) else ""
        if differ:
            raise ckpt.CheckpointError(f"{path}: the checkpoint trained another model than this command "
                                       f"builds: {differ}; resume with the --model, --pretrained, "
                                       f"--model-overrides and --loss that started the run") from None
        older = ckpt.older_checkpoint(cfg.output, path) if cfg.resume == "latest" else None
        if older is None or ckpt.readable_training_state(path):
            raise       # (a readable file that does not fit this run: so would the older one)
        raise ckpt.CheckpointError(f"{e}; the previous checkpoint of this run is {older} "
                                   f"(--resume {older} continues from it)") from None
    t.start_step = int(state["step"])
    named = ckpt.named_step(path)
    if named is not None and named != t.start_step:
        # --resume latest picks the file by its name: another run's step 4 copied in as
        # step_00000014 was resumed as this run's newest, its weights spliced onto this run's log.
        raise ckpt.CheckpointError(f"{path}: named step {named} but holds the state of step {t.start_step}: "
                                   f"renamed, or copied in from another run; move it out of the run "
                                   f"folder (or give it its own step's name if it is this run's)")
    extra = state["extra"]
    check_same_architecture(t, path, extra)
    restore_extra(t, path, extra)
    keep_budget_schedule(t, extra)
    t.resumed_from = path
    if t.start_step > t.total_steps:
        raise ckpt.CheckpointError(f"{path}: the checkpoint is at step {t.start_step}, past the "
                                   f"run's {t.total_steps} steps: nothing left to train (raise --steps)")
    keep_checkpoint_optimizer(t, extra)
    follow_new_schedule(t, extra)
    note_finished_run(t)


def _model_settings_differ(cfg, saved: Optional[Dict[str, Any]]) -> str:
    """The settings that decide the model, as ``"loss 'clip' (this command: 'siglip')"``, where
    the checkpoint's run configuration ``saved`` and this command's ``cfg`` differ ("" if none)."""
    if not isinstance(saved, dict):
        return ""
    out = []
    for k in ("model", "pretrained", "model_overrides", "loss"):
        if k in saved and saved[k] != getattr(cfg, k, saved[k]) and (saved[k] or getattr(cfg, k, None)):
            out.append(f"{k} {saved[k]!r} (this command: {getattr(cfg, k)!r})")
    return ", ".join(out)


# What the weights' shapes do not show: the activation and the head counts (a model rebuilt
# with other ones loads the same tensors and computes something else). The initial logit
# scale and bias are starting values, replaced by the loaded parameters.
_INIT_ONLY = ("init_logit_scale", "init_logit_bias")


def check_same_architecture(t, path: str, extra: Dict[str, Any]) -> None:
    """``CheckpointError`` when the model this command built is not the one the checkpoint
    trained (``extra["model_config"]``; checkpoints without it are not checked). A --pretrained
    run resumed without its --model-overrides rebuilt quick_gelu and the head counts from the
    defaults, which load the same tensors: it trained on silently as another model."""
    saved = extra.get("model_config") if isinstance(extra, dict) else None
    if not isinstance(saved, dict):
        return
    from ..models.configs import CLIPConfig
    try:
        before = CLIPConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: corrupt 'model_config' entry in the checkpoint ({e})") from None
    now = t.model.config

    def arch(c):
        d = {k: v for k, v in c.to_dict().items() if k not in _INIT_ONLY}
        d.update(vision_heads=c.vision_num_heads, text_heads=c.text_num_heads,
                 logit_bias=c.init_logit_bias is not None)
        return d

    a, b = arch(before), arch(now)
    wrong = [f"{k} {a[k]!r} (this command: {b[k]!r})" for k in a if a[k] != b[k]]
    if wrong:
        keep = {k: a[k] for k in ("quick_gelu", "vision_heads", "text_heads") if a[k] != b[k]}
        asked = t.cfg.model_overrides if isinstance(t.cfg.model_overrides, dict) else {}
        hint = (f"; resume with --model-overrides '{json.dumps({**asked, **keep})}'" if keep and len(keep) == len(wrong)
                else "; resume with the --model, --pretrained and --model-overrides that started the run")
        raise ckpt.CheckpointError(f"{path}: the checkpoint trained another model than this command "
                                   f"builds: {', '.join(wrong)}{hint}")


def restore_extra(t, path: str, extra: Dict[str, Any]) -> None:
    """The counters a run carries over: skipped samples and batches, the data position
    (batches drawn: ahead of the step when batches were skipped; the step in checkpoints that
    predate it) and the wall time."""
    try:
        t.skipped_before = int(extra.get("skipped", 0))
        t.batches_skipped_before = int(extra.get("skipped_batches", 0))
        t.data_position = int(extra.get("data_position", t.start_step))
        t.wall_before = float(extra.get("wall_time_s", 0.0))
        if min(t.skipped_before, t.batches_skipped_before, t.data_position) < 0 or not 0 <= t.wall_before < 1e12:
            raise ValueError("negative counts or a wall time that is not a finite number of seconds")
    except (AttributeError, TypeError, ValueError, OverflowError) as e:   # (int(inf): OverflowError)
        raise ckpt.CheckpointError(f"{path}: corrupt 'extra' entry in the checkpoint ({e})") from None


def keep_checkpoint_optimizer(t, extra: Dict[str, Any]) -> None:
    """The checkpoint's optimizer hyperparameters stay (a note names those the command asked
    otherwise), and ``t.cfg`` records them; then ``note_changed_data``."""
    saved = extra.get("config") if isinstance(extra, dict) else None
    if not isinstance(saved, dict):
        return
    kept = [(k, saved[k], getattr(t.cfg, k)) for k in OPTIMIZER_FIELDS
            if isinstance(saved.get(k), (int, float)) and isinstance(getattr(t.cfg, k), (int, float))
            and saved[k] != getattr(t.cfg, k)]
    if kept:
        t.resume_notes.append(
            "the resumed optimizer keeps the checkpoint's " + ", ".join(f"{k} {old:g} (asked {new:g})"
                                                                      for k, old, new in kept)
            + "; start a new run to change them")
        for k, old, _ in kept:
            setattr(t.cfg, k, old)
    note_changed_data(t, saved, extra)


def note_changed_data(t, saved: Dict[str, Any], extra: Dict[str, Any]) -> None:
    """Say what a resume cannot continue exactly: the data position counts batches of the
    checkpoint's global batch, and the order comes from its seed and data (resuming on
    fewer GPUs after a pre-emption is legitimate, so these are notes, not refusals)."""
    notes = []
    gb, now = extra.get("global_batch"), t.cfg.batch_size * t.env.world_size
    if isinstance(gb, int) and gb != now:
        notes.append(f"global batch {gb} -> {now} (the data position, {t.data_position} batches, now "
                     f"counts batches of {now}: not the samples the run would have drawn next)")
    for k in ("seed", "train_data"):
        if k in saved and saved[k] != getattr(t.cfg, k, saved[k]):
            notes.append(f"{k} {saved[k]!r} -> {getattr(t.cfg, k)!r}")
    # Other data at the same path (a CSV rewritten, shards added): the path alone said nothing.
    before, now = extra.get("data"), getattr(t, "data_fingerprint", None)
    if (isinstance(before, dict) and isinstance(now, dict) and before != now
            and saved.get("train_data") == t.cfg.train_data):
        changed = ", ".join(f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
                            if before.get(k) != now.get(k))
        notes.append(f"the training data at {t.cfg.train_data!r} changed since the checkpoint ({changed})")
    if "dataset_type" in saved:
        # the type each setting gives the data: --dataset-type webdataset and "auto" on .tar
        # shards are one (it was noted as a change)
        try:
            before = detect_dataset_type(saved.get("train_data"), saved["dataset_type"])
        except (ValueError, TypeError, AttributeError):
            before = saved["dataset_type"]
        now = getattr(t, "data_type", None) or t.cfg.dataset_type
        if before != now:
            notes.append(f"dataset type {before!r} -> {now!r}")
    if getattr(t, "data_type", None) == "webdataset":
        # Shards are streamed by ranks x workers readers, each from its own share of them: another
        # count of either reads other samples next (a same global batch did not make it exact).
        w0 = extra.get("world_size")
        if not isinstance(w0, int) and isinstance(gb, int) and isinstance(saved.get("batch_size"), int):
            w0 = gb // max(1, saved["batch_size"])       # checkpoints that predate the field
        k0, w1, k1 = saved.get("workers"), t.env.world_size, t.cfg.workers
        if isinstance(w0, int) and isinstance(k0, int) and (w0, max(1, k0)) != (w1, max(1, k1)):
            # (--workers 0: the rank reads, one reader; "x 0 worker(s)" read as no reader at all)
            notes.append(f"shard readers {w0} rank(s) x {max(1, k0)} -> {w1} x {max(1, k1)} (--workers "
                         f"{k0} -> {k1}; each reader streams its own share of the shards: not the samples "
                         f"the run would have drawn next)")
    if notes:
        t.resume_notes.append("resumed with other data settings than the checkpoint's: " + "; ".join(notes)
                              + "; the run continues, not exactly as an uninterrupted one")
    # The arithmetic of a step: another precision rounds every product otherwise, another clip
    # norm scales other gradients (the optimizer's own settings stay: keep_checkpoint_optimizer).
    other = [f"{k} {saved[k]!r} -> {getattr(t.cfg, k)!r}" for k in STEP_FIELDS
             if k in saved and saved[k] != getattr(t.cfg, k, saved[k])]
    if other:
        t.resume_notes.append("resumed with other training settings than the checkpoint's: " + "; ".join(other)
                              + "; the run continues, not exactly as an uninterrupted one")
    # A requeued job that dropped --save-every trained on without a checkpoint, unannounced.
    every = saved.get("save_every")
    if isinstance(every, int) and not isinstance(every, bool) and every > 0 and not getattr(t.cfg, "save_every", None):
        t.resume_notes.append(f"the checkpoint's run saved every {every} steps; this one writes no "
                              f"checkpoint (no --save-every): an interruption loses what it trains")


def note_finished_run(t) -> None:
    """Resuming a run that had already finished (its metrics.json says so) from a checkpoint
    before its end trains its last steps again (checkpoints are written before the last
    step only): said, since the user may have meant only to evaluate it."""
    done = finished_steps(t.cfg.output)
    if done is None or t.start_step >= done:
        return
    again = f"steps {t.start_step + 1}-{min(done, t.total_steps)} are trained again"
    if t.total_steps > done:
        t.resume_notes.append(f"this run had finished at step {done}; it goes on to step {t.total_steps} "
                              f"from its checkpoint at step {t.start_step}: {again}, on the "
                              f"{t.total_steps}-step schedule")
    else:
        t.resume_notes.append(f"this run had finished (metrics.json: {done} steps); {again} (to "
                              f"evaluate it: fastclip eval {t.cfg.output}; to train it further: a "
                              f"larger --steps)")


def keep_budget_schedule(t, extra: Dict[str, Any]) -> None:
    """With --time-budget, the shortened schedule the checkpoint was trained on (its length
    and warmup): rebuilt from --steps, a resumed run's learning rate jumped back up to
    near its peak until the budget cut it again. Only for the length the checkpoint's run
    asked for: a resume with another --steps (or --epochs) follows it, the budget still
    applying (a larger --steps was ignored for the checkpoint's 200, and the closing advice
    said to pass a larger --steps)."""
    total, warm = extra.get("total_steps"), extra.get("warmup_steps")
    old = extra.get("config")
    if isinstance(old, dict) and (old.get("steps"), old.get("epochs")) != (
            getattr(t.cfg, "steps", None), getattr(t.cfg, "epochs", None)):
        return
    if (t.cfg.time_budget and isinstance(total, int) and isinstance(warm, int)
            and t.start_step <= total < t.total_steps):
        t.total_steps, t.warmup_steps = total, min(t.warmup_steps, warm)
        t.resume_notes.append(f"time budget: the checkpoint's schedule of {total} steps is kept")


def follow_new_schedule(t, extra: Dict[str, Any]) -> None:
    """A resumed run whose --steps or --warmup give another schedule than the checkpoint's:
    the restored optimizer held the old schedule's learning rate for the first resumed step
    (LambdaLR applies its function only from the next step on), so two schedules were
    spliced unannounced. The first step now takes the new schedule's rate, and a note says so."""
    total, warm = extra.get("total_steps"), extra.get("warmup_steps")
    if not (isinstance(total, int) and isinstance(warm, int)):
        return                          # a checkpoint that predates these fields
    if (total, warm) == (t.total_steps, t.warmup_steps):
        return
    sched = t.scheduler
    old_lr = t.optimizer.param_groups[0]["lr"]
    new = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(t.optimizer.param_groups, new):
        group["lr"] = lr
    sched._last_lr = list(new)
    t.resume_notes.append(f"the learning-rate schedule follows this run's {t.total_steps} steps and "
                          f"{t.warmup_steps} warmup steps (the checkpoint's: {total} and {warm}): lr "
                          f"{new[0]:.4g} at step {t.start_step + 1} (the old schedule's {old_lr:.4g})")


__all__ = ["OPTIMIZER_FIELDS", "resume_from_checkpoint"]
