"""Two gloo ranks launched as torchrun would (RANK/WORLD_SIZE/MASTER_* env vars), each with half
the batch, train to the same weights as one process with the whole batch (the exact sharded loss
+ DDP's gradient averaging), also with micro-batching and the ring form."""
import json
import os
import subprocess
import time

import pytest

from fastclip.bench.measure import free_port

from .._ports import port_taken
from ._common import assert_same_weights, env, fastclip_cmd, run, weights

# Adam's eps 1e-3 (instead of 1e-6): parameters whose true gradient is exactly zero (the key
# bias of attention: softmax is shift-invariant) get float-noise gradients of ~1e-9 that Adam's
# g / sqrt(v) would blow up to full-size, order-dependent updates; a larger eps keeps the
# comparison about the gradients.
COMMON = ["--steps", "6", "--log-every", "1", "--eval-every", "1000", "--lr", "1e-3", "--warmup", "2",
          "--eps", "1e-3"]


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["type"] == "train"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def single(tmp_path_factory, request):
    out = str(tmp_path_factory.mktemp("single"))
    run(COMMON + ["--loss", request.param, "--batch-size", "16", "--output", out])
    return request.param, out


def _launch(extra, out, port, timeout=240):
    """Two ranks of ``fastclip train`` as torchrun starts them: their exit codes and logs. A rank
    that fails stops the other (which would wait for it until the group's timeout)."""
    logs = [f"{out}.rank{r}.log" for r in range(2)]
    procs = []
    try:
        for r in range(2):
            with open(logs[r], "w") as f:
                procs.append(subprocess.Popen(
                    fastclip_cmd(*COMMON, *extra, "--batch-size", "8", "--output", out),
                    env=env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                    stdout=f, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout
        while (any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs)
               and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return [p.returncode for p in procs], [open(f).read() for f in logs]


@pytest.mark.parametrize("extra", [[], ["--dist-impl", "ring", "--accum-micro-batch", "3"]],
                         ids=["gather", "ring+micro"])
def test_two_ranks_equal_one_process(tmp_path, single, extra):
    loss, single = single
    extra = ["--loss", loss, *extra]
    # The port is free when chosen but bound only once rank 0 has imported torch, seconds later:
    # if another process took it meanwhile, the ranks run once more on a new port.
    for attempt in range(2):
        out = str(tmp_path / f"ddp{attempt}")
        codes, logs = _launch(extra, out, free_port())
        if not any(port_taken(log) for log in logs):
            break
    for code, log in zip(codes, logs):
        assert code == 0, log
    assert "batch 16 (2 ranks)" in logs[0]
    for a, b in zip(_losses(out), _losses(single)):
        assert abs(a - b) <= 1e-5 * abs(b), (_losses(out), _losses(single))
    assert_same_weights(weights(out), weights(single), exact=False, rtol=1e-4)
