"""What is specific to the ``cuda`` backend (csrc/contrastive_loss/cuda). The behaviour
every (loss, backend) pair shares (values against the float64 oracle, layouts, dtypes,
opcheck, compile, determinism, non-finite inputs) is the conformance suite,
test_contrastive_loss.py, which runs cuda x clip and cuda x siglip from the registry.

Without a GPU (CI): the workspace plans, the compiled entry points' argument checks (each
fires before any memory is touched: the addresses below are fake but aligned), the
registry entry and the auto-priority table. With a GPU: the TF32 path, large batches,
agreement with the triton backend, the one-pass form against the two passes, the
row-block order of the gradient reduction, and outputs and workspace poisoned before the
call. GPU tests take the ``gpu`` fixture (so they are marked ``gpu`` at collection) and
skip cleanly; no CUDA call happens at import or collection.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastclip
from fastclip._ext import extension
from fastclip.ops.backends import cuda as cuda_backend
from fastclip.ops.backends import get_backend
from fastclip.ops.losses import get_loss

from ._helpers import (
    EPS,
    HALF_FACTOR,
    TOL,
    embeddings,
    naive_in,
    names,
    oracle,
    params_for,
    rel_err,
    run,
    upstream,
)

C = extension()
LOSSES = ("clip", "siglip")


@pytest.fixture
def gpu():
    """The CUDA device, or a clean skip (decided per test, never at collection); TF32 off."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, reason = get_backend("cuda").availability()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = prev


def _needs_cuda_build():
    if C is None or not getattr(C, "CUDA_BUILT", False):
        pytest.skip("fastclip._C was built without CUDA")


# ----------------------------------------------------------------- workspace plans
def _grad_layout(n: int, m: int, d: int) -> tuple[int, int]:
    """(splits, ldw) of the gradient pass: column splits only when the row blocks alone
    cannot fill the GPU (512 CTAs), fp32 accumulator rows padded to 64."""
    rbx, cbx = math.ceil(n / 64), math.ceil(m / 64)
    return max(1, min(512 // rbx, cbx)), math.ceil(d / 64) * 64


SIZES = ((1, 1, 1), (3, 200, 7), (129, 1000, 513), (1000, 262144, 512), (262144, 262144, 512),
         (262144, 64, 1024))


@pytest.mark.parametrize("n,m,d", SIZES)
def test_workspace_sizes(n, m, d):
    _needs_cuda_build()
    fwd = C.cuda_fwd_workspace_bytes(n, m, d)
    bwd = C.cuda_bwd_workspace_bytes(n, m, d)
    both = C.cuda_fwd_bwd_workspace_bytes(n, m, d)
    for b in (fwd, bwd, both):
        assert b % 256 == 0 and b > 0
    # forward: rho, sigma (fp32) and at least one 8-byte partial statistic per row/column
    assert fwd >= 4 * (n + m) + 8 * (n + m)
    splits, ldw = _grad_layout(n, m, d)
    acc = 4 * ldw * (splits * n + m)          # fp32 accumulators Wx [splits, n], Wy [m]
    assert acc <= bwd <= acc + 16 * (n + m) + 16384
    # the one-pass form adds the row sums of each split (float64)
    assert both - bwd == math.ceil(8 * splits * n / 256) * 256
    # split partials stay bounded: splits x n <= 512 row blocks of 64 rows (or n itself)
    assert splits * n <= max(n, 512 * 64)


def test_workspace_stays_bounded():
    _needs_cuda_build()
    # about sqrt(1024) partial statistics per row and column at N = 262144
    assert C.cuda_fwd_workspace_bytes(262144, 262144, 1024) < 200e6
    # gradients: the two fp32 accumulators and O(N), nothing N x N
    n, d = 262144, 512
    assert C.cuda_fwd_bwd_workspace_bytes(n, n, d) <= 2 * 4 * n * d * 1.01


@pytest.mark.parametrize("fn", ("cuda_fwd_workspace_bytes", "cuda_bwd_workspace_bytes",
                                "cuda_fwd_bwd_workspace_bytes"))
@pytest.mark.parametrize("bad,pattern", [
    ((0, 1, 1), r"expected n, m, d >= 1, got n=0"),
    ((1, 0, 1), r"m=0"),
    ((1, 1, 0), r"d=0"),
    ((-3, 1, 1), r"n=-3"),
    ((1 << 31, 1, 1), r"<= 2\^30"),
])
def test_workspace_rejects_bad_sizes(fn, bad, pattern):
    _needs_cuda_build()
    with pytest.raises(ValueError, match=pattern):
        getattr(C, fn)(*bad)


# ----------------------------------------------------------- entry-point arguments
_P = 1 << 20    # a fake, 256-byte aligned address: every check below fires before any use


def _args(fn: str, **kw) -> dict:
    """Valid arguments of ``fn`` for the sigmoid (loss 1, two parameters), bf16 [4, 8]."""
    a = dict(loss=1, x=_P, y=_P, n=4, m=4, d=8, ldx=8, ldy=8, dtype=2, allow_tf32=False,
             params=_P, num_params=2, normalize=True, eps=1e-12, pos_offset=0)
    if fn == "cuda_fwd":
        a.update(row=_P, col=_P, pos=_P)
    elif fn == "cuda_bwd":
        a.update(row=_P, col=_P, grad_row=_P, grad_col=_P, grad_pos=_P, dx=_P, dy=_P,
                 dparams=_P)
    else:
        a.update(grad_row=_P, grad_col=_P, grad_pos=_P, row=_P, col=_P, pos=_P, dx=_P, dy=_P,
                 dparams=_P)
    a.update(workspace=_P, workspace_bytes=1 << 40, stream=0)
    a.update(kw)
    return a


ALL = ("cuda_fwd", "cuda_bwd", "cuda_fwd_bwd")
GRADS = ("cuda_bwd", "cuda_fwd_bwd")
BAD_ARGS = [
    (ALL, dict(loss=2), r"unknown loss code 2 \(0: softmax/clip, 1: sigmoid/siglip\)"),
    (ALL, dict(n=0), r"expected n, m, d >= 1, got n=0 m=4 d=8"),
    (ALL, dict(m=0), r"got n=4 m=0"),
    (ALL, dict(d=0), r"d=0"),
    (ALL, dict(ldx=7), r"row strides must be >= d=8, got ldx=7 ldy=8"),
    (ALL, dict(ldy=3), r"ldy=3"),
    (ALL, dict(m=1 << 31), r"must be <= 2\^30, got n=4 m=2147483648"),
    (ALL, dict(dtype=3),
     r"dtype code must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\), got 3"),
    (ALL, dict(x=0), r"x and y must be non-null"),
    (ALL, dict(y=_P + 1), r"aligned to their element size \(2 bytes\)"),
    (ALL, dict(x=_P + 2, dtype=0), r"aligned to their element size \(4 bytes\)"),
    (ALL, dict(params=0), r"params is a null pointer"),
    (ALL, dict(params=_P + 2), r"params must be 4-byte aligned \(float32\)"),
    (ALL, dict(num_params=1),
     r"the sigmoid loss takes 2 parameters \(scale, bias\), got num_params=1"),
    (ALL, dict(loss=0), r"the softmax loss takes 1 parameter \(scale\), got num_params=2"),
    (ALL, dict(eps=0.0), r"eps must be finite and > 0, got 0"),
    (ALL, dict(eps=float("nan")), r"eps must be finite and > 0"),
    (ALL, dict(row=0), r"row is a null pointer"),
    (ALL, dict(col=_P + 4), r"col must be 8-byte aligned \(float64\)"),
    (ALL, dict(workspace=0), r"workspace is a null pointer"),
    (ALL, dict(workspace=_P + 128), r"workspace must be 256-byte aligned"),
    (ALL, dict(workspace_bytes=10),
     r"workspace has 10 bytes, needs \d+ \(see cuda_\w+_workspace_bytes\)"),
    (("cuda_fwd", "cuda_fwd_bwd"), dict(pos=_P + 4), r"pos must be 8-byte aligned"),
    (GRADS, dict(grad_row=0), r"grad_row is a null pointer"),
    (GRADS, dict(grad_col=_P + 4), r"grad_col must be 8-byte aligned"),
    (GRADS, dict(grad_pos=0), r"grad_pos is a null pointer"),
    (GRADS, dict(dx=0), r"dx and dy must be non-null and aligned to their element size"),
    (GRADS, dict(dy=_P + 1), r"dx and dy must be non-null and aligned"),
    (GRADS, dict(dparams=0), r"dparams is a null pointer"),
    (GRADS, dict(dparams=_P + 2), r"dparams must be 4-byte aligned"),
    (("cuda_fwd_bwd",), dict(loss=0, num_params=1),
     r"only one-pass losses \(code 1, sigmoid\) run in one pass"),
]


@pytest.mark.parametrize("fn,change,pattern",
                         [pytest.param(f, c, p, id=f"{f}-{'-'.join(c)}-{i}")
                          for i, (fns, c, p) in enumerate(BAD_ARGS) for f in fns])
def test_extension_rejects_bad_arguments(fn, change, pattern):
    _needs_cuda_build()
    with pytest.raises(ValueError, match=pattern):
        getattr(C, fn)(**_args(fn, **change))


def test_extension_takes_the_softmax_with_one_parameter():
    # The same valid-looking call with the softmax's parameter count gets past the
    # parameter check and is stopped by the next bad argument (no memory touched).
    _needs_cuda_build()
    for fn in ("cuda_fwd", "cuda_bwd"):
        with pytest.raises(ValueError, match="workspace has 10 bytes"):
            getattr(C, fn)(**_args(fn, loss=0, num_params=1, workspace_bytes=10))


# ------------------------------------------------------------ registry and priority
def test_registry_entry():
    b = get_backend("cuda")
    assert set(b.losses) == {"clip", "siglip"}
    assert b.fwd_bwd is not None                # SigLIP runs in one pass
    assert set(b.dtypes) == {torch.float32, torch.float16, torch.bfloat16}
    # the gradient pass reuses the forward's logit tiles bit for bit: exact at any |z|
    assert b.exact_logits == float("inf")


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5)])
@pytest.mark.parametrize("cuda_available", (True, False))
def test_triton_is_preferred_on_every_gpu(monkeypatch, cap, cuda_available):
    # Measured on an H200 (cuda_backend's comment): the triton backend is 3x faster; the
    # cuda backend's gradient pass is bound by memory traffic on any architecture.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    dev = torch.device("cuda")
    assert get_backend("cuda").rank(dev) == cuda_backend.CUDA_PRIORITY
    assert get_backend("triton").rank(dev) > get_backend("cuda").rank(dev)
    assert get_backend("cuda").rank(dev) > get_backend("reference").rank(dev)


# ------------------------------------------------------------------------ GPU side
def _params(loss: str, scale: float = 1 / 0.07, bias: float = -10.0):
    return params_for(loss, scale, bias)


@pytest.mark.parametrize("loss", LOSSES)
def test_tf32_path(gpu, loss):
    # fp32 inputs with allow_tf32: the tile products on TF32 tensor cores, judged as
    # torch.matmul under the same flag is: within 2x its error (or the fp32 table).
    g = torch.Generator().manual_seed(5)
    x, y = (t.to(gpu) for t in embeddings("random", 257, 200, gen=g))
    params = _params(loss, 20.0)
    want = oracle(loss, x, y, params, True)
    torch.backends.cuda.matmul.allow_tf32 = True
    out = run(loss, x, y, params, True, "cuda")
    torch32 = naive_in(loss, x, y, params, True, torch.float32)
    for name, o, t, r in zip(names(loss), out, torch32, want):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, r) <= max(TOL[torch.float32], HALF_FACTOR * rel_err(t, r)), name


@pytest.mark.parametrize("loss", LOSSES)
def test_matches_triton_backend(gpu, loss):
    tri = get_backend("triton")
    if not tri.available() or loss not in tri.losses:
        pytest.skip(f"the triton backend does not run the {loss!r} loss here")
    g = torch.Generator().manual_seed(8)
    x, y = (t.to(gpu) for t in embeddings("random", 515, 128, gen=g))
    params = _params(loss)
    a = run(loss, x, y, params, True, "cuda")
    b = run(loss, x, y, params, True, "triton")
    want = oracle(loss, x, y, params, True)
    for name, u, v, r in zip(names(loss), a, b, want):
        assert rel_err(u, v) <= 2 * TOL[torch.float32], name
        assert rel_err(u, r) <= TOL[torch.float32], name


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("pos_offset", (0, -3, 70))
def test_one_pass_equals_two_passes(gpu, dtype, pos_offset):
    # fwd_bwd is the backward kernel with the statistics folded in: its gradients are the
    # backward's bit for bit, its statistics the forward's up to the float64 summation
    # order (per-tile partials grouped by column split instead of column group).
    spec, be = get_loss("siglip"), get_backend("cuda")
    g = torch.Generator().manual_seed(21)
    n, m, d = 300, 1100, 72
    x = torch.randn(n, d, generator=g).to(gpu, dtype)
    y = torch.randn(m, d, generator=g).to(gpu, dtype)
    p = torch.tensor([12.0, -4.0], device=gpu)
    grads = upstream(n, m, g, device=gpu)
    row, col, pos = be.fwd(spec, x, y, p, True, EPS, pos_offset)
    dx, dy, dp = be.bwd(spec, x, y, p, True, EPS, pos_offset, row, col, *grads)
    r1, c1, p1, dx1, dy1, dp1 = be.fwd_bwd(spec, x, y, p, True, EPS, pos_offset, *grads)
    for name, a, b in (("row", r1, row), ("col", c1, col), ("pos", p1, pos)):
        assert a.dtype == torch.float64
        assert rel_err(a, b) <= 1e-12, name
    for name, a, b in (("dx", dx1, dx), ("dy", dy1, dy), ("dparams", dp1, dp)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loss", LOSSES)
def test_row_block_order_is_fixed(gpu, loss):
    # Many row blocks and several column splits: the dY rows and the column sums are added
    # through the turnstiles in row-block order, so repeated runs are bitwise equal even
    # though the units run in whatever order the GPU schedules them.
    g = torch.Generator().manual_seed(31)
    x, y = (t.to(gpu, torch.bfloat16) for t in embeddings("random", 5000, 96, gen=g))
    params = _params(loss)
    first = run(loss, x, y, params, True, "cuda")
    for _ in range(3):
        again = run(loss, x, y, params, True, "cuda")
        for name, a, b in zip(names(loss), first, again):
            assert torch.equal(a, b), name


def _poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_every_output_element_is_written(gpu, loss, dtype):
    """Outputs filled with NaN and workspaces with 0xFF bytes (NaN as floats and doubles,
    turnstiles at their largest value) before each call come back finite everywhere: the
    kernels write every output element and never read workspace they did not write."""
    spec = get_loss(loss)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    g = torch.Generator().manual_seed(2)
    n, m, d, off = 200, 131, 65, 5
    x = torch.randn(n, d, generator=g).to(gpu, dtype)
    y = torch.randn(m, d, generator=g).to(gpu, dtype)
    p = torch.tensor(_params(loss, 30.0, -3.0), device=gpu)
    st = torch.cuda.current_stream().cuda_stream
    head = (spec.code, x.data_ptr(), y.data_ptr(), n, m, d, d, d, code, False, p.data_ptr(),
            p.numel(), True, EPS, off)

    def workspace(nbytes):
        return torch.full((nbytes,), 255, dtype=torch.uint8, device=gpu)

    row, col, pos = (_poisoned((k,), torch.float64, gpu) for k in (n, m, n))
    wb = C.cuda_fwd_workspace_bytes(n, m, d)
    ws = workspace(wb)
    C.cuda_fwd(*head, row.data_ptr(), col.data_ptr(), pos.data_ptr(), ws.data_ptr(), wb, st)
    gr, gc, gp = upstream(n, m, g, device=gpu)
    dx, dy = _poisoned((n, d), dtype, gpu), _poisoned((m, d), dtype, gpu)
    dp = _poisoned((p.numel(),), torch.float32, gpu)
    wb = C.cuda_bwd_workspace_bytes(n, m, d)
    ws = workspace(wb)
    C.cuda_bwd(*head, row.data_ptr(), col.data_ptr(), gr.data_ptr(), gc.data_ptr(),
               gp.data_ptr(), dx.data_ptr(), dy.data_ptr(), dp.data_ptr(), ws.data_ptr(), wb, st)
    outs = [row, col, pos, dx, dy, dp]
    if spec.one_pass:
        r1, c1, p1 = (_poisoned((k,), torch.float64, gpu) for k in (n, m, n))
        dx1, dy1 = _poisoned((n, d), dtype, gpu), _poisoned((m, d), dtype, gpu)
        dp1 = _poisoned((p.numel(),), torch.float32, gpu)
        wb = C.cuda_fwd_bwd_workspace_bytes(n, m, d)
        ws = workspace(wb)
        C.cuda_fwd_bwd(*head, gr.data_ptr(), gc.data_ptr(), gp.data_ptr(), r1.data_ptr(),
                       c1.data_ptr(), p1.data_ptr(), dx1.data_ptr(), dy1.data_ptr(),
                       dp1.data_ptr(), ws.data_ptr(), wb, st)
        outs += [r1, c1, p1, dx1, dy1, dp1]
    torch.cuda.synchronize()
    for i, t in enumerate(outs):
        assert torch.isfinite(t).all(), i
    # pos outside the block (i + 5 >= m) is 0; inside it is the logit of the tile
    assert torch.equal(pos[m - off:], torch.zeros(n - m + off, dtype=torch.float64, device=gpu))


def test_siglip_loss_on_cuda_matches_the_cpu(gpu):
    # The public function end to end on the GPU: the one-pass path with gradients, the
    # forward alone without.
    g = torch.Generator().manual_seed(40)
    x, y = embeddings("random", 700, 64, gen=g)
    want = fastclip.siglip_loss(x, y, 10.0, -10.0, normalize=True, backend="cpu")
    with torch.no_grad():
        got = fastclip.siglip_loss(x.to(gpu), y.to(gpu), 10.0, -10.0, normalize=True,
                                   backend="cuda")
    assert rel_err(got, want) <= TOL[torch.float32]
    out = run("siglip", x.to(gpu), y.to(gpu), (10.0, -10.0), True, "cuda")
    ref = run("siglip", x, y, (10.0, -10.0), True, "cpu")
    for name, a, b in zip(names("siglip"), out, ref):
        assert rel_err(a, b) <= 2 * TOL[torch.float32], name
