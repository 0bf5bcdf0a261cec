"""A run folder holds one run: a folder with a run in it is refused without --resume or
--overwrite; a resumed run keeps one metrics row per step, carries its wall time and removes the
temporary files a killed checkpoint write left. Data faults are never fatal: a batch whose
samples all fail is skipped and counted; only data in which nothing loads stops the run."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip import cli
from fastclip.train import checkpoint as ckpt

from ._common import for_data

TINY = ["--model", "tiny-vit", "--threads", "1", "--progress", "none", "--no-plot", "--time-budget", "0",
        "--demo-train-samples", "256", "--demo-eval-samples", "16", "--batch-size", "8", "--lr", "1e-3",
        "--warmup", "2", "--log-every", "1", "--eval-every", "1000"]


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


def _train(capsys, *args):
    code = cli.main(["train", *for_data(TINY, args), *args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "4", "--save-every", "2", "--output", out)
    assert code == 0, err
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in ("metrics.jsonl", "model.safetensors")}
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_00000002.safetensors"]

    code, _, err = _train(capsys, "--steps", "6", "--save-every", "3", "--output", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and out in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0], err
    # nothing of the first run was touched
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ckpts
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in before} == before

    code, _, err = _train(capsys, "--steps", "6", "--save-every", "3", "--output", out, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000003.safetensors"]
    steps = [r["step"] for r in _rows(out) if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the new run's rows only
    assert sum(r["type"] == "final" for r in _rows(out)) == 1
    # a new run without checkpoints leaves no empty checkpoints/ folder behind
    code, _, err = _train(capsys, "--steps", "2", "--output", out, "--overwrite")
    assert code == 0, err
    assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(tmp_path, capsys):
    # --overwrite replaces the old run only once the new one has its data, evaluation sets and
    # model: a command that fails on its input leaves the old run as it was.
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "2", "--save-every", "1", "--output", out)
    assert code == 0, err
    before = sorted(os.listdir(out)) + sorted(os.listdir(os.path.join(out, "checkpoints")))
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("filepath,title\n")
    no_images = tmp_path / "zs"
    (no_images / "cat").mkdir(parents=True)
    for bad in (["--train-data", str(empty_csv)], ["--zeroshot-data", str(no_images)]):
        code, _, err = _train(capsys, "--steps", "2", "--output", out, "--overwrite", *bad)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "error:" in err, err
        assert sorted(os.listdir(out)) + sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    # Data found unusable only when read (no image of the CSV exists): the first batch is
    # drawn before the old run is touched.
    (tmp_path / "gone.csv").write_text("filepath,title\n" + "\n".join(f"no{i}.png,x {i}" for i in range(6)))
    code, _, err = _train(capsys, "--steps", "2", "--output", out, "--overwrite", "--train-data",
                          str(tmp_path / "gone.csv"), "--batch-size", "2")
    assert code == 2 and "gone.csv" in err.strip().splitlines()[-1], err
    assert sorted(os.listdir(out)) + sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_resume_keeps_one_row_per_step_carries_wall_time_and_removes_temporaries(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "8", "--save-every", "4", "--output", out)
    assert code == 0, err
    path = os.path.join(out, "checkpoints", "step_00000004.safetensors")
    saved_wall = ckpt.read_training_state(path)["extra"]["wall_time_s"]
    assert saved_wall > 0
    # what a SIGKILL during checkpoint and model writes leaves behind
    stale = [os.path.join(out, "checkpoints", ".tmp-k1l2m3.safetensors"), os.path.join(out, "checkpoints", ".tmp-x.pt"),
             os.path.join(out, ".tmp-a1b2c3.safetensors")]
    for s in stale:
        with open(s, "wb") as f:
            f.write(b"\0" * 1000)

    code, stdout, err = _train(capsys, "--steps", "8", "--save-every", "4", "--output", out, "--resume", "latest")
    assert code == 0, err
    assert "resumed from" in stdout
    resumed = int(stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed == 4      # checkpoints are written before the last step only
    assert "note: this run had finished (metrics.json: 8 steps); steps 5-8 are trained again" in stdout, stdout
    assert not any(os.path.exists(s) for s in stale)
    rows = _rows(out)
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 9))  # 5..8 once, not twice
    assert sum(r["type"] == "final" for r in rows) == 1
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    resumed_rows = [r for r in rows if r["type"] == "train" and r["step"] > 4]
    assert metrics["wall_time_s"] > saved_wall  # the time before the checkpoint is counted
    assert all(r["elapsed_s"] > saved_wall for r in resumed_rows)
    # extended with a larger --steps: the note says so, not "use a larger --steps"
    code, stdout, err = _train(capsys, "--steps", "10", "--save-every", "4", "--output", out, "--resume", "latest")
    assert code == 0, err
    assert ("note: this run had finished at step 8; it goes on to step 10 from its checkpoint at step 4: "
            "steps 5-8 are trained again, on the 10-step schedule") in stdout, stdout


def _png(path, seed):
    arr = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _halfmissing_csv(root):
    rows = []
    for i in range(8):
        if i % 2 == 0:
            _png(root / f"img{i}.png", i)
        rows.append(f"img{i}.png,caption number {i}")
    (root / "halfmissing.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    return str(root / "halfmissing.csv")


def test_batches_of_one_loaded_pair_do_not_train_the_softmax_loss(tmp_path, capsys):
    # One loadable image per batch of 2: every step's CLIP loss was exactly 0 ("loss 0.000")
    # and the run ended with status 0 and a model that learned nothing. Now such batches are
    # skipped like empty ones, and data made only of them is unusable, said in one line.
    code, _, err = _train(capsys, "--train-data", _halfmissing_csv(tmp_path), "--batch-size", "2",
                          "--steps", "4", "--output", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert "fewer than 2 samples loaded (the softmax loss of one pair is 0: nothing to contrast)" in err, err


def test_a_batch_whose_samples_all_fail_is_skipped_and_counted(tmp_path, capsys):
    """Half the images are missing: with batch 2 some batches have no image at all; they are
    skipped (counted, the next batch is drawn) and the run trains its 8 steps. Resuming from a
    checkpoint taken after skipped batches continues exactly (the data position is saved).
    The sigmoid loss: a batch of one loaded pair still trains it (the softmax loss skips those
    too, its loss of one pair being 0)."""
    import shutil

    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    args = ["--train-data", _halfmissing_csv(tmp_path), "--batch-size", "2", "--steps", "8", "--seed", "0",
            "--save-every", "4", "--loss", "siglip"]
    code, stdout, err = _train(capsys, *args, "--output", out)
    assert code == 0, err
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 8 and metrics["train_batches_skipped"] >= 1
    assert [r["step"] for r in _rows(out) if r["type"] == "train"] == list(range(1, 9))
    # every sample of the skipped batches is counted, with the missing ones of the other batches
    assert metrics["train_samples_skipped"] >= 2 * metrics["train_batches_skipped"]
    assert "no sample of batch" in err and "training batches with too few loadable samples were replaced" in stdout
    extra = ckpt.read_training_state(os.path.join(out, "checkpoints", "step_00000004.safetensors"))["extra"]
    assert extra["data_position"] == 4 + extra["skipped_batches"] and extra["skipped_batches"] >= 1

    again = str(tmp_path / "again")  # the same run, resumed from its step-4 checkpoint
    shutil.copytree(out, again)
    code, _, err = _train(capsys, *args, "--output", again, "--resume", "latest")
    assert code == 0, err
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(again, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.load(open(os.path.join(again, "metrics.json")))
    assert resumed["train_batches_skipped"] == metrics["train_batches_skipped"]


def test_data_in_which_nothing_loads_stops_with_a_message_naming_it(tmp_path, capsys):
    (tmp_path / "gone.csv").write_text("filepath,title\n" + "\n".join(f"no{i}.png,x {i}" for i in range(6)) + "\n")
    code, _, err = _train(capsys, "--train-data", str(tmp_path / "gone.csv"), "--batch-size", "2", "--steps", "50",
                          "--output", str(tmp_path / "run"))
    assert code == 2
    last = err.strip().splitlines()[-1]  # after the notes on the skipped batches
    assert last.startswith("fastclip train: error: ") and "gone.csv" in last and "no sample" in last, err
    assert "Traceback" not in err


def test_csv_rows_that_are_not_utf8_train_and_are_named_in_the_log(tmp_path, capsys):
    for i in range(4):
        _png(tmp_path / f"img{i}.png", i)
    (tmp_path / "latin1.csv").write_bytes(b"filepath,title\nimg0.png,a cat\nimg1.png,caf\xe9 au lait\n"
                                          b"img2.png,a dog\nimg3.png,na\xefve art\n")
    code, stdout, err = _train(capsys, "--train-data", str(tmp_path / "latin1.csv"), "--batch-size", "2",
                               "--steps", "2", "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "latin1.csv: 2 rows with bytes that are not valid UTF-8 (lines 3, 5)" in stdout


def test_resume_continues_only_this_folders_run(tmp_path, capsys):
    done = str(tmp_path / "done")                       # a finished run, no checkpoints
    code, _, err = _train(capsys, "--steps", "2", "--output", done)
    assert code == 0, err
    other = str(tmp_path / "other")                     # another run, with a checkpoint
    code, _, err = _train(capsys, "--steps", "2", "--save-every", "1", "--output", other)
    assert code == 0, err
    before = sorted(os.listdir(done))
    mtime = os.path.getmtime(os.path.join(done, "model.safetensors"))
    foreign = os.path.join(other, "checkpoints", "step_00000001.safetensors")
    for resume, needle in (("latest", "no checkpoint to continue it from"),
                           (foreign, "a checkpoint of another run")):
        code, _, err = _train(capsys, "--steps", "3", "--output", done, "--resume", resume)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert sorted(os.listdir(done)) == before
        assert os.path.getmtime(os.path.join(done, "model.safetensors")) == mtime
    # Another run's checkpoint into an empty folder is a fine start.
    code, _, err = _train(capsys, "--steps", "3", "--output", str(tmp_path / "new"), "--resume", foreign)
    assert code == 0, err


def test_resume_says_what_it_keeps_from_the_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "4", "--save-every", "2", "--output", out)
    assert code == 0, err
    code, stdout, err = _train(capsys, "--steps", "4", "--output", out, "--resume", "latest", "--lr", "0.1")
    assert code == 0, err
    assert "note: the resumed optimizer keeps the checkpoint's lr 0.001 (asked 0.1)" in stdout, stdout
    assert json.load(open(os.path.join(out, "config.json")))["train"]["lr"] == 1e-3
    code, _, err = _train(capsys, "--steps", "1", "--output", out, "--resume", "latest")
    assert code == 2 and "past the run's 1 steps" in err, err


def test_undecodable_zero_shot_folder_is_refused_before_overwrite(tmp_path, capsys):
    """The zero-shot folder is decoded at each evaluation, but one image of it is decoded at start:
    a folder of which nothing decodes stops the command before --overwrite deletes the old run."""
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "2", "--output", out)
    assert code == 0, err
    before = sorted(os.listdir(out))
    bad = tmp_path / "zsbad"
    for cls in ("a", "b"):
        (bad / cls).mkdir(parents=True)
        (bad / cls / "1.png").write_bytes(b"not a png")
    code, _, err = _train(capsys, "--steps", "2", "--output", out, "--overwrite", "--zeroshot-data", str(bad))
    assert code == 2 and f"--zeroshot-data {str(bad)!r}: no image could be decoded" in err
    assert sorted(os.listdir(out)) == before


def test_overwrite_removes_emptied_checkpoint_folders_but_not_a_link(tmp_path):
    from fastclip.train.run_folder import prepare_run_folder
    run = tmp_path / "run"
    (run / "checkpoints" / "superseded-after-4").mkdir(parents=True)
    for name in ("checkpoints/step_00000004.safetensors", "checkpoints/superseded-after-4/step_00000008.safetensors",
                 "metrics.json"):
        (run / name).write_bytes(b"x")
    prepare_run_folder(str(run), None, True, log=lambda s: None)
    assert sorted(os.listdir(run)) == []                       # both folders emptied and removed
    # checkpoints/ as a link to a folder elsewhere: its files go, the link and its target stay
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "step_00000004.safetensors").write_bytes(b"x")
    os.symlink(elsewhere, run / "checkpoints")
    (run / "metrics.json").write_bytes(b"x")
    prepare_run_folder(str(run), None, True, log=lambda s: None)
    assert os.path.islink(run / "checkpoints") and os.listdir(elsewhere) == []


def test_default_output_folders_are_claimed_one_per_run(tmp_path):
    # Runs started in the same second (a sweep in a loop) got the same runs/<date-time>: all
    # but one were refused, naming a folder the user never chose.
    from fastclip.train.run_folder import fresh_run_folder
    root = str(tmp_path / "runs")
    got = [fresh_run_folder(root) for _ in range(3)]
    assert len(set(got)) == 3 and all(os.path.isdir(p) and not os.listdir(p) for p in got)
    stamps = [os.path.basename(p) for p in got]
    assert all(s.startswith(stamps[0][:8]) for s in stamps)


def test_overwrite_leaves_another_tools_folder_alone(tmp_path, capsys):
    # A Hugging Face model folder also holds config.json and model.safetensors: --overwrite
    # deleted them as if they were a run's.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "model.safetensors").write_bytes(b"x")
    code, _, err = _train(capsys, "--steps", "2", "--output", str(hf), "--overwrite")
    assert code == 2 and "not a fastclip run's" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]


def test_closed_stdout_finishes_the_run(tmp_path):
    # `fastclip train | head`: the run went on to its last line, then died with a
    # BrokenPipeError traceback and exit status 1.
    import subprocess
    import sys

    import fastclip
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastclip.__file__)) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "fastclip", "train", *TINY, "--steps", "2", "--output", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()                   # as `| head -0` would
    _, err = p.communicate(timeout=300)
    assert p.returncode in (0, 141), err
    assert b"Traceback" not in err and json.loads((out / "metrics.json").read_text())["steps"] == 2


@pytest.mark.parametrize("how", ("closed", "full"))
def test_closed_or_full_stderr_finishes_the_run(tmp_path, how):
    # `fastclip train 2>&1 | head -1` (a closed pipe) and `2>/dev/full`: the first progress
    # line's write raised, the run ended with status 1, no message and no model.
    import subprocess
    import sys

    import fastclip
    if how == "full" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastclip.__file__)) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastclip", "train", *TINY, "--steps", "2", "--output", str(out)]
    if how == "closed":
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        p.stderr.close()               # as `2>&1 | head -0` would
        p.wait(timeout=300)
    else:
        with open("/dev/full", "w") as full:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=full, env=env)
            p.wait(timeout=300)
    assert p.returncode in (0, 141)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("what", ("model", "metrics", "config"))
def test_a_failed_final_write_is_one_line(tmp_path, capsys, monkeypatch, what):
    # A full disk when the final model.safetensors (or metrics.json, or config.json at the start)
    # was written ended in a traceback; the checkpoints' writes already said it in one line. A
    # torn config.json then barred the folder even to --overwrite: it is written atomically.
    import errno

    import fastclip.models as models
    from fastclip.train import trainer
    if what == "model":
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(models, "save_checkpoint", full)
    else:
        real_write = trainer._write_text

        def full_write(path, text):
            if ('"train"' in text) == (what == "config"):      # config.json holds the run's "train"
                with open(path, "w") as f:
                    f.write(text[:100])                         # torn, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(path, text)
        monkeypatch.setattr(trainer, "_write_text", full_write)
    out = tmp_path / "run"
    code, _, err = _train(capsys, "--steps", "2", "--output", str(out))
    name = {"model": "model.safetensors", "metrics": "metrics.json", "config": "config.json"}[what]
    assert code == 2 and "Traceback" not in err, err
    assert "cannot write" in err and name in err and "No space left" in err, err
    assert not out.exists() or not any(n.startswith(".tmp") for n in os.listdir(out))
    if what == "config":        # (the folder this command made is removed again, being empty)
        assert not (out / "config.json").exists()
        monkeypatch.undo()
        code, _, err = _train(capsys, "--steps", "2", "--output", str(out))    # the folder is free
        assert code == 0, err


def test_a_second_run_in_a_folder_a_run_holds_is_refused(tmp_path, capsys):
    """A second `--resume latest` on a live run removed the first run's checkpoint in flight as a
    stale temporary, set its newer checkpoints aside and interleaved both runs' metrics."""
    from fastclip.train.run_folder import RunFolderLock
    out = tmp_path / "run"
    code, _, err = _train(capsys, "--steps", "2", "--save-every", "1", "--output", str(out))
    assert code == 0, err
    before = sorted(os.listdir(out / "checkpoints"))
    (out / "checkpoints" / ".tmpAb12Cd").write_bytes(b"\0" * 100)     # the live run's write in flight
    with RunFolderLock(str(out)):                                     # (another process's, as flock sees it)
        code, _, err = _train(capsys, "--steps", "3", "--output", str(out), "--resume", "latest")
        assert code == 2 and "another fastclip train is running in" in err and "Traceback" not in err, err
        assert sorted(os.listdir(out / "checkpoints")) == sorted(before + [".tmpAb12Cd"])
    code, _, err = _train(capsys, "--steps", "3", "--output", str(out), "--resume", "latest")
    assert code == 0, err


def test_safetensors_own_temporaries_are_stale_too(tmp_path):
    """safetensors' save_file writes its own .tmpXXXXXX beside the file: a SIGTERM during a
    checkpoint write left one (as large as the checkpoint) that no resume removed."""
    from fastclip.train.run_folder import stale_temporaries
    (tmp_path / "checkpoints").mkdir()
    names = ["checkpoints/.tmpSAO8rI", ".tmprDx1M0", "checkpoints/.tmp-q2gvejq_.safetensors", ".tmp-abc.json",
             ".tmpnotes.txt", "checkpoints/.tmp", "keep.txt", "checkpoints/.tmpAB"]
    for n in names:
        (tmp_path / n).write_text("x")
    got = sorted(os.path.relpath(p, tmp_path) for p in stale_temporaries(str(tmp_path)))
    assert got == sorted(names[:4])


def test_resume_latest_from_a_corrupt_checkpoint_names_the_previous_one(tmp_path, capsys):
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "5", "--save-every", "2", "--output", out)
    assert code == 0, err
    (_, older), (_, newest) = sorted(ckpt.list_checkpoints(out))     # steps 2 and 4
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:                       # a disk fault: the newest file torn
        f.write(data[: len(data) // 3])
    code, _, err = _train(capsys, "--steps", "6", "--output", out, "--resume", "latest")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert newest in err and f"--resume {older} continues from it" in err, err
    code, stdout, err = _train(capsys, "--steps", "6", "--output", out, "--resume", older)
    assert code == 0 and "resumed from" in stdout, err


def test_resume_latest_refuses_a_checkpoint_whose_name_is_not_its_step(tmp_path, capsys):
    """--resume latest picks the newest file by its name: another run's step 2 copied in under a
    later step's name was resumed as this run's newest, its weights spliced onto this run's log."""
    import shutil
    other, out = str(tmp_path / "other"), str(tmp_path / "run")
    for folder, seed in ((other, "1"), (out, "0")):
        code, _, err = _train(capsys, "--steps", "4", "--save-every", "2", "--seed", seed, "--output", folder)
        assert code == 0, err
    (_, foreign), *_ = sorted(ckpt.list_checkpoints(other))                    # step 2
    planted = os.path.join(out, ckpt.CKPT_DIR, "step_00000003.safetensors")
    shutil.copy(foreign, planted)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    code, _, err = _train(capsys, "--steps", "6", "--output", out, "--resume", "latest")
    assert code == 2 and "named step 3 but holds the state of step 2" in err and planted in err, err
    assert open(os.path.join(out, "metrics.jsonl")).read() == before and os.path.isfile(planted)
    os.unlink(planted)
    code, stdout, err = _train(capsys, "--steps", "6", "--output", out, "--resume", "latest")
    assert code == 0 and "resumed from" in stdout and "step_00000002.safetensors at step 2" in stdout, stdout


def test_images_per_second_leaves_out_evaluation_and_checkpoints(tmp_path, capsys, monkeypatch):
    """A log window that held an evaluation (or a checkpoint write) counted its seconds as
    training: 1 img/s in the log of a run whose steps took milliseconds."""
    import time

    from fastclip.train import checkpoint as ckpt_mod
    from fastclip.train.trainer import Trainer
    evaluate, save = Trainer.evaluate, ckpt_mod.save_training_state
    monkeypatch.setattr(Trainer, "evaluate", lambda self, step: time.sleep(0.4) or evaluate(self, step))
    monkeypatch.setattr(ckpt_mod, "save_training_state", lambda *a, **k: time.sleep(0.4) or save(*a, **k))
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "4", "--eval-every", "2", "--save-every", "1", "--log-every", "2",
                          "--output", out)
    assert code == 0, err
    rows = [r for r in _rows(out) if r["type"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 4]
    # The windows ending at steps 2 and 4 held >= 0.4 s of sleeps (a checkpoint, an eval) and 8 or
    # 16 images: counted, <= 20 img/s. (Step 1's window holds the first step's one-time costs.)
    assert all(r["images_per_s"] > 60 for r in rows[1:]), rows


def test_resume_with_other_steps_follows_the_new_schedule_from_its_first_step(tmp_path, capsys):
    """The restored optimizer kept the old schedule's learning rate for the first resumed step
    (LambdaLR applies its function from the next step on): two schedules spliced, no note."""
    from fastclip.train.optim import cosine_lr
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "5", "--save-every", "2", "--output", out)
    assert code == 0, err
    code, stdout, err = _train(capsys, "--steps", "12", "--output", out, "--resume", "latest")
    assert code == 0, err
    assert "the learning-rate schedule follows this run's 12 steps and 2 warmup steps (the checkpoint's: 5 and 2)" \
        in stdout, stdout
    lrs = {r["step"]: r["lr"] for r in _rows(out) if r["type"] == "train"}
    for step in (5, 6, 12):             # the lr of step s is the schedule's at s - 1
        assert lrs[step] == pytest.approx(1e-3 * cosine_lr(step - 1, 2, 12), rel=1e-12), (step, lrs)


def test_resume_latest_before_the_first_checkpoint_says_so(tmp_path):
    """A run stopped before its first checkpoint was said to be "trained without --save-every"."""
    from fastclip.train.run_folder import RunFolderError, check_run_folder
    for every, needle in ((20, "it stopped before its first checkpoint, due at step 20"),
                          (None, "it was trained without --save-every")):
        out = tmp_path / f"run{every}"
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"train": {"save_every": every, "steps": 40}}))
        (out / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
        with pytest.raises(RunFolderError, match=needle):
            check_run_folder(str(out), "latest", False)


def test_resume_latest_of_another_model_does_not_point_to_the_previous_checkpoint(tmp_path, capsys):
    """The hint naming the previous checkpoint is for an unreadable newest one: a checkpoint of
    another model (which the previous one is too) got it, and following it failed the same way."""
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "5", "--save-every", "2", "--output", out)
    assert code == 0, err
    code, _, err = _train(capsys, "--steps", "6", "--output", out, "--resume", "latest",
                          "--model-overrides", '{"embed_dim": 32}')
    assert code == 2 and "previous checkpoint" not in err, err
    # The settings that differ are named (the message said only what the checkpoint holds,
    # then a truncated state-dict error).
    for flags, want in ((["--model-overrides", '{"embed_dim": 32}'], "model_overrides {} (this command: "
                                                                       "{'embed_dim': 32})"),
                        (["--loss", "siglip"], "loss 'clip' (this command: 'siglip')"),
                        (["--model", "tiny-rn"], "model 'tiny-vit' (this command: 'tiny-rn')")):
        code, _, err = _train(capsys, "--steps", "6", "--output", out, "--resume", "latest", *flags)
        assert code == 2 and "the checkpoint trained another model than this command builds: " + want in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_a_run_inside_another_runs_checkpoints_folder_is_refused(tmp_path, capsys):
    # --output runs/a/checkpoints was accepted: the outer run's --overwrite, pruning and
    # --resume latest then reached the inner run's files. Elsewhere below a run folder nothing
    # of it reaches, and a project's own config.json with a "train" section above is no run.
    out = str(tmp_path / "a")
    code, _, err = _train(capsys, "--steps", "2", "--save-every", "1", "--keep-checkpoints", "0",
                          "--output", out)
    assert code == 0, err
    for inner in (os.path.join(out, "checkpoints"), os.path.join(out, "checkpoints", "deeper")):
        code, _, err = _train(capsys, "--steps", "2", "--output", inner)
        assert code == 2 and f"is inside the checkpoints folder of another run, {os.path.realpath(out)}" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000001.safetensors"]
    # Its checkpoints alone (config.json gone) still say it is a run's folder.
    os.unlink(os.path.join(out, "config.json"))
    code, _, err = _train(capsys, "--steps", "2", "--output", os.path.join(out, "checkpoints", "x"))
    assert code == 2 and "is inside the checkpoints folder of another run" in err, err
    # Beside its checkpoints, a sibling, or below a project folder whose config.json has a
    # "train" section: fine; so is a folder below another tool's checkpoints/step_*.
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "config.json").write_text('{"train": {"lr": 1}}')
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "step_00000001.safetensors").write_bytes(b"not fastclip's")
    for ok in (os.path.join(out, "sub"), str(tmp_path / "b"), str(tmp_path / "proj" / "runs" / "x"),
               str(other / "checkpoints" / "run")):
        code, _, err = _train(capsys, "--steps", "1", "--output", ok)
        assert code == 0, (ok, err)


def _eval_json(path, model_file):
    path.write_text(json.dumps({"model": str(path.parent), "model_file": model_file, "seed": 0,
                                "config": {}, "metrics": {"zeroshot/shape/top1": 0.5}}))


def test_overwrite_and_resume_move_the_old_models_evaluations(tmp_path, monkeypatch):
    # `fastclip eval RUN --output RUN/eval.json` (the README's example) stayed beside the new
    # run's model after --overwrite, naming the deleted one.
    from fastclip.train.run_folder import prepare_run_folder, set_aside_later_steps
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "checkpoints/step_00000002.safetensors",
                 "checkpoints/step_00000004.safetensors"):
        (run / name).write_text('{"train": {}}' if name == "config.json" else "x")
    (run / "metrics.json").write_text('{"steps": 4}')
    _eval_json(run / "eval.json", str(run / "model.safetensors"))
    monkeypatch.chdir(tmp_path)
    _eval_json(run / "eval-rel.json", "run/model.safetensors")                  # relative, from here
    _eval_json(run / "eval-ck.json", "elsewhere/run/checkpoints/step_00000004.safetensors")  # recorded elsewhere
    _eval_json(run / "eval-in.json", "./model.safetensors")                     # typed inside the folder
    _eval_json(run / "eval-ck-in.json", "checkpoints/step_00000004.safetensors")
    other = tmp_path / "other.safetensors"
    other.write_text("x")
    _eval_json(run / "eval-other.json", str(other))                             # another model's: stays
    _eval_json(run / "eval-b.json", "elsewhere/b/model.safetensors")            # run b's, typed elsewhere: stays
    (run / "notes.json").write_text('{"mine": 1}')                              # not an evaluation: stays
    dest = set_aside_later_steps(str(run), 2)
    assert sorted(os.listdir(dest)) == ["eval-ck-in.json", "eval-ck.json", "eval-in.json", "eval-rel.json",
                                        "eval.json", "metrics.json", "model.safetensors",
                                        "step_00000004.safetensors"]
    for name in ("eval.json", "eval-rel.json", "eval-in.json"):
        os.replace(os.path.join(dest, name), run / name)
    prepare_run_folder(str(run), None, True, log=lambda s: None)
    assert sorted(os.listdir(run)) == ["eval-b.json", "eval-other.json", "notes.json"]


def test_resuming_from_the_runs_own_model_file_says_what_it_is(tmp_path, capsys):
    """--resume RUN/model.safetensors in RUN was "a checkpoint of another run ... choose an empty
    --output", and an empty --output then gave the real reason."""
    out = str(tmp_path / "run")
    code, _, err = _train(capsys, "--steps", "2", "--save-every", "1", "--output", out)
    assert code == 0, err
    model = os.path.join(out, "model.safetensors")
    code, _, err = _train(capsys, "--steps", "4", "--output", out, "--resume", model)
    assert code == 2 and (f"--resume {model}: a file of the run in {out} itself, not one of its training "
                          f"checkpoints") in err and "--resume latest continues the run" in err, err
