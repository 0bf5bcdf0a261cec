"""What only the ``gemm`` backend has (src/fastclip/ops/triton/contrastive_loss_gemm.py): the
rows in chunks (the last one shorter), the per-tile partial sums re-zeroed between chunks,
the fp32-output GEMMs, fp16's power-of-two scaling of the gradient buffer, and what only a
GPU can show (the fp32-output GEMM on tensor cores, bf16 accuracy, bounded memory). Every
behaviour shared by all backends is in the conformance suite (test_contrastive_loss.py),
which runs this backend for both losses.

Without a GPU its Triton kernel runs under Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``) on CPU tensors and small shapes; GPU tests take the ``gpu``
fixture and skip without one; nothing touches CUDA at import or collection time.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastclip.ops.backends import all_backends, get_backend
from fastclip.ops.losses import LOSSES, get_loss

from ._helpers import (
    EPS,
    HALF_FACTOR,
    TOL,
    LaunchCounter,
    block_oracle,
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
    from fastclip.ops.triton import contrastive_loss_gemm as K  # noqa: PLC0415
    return K


def _fused():
    pytest.importorskip("triton")
    from fastclip.ops.triton import contrastive_loss as F  # noqa: PLC0415
    return F


@pytest.fixture
def dev():
    return kernel_device("gemm")


@pytest.fixture
def gpu():
    return kernel_gpu("gemm")


# ---------------------------------------------------------------------------- registry
def test_registration():
    b = all_backends()["gemm"]
    assert b.dtypes == (torch.float32, torch.float16, torch.bfloat16)
    assert b.devices == (("cuda", "cpu") if INTERPRET else ("cuda",))
    assert set(b.losses) == set(LOSSES) and b.fwd_bwd is not None
    assert b.code not in {o.code for n, o in all_backends().items() if n != "gemm"}
    # auto keeps the measured fused kernels first on a GPU (no CUDA call: a device object).
    gpu = torch.device("cuda")
    assert get_backend("triton").rank(gpu) > b.rank(gpu) > get_backend("cuda").rank(gpu)
    assert b.rank(torch.device("cpu")) < get_backend("reference").rank(torch.device("cpu"))
    ok, reason = b.availability()
    # Where it cannot run, the reason names this backend (not the triton one it shares code
    # with) or what is missing.
    assert ok or "gemm backend" in reason or "triton package is not installed" in reason \
        or "interpreter fails here" in reason, reason


def test_chunk_rows():
    K = _kernels()
    for n, m, size in ((32768, 32768, 2), (262144, 262144, 2), (100, 7, 4), (5000, 3, 2),
                       (1, 1, 4), (300000, 1 << 22, 4)):
        r = K.chunk_rows(n, m, size)
        assert 1 <= r <= n
        assert r == n or (r % 128 == 0 and (r * m * size <= K._CHUNK_BYTES or r == 128))
    assert K.chunk_rows(32768, 32768, 2) == 4096
    # Few columns: the byte bound alone allowed 65,536 row tiles of 64 (grid axis 1 stops at
    # 65,535).
    for n, m, size in ((5_000_000, 16, 4), (5_000_000, 1, 2), (1 << 23, 32, 2)):
        r = K.chunk_rows(n, m, size)
        assert r % 128 == 0 and -(-r // 64) <= 65535, (n, m, size, r)
    # The declared scratch bounds the chunk buffer for every feature dtype, past the 128-row
    # floor too (a 256 MiB cap undercounted m > 2^19 fp32 columns).
    b = all_backends()["gemm"]
    for n, m in ((1000, 1000), (32768, 32768), (600_000, 600_000), (2_000_000, 2_000_000)):
        for size in (2, 4):
            assert b.scratch_bytes(n, m, 512, 4) >= K.chunk_rows(n, m, size) * m * size, (n, m, size)


def test_mm32_keeps_fp32_accumulation():
    K = _kernels()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 40, generator=g), torch.randn(40, 5, generator=g)
    assert torch.equal(K._mm32(a, b), torch.mm(a, b))
    for dt in (torch.bfloat16, torch.float16):
        out = K._mm32(a.to(dt), b.to(dt))
        assert out.dtype == torch.float32
        # Products of 16-bit values are exact in fp32: the same sums as widened inputs.
        assert torch.equal(out, torch.mm(a.to(dt).float(), b.to(dt).float()))


def test_fp16_accumulation_flag_widens_the_gemm_inputs(monkeypatch, matmul_flags):
    # PyTorch refuses an fp32 output for fp16 inputs while fp16 accumulation is allowed:
    # the backend asks at every call (no CUDA call here: the flag decides first).
    K = _kernels()
    matmul_flags.allow_fp16_accumulation = True
    assert K._fp16_accumulation()
    assert not K._out_dtype_mm(torch.device("cuda"), torch.float16)
    matmul_flags.allow_fp16_accumulation = False
    assert not K._fp16_accumulation()
    monkeypatch.setattr(K, "_fp16_accumulation", lambda: False)
    assert not K._out_dtype_mm(torch.device("cpu"), torch.bfloat16)
    assert not K._out_dtype_mm(torch.device("cpu"), torch.float16)


# ---------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("normalize", (False, True))
def test_rows_in_chunks(dev, monkeypatch, loss, normalize):
    # The smallest chunk (128 rows): n = 300 takes three chunks (128, 128, 44), the last
    # one shorter (its partial sums re-zeroed), dY summed in groups of two chunks (a full
    # group and a partial one); block functions with an off-diagonal positive against the
    # float64 oracle, fwd_bwd too for a one-pass loss.
    K = _kernels()
    monkeypatch.setattr(K, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(K, "_GROUP", 2)
    launches = LaunchCounter(K._grad_tile_launch)
    monkeypatch.setattr(K, "_grad_tile_launch", launches)
    spec = get_loss(loss)
    g = torch.Generator().manual_seed(11)
    n, m, d, off = 300, 70, 20, 3
    x, y = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    if not normalize:
        x, y = unit_rows(x), unit_rows(y)
    params = params_for(loss, 15.0, -5.0)
    grads = upstream(n, m, g)
    (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, normalize, off, grads)
    p = param_tensor(loss, dev, 15.0, -5.0)
    xs, ys, gd = x.to(dev), y.to(dev), [t.to(dev) for t in grads]
    got = [("dx", wdx), ("dy", wdy), ("dparams", wdp)]
    out = K.bwd(spec.code, xs, ys, p, normalize, EPS, off, wr.to(dev), wc.to(dev), *gd)
    assert launches.calls == math.ceil(n / 128)
    checks = list(zip(got, out))
    if spec.one_pass:
        both = K.fwd_bwd(spec.code, xs, ys, p, normalize, EPS, off, *gd)
        checks += list(zip([("row", wr), ("col", wc), ("pos", wp)] + got, both))
    for (name, want), o in checks:
        assert rel_err(o, want) <= TOL[torch.float32], (name, rel_err(o, want))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_output_element_is_written(dev, monkeypatch, loss):
    # Every output starts as NaN (the fused module's debug hook, which this module's
    # buffers go through); two chunks, sizes straddling the tiles.
    K, F = _kernels(), _fused()
    monkeypatch.setattr(F, "POISON_OUTPUTS", True)
    monkeypatch.setattr(K, "_CHUNK_BYTES", 1)
    spec = get_loss(loss)
    g = torch.Generator().manual_seed(23)
    n, m, d = 131, 37, 33
    x, y = torch.randn(n, d, generator=g).to(dev), torch.randn(m, d, generator=g).to(dev)
    p = param_tensor(loss, dev, 5.0, -2.0)
    gr, gc, gp = (t.to(dev) for t in upstream(n, m, g))
    r, c, pos = K.fwd(spec.code, x, y, p, True, EPS, 2)
    outs = list(zip(("dx", "dy", "dparams"), K.bwd(spec.code, x, y, p, True, EPS, 2, r, c,
                                                   gr, gc, gp)))
    if spec.one_pass:
        outs += list(zip(("row", "col", "pos", "dx", "dy", "dparams"),
                         K.fwd_bwd(spec.code, x, y, p, True, EPS, 2, gr, gc, gp)))
    for name, t in outs:
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fp16_buffer_is_scaled(dev, monkeypatch, loss):
    # fp16 rounds Ĝ to fp16: its power-of-two scaling keeps |G| ~ 1/N in the normal
    # range. Against the same fp16 values in fp32 (the path's own rounding only), 2 chunks.
    K = _kernels()
    monkeypatch.setattr(K, "_CHUNK_BYTES", 1)
    spec = get_loss(loss)
    g = torch.Generator().manual_seed(31)
    n, m, d = 200, 64, 16
    x = unit_rows(torch.randn(n, d, generator=g)).half()
    y = unit_rows(torch.randn(m, d, generator=g)).half()
    p = param_tensor(loss, dev, 10.0, -6.0)
    gd = [(t * 1e-3).to(dev) for t in upstream(n, m, g)]     # |G| ~ 1e-3/N: below 6e-5
    outs = []
    for t in (torch.float16, torch.float32):
        xs, ys = x.to(t).to(dev), y.to(t).to(dev)
        r, c, _ = K.fwd(spec.code, xs, ys, p, False, EPS, 0)
        outs.append(K.bwd(spec.code, xs, ys, p, False, EPS, 0, r, c, *gd))
    for name, o, r in zip(("dx", "dy", "dparams"), *outs):
        assert rel_err(o, r) <= 4 * 2.0 ** -11, (name, rel_err(o, r))


# ----------------------------------------------------------------------------- GPU only
def test_gpu_gemms_take_16_bit_inputs_with_fp32_output(gpu):
    # Without torch.mm(..., out_dtype=torch.float32) the 16-bit GEMMs would run widened
    # to fp32, off the tensor cores' 16-bit rate.
    assert _kernels()._out_dtype_mm(torch.device("cuda"))


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("n", (1000, 8192))
def test_gpu_bf16_accuracy(gpu, loss, n):
    # Within 2x the error of PyTorch's own bf16 computation, judged against float64.
    d = 512
    x, y = gpu_features(n, d, torch.bfloat16, 5 + n)
    params = params_for(loss, 1 / 0.07 if loss == "clip" else 10.0, -10.0)
    want = oracle(loss, x, y, params, True)
    out = run(loss, x, y, params, True, "gemm")
    torch_bf16 = naive_in(loss, x, y, params, True, torch.bfloat16)
    for i, (o, t, r) in enumerate(zip(out, torch_bf16, want)):
        assert rel_err(o, r) <= HALF_FACTOR * rel_err(t, r) + 1e-7, (i, rel_err(o, r),
                                                                    rel_err(t, r))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_fp32_many_chunks(gpu, loss, monkeypatch, matmul_flags):
    # IEEE fp32, 17 chunks of 128 rows, m != n, an off-diagonal positive.
    matmul_flags.allow_tf32 = False
    K = _kernels()
    monkeypatch.setattr(K, "_CHUNK_BYTES", 1)
    spec, be = get_loss(loss), get_backend("gemm")
    n, m, d, off = 2100, 1000, 300, -5
    g = torch.Generator().manual_seed(n)
    x = unit_rows(torch.randn(n, d, generator=g))
    y = unit_rows(torch.randn(m, d, generator=g))
    params = params_for(loss, 20.0, -8.0)
    grads = upstream(n, m, g)
    (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, True, off, grads)
    p = torch.tensor(params, dtype=torch.float32, device="cuda")
    gd = [t.cuda() for t in grads]
    got = be.bwd(spec, x.cuda(), y.cuda(), p, True, EPS, off, wr.cuda(), wc.cuda(), *gd)
    for name, o, r in zip(("dx", "dy", "dparams"), got, (wdx, wdy, wdp)):
        assert rel_err(o, r) <= TOL[torch.float32], (loss, name, rel_err(o, r))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gpu_memory_is_bounded(gpu, loss):
    # N = 65536, D = 512, bf16: the logits would be 8 GiB; the backend holds one chunk
    # (_CHUNK_BYTES), the fp32 dY accumulator and one fp32 GEMM result ([m, D] each),
    # plus O(N) statistics and [R, D] rows.
    K = _kernels()
    n, d = 65536, 512
    x, y = gpu_features(n, d, torch.bfloat16, 7)
    out, extra = gpu_step_extra_memory(loss, x, y, "gemm")
    bound = K._CHUNK_BYTES + 2 * n * d * 4 + (64 << 20)
    assert torch.isfinite(out) and torch.isfinite(x.grad.float()).all()
    assert extra < bound, f"{loss}: extra {extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


def test_small_chunks_skip_the_autotuning():
    # A chunk of at most 2048 x 2048 logits (buckets) compiles one tile, not five.
    K = _kernels()
    small = K._prune(K._CONFIGS, {"r_key": 2048, "m_key": 2048})
    assert len(small) == 1 and small[0].kwargs["BLOCK_M"] == small[0].kwargs["BLOCK_N"] == 64
    assert K._prune(K._CONFIGS, {"r_key": 4096}, m_key=2048) == K._CONFIGS


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_autotuner_zeroes_only_partial_buffers(dev, monkeypatch, loss):
    # On a GPU the autotuner zeroes the buffers named in _PARTIALS before each configuration
    # it measures: none of them may share memory with an input or an output of the launch
    # (a statistic-free launch must not hand it an upstream gradient as a placeholder).
    K = _kernels()
    spec = get_loss(loss)
    names = K._grad_tile_kernel.arg_names
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(dict(zip(names, args)))
                return K._grad_tile_kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(K, "_grad_tile_launch", Spy())
    g = torch.Generator().manual_seed(41)
    n, m, d = 40, 35, 8
    x, y = torch.randn(n, d, generator=g).to(dev), torch.randn(m, d, generator=g).to(dev)
    p = param_tensor(loss, dev)
    grads = [t.to(dev) for t in upstream(n, m, g)]
    r, c, _ = K.fwd(spec.code, x, y, p, True, EPS, 0)
    K.bwd(spec.code, x, y, p, True, EPS, 0, r, c, *grads)
    if spec.one_pass:
        K.fwd_bwd(spec.code, x, y, p, True, EPS, 0, *grads)
    assert seen
    for args in seen:
        zeroed = [args[k] for k in K._PARTIALS]
        others = [v for k, v in args.items() if torch.is_tensor(v) and k not in K._PARTIALS]
        for a in zeroed:
            for b in others:
                assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
