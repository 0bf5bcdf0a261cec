"""A run killed with SIGKILL mid-way and resumed with ``--resume latest`` ends with exactly the
weights of an uninterrupted run (CPU, deterministic data order and RNG states)."""
import os
import signal
import subprocess
import time

import pytest

from ._common import assert_same_weights, env, fastclip_cmd, run, weights

COMMON = ["--steps", "30", "--batch-size", "16", "--save-every", "4", "--log-every", "1", "--eval-every", "1000",
          "--lr", "1e-3", "--warmup", "4"]


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-rn"])  # tiny-rn: channels_last parameters and state
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, model):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    common = COMMON + ["--model", model]
    run(common + ["--output", ref])

    proc = subprocess.Popen(fastclip_cmd(*common, "--output", killed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            if any(n.startswith("step_") and int(n[5:13]) >= 8 for n in names):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "model.safetensors"))

    r = run(common + ["--output", killed, "--resume", "latest"])
    assert "resumed from" in r.stdout
    assert_same_weights(weights(ref), weights(killed), exact=True)
