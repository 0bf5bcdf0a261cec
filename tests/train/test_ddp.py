"""Two gloo ranks launched as torchrun would (RANK/WORLD_SIZE/MASTER_* env vars), each with half
the batch, train to the same weights as one process with the whole batch (the exact sharded loss
+ DDP's gradient averaging), also with micro-batching and the ring form."""
import json
import os
import subprocess

import pytest

from fastclip.bench.measure import free_port

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


@pytest.mark.parametrize("extra", [[], ["--dist-impl", "ring", "--accum-micro-batch", "3"]],
                         ids=["gather", "ring+micro"])
def test_two_ranks_equal_one_process(tmp_path, single, extra):
    loss, single = single
    extra = ["--loss", loss, *extra]
    out = str(tmp_path / "ddp")
    port = free_port()
    procs = [subprocess.Popen(fastclip_cmd(*COMMON, *extra, "--batch-size", "8", "--output", out),
                              env=env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    assert "batch 16 (2 ranks)" in logs[0]
    for a, b in zip(_losses(out), _losses(single)):
        assert abs(a - b) <= 1e-5 * abs(b), (_losses(out), _losses(single))
    assert_same_weights(weights(out), weights(single), exact=False, rtol=1e-4)
