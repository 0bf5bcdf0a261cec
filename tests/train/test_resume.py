"""A run killed with SIGKILL mid-way and resumed with ``--resume latest`` ends with exactly the
weights of an uninterrupted run (CPU, deterministic data order and RNG states)."""
import os
import signal
import subprocess
import time

import pytest
import torch

from ._common import assert_same_weights, env, fastclip_cmd, run, weights

COMMON = ["--steps", "30", "--batch-size", "16", "--save-every", "4", "--log-every", "1", "--eval-every", "1000",
          "--lr", "1e-3", "--warmup", "4"]


def _kill_after_checkpoint(cmd, out, step):
    """Start ``cmd`` and SIGKILL it once ``out`` holds a training checkpoint of ``step`` or later;
    the finished process (its returncode: -SIGKILL, or 0 if it ended before the kill)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(out, "checkpoints")
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            if any(n.startswith("step_") and int(n[5:13]) >= step for n in names):
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-rn"])  # tiny-rn: channels_last parameters and state
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, model):
    ref = str(tmp_path / "ref")
    common = COMMON + ["--model", model]
    run(common + ["--output", ref])

    # Killed once checkpoint 8 of 30 exists. A process descheduled for the ~1 s of its last 22
    # steps finishes first: then the run is started afresh, in a new folder (at most three times).
    for attempt in range(3):
        killed = str(tmp_path / f"killed{attempt}")
        proc = _kill_after_checkpoint(fastclip_cmd(*common, "--output", killed), killed, 8)
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: ended before the kill, 3 times"
    assert not os.path.exists(os.path.join(killed, "model.safetensors"))

    r = run(common + ["--output", killed, "--resume", "latest"])
    assert "resumed from" in r.stdout
    assert_same_weights(weights(ref), weights(killed), exact=True)


def test_training_state_of_a_hand_written_loop_compiled_and_without_a_schedule(tmp_path):
    """save_training_state crashed without a scheduler, and a torch.compile'd model's checkpoint
    ("_orig_mod." keys) did not load into the plain model, nor the reverse."""
    from fastclip.models import create_model
    from fastclip.train.checkpoint import load_training_state, save_training_state
    torch.manual_seed(0)
    model = create_model("tiny-vit")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = torch.compile(model)          # a wrapper only: nothing is compiled here
    path = save_training_state(str(tmp_path), 3, wrapped, opt, None, None)
    other = create_model("tiny-vit")
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_training_state(path, other, opt2, None, None)["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    path = save_training_state(str(tmp_path), 4, other, opt2, None, None)
    assert load_training_state(path, torch.compile(create_model("tiny-vit")), opt, None, None)["step"] == 4
