"""The ``fastclip`` command line: help, argument errors (exit status 2 with a message naming the flag)."""
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


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--precision", "fp8"], "--precision"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--train-data", "/nonexistent/train.csv"], "file not found"),
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
])
def test_argument_errors_exit_2_with_a_clear_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err


def test_real_data_gets_open_clip_defaults(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("filepath,title\na.png,x\n")
    args = cli.build_parser().parse_args(["train", "--train-data", str(csv)])
    cfg = cli.config_from_args(args)
    assert (cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.batch_size) == (5e-4, 0.2, 2000, None, 128)
    assert not cfg.eval_at_start and cfg.eval_every is None and cfg.time_budget is None


def test_demo_defaults_are_a_fixed_amount_of_work():
    """``fastclip train`` with no arguments: a fixed step count and batch, no time budget (opt-in)."""
    demo = cli.config_from_args(cli.build_parser().parse_args(["train"]))
    assert demo.train_data is None and demo.time_budget is None
    assert (demo.steps, demo.batch_size) == (1500, 88) and demo.eval_at_start
    budget = cli.config_from_args(cli.build_parser().parse_args(["train", "--time-budget", "60"]))
    assert budget.time_budget == 60.0 and budget.steps == 1500
