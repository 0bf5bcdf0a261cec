"""What only the ``triton`` backend has (src/fastclip/ops/triton): the forward's waves of
partial column statistics, outputs written element by element by several kernels, its
dtype set (no float64), its autotuned tile configurations, the one-pass launch sequence of
the sigmoid, and what only a GPU can show (memory at large N, the TF32 flag, bf16 tensor
cores, fp16 gradients at large N). Every behaviour shared by all backends is in the
conformance suite (test_contrastive_loss.py), which runs this backend for both losses.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports them) on CPU tensors and small shapes. GPU
tests take the ``gpu`` fixture (marked ``gpu`` at collection) and skip without one;
nothing touches CUDA at import or collection time.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from fastclip.ops import contrastive_loss as op
from fastclip.ops.backends import BackendUnavailableError, all_backends, get_backend
from fastclip.ops.losses import LOSSES, get_loss

from ._helpers import (
    EPS,
    HALF_FACTOR,
    TOL,
    LaunchCounter,
    block_oracle,
    default_params,
    embeddings,
    gpu_features,
    gpu_step_extra_memory,
    interpreter_env,
    kernel_device,
    kernel_gpu,
    naive_in,
    oracle,
    param_tensor,
    params_for,
    rel_err,
    run,
    unit_rows,
    upstream,
)

INTERPRET = interpreter_env()
LOSS_NAMES = tuple(LOSSES)


def _kernels():
    pytest.importorskip("triton")       # the installed wheel's [test] extra brings no Triton
    from fastclip.ops.triton import contrastive_loss as K  # noqa: PLC0415  (imports triton)
    return K


@pytest.fixture
def dev():
    return kernel_device("triton")


@pytest.fixture
def gpu():
    return kernel_gpu("triton")


# ------------------------------------------------------------------ registry / dtypes
def test_registration():
    b = all_backends()["triton"]
    assert b.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert b.devices == (("cuda", "cpu") if INTERPRET else ("cuda",))
    assert set(b.losses) == set(LOSSES) and b.fwd_bwd is not None
    ok, reason = b.availability()
    assert ok or ("triton package is not installed" in reason or "CUDA GPU" in reason
                  or "interpreter fails here" in reason), reason


def test_interpreter_probe_names_what_failed(monkeypatch):
    """Under the interpreter the backend runs a probe kernel once: where the interpreter
    cannot run (Triton 3.5's with NumPy 2.4) the backend is unavailable, with the reason."""
    if not INTERPRET:
        pytest.skip("the probe runs under TRITON_INTERPRET=1 only")
    pytest.importorskip("triton")
    K = _kernels()
    ok, reason = all_backends()["triton"].availability()
    assert ok == (K.interpreter_problem() == ""), reason

    class Broken:
        def __getitem__(self, grid):
            def launch(*a, **k):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch
    monkeypatch.setattr(K, "_probe_kernel", Broken())
    why = K.interpreter_problem()
    assert why.startswith("Triton ") and "interpreter fails here with NumPy" in why
    assert "only 0-dimensional arrays" in why

def test_compiled_kernels_keep_their_autotuning_on_disk():
    """Compiled (not interpreted), the kernels autotune with cache_results where Triton has
    it (>= 3.4), so that only the first process pays the 2.5-30 s of benchmarking per shape
    bucket. Checked in a fresh interpreter without TRITON_INTERPRET (no GPU needed: the
    decorators make no CUDA call)."""
    import inspect
    import os
    import subprocess
    import sys
    triton = pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import fastclip.ops.triton.contrastive_loss as m; "
            "print(m.INTERPRET, getattr(m._fwd_launch, 'cache_results', None), "
            "getattr(m._bwd_launch, 'cache_results', None))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    has = "cache_results" in inspect.signature(triton.autotune).parameters
    assert out.stdout.split() == ["False", str(has), str(has)], out.stdout


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fp64_is_refused_by_name(dev, loss):
    x, y = embeddings("random", 8, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*float64"):
        fastclip.ops.fused_loss(loss, x.to(dev), y.to(dev), default_params(loss),
                                backend="triton")
    # The kernels' own check, for callers of the block functions.
    p = torch.tensor(default_params(loss), dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match=r"float64"):
        _kernels().fwd(get_loss(loss).code, x.to(dev), y.to(dev), p, False, EPS, 0)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_auto_never_sends_fp64_to_triton(monkeypatch, loss):
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    for device in ("cpu", "cuda"):
        try:
            b = op.select_backend("auto", torch.device(device), torch.float64, loss)
        except BackendUnavailableError:
            continue
        assert b.name != "triton"


def test_kernels_refuse_what_they_do_not_implement(dev):
    K = _kernels()
    x, y = embeddings("random", 8, 4)
    x, y = x.to(dev), y.to(dev)
    with pytest.raises(ValueError, match="loss code 7"):
        K.fwd(7, x, y, param_tensor("clip", dev), False, EPS, 0)
    with pytest.raises(ValueError, match=r"at least 2 element.*bias"):
        K.fwd(K.SIGMOID.value, x, y, param_tensor("clip", dev), False, EPS, 0)
    g = torch.zeros(8, device=dev)
    with pytest.raises(ValueError, match="softmax .* needs its merged statistics"):
        K.fwd_bwd(K.SOFTMAX.value, x, y, param_tensor("clip", dev), False, EPS, 0, g, g, g)


# ------------------------------------------------------------------------ forward waves
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("blocks_per_wave", (1, 2, 3))
def test_forward_in_waves(dev, monkeypatch, loss, blocks_per_wave):
    # The partial column statistics are bounded by _PARTIAL_BYTES: shrink it so that the 3
    # row blocks run as 3 waves (first / middle / last merge), 2 waves or 1 wave.
    K = _kernels()
    spec = get_loss(loss)
    bm = K._INTERP_BLOCK if K.INTERPRET else 64
    n, m, d = 2 * bm + 6, 33, 20
    per_col = 8 if spec.merge == "lse" else 4
    monkeypatch.setattr(K, "_PARTIAL_BYTES", per_col * m * blocks_per_wave)
    merges = LaunchCounter(K._col_merge_kernel)
    monkeypatch.setattr(K, "_col_merge_kernel", merges)
    g = torch.Generator().manual_seed(17 + blocks_per_wave)
    x, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    params = params_for(loss, 30.0, -6.0)
    got = K.fwd(spec.code, x.to(dev), y.to(dev), param_tensor(loss, dev, 30.0, -6.0), True, EPS, 3)
    assert merges.calls == math.ceil(3 / blocks_per_wave)
    (want, _) = block_oracle(loss, x, y, params, True, 3, upstream(n, m, g))
    for name, o, r in zip(("row", "col", "pos"), got, want):
        assert o.dtype == torch.float64, name
        assert rel_err(o, r) <= TOL[torch.float32], (name, rel_err(o, r))


# ------------------------------------------------------------------- poisoned outputs
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("normalize", (False, True))
def test_every_output_element_is_written(dev, monkeypatch, loss, normalize):
    # Every buffer starts as NaN; any element a kernel skips stays NaN. n, m straddle the
    # block edges and D = 33 takes two programs per block along D in the backward.
    K = _kernels()
    monkeypatch.setattr(K, "POISON_OUTPUTS", True)
    spec = get_loss(loss)
    g = torch.Generator().manual_seed(21)
    n, m, d = 37, 70, 33
    x, y = torch.randn(n, d, generator=g).to(dev), torch.randn(m, d, generator=g).to(dev)
    p = param_tensor(loss, dev, 5.0, -2.0)
    gr, gc, gp = (t.to(dev) for t in upstream(n, m, g))
    r, c, pos = K.fwd(spec.code, x, y, p, normalize, EPS, 2)
    dx, dy, dp = K.bwd(spec.code, x, y, p, normalize, EPS, 2, r, c, gr, gc, gp)
    outs = [("row", r), ("col", c), ("pos", pos), ("dx", dx), ("dy", dy), ("dparams", dp)]
    if spec.one_pass:
        outs += [(f"fwd_bwd {k}", t) for k, t in zip(
            ("row", "col", "pos", "dx", "dy", "dparams"),
            K.fwd_bwd(spec.code, x, y, p, normalize, EPS, 2, gr, gc, gp))]
    for name, t in outs:
        assert torch.isfinite(t).all(), name


# ------------------------------------------------------------------- one-pass sequence
def test_one_pass_runs_no_forward_and_matches_the_two_passes(dev, monkeypatch):
    # fwd_bwd of the sigmoid: the two backward passes with statistics, no forward kernel and
    # no merge; its statistics and gradients are those of fwd then bwd (bitwise under the
    # interpreter, whose tiles are fixed; the autotuner may pick other tiles on a GPU), but
    # pos: fwd takes the positive's fp32 logit from its tile, the one pass a float64 dot
    # (fastclip.ops.backends), so the two agree to fp32 rounding.
    K = _kernels()
    spec = get_loss("siglip")
    g = torch.Generator().manual_seed(5)
    n, m, d = 45, 38, 20
    x, y = torch.randn(n, d, generator=g).to(dev), torch.randn(m, d, generator=g).to(dev)
    p = param_tensor("siglip", dev, 10.0, -3.0)
    grads = [t.to(dev) for t in upstream(n, m, g)]
    row, col, pos = K.fwd(spec.code, x, y, p, True, EPS, 1)
    two = (row, col, pos, *K.bwd(spec.code, x, y, p, True, EPS, 1, row, col, *grads))
    fwds, merges = LaunchCounter(K._fwd_launch), LaunchCounter(K._col_merge_kernel)
    monkeypatch.setattr(K, "_fwd_launch", fwds)
    monkeypatch.setattr(K, "_col_merge_kernel", merges)
    one = K.fwd_bwd(spec.code, x, y, p, True, EPS, 1, *grads)
    assert fwds.calls == 0 and merges.calls == 0
    for name, a, b in zip(("row", "col", "pos", "dx", "dy", "dparams"), one, two):
        if INTERPRET and name != "pos":
            assert torch.equal(a, b), name
        else:
            assert rel_err(a, b) <= 1e-6, (name, rel_err(a, b))


# ------------------------------------------------------------------------- autotuning
@pytest.mark.parametrize("d", (1, 7, 16, 64, 100, 256, 300, 513, 1024))
def test_bwd_config_pruning(d):
    # BLOCK_DO is clipped to next_pow2(D) (at least 16, tl.dot's minimum) and the configs
    # that become duplicates are dropped: every distinct tile is benchmarked once.
    K = _kernels()
    import triton  # noqa: PLC0415
    cap = max(16, triton.next_power_of_2(d))
    for out in (K._prune_bwd(K._BWD_CONFIGS, {"D": d}), K._prune_bwd(K._BWD_CONFIGS, {}, D=d)):
        keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in out]
        assert len(keys) == len(set(keys))
        assert all(c.kwargs["BLOCK_DO"] <= cap for c in out)
        want = {(tuple(sorted({**c.kwargs, "BLOCK_DO": min(c.kwargs["BLOCK_DO"], cap)}.items())),
                 c.num_warps, c.num_stages) for c in K._BWD_CONFIGS}
        assert set(keys) == want
        if d >= 512:
            assert len(out) == len(K._BWD_CONFIGS)


def test_tile_configs_and_autotune_keys():
    K = _kernels()
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731
    for c in K._FWD_CONFIGS + K._BWD_CONFIGS:
        assert all(pow2(v) for v in c.kwargs.values()), c
        assert c.num_warps in (4, 8) and c.num_stages >= 2, c
    # The registers of the backward's accumulator (see _BWD_CONFIGS): BLOCK_M·BLOCK_DO fp32.
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_DO"] <= 32 * 512 for c in K._BWD_CONFIGS)
    assert not any("BLOCK_M" in c.kwargs for c in K._FWD_CONFIGS)   # sized on the host
    # A configuration tuned for one loss, pass or precision is never reused for another.
    assert {"LOSS", "PRECISION", "D"} <= set(K._FWD_KEY)
    assert {"LOSS", "COLS_OUTER", "STATS", "NORMALIZE", "SCALE_W", "PRECISION",
            "D"} <= set(K._BWD_KEY)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_large_n_memory(gpu, loss):
    # N = 262144, D = 512, bf16: the N×N logits would be 128 GiB in bf16; the fused loss
    # needs O(N·D) beyond its inputs and gradients, under 1 GiB.
    x, y = gpu_features(262144, 512, torch.bfloat16, 0)
    out, extra = gpu_step_extra_memory(loss, x, y, "triton")
    assert torch.isfinite(out) and torch.isfinite(x.grad.float()).all()
    assert extra < 1 << 30, f"{loss}: extra memory {extra / 2**30:.2f} GiB"


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_tf32_flag_is_honoured(gpu, loss, matmul_flags):
    x, y = gpu_features(1000, 512, torch.float32, 1)
    params = default_params(loss)
    want = oracle(loss, x, y, params, True)
    matmul_flags.allow_tf32 = False
    ieee = run(loss, x, y, params, True, "triton")
    matmul_flags.allow_tf32 = True
    tf32 = run(loss, x, y, params, True, "triton")
    for o, r in zip(ieee, want):
        assert rel_err(o, r) <= TOL[torch.float32]
    assert torch.isfinite(tf32[0]) and rel_err(tf32[0], want[0]) <= 1e-2
    # TF32 rounds the operands to 10 mantissa bits: a different (less exact) result.
    assert not torch.equal(ieee[1], tf32[1])


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("n", (1000, 4099, 8192))
def test_gpu_bf16_accuracy(gpu, loss, n):
    # bf16 operands on tensor cores (the interpreter upcasts them): within 2x the error of
    # PyTorch's own bf16 computation of the same formula, judged against float64.
    d = 512
    x, y = gpu_features(n, d, torch.bfloat16, 2 + n)
    params = params_for(loss, 1 / 0.07 if loss == "clip" else 10.0, -10.0)
    want = oracle(loss, x, y, params, True)
    out = run(loss, x, y, params, True, "triton")
    torch_bf16 = naive_in(loss, x, y, params, True, torch.bfloat16)
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.bfloat16
    for i, (o, t, r) in enumerate(zip(out, torch_bf16, want)):
        assert not torch.isnan(o).any(), i
        assert rel_err(o, r) <= HALF_FACTOR * rel_err(t, r) + 1e-7, (i, rel_err(o, r),
                                                                    rel_err(t, r))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_fp16_gradients_do_not_underflow_at_large_n(gpu, loss):
    # |G| ~ 1/N: at N = 65536 most of it is below fp16's normal range (6e-5), and the
    # gradient product's fp16 operand would flush it to zero without the kernel's
    # power-of-two scaling. Judged against the same fp16 values computed in fp32
    # (TOL-exact), which isolates the fp16 path's own rounding.
    n, d = 65536, 64
    x, y = gpu_features(n, d, torch.float16, 3)
    params = default_params(loss)
    half = run(loss, x, y, params, True, "triton")
    full = run(loss, x.float(), y.float(), params, True, "triton")
    for i, (o, r) in enumerate(zip(half, full)):
        assert rel_err(o, r) <= 4 * 2.0 ** -11, (i, rel_err(o, r))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_block_functions_m_ne_n(gpu, loss, matmul_flags):
    # Sizes beyond the conformance suite's: several waves of row blocks' worth of columns,
    # D > BLOCK_DO (several programs per block along D), positives outside the block.
    matmul_flags.allow_tf32 = False
    spec, be = get_loss(loss), get_backend("triton")
    for n, m, d, off in ((129, 1000, 100, 0), (1000, 129, 513, -7), (4099, 4097, 64, 5000)):
        g = torch.Generator().manual_seed(n + m)
        x = unit_rows(torch.randn(n, d, generator=g))
        y = unit_rows(torch.randn(m, d, generator=g))
        params = params_for(loss, 20.0, -8.0)
        grads = upstream(n, m, g)
        (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, True, off, grads)
        p = torch.tensor(params, dtype=torch.float32, device="cuda")
        xs, ys = x.cuda(), y.cuda()
        gd = [t.cuda() for t in grads]
        got = (*be.fwd(spec, xs, ys, p, True, EPS, off),
               *be.bwd(spec, xs, ys, p, True, EPS, off, wr.cuda(), wc.cuda(), *gd))
        for name, o, r in zip(("row", "col", "pos", "dx", "dy", "dparams"), got,
                              (wr, wc, wp, wdx, wdy, wdp)):
            assert rel_err(o, r) <= TOL[torch.float32], (loss, n, m, name, rel_err(o, r))
