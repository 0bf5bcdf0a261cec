"""A short CPU training run: the loss decreases, outputs are written; optimizer groups and schedule."""
import dataclasses
import json
import math
import os

import pytest
import torch

from fastclip.models import create_model, load_checkpoint
from fastclip.train import TrainConfig, cosine_lr, param_groups, train
from fastclip.train.plots import plot_curves


def test_short_cpu_run_loss_decreases(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    # 64 training pairs (2 batches): 40 steps fit them well below ln(32) = 3.47 (a model that
    # ignores its inputs); on fresh data the tiny model first sits on that plateau for ~80 steps.
    cfg = TrainConfig(model="tiny-vit", output=out, steps=40, batch_size=32, lr=1e-3, warmup=5, log_every=1,
                      eval_every=20, demo_train_samples=64, demo_eval_samples=48, progress="none", plot=False,
                      save_every=20)
    result = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < min(0.6 * losses[0], 2.5), losses
    assert all(r["scale"] <= 100.0 + 1e-4 for r in rows if r["type"] == "train")
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    for key in ("zero_shot_shape_top1", "zero_shot_color_top1", "zero_shot_top1_mean", "steps", "wall_time_s"):
        assert key in result
    assert json.load(open(os.path.join(out, "metrics.json")))["steps"] == 40
    model = load_checkpoint(os.path.join(out, "model.safetensors"))
    assert model.config.image_size == 32
    assert os.path.exists(os.path.join(out, "checkpoints", "step_00000020.safetensors"))
    png = plot_curves(os.path.join(out, "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert png is None or os.path.getsize(png) > 1000


def test_weight_decay_groups():
    model = create_model("tiny-vit")
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and "token_embedding.weight" in nd and "positional_embedding" in nd
    assert "visual.class_embedding" in nd and "ln_final.weight" in nd
    assert all(model.get_parameter(n).ndim >= 2 for n in d) and "text_projection" in d
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_cosine_schedule():
    assert cosine_lr(0, 10, 100) == 0.1 and cosine_lr(9, 10, 100) == 1.0
    assert cosine_lr(10, 10, 100) == 1.0
    assert math.isclose(cosine_lr(55, 10, 100), 0.5, abs_tol=1e-12)
    assert cosine_lr(100, 10, 100) == 0.0 and cosine_lr(500, 10, 100) == 0.0


def test_siglip_run_learns_a_bias_and_checkpoints_it(tmp_path):
    """--loss siglip: the model gets a learnable bias at SigLIP's initialisation (t = 10,
    b = -10), it trains, and the checkpoint carries it."""
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="tiny-vit", loss="siglip", output=out, steps=12, batch_size=16, lr=1e-3,
                      warmup=2, log_every=1, eval_every=1000, demo_train_samples=64,
                      demo_eval_samples=32, progress="none", plot=False)
    train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert "bias" in train_rows[0] and abs(train_rows[0]["bias"] + 10.0) < 0.1
    assert abs(train_rows[0]["scale"] - 10.0) < 0.1
    assert train_rows[-1]["bias"] != train_rows[0]["bias"]         # the bias is trained
    model = load_checkpoint(os.path.join(out, "model.safetensors"))
    assert model.logit_bias is not None and model.config.init_logit_bias == -10.0
    img, txt, scale, bias = model(torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 32)))
    assert abs(bias.item() - train_rows[-1]["bias"]) < 1e-6


def test_eval_line_names_what_was_evaluated():
    from fastclip.train.progress import format_eval
    val = {"step": 3, "val/loss": 0.5, "val/mean_recall": 0.25}
    assert format_eval(val) == "eval @ step 3: val loss 0.500, val mean recall 25.0%"
    both = {**val, "step": 4, "zeroshot/pets/top1": 0.5, "chance/pets": 0.1}
    assert format_eval(both) == ("eval @ step 4: zero-shot top-1 pets 50.0% (chance 10.0%); "
                                 "val loss 0.500, val mean recall 25.0%")


def test_a_nan_metric_is_written_as_null_and_a_single_val_pair_shown_as_such(tmp_path, capsys):
    """A one-row --val-data gave val/loss NaN, written as a bare NaN into metrics.json and
    metrics.jsonl: not JSON (Python's strict parse, JavaScript and Go refuse the files)."""
    from PIL import Image

    from fastclip.eval.evaluate import format_metrics
    from fastclip.train.progress import format_eval
    torch.set_num_threads(1)
    with open(tmp_path / "train.csv", "w") as f:
        f.write("filepath,title\n")
        for i in range(8):
            Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
            f.write(f"{i}.png,a red square {i}\n")
    (tmp_path / "val.csv").write_text("filepath,title\n0.png,a red square 0\n")
    out = tmp_path / "run"
    train(TrainConfig(model="tiny-vit", output=str(out), train_data=str(tmp_path / "train.csv"),
                      val_data=str(tmp_path / "val.csv"), steps=2, batch_size=4, progress="none", plot=False))

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    final = strict((out / "metrics.json").read_text())
    evals = [strict(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert evals and all(r["val/loss"] is None and r["val/n"] == 1 for r in evals)
    assert "val/loss" not in final or final["val/loss"] is None
    assert "val loss n/a (1 val pair)" in "".join(capsys.readouterr())
    ev = {"step": 1, "val/loss": float("nan"), "val/n": 1, "val/mean_recall": 1.0}
    assert format_eval(ev) == "eval @ step 1: val loss n/a (1 val pair), val mean recall 100.0%"
    assert "n/a (1 val pair: the softmax loss needs two)" in format_metrics(ev)
    assert "val loss nan" in format_eval({**ev, "val/n": 8})      # a diverged model: NaN it is
    # Several batches of one row each (a Python caller's batching): n/a too, not nan.
    from fastclip.eval.evaluate import val_metrics
    from fastclip.models import create_model
    model = create_model("tiny-vit")
    one = (torch.rand(1, 3, 32, 32), torch.randint(1, 100, (1, model.context_length)))
    m = val_metrics(model, [one, one, one], "clip")
    assert m["val/n"] == 3 and m["val/loss_n"] == 0 and math.isnan(m["val/loss"])
    assert "n/a (3 val pairs, no batch of two: the softmax loss needs two)" in format_metrics(m)
    assert "val loss n/a (3 val pairs)" in format_eval({**m, "step": 1})
    from fastclip.train.plots import read_metrics  # the curves read null back as a gap (NaN)
    (tmp_path / "m.jsonl").write_text('{"type": "train", "step": 1, "loss": null, "scale": 1.0}\n')
    assert math.isnan(read_metrics(str(tmp_path / "m.jsonl"))[0]["loss"])


def test_logged_lr_is_the_steps_own_and_a_batch_of_one_is_refused(tmp_path):
    """The lr of a metrics row was read after the scheduler stepped: the next step's."""
    import pytest
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="tiny-vit", output=out, steps=6, batch_size=8, lr=1e-3, warmup=2, log_every=1,
                      eval_every=1000, demo_train_samples=32, demo_eval_samples=16, progress="none", plot=False)
    train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    lrs = [r["lr"] for r in rows if r["type"] == "train"]
    assert lrs == [pytest.approx(1e-3 * cosine_lr(k, 2, 6)) for k in range(6)]
    with pytest.raises(ValueError, match="--batch-size 1 in one process"):
        train(TrainConfig(model="tiny-vit", output=str(tmp_path / "b1"), steps=2, batch_size=1, progress="none",
                          plot=False, demo_train_samples=8, demo_eval_samples=8))


def test_a_run_resumed_at_its_last_step_still_evaluates(tmp_path):
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    base = dict(model="tiny-vit", output=out, batch_size=8, lr=1e-3, warmup=1, eval_every=3,
                demo_train_samples=32, demo_eval_samples=16, progress="none", plot=False, save_every=3)
    train(TrainConfig(steps=5, **base))
    ck = os.path.join(out, "checkpoints", "step_00000003.safetensors")
    result = train(TrainConfig(steps=3, resume=ck, **base))
    assert "zero_shot_shape_top1" in result
    assert "zero_shot_shape_top1" in json.load(open(os.path.join(out, "metrics.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [3]       # evaluated again, logged once


def test_a_time_budget_run_resumes_on_its_shortened_schedule():
    """The schedule was rebuilt from --steps on resume: the lr jumped from 3.2e-4 back to
    ~1e-3 for 8 steps until the budget cut the run again."""
    from types import SimpleNamespace

    from fastclip.train.resume import keep_budget_schedule
    t = SimpleNamespace(cfg=SimpleNamespace(time_budget=60.0), start_step=80, total_steps=2000, warmup_steps=100,
                        resume_notes=[])
    keep_budget_schedule(t, {"total_steps": 130, "warmup_steps": 100})
    assert (t.total_steps, t.warmup_steps) == (130, 100) and "130 steps is kept" in t.resume_notes[0]
    t2 = SimpleNamespace(cfg=SimpleNamespace(time_budget=None), start_step=80, total_steps=2000, warmup_steps=100,
                         resume_notes=[])
    keep_budget_schedule(t2, {"total_steps": 130, "warmup_steps": 100})
    assert t2.total_steps == 2000          # without a budget the command's --steps decide
    # A resume that asks for another length follows it: --steps 200 cut to 130 by the budget,
    # resumed with --steps 400, trains toward 400 (the budget still applies).
    t3 = SimpleNamespace(cfg=SimpleNamespace(time_budget=60.0, steps=400, epochs=1), start_step=80,
                         total_steps=400, warmup_steps=40, resume_notes=[])
    same = {"total_steps": 130, "warmup_steps": 20, "config": {"steps": 400, "epochs": 1}}
    keep_budget_schedule(t3, {**same, "config": {"steps": 200, "epochs": 1}})
    assert (t3.total_steps, t3.warmup_steps) == (400, 40) and not t3.resume_notes
    keep_budget_schedule(t3, same)           # the same --steps: the shortened schedule is kept
    assert (t3.total_steps, t3.warmup_steps) == (130, 20)


def test_a_time_budget_is_estimated_early_in_a_long_run(tmp_path, monkeypatch):
    """Estimated at logged steps only, a run planned for 20000 steps (logged every 500) with a
    2 s budget trained 500 steps (6 s) on the long run's warmup before its first estimate, and
    the step after a cut still took the old schedule's learning rate."""
    from types import SimpleNamespace

    import fastclip.train.demo as demo
    from fastclip.train.trainer import Trainer
    torch.set_num_threads(1)
    t = Trainer(TrainConfig(model="tiny-vit", steps=20000, warmup=None, time_budget=2.0, output=str(tmp_path / "r"),
                            batch_size=8, demo_train_samples=32, demo_eval_samples=16, progress="none",
                            plot=False, eval_every=100000))
    now = [1000.0]
    monkeypatch.setattr(demo.time, "time", lambda: now[0])
    messages = []
    t.progress = SimpleNamespace(total=20000, message=messages.append)
    t.elapsed_s = lambda: now[0] - 1000.0          # training started at 1000.0
    t.t_first_step = 1000.01                        # the end of step 1
    hook = next(h for h in t.hooks if isinstance(h, demo.TimeBudget))
    for step in range(1, 9):            # 0.01 s per step: about 200 steps fit in 2 s
        t.optimizer.step()
        t.scheduler.step()
        now[0] += 0.01
        hook.after_step(t, step, 0.01)
    assert 150 <= t.total_steps <= 250 and t.progress.total == t.total_steps and len(messages) == 1
    assert t.warmup_steps == t.total_steps // 10
    base = t.cfg.lr
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(
        base * cosine_lr(8, t.warmup_steps, t.total_steps))       # the next step's, on the new schedule
    hook.after_log(t, 8, t.elapsed_s(), t.progress)                # step 8 is also logged: once
    assert len(messages) == 1


@pytest.mark.parametrize("warmup, want", [(None, 13), (500, 13), (40, 1)])
def test_a_time_budget_keeps_the_warmups_share_of_the_run(warmup, want, monkeypatch):
    """Cut from 5000 planned steps to ~120, the run kept the planned 500-step warmup (cut to
    the first estimate): the lr peaked at step 78 of 120 and never decayed smoothly."""
    from types import SimpleNamespace

    import fastclip.train.demo as demo
    now = [1000.0]
    monkeypatch.setattr(demo.time, "time", lambda: now[0])
    messages = []
    progress = SimpleNamespace(total=5000, message=messages.append)
    env = SimpleNamespace(distributed=False, is_main=True)
    t = SimpleNamespace(cfg=SimpleNamespace(warmup=warmup), start_step=0, total_steps=5000, planned_steps=5000,
                        warmup_steps=500 if warmup is None else warmup, env=env, t_first_step=991.0,
                        refresh_lr=lambda: None)
    hook = demo.TimeBudget(budget=130.0)
    hook.after_log(t, step=10, elapsed=10.0, progress=progress)     # 1 s per step over steps 1..9
    assert (t.total_steps, progress.total, t.warmup_steps) == (130, 130, want)
    assert messages == [f"time budget 130 s at 1.00 s/step: training about 130 steps instead of 5000, "
                        f"{want} of them warmup (re-estimated as the run goes)"]
    now[0] = 991.0 + 19 * 0.95                       # 0.95 s per step over steps 1..19
    hook.after_log(t, step=20, elapsed=19.0, progress=progress)
    assert t.total_steps == 20 + int(111 / 0.95) == 136 and len(messages) == 1   # moved < 5%: quiet
    assert t.warmup_steps == demo.TimeBudget.warmup_for(136, warmup, 5000)


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Resumed from step 2 of a run that had reached step 4, the run kept step 4 in place:
    a later --resume latest jumped back onto the abandoned timeline."""
    from fastclip.train.checkpoint import list_checkpoints, resolve_resume
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    base = dict(model="tiny-vit", output=out, batch_size=8, lr=1e-3, warmup=1, eval_every=1000,
                demo_train_samples=32, demo_eval_samples=16, progress="none", plot=False, save_every=2,
                keep_checkpoints=0)
    train(TrainConfig(steps=5, **base))
    assert sorted(k for k, _ in list_checkpoints(out)) == [2, 4]
    train(TrainConfig(steps=5, resume=os.path.join(out, "checkpoints", "step_00000002.safetensors"), **base))
    assert sorted(k for k, _ in list_checkpoints(out)) == [2, 4]           # step 4 of the new timeline
    aside = os.path.join(out, "checkpoints", "superseded-after-00000002")
    # The abandoned run had finished: its model and results go aside with its checkpoint.
    assert sorted(os.listdir(aside)) == ["metrics.json", "model.safetensors", "step_00000004.safetensors"]
    assert resolve_resume("latest", out).endswith("step_00000004.safetensors")
    # The set-aside checkpoints can still be resumed from, and --overwrite removes them too.
    train(TrainConfig(steps=5, resume=os.path.join(aside, "step_00000004.safetensors"), **base))
    train(TrainConfig(steps=2, overwrite=True, **{**base, "save_every": 0}))
    assert not any(os.path.exists(os.path.join(d, "step_00000004.safetensors"))
                   for d in (aside, os.path.join(out, "checkpoints")))


@pytest.mark.parametrize("ranks, workers, noted", [(2, 0, False), (2, 1, False), (1, 0, True), (2, 2, True)])
def test_a_shard_run_resumed_with_other_readers_says_so(ranks, workers, noted):
    """A shard run of 2 ranks x 0 workers resumed in one process with twice the batch (the same
    global batch), or with --workers 2, read other samples next without a word."""
    from types import SimpleNamespace

    from fastclip.train.resume import note_changed_data
    cfg = SimpleNamespace(batch_size=8 // ranks, seed=0, train_data="s{0..2}.tar", dataset_type="auto",
                          workers=workers)
    t = SimpleNamespace(cfg=cfg, env=SimpleNamespace(world_size=ranks), data_position=4, resume_notes=[],
                        data_type="webdataset")
    saved = dict(batch_size=4, seed=0, train_data="s{0..2}.tar", dataset_type="auto", workers=0)
    for extra in ({"global_batch": 8, "world_size": 2}, {"global_batch": 8}):    # the field, or derived
        t.resume_notes.clear()
        note_changed_data(t, saved, extra)
        assert bool(t.resume_notes) == noted, t.resume_notes
        if noted:
            # --workers 0 is one reader per rank ("x 0 worker(s)" read as none)
            assert (f"shard readers 2 rank(s) x 1 -> {ranks} x {max(1, workers)} (--workers 0 -> {workers}; "
                    f"each reader streams its own share of the shards") in t.resume_notes[0]
    t.data_type, t.resume_notes = "csv", []      # map-style data: the position alone decides
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 2})
    assert t.resume_notes == ["resumed with other data settings than the checkpoint's: dataset type 'webdataset' "
                              "-> 'csv'; the run continues, not exactly as an uninterrupted one"]
    # --dataset-type webdataset then "auto" on the same shards: the same type (it was noted)
    t.data_type, t.resume_notes = "webdataset", []
    cfg.batch_size, cfg.workers, t.env.world_size = 4, 0, 2
    note_changed_data(t, dict(saved, dataset_type="webdataset"), {"global_batch": 8, "world_size": 2})
    assert t.resume_notes == []


def test_other_data_at_the_same_path_is_noted_on_resume(tmp_path):
    """A CSV rewritten between the run and --resume (16 rows, then 8) continued without a word:
    only the path was compared. Checkpoints record the rows and bytes (shards: count and bytes)."""
    from types import SimpleNamespace

    from fastclip.train.data import TrainData, data_fingerprint
    from fastclip.train.resume import note_changed_data
    path = tmp_path / "t.csv"
    path.write_text("filepath,title\n" + "".join(f"{i}.png,c{i}\n" for i in range(16)))
    cfg = SimpleNamespace(batch_size=8, seed=0, train_data=str(path), dataset_type="auto", workers=0)
    before = data_fingerprint(cfg, "csv", TrainData(list(range(16)), True, True, 2, "d"))
    assert before == {"rows": 16, "bytes": path.stat().st_size}
    path.write_text("filepath,title\n" + "".join(f"{i}.png,c{i}\n" for i in range(8)))
    now = data_fingerprint(cfg, "csv", TrainData(list(range(8)), True, True, 1, "d"))
    t = SimpleNamespace(cfg=cfg, env=SimpleNamespace(world_size=1), data_position=4, resume_notes=[],
                        data_type="csv", data_fingerprint=now)
    saved = dict(batch_size=8, seed=0, train_data=str(path), dataset_type="auto", workers=0)
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 1, "data": before})
    assert len(t.resume_notes) == 1 and (f"the training data at {str(path)!r} changed since the checkpoint "
                                         f"(bytes {before['bytes']} -> {now['bytes']}, rows 16 -> 8)"
                                         ) in t.resume_notes[0]
    t.resume_notes = []
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 1, "data": now})      # the same data
    assert t.resume_notes == []
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 1})        # a checkpoint without the field
    assert t.resume_notes == []


def test_resuming_with_other_data_settings_says_so(tmp_path, capsys):
    """A 2-rank run resumed in one process, or with another seed or dataset, continued without
    a word (its epoch counter jumped back)."""
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    base = dict(model="tiny-vit", output=out, lr=1e-3, warmup=1, eval_every=1000, demo_train_samples=32,
                demo_eval_samples=16, progress="lines", plot=False, save_every=2)
    train(TrainConfig(steps=3, batch_size=8, **base))
    capsys.readouterr()
    train(TrainConfig(steps=4, batch_size=4, seed=5, resume="latest", **base))
    out_text = capsys.readouterr().out
    assert "resumed with other data settings than the checkpoint's: global batch 8 -> 4" in out_text
    assert "seed 0 -> 5" in out_text
    # Another precision or clip norm: the step's arithmetic changed, noted as well.
    train(TrainConfig(steps=6, batch_size=4, seed=5, resume="latest", precision="bf16",
                      grad_clip_norm=1.0, **base))
    out_text = capsys.readouterr().out
    assert ("resumed with other training settings than the checkpoint's: precision 'fp32' -> 'bf16'; "
            "grad_clip_norm None -> 1.0; the run continues, not exactly as an uninterrupted one") in out_text


def test_default_warmup_leaves_room_for_the_decay(tmp_path, capsys):
    """warmup=None (real data's default) is min(2000, steps // 10): a fixed 2000 made any
    shorter run all warmup, ending at the peak learning rate. A warmup as long as the run is
    noted."""
    from fastclip.train.trainer import Trainer
    torch.set_num_threads(1)
    base = dict(model="tiny-vit", batch_size=8, demo_train_samples=32, demo_eval_samples=16,
                progress="none", plot=False, eval_every=1000)
    t = Trainer(TrainConfig(steps=300, warmup=None, output=str(tmp_path / "a"), **base))
    assert t.warmup_steps == 30
    capsys.readouterr()
    train(TrainConfig(steps=3, warmup=5, output=str(tmp_path / "b"), resume="latest", **base))
    out = capsys.readouterr().out
    assert "--warmup 5 is not shorter than the run: the warmup is cut to its 3 steps" in out
    # The same command starts a run and continues it (preemptible jobs): the first start says so.
    assert f"--resume latest: no checkpoint in {tmp_path / 'b'} yet: a new run" in out


def test_the_softmax_loss_refuses_a_model_with_a_bias(tmp_path):
    """A clip-loss run of a model with a logit_bias kept the bias at its initial value, and its
    evaluation (fastclip eval) took the model for a sigmoid-loss one."""
    with pytest.raises(ValueError, match=r"loss 'clip' uses no logit_bias: the model has one \(init_logit_bias -5"):
        train(TrainConfig(model="tiny-vit", output=str(tmp_path / "run"), steps=1, batch_size=4, progress="none",
                          plot=False, demo_train_samples=8, demo_eval_samples=8,
                          model_overrides={"init_logit_bias": -5.0}))


def test_a_config_built_in_python_gets_the_clis_checks(tmp_path):
    """train(TrainConfig(...)) skipped the CLI's checks: grad_clip_norm=-1 trained the model
    backwards, steps=-3 wrote an untrained model, steps="4" failed deep in the trainer, epochs
    was ignored beside the default steps, and an output that is a file failed after the model
    and data were built."""
    (tmp_path / "afile").write_text("x")
    for kw, kind, text in (
            (dict(grad_clip_norm=-1.0), ValueError, r"grad_clip_norm must be a finite number in \(0, inf\) or None"),
            (dict(steps=-3), ValueError, r"steps must be an int in \[1, 2\*\*63\) or None, got -3"),
            (dict(steps="4"), TypeError, r"steps must be an int .*got '4' \(str\)"),
            (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
            (dict(seed=1.5), TypeError, "seed must be an int"),
            (dict(threads=0), ValueError, r"threads must be an int in \[1, 1024\] or None"),
            # 100000 threads crashed in OpenMP's thread creation
            (dict(threads=100000), ValueError, r"threads must be an int in \[1, 1024\] or None, got 100000"),
            # torch's own RuntimeError from the distributed set-up named no field
            (dict(device="tpu"), ValueError, "TrainConfig.device 'tpu': not a device; expected auto, cpu"),
            (dict(device="cuda0"), ValueError, "TrainConfig.device 'cuda0': not a device"),
            # a BatchNorm model skipped every batch of one image, then failed about the data
            (dict(model="tiny-rn", batch_size=1), ValueError,
             "TrainConfig.batch_size 1: model 'tiny-rn' has BatchNorm layers"),
            (dict(model="demo", batch_size=8, accum_micro_batch=1), ValueError,
             "TrainConfig.accum_micro_batch 1: model 'demo' has BatchNorm layers .*last stage is 1x1 at image_size 32"),
            (dict(model_overrides=None), TypeError, "model_overrides must be a dict"),
            (dict(progress="fancy"), ValueError, "progress must be one of"),
            (dict(plot=1), TypeError, "plot must be a bool"),
            (dict(epochs=3), ValueError, r"steps=1500 and epochs=3 both set the length .*pass steps=None"),
            (dict(output=str(tmp_path / "afile")), ValueError, "output .*afile' exists and is not a directory")):
        with pytest.raises(kind, match=text):
            train(TrainConfig(**{"model": "tiny-vit", "progress": "none", "plot": False,
                                 "output": str(tmp_path / "o"), **kw}))
    assert not (tmp_path / "o").exists()
    # A backend this machine lacks failed at the first step, after overwrite=True had deleted
    # the old run: refused first, the old run kept.
    from fastclip.ops import all_backends, available_backends
    missing = sorted(set(all_backends()) - set(available_backends()))
    if missing:
        old = tmp_path / "old"
        train(TrainConfig(model="tiny-vit", steps=1, batch_size=4, demo_train_samples=8, demo_eval_samples=8,
                          progress="none", plot=False, threads=1, output=str(old)))
        before = sorted(p.name for p in old.iterdir())
        with pytest.raises(ValueError, match=f"TrainConfig.loss_backend '{missing[0]}': not available on this "
                                             f"machine; available: auto, "):
            train(TrainConfig(model="tiny-vit", steps=1, batch_size=4, progress="none", plot=False,
                              loss_backend=missing[0], overwrite=True, output=str(old)))
        assert sorted(p.name for p in old.iterdir()) == before
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCLIP_BACKEND", "nonesuch")
        with pytest.raises(ValueError, match="TrainConfig.loss_backend auto takes FASTCLIP_BACKEND='nonesuch': "
                                             "unknown"):
            train(TrainConfig(model="tiny-vit", progress="none", plot=False, output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
    # A micro-batch of one trains a ResNet whose last stage is larger than 1x1 (64 px: 2x2).
    out = train(TrainConfig(model="tiny-rn", model_overrides={"image_size": 64}, steps=1, batch_size=3,
                            accum_micro_batch=1, demo_train_samples=8, demo_eval_samples=8, progress="none",
                            plot=False, threads=1, output=str(tmp_path / "rn64")))
    assert out["steps"] == 1
    from fastclip.train.config import validate_config
    validate_config(TrainConfig(loss="siglip", dist_impl="bidir"))      # open_clip's names, as SigLipLoss
    # NumPy numbers are numbers (np.int64 steps passed and then failed writing config.json).
    import numpy as np
    out = train(TrainConfig(model="tiny-vit", steps=np.int64(2), batch_size=np.int64(4), lr=np.float32(1e-3),
                            warmup=1, seed=np.int64(1), demo_train_samples=16, demo_eval_samples=16,
                            progress="none", plot=False, threads=1, output=str(tmp_path / "np")))
    assert out["steps"] == 2


def test_train_leaves_the_callers_config_and_context_alone(tmp_path, monkeypatch):
    """train() wrote its generated folder into the caller's config (a second call with it found
    the folder taken), failed with an autograd error under the caller's no_grad after writing
    the run folder, and trained a float64 model labelled fp32 after set_default_dtype(float64).
    The training checkpoint it writes is named as one by load_checkpoint."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model="tiny-vit", steps=2, batch_size=4, warmup=1, demo_train_samples=16,
                      demo_eval_samples=16, progress="none", plot=False, threads=1, save_every=1)
    # A config the trainer refuses left its generated runs/<date>-<time> folder behind, empty.
    with pytest.raises(ValueError, match="batch of one pair"):
        train(TrainConfig(**{**cfg.__dict__, "batch_size": 1}))
    assert not os.path.isdir("runs") or os.listdir("runs") == []
    import pathlib
    path_cfg = TrainConfig(**{**cfg.__dict__, "output": pathlib.Path(tmp_path / "p")})      # a Path works
    assert train(path_cfg)["output"] == str(tmp_path / "p") and isinstance(path_cfg.output, pathlib.Path)
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            first = train(cfg)
            assert not torch.is_grad_enabled()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert cfg.output is None and os.path.isdir(first["output"])
    model = load_checkpoint(os.path.join(first["output"], "model.safetensors"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="a fastclip training checkpoint .*fastclip.eval.evaluate.load_model"):
        load_checkpoint(os.path.join(first["output"], "checkpoints", "step_00000001.safetensors"))
    from fastclip.train import checkpoint
    assert checkpoint.FORMAT == "fastclip-training-state"      # the name load_checkpoint looks for


def test_a_diverged_run_says_so_once(tmp_path, capsys):
    """A run at lr 1e9 logged a nan loss from step 2 on and ended "done" with exit 0 and not a
    word: the first logged non-finite loss is now a warning (once), and the run still ends."""
    torch.set_num_threads(1)
    out = str(tmp_path / "run")
    cfg = TrainConfig(model="tiny-vit", output=out, steps=6, batch_size=8, lr=1e9, warmup=1, log_every=1,
                      eval_every=1000, demo_train_samples=32, demo_eval_samples=16, progress="none", plot=False)
    train(cfg)
    text = capsys.readouterr().out
    import re
    assert len(re.findall(r"warning: the loss is -?(nan|inf) at step \d+ .*has diverged", text)) == 1
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert max(r["step"] for r in rows if r["type"] == "train") == 6


def test_a_resume_without_the_runs_save_every_says_it_writes_no_checkpoint():
    """A requeued job that dropped --save-every 50 trained 450 steps without a checkpoint and
    said nothing, while other changed settings were noted."""
    from types import SimpleNamespace

    from fastclip.train.resume import note_changed_data
    cfg = SimpleNamespace(batch_size=8, seed=0, train_data="a.csv", dataset_type="auto", workers=0,
                          save_every=None)
    t = SimpleNamespace(cfg=cfg, env=SimpleNamespace(world_size=1), data_position=4, resume_notes=[],
                        data_type="csv")
    saved = dict(batch_size=8, seed=0, train_data="a.csv", dataset_type="auto", workers=0, save_every=50)
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 1})
    assert t.resume_notes == ["the checkpoint's run saved every 50 steps; this one writes no checkpoint "
                              "(no --save-every): an interruption loses what it trains"]
    cfg.save_every, t.resume_notes = 100, []     # another interval is the user's choice: no note
    note_changed_data(t, saved, {"global_batch": 8, "world_size": 1})
    assert t.resume_notes == []


def test_notes_for_a_save_every_past_the_run_and_grad_checkpointing_on_a_resnet(tmp_path, capsys):
    """--steps 3 --save-every 10 wrote no checkpoint and --grad-checkpointing on a ResNet
    recomputed only the text tower, neither with a word."""
    torch.set_num_threads(1)
    cfg = TrainConfig(model="tiny-rn", output=str(tmp_path / "r"), steps=3, batch_size=8, lr=1e-3, warmup=1,
                      save_every=10, grad_checkpointing=True, eval_every=1000, demo_train_samples=16,
                      demo_eval_samples=8, progress="none", plot=False)
    train(cfg)
    out = capsys.readouterr().out
    assert "note: --save-every 10 reaches no step before the run's last (3): no checkpoint is written" in out
    assert "the ResNet image tower keeps its activations" in out
    assert not os.path.isdir(os.path.join(cfg.output, "checkpoints")) or not os.listdir(
        os.path.join(cfg.output, "checkpoints"))
    train(dataclasses.replace(cfg, model="tiny-vit", output=str(tmp_path / "v"), save_every=2))
    out = capsys.readouterr().out
    assert "--save-every" not in out and "keeps its activations" not in out
