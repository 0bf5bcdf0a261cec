"""The ``fastclip`` command line: help, argument errors (exit status 2 with a message naming the flag)."""
import contextlib
import os
import subprocess
import sys

import pytest

from fastclip import cli


def _env():
    import fastclip
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(fastclip.__file__))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_python_m_fastclip_help():
    r = subprocess.run([sys.executable, "-m", "fastclip", "--help"], capture_output=True, text=True, timeout=120,
                       env=_env())
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "bench" in r.stdout


def test_train_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--train-data", "--precision", "--accum-micro-batch", "--save-every", "--resume",
                 "--zeroshot-data", "--csv-img-key", "--grad-checkpointing", "--compile"):
        assert flag in out


def test_loss_choices_are_the_losses_with_a_module():
    # --loss's choices are named without importing torch; they must be exactly the fused
    # losses that have a drop-in module (what the trainer builds), and each module its loss's.
    import fastclip.ops
    from fastclip.loss import LOSS_MODULES
    from fastclip.train.config import LOSSES
    assert set(LOSSES) == set(LOSS_MODULES) <= set(fastclip.ops.LOSSES)
    assert all(cls.loss_name == name for name, cls in LOSS_MODULES.items())


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--precision", "fp8"], "--precision"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--train-data", "/nonexistent/train.csv"], "file not found"),
    (["train", "--batch-size", "99999999999999999999"], "expected a positive integer below 2**63"),
    (["train", "--train-data", "/nonexistent/a.tar::/nonexistent/b.csv"], "a CSV cannot be mixed with shards"),
    (["train", "--train-data", "/nonexistent/shard-{000..003}.tar"], "no tar shard"),
    (["train", "--train-data", "/tmp/data.parquet"], "cannot tell the type"),
    (["train", "--zeroshot-data", "/nonexistent/dir"], "--zeroshot-data"),
    (["train", "--resume", "latest"], "--resume latest needs --output"),
    (["train", "--model", "no-such-model"], "--model"),
    (["train", "--model-overrides", "[1, 2]"], "JSON object"),
    (["train", "--demo-group-prob", "1.5"], "--demo-group-prob"),
    (["train", "--demo-group-size", "0"], "--demo-group-size"),
    (["train", "--demo-design", "plaid"], "--demo-design"),
    (["train", "--time-budget", "abc"], "--time-budget"),
    (["train", "--device", "cuda:99"], "--device cuda:99"),
    (["train", "--device", "tpu"], "--device 'tpu'"),
    (["train", "--device", "nonsense!"], "--device 'nonsense!'"),
    (["train", "--loss-backend", "nosuch"], "--loss-backend 'nosuch': unknown"),
    (["train", "--lr", "nan"], "argument --lr: expected a finite number"),
    (["train", "--lr", "inf"], "argument --lr"),
    (["train", "--lr", "-1"], "argument --lr"),
    (["train", "--wd", "nan"], "argument --wd"),
    (["train", "--eps", "0"], "argument --eps"),
    (["train", "--beta2", "1"], "argument --beta2"),
    (["train", "--grad-clip-norm=-inf"], "argument --grad-clip-norm"),
    (["train", "--time-budget", "nan"], "argument --time-budget"),
    (["train", "--model-overrides", '{"nosuch": 1}'], "--model-overrides {\"nosuch\": 1}: unknown config override"),
    (["train", "--model-overrides", '{"embed_dim": -4}'], "embed_dim must be positive"),
    (["train", "--output", "/proc/fastclip-test/run"], "--output '/proc/fastclip-test/run': cannot write there"),
    (["train", "--output", "/tmp/fastclip-never-created", "--resume", "latest", "--overwrite"], "exclude each other"),
    (["train", "--max-failed-batches", "0"], "--max-failed-batches"),
    # 100000 crashed in OpenMP's thread creation
    (["train", "--threads", "100000"], "argument --threads: expected a thread count in [1, 1024], got '100000'"),
    (["train", "--threads", "0"], "argument --threads: expected a thread count in [1, 1024], got '0'"),
    (["eval", "--threads", "1025"], "argument --threads: expected a thread count in [1, 1024], got '1025'"),
    (["train", "--batch-size", "1"], "--batch-size 1: model 'demo' has BatchNorm layers"),
    (["train", "--batch-size", "4", "--accum-micro-batch", "1"], "--accum-micro-batch 1"),
    (["train", "--dataset-type", "csv"], "--dataset-type csv needs --train-data"),
    (["train", "--dataset-type", "webdataset"], "--dataset-type webdataset needs --train-data"),
    (["train", "--seed", "99999999999999999999"], "argument --seed: expected an integer in [0, 2**63)"),
    (["train", "--seed", "-1"], "argument --seed"),
    (["train", "--csv-separator", "||"], "argument --csv-separator: expected one character"),
    (["train", "--dataset-type", "shapes", "--train-data", "/tmp/x.csv"], "--dataset-type shapes trains on"),
    (["train", "--train-data", "/tmp", "--dataset-type", "csv"], "--train-data '/tmp': a folder, not a CSV file"),
    (["train", "--train-data", os.devnull, "--dataset-type", "csv"],
     f"--train-data '{os.devnull}': not a regular file (a device, pipe or socket)"),
    (["train", "--train-data", "/tmp", "--dataset-type", "webdataset"], "'/tmp' is a folder: name its shards"),
    (["train", "--zeroshot-classes", "a,b"], "--zeroshot-classes names the classes of --zeroshot-data"),
    (["train", "--zeroshot-data", "/tmp", "--zeroshot-classes", "/tmp/fastclip-none/names.txt"],
     "--zeroshot-classes '/tmp/fastclip-none/names.txt': no such file"),
    (["train", "--zeroshot-data", "/tmp", "--zeroshot-classes", "fastclip-none-clases.txt"],
     "--zeroshot-classes 'fastclip-none-clases.txt': no such file"),     # read as one class name
    (["train", "--train-data", "/tmp"], "cannot tell the type of --train-data '/tmp' (a folder)"),
    (["train", "--val-data", "/tmp"], "cannot tell the type of --val-data '/tmp' (a folder)"),
    (["train", "--model", "tiny-vit", "--model-overrides", '{"vocab_size": 10}'], "vocab_size 10 is smaller"),
    (["train", "--model", "tiny-vit", "--model-overrides", '{"vision_heads": 0}'], "vision_heads must be positive"),
    (["train", "--model", "tiny-vit", "--model-overrides", '{"patch_size": 0}'], "patch_size must be in"),
    (["train", "--loss", "siglip", "--model-overrides", '{"init_logit_bias": null}'],
     "init_logit_bias must be a number"),
    # a bias the softmax loss never trains: the run's eval then took the sigmoid loss
    (["train", "--model-overrides", '{"init_logit_bias": -5}'],
     "--loss clip uses no logit_bias: drop init_logit_bias from --model-overrides, or train with --loss siglip"),
])
def test_argument_errors_exit_2_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize("value, needle", [
    ("nosuch", "--loss-backend auto takes FASTCLIP_BACKEND='nosuch': unknown; expected auto or one of"),
    ("cuda", "--loss-backend auto takes FASTCLIP_BACKEND='cuda': not available on this machine"),
])
def test_a_bad_fastclip_backend_is_refused_before_the_run_folder(value, needle, tmp_path, capsys, monkeypatch):
    """FASTCLIP_BACKEND, which --loss-backend auto honours, failed with a traceback at the first
    training step, leaving a run folder that the next try was refused for."""
    import torch
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("the CUDA backend is available here")
    monkeypatch.setenv("FASTCLIP_BACKEND", value)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "1", "--output", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_options_for_data_the_run_does_not_read_are_refused(tmp_path, capsys):
    """--demo-* with --train-data, --train-num-samples without shards, --csv-* without a CSV file,
    colour-group options without that design, --keep-checkpoints without --save-every, --epochs
    beside --steps or with the demo and --eval-every with nothing to evaluate would be ignored:
    they exit 2 naming the option, also typed abbreviated or as --flag=value."""
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,title\na.png,a cat\n")
    (tmp_path / "s0.tar").write_bytes(b"")
    shards = str(tmp_path / "s{0..0}.tar")
    for argv, needle in (
            (["--train-data", str(csv), "--demo-design", "iid"], "--demo-design sets up the built-in shapes demo"),
            (["--train-data", shards, "--demo-tr", "64", "--demo-eval-samples", "8"],
             "drop --demo-train-samples and --demo-eval-samples"),
            (["--train-data", str(csv), "--train-num-samples=100"], "a CSV file's samples are its rows"),
            (["--train-num-samples", "100"], "the demo's samples are --demo-train-samples"),
            (["--csv-img-key", "path"], "--csv-img-key reads CSV files"),
            (["--train-data", shards, "--csv-separator", ";"], "--csv-separator reads CSV files"),
            (["--demo-group-size", "4"], "--demo-group-size shapes the colour groups"),
            (["--demo-design", "iid", "--demo-group-prob", "0.5"], "not of --demo-design iid"),
            (["--zeroshot-templates", "simple"], "--zeroshot-templates makes the prompts of --zeroshot-data's"),
            (["--train-data", str(csv), "--val-num-samples", "10"], "--val-num-samples caps the samples of"),
            (["--keep-checkpoints", "3"], "--keep-checkpoints prunes the training checkpoints that --save-every"),
            (["--train-data", str(csv), "--epochs", "3", "--steps", "5"], "--steps and --epochs both set"),
            (["--epochs", "2"], "--epochs counts passes over --train-data; the demo's length is --steps"),
            (["--train-data", str(csv), "--eval-every", "1"], "--eval-every sets how often the run "
                                                             "evaluates, and it has nothing to evaluate")):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv])
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
    # The same options where they are read pass the check.
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    for argv in (["--train-data", shards, "--train-num-samples", "100", "--val-data", str(csv), "--csv-img-key", "p"],
                 ["--train-data", str(csv), "--csv-sep", "\\t", "--zeroshot-data", str(tmp_path),
                  "--zeroshot-templates", "cifar"],
                 ["--demo-design", "colour-groups", "--demo-group-size", "4", "--demo-eval-samples", "8"],
                 ["--save-every", "100", "--keep-checkpoints", "0"],
                 ["--train-data", str(csv), "--epochs", "2", "--val-data", str(csv), "--eval-every", "3"],
                 ["--eval-every", "3"]):
        cli._check_paths(train, train.parse_args(argv), cli.given_dests(train, argv))


def test_given_dests_names_only_the_options_typed():
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    assert cli.given_dests(train, ["--steps=3", "--demo-e", "8", "--no-plot"]) == {
        "steps", "demo_eval_samples", "plot"}
    assert cli.given_dests(train, []) == set()
    assert train.get_default("demo_eval_samples") == cli._DEFAULTS.demo_eval_samples   # defaults restored


def test_csv_separator_reads_shell_escapes():
    for typed, want in (("\\t", "\t"), ("tab", "\t"), (";", ";"), (",", ",")):
        assert cli.build_parser().parse_args(["train", "--csv-separator", typed]).csv_separator == want


def test_batch_of_one_is_fine_without_batchnorm_where_the_loss_has_something_to_learn(monkeypatch):
    # A ViT tower has no BatchNorm: a batch of one is not refused for the sigmoid loss (one pair
    # still has a loss), nor for the softmax one across ranks (the batch is global).
    args = cli.build_parser().parse_args(["train", "--model", "tiny-vit", "--batch-size", "1", "--loss", "siglip"])
    cli._check_paths(cli.build_parser(), args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = cli.build_parser().parse_args(["train", "--model", "tiny-vit", "--batch-size", "1"])
    cli._check_paths(cli.build_parser(), args)


def test_bench_summarize_of_a_missing_file_is_one_line(capsys):
    assert cli.main(["bench", "--summarize", "/nonexistent/results.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--summarize '/nonexistent/results.csv'" in err[0], err


def test_real_data_gets_open_clip_defaults(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("filepath,title\na.png,x\n")
    args = cli.build_parser().parse_args(["train", "--train-data", str(csv)])
    cfg = cli.config_from_args(args)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.batch_size) == (5e-4, 0.2, None, None, 128)
    assert not cfg.eval_at_start and cfg.eval_every is None and cfg.time_budget is None


def test_demo_defaults_are_a_fixed_amount_of_work():
    """``fastclip train`` with no arguments: a fixed step count and batch, no time budget (opt-in)."""
    demo = cli.config_from_args(cli.build_parser().parse_args(["train"]))
    assert demo.train_data is None and demo.time_budget is None
    assert (demo.steps, demo.batch_size) == (1500, 88) and demo.eval_at_start
    budget = cli.config_from_args(cli.build_parser().parse_args(["train", "--time-budget", "60"]))
    assert budget.time_budget == 60.0 and budget.steps == 1500


def test_cuda_device_without_cuda_exits_2(capsys):
    import torch
    if torch.cuda.is_available():  # then "cuda" is valid; an index past the last device is not
        argv, needle = ["train", "--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"
    else:
        argv, needle = ["train", "--device", "cuda"], "--device cuda: CUDA is not available"
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    if not torch.cuda.is_available():  # the API says it too, instead of torch's AttributeError
        from fastclip.train.dist_env import init_distributed
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
            init_distributed("cuda")


def test_read_only_output_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--output", str(ro / "file")])  # a file, not a folder
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # permission bits do not stop root (the /proc case above does)
        ro.chmod(0o555)
        try:
            with pytest.raises(SystemExit) as e:
                cli.main(["train", "--output", str(ro / "run")])
            assert e.value.code == 2 and "cannot write there" in capsys.readouterr().err
        finally:
            ro.chmod(0o755)


def _one_line_error(capsys, argv, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastclip train: error: ") and needle in lines[0], err


TINY = ["--model", "tiny-vit", "--threads", "1", "--progress", "none", "--no-plot", "--time-budget", "0",
        "--steps", "2", "--batch-size", "2"]


def test_bad_data_files_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "cols.csv").write_text("path,caption\na.png,x\n")
    (tmp_path / "header.csv").write_text("filepath,title\n")
    for name, needle in (("empty.csv", "empty.csv: column 'filepath'"), ("cols.csv", "cols.csv: column 'filepath'"),
                         ("header.csv", "header.csv: no rows")):
        _one_line_error(capsys, ["train", *TINY, "--train-data", str(tmp_path / name),
                                 "--output", str(tmp_path / f"out-{name}")], needle)


def test_the_datas_notes_come_before_the_error_they_explain(tmp_path, capsys):
    """Notes on the data were printed with the run's first lines, after the first usable batch:
    a run whose data was unusable stopped without the one note that said why."""
    (tmp_path / "t.csv").write_text("filepath,title\na.png,one,x\nb.png,two\nc.png,three\n")
    code = cli.main(["train", *TINY, "--train-data", str(tmp_path / "t.csv"), "--output", str(tmp_path / "out")])
    cap = capsys.readouterr()
    out, err = cap.out.strip().splitlines(), cap.err.strip().splitlines()
    assert code == 2
    assert len(out) == 1 and "1 row with more fields than the header (line 2): skipped" in out[0]
    assert len(err) == 1 and err[-1].startswith("fastclip train: error: CSV ") and "t.csv" in err[-1]
    # One example of a failing row, its line and its image as resolved: a typo shows at once.
    assert f"e.g. line 3: image '{tmp_path / 'b.png'}' does not exist" in err[-1], err[-1]


def test_unusable_resume_files_exit_2_with_one_line(tmp_path, capsys):
    import torch

    from fastclip.models import create_model, save_checkpoint
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    model_file = tmp_path / "model.safetensors"
    save_checkpoint(create_model("tiny-vit"), str(model_file))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(model_file.read_bytes()[:5000])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, str(other))
    for f, needle in ((junk, "junk.safetensors: not a readable training checkpoint"),
                      (trunc, "trunc.safetensors: not a readable training checkpoint"),
                      (model_file, "model.safetensors: not a fastclip training checkpoint"),
                      (other, "other.pt: a training checkpoint in fastclip's earlier pickle format")):
        _one_line_error(capsys, ["train", *TINY, "--output", str(tmp_path / f"out-{f.name}"), "--resume", str(f)],
                        needle)


def test_outputs_that_would_feed_the_run_or_break_its_checkpoints_exit_2(tmp_path, capsys, monkeypatch):
    """--output inside --zeroshot-data became one more class of it (chance 25% for 3 classes);
    a 'checkpoints' file there was found at the first save, as a traceback; a batch of one
    pair trained on a loss that is always 0."""
    zs = tmp_path / "zs"
    for c in ("cat", "dog"):
        (zs / c).mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--zeroshot-data", str(zs), "--output", str(zs / "run")])
    assert e.value.code == 2 and "is inside --zeroshot-data" in capsys.readouterr().err
    assert not (zs / "run").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--output", str(tmp_path / "out")])
    assert e.value.code == 2 and "'checkpoints' is not a folder" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--model", "tiny-vit", "--batch-size", "1", "--output", str(tmp_path / "b1")])
    assert e.value.code == 2 and "--batch-size 1 in one process" in capsys.readouterr().err


def test_a_model_too_large_for_this_machine_exits_2(capsys):
    """A text width of 2^20 passed the meta-device check and failed at the first allocation
    (207 GB) with a traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--device", "cpu", "--model", "tiny-vit", "--model-overrides",
                  '{"text_width": 1048576, "text_heads": 1}'])
    assert e.value.code == 2 and "training needs at least" in capsys.readouterr().err


def test_a_shard_that_is_not_a_tar_is_named_before_training(tmp_path, capsys):
    # A CSV given with --dataset-type webdataset (or any non-tar .tar) streamed 100 empty
    # batches, then blamed the order of the members: when none of the shards checked is a tar,
    # the run is refused at once.
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,title\na.png,a cat\n")
    (tmp_path / "bad.tar").write_text("not a tar at all\n" * 40)
    (tmp_path / "bad2.tar").write_text("nor this\n" * 40)
    for argv, needles in (
            (["--train-data", str(csv), "--dataset-type", "webdataset"],
             [f"shard '{csv}': not a tar archive"]),
            (["--train-data", f"{tmp_path / 'bad.tar'}::{tmp_path / 'bad2.tar'}", "--steps", "2"],
             [f"shard '{tmp_path / 'bad.tar'}': not a tar archive", "(and the 1 other shard(s) checked)"])):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles), err


def test_a_bad_shard_among_good_ones_is_a_note_wherever_it_stands(tmp_path, capsys):
    """The same bad shard was skipped as the 17th of a list and fatal as the first: a data
    fault is never fatal while other shards hold samples; it is named at start."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    with tarfile.open(tmp_path / "good.tar", "w") as tar:
        for k in range(8):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 24, 3), 30 * k, np.uint8)).save(buf, format="PNG")
            for name, data in ((f"s{k}.png", buf.getvalue()), (f"s{k}.txt", f"caption {k}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bad.tar").write_text("not a tar at all\n" * 40)
    spec = f"{tmp_path / 'bad.tar'}::{tmp_path / 'good.tar'}"
    code = cli.main(["train", *TINY, "--train-data", spec, "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"1 of the first 2 shards cannot be read (e.g. {tmp_path / 'bad.tar'}: not a tar archive (" in out, out
    assert "each counts as one skipped sample when drawn: training on the others" in out, out


def test_a_run_that_never_starts_leaves_no_output_folder(tmp_path, capsys, monkeypatch):
    """Checking that --output is writable creates it: a run refused afterwards (a CSV without
    the named columns, a missing file) left an empty folder behind, parents included."""
    (tmp_path / "semi.csv").write_text("a,b\nx,y\n")
    for data in ("semi.csv", "missing.csv"):
        out = tmp_path / "new" / "run"
        with pytest.raises(SystemExit) if data == "missing.csv" else contextlib.nullcontext():
            code = cli.main(["train", "--train-data", str(tmp_path / data), "--steps", "2", "--output", str(out)])
            assert code == 2
        assert not (tmp_path / "new").exists(), data
    kept = tmp_path / "kept"
    kept.mkdir()
    code = cli.main(["train", "--train-data", str(tmp_path / "semi.csv"), "--steps", "2", "--output", str(kept)])
    assert code == 2 and kept.is_dir()            # a folder that was there stays
    # The default --output (runs/<date>-<time>, made when the run is set up) goes too.
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--train-data", "semi.csv", "--steps", "2"])
    assert code == 2 and not (tmp_path / "runs").exists()
    capsys.readouterr()


def test_output_that_is_a_dangling_link_is_named_as_such(tmp_path, capsys):
    """It said "cannot write there (File exists)"."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(SystemExit):
        cli.main(["train", "--output", str(link), "--steps", "1"])
    assert "a symbolic link to" in capsys.readouterr().err


def test_an_error_from_a_dataloader_worker_is_one_line_of_its_own_message():
    """It came back with the worker's whole traceback flattened into the line."""
    msg = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
           '  File "x.py", line 3, in f\n    raise DataError("...")\n'
           "fastclip.datasets.csv_dataset.DataError: reader 1 of 2 got no samples\n")
    assert cli._one_line(msg) == "reader 1 of 2 got no samples"
    assert cli._one_line("a\n  b") == "a b"


def test_ranks_other_than_0_stay_quiet_or_say_who_they_are(monkeypatch, capsys):
    """Under torchrun every rank printed the same usage error, and a rank whose peer had stopped
    printed the process group's traceback."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "_peer_stopped", False)     # (restored after: main() would os._exit)
    with pytest.raises(SystemExit):
        cli.main(["train", "--steps", "0"])
    assert capsys.readouterr().err == ""

    def peer_gone():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:29500")
    assert cli.run_reporting("train", peer_gone, (ValueError,)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastclip train: rank 1: stopped: another rank stopped first") and err.count("\n") == 1

    def user_error():
        raise ValueError("bad data")
    assert cli.run_reporting("train", user_error, (ValueError,)) == 2
    assert capsys.readouterr().err == "fastclip train: rank 1: error: bad data\n"

    def bug():
        raise RuntimeError("a bug, not a peer")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run_reporting("train", bug, (ValueError,))
    monkeypatch.setenv("WORLD_SIZE", "1")                  # one process: a gloo error is raised as is
    with pytest.raises(RuntimeError):
        cli.run_reporting("train", peer_gone, (ValueError,))


def test_help_imports_no_model_dataset_or_evaluation_layer():
    """`fastclip --help` imported the trainer (the package's __init__), and with it the data,
    tokenizer, model and evaluation layers (150 ms of imports), against pyproject.toml's note."""
    code = ("import sys, contextlib, io\n"
            "from fastclip import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['train', '--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[:2] in (['fastclip', 'datasets'], "
            "['fastclip', 'models'], ['fastclip', 'eval'], ['fastclip', 'tokenizer'])\n"
            "               or m == 'fastclip.train.trainer')\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_train_packages_submodules_are_attributes_after_a_plain_import():
    """After the names became lazy, `fastclip.train.checkpoint` (which an error message of
    load_openai tells users to call) raised AttributeError after `import fastclip.train`."""
    code = ("import fastclip.train as t\n"
            "print(t.checkpoint.convert_legacy_checkpoint.__name__, t.trainer.Trainer.__name__, "
            "t.train.__name__, 'resume' in dir(t))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["convert_legacy_checkpoint", "Trainer", "train", "True"]


def test_ctrl_c_before_the_run_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the first seconds (imports, argument checks) printed a KeyboardInterrupt
    traceback; after start-up it said "interrupted" and exited 130. Now the same from cli.main on."""
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_stops_a_run_with_one_line_and_no_temporary_files(tmp_path):
    """SIGTERM (a scheduler's stop) killed the process silently (status -15), and one that came
    during a checkpoint write left safetensors' temporary file behind."""
    import signal
    import time

    from ._common import env, fastclip_cmd
    out = tmp_path / "run"
    p = subprocess.Popen(fastclip_cmd("--steps", "400", "--save-every", "1", "--batch-size", "8", "--output", str(out)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "checkpoints").glob("step_*")):
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in err, err
    assert not [n for d in (out, out / "checkpoints") for n in os.listdir(d) if n.startswith(".tmp")]


def test_pipes_and_unreadable_class_files_get_one_line(tmp_path, capsys):
    # A FIFO given as --zeroshot-classes or --resume was "no such file" (it exists) or, read,
    # blocked; a class-names file that cannot be decoded ended in a traceback.
    from fastclip.datasets.csv_dataset import DataError
    from fastclip.datasets.folder import read_classnames
    fifo = str(tmp_path / "names.txt")
    os.mkfifo(fifo)
    for argv, needle in ((["train", "--zeroshot-data", str(tmp_path), "--zeroshot-classes", fifo],
                          f"--zeroshot-classes {fifo!r}: not a regular file"),
                         (["train", "--resume", fifo, "--output", str(tmp_path / "run")],
                          f"--resume {fifo!r}: not a regular file")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, err
    shard = str(tmp_path / "val.tar")
    os.mkfifo(shard)
    with pytest.raises(SystemExit) as e:      # read again at each evaluation: a pipe cannot be
        cli.main(["train", "--val-data", shard])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"shard {shard!r} is not a regular file (a pipe or device)" in err, err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt' is not UTF-8 text"):
        read_classnames(str(bad))
