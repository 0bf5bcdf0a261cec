"""The ``cuda`` backend (csrc/contrastive_loss/cuda).

On a machine without a GPU (CI, and where this was written) the CPU-side tests run:
the backend says why it is unavailable, ``backend="cuda"`` raises with that reason, the
extension's CUDA entry points reject bad sizes with ValueError before touching memory,
and the auto-order table. The GPU tests skip cleanly; no CUDA call happens at import or
collection (decided inside the ``gpu`` fixture).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastclip
from fastclip._ext import extension
from fastclip.ops import reference
from fastclip.ops.backends import BackendUnavailableError, get_backend
from fastclip.ops.backends import cuda_preference
from fastclip.ops.reference import clip_loss_naive

from ._helpers import embeddings, oracle, rel_err, run

FP32_TOL = 1e-5   # design.md §5
C = extension()


def _cuda_ok() -> bool:
    return get_backend("cuda").available()


@pytest.fixture
def gpu():
    """The CUDA device, or a clean skip (evaluated per test, never at collection)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, reason = get_backend("cuda").availability()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = prev


# ------------------------------------------------------------------------ CPU side
def test_unavailable_reason_is_clear():
    if _cuda_ok():
        pytest.skip("a CUDA device is present")
    ok, reason = get_backend("cuda").availability()
    assert not ok
    if C is None:
        assert "did not import" in reason
    elif not C.CUDA_BUILT:
        assert "built without CUDA" in reason
    else:
        assert "no CUDA device" in reason and "CUDA unavailable" in reason


def test_clip_loss_backend_cuda_raises_with_reason():
    x, y = embeddings("random", 8, 4)
    if _cuda_ok():
        with pytest.raises(BackendUnavailableError, match="runs on cuda tensors"):
            fastclip.clip_loss(x, y, 1.0, backend="cuda")
        return
    reason = get_backend("cuda").availability()[1]
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is not available") as ei:
        fastclip.clip_loss(x, y, 1.0, backend="cuda")
    assert reason in str(ei.value)
    assert "cuda" not in fastclip.available_backends()


def test_float64_is_not_a_cuda_dtype():
    b = get_backend("cuda")
    assert torch.float64 not in b.dtypes
    assert set(b.dtypes) == {torch.float32, torch.float16, torch.bfloat16}


def _needs_cuda_build():
    if C is None or not getattr(C, "CUDA_BUILT", False):
        pytest.skip("fastclip._C was built without CUDA")
    if not hasattr(C, "cuda_fwd"):
        pytest.skip("fastclip._C predates the CUDA kernels (rebuild it: pip install -e .)")


def test_workspace_sizes():
    _needs_cuda_build()
    for n, m, d in ((1, 1, 1), (129, 1000, 513), (64, 262144, 512), (262144, 262144, 1024)):
        assert C.cuda_fwd_workspace_bytes(n, m, d) >= 4 * (n + m) + 8 * (n + m)
        # dX then dY reuse one fp32 [rows, ceil(d/64)*64] buffer
        assert C.cuda_bwd_workspace_bytes(n, m, d) >= 4 * max(n, m) * math.ceil(d / 64) * 64
    # bounded extra memory: ~sqrt(1024) partial statistics per row/column at N = 262144
    assert C.cuda_fwd_workspace_bytes(262144, 262144, 1024) < 200e6
    for bad in ((0, 1, 1), (1, 0, 1), (1, 1, 0), (-3, 1, 1)):
        with pytest.raises(ValueError, match="expected n, m, d >= 1"):
            C.cuda_fwd_workspace_bytes(*bad)
        with pytest.raises(ValueError, match="expected n, m, d >= 1"):
            C.cuda_bwd_workspace_bytes(*bad)


# Fake but aligned addresses: every check below must fire before any memory is touched.
_P = 1 << 20


def _fwd_args(**kw):
    a = dict(x=_P, y=_P, n=4, m=4, d=8, ldx=8, ldy=8, dtype=2, allow_tf32=False, scale=_P,
             normalize=True, eps=1e-12, pos_offset=0, row_lse=_P, col_lse=_P, pos=_P,
             workspace=_P, workspace_bytes=1 << 30, stream=0)
    a.update(kw)
    return a


def _bwd_args(**kw):
    a = _fwd_args()
    for k in ("pos",):
        a.pop(k)
    a.update(grad_row=_P, grad_col=_P, grad_pos=_P, dx=_P, dy=_P, dscale=_P)
    a.update(kw)
    return a


@pytest.mark.parametrize("fn", ("cuda_fwd", "cuda_bwd"))
@pytest.mark.parametrize("change,pattern", [
    (dict(n=0), r"expected n, m, d >= 1, got n=0"),
    (dict(m=0), r"got n=4 m=0"),
    (dict(d=0), r"d=0"),
    (dict(ldx=7), r"row strides must be >= d=8, got ldx=7"),
    (dict(ldy=3), r"ldy=3"),
    (dict(n=1 << 31), r"<= 2\^30"),
    (dict(dtype=3), r"dtype code must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\)"),
    (dict(x=0), r"null pointer"),
    (dict(x=_P + 1), r"aligned to their element size"),
    (dict(workspace_bytes=10), r"workspace has 10 bytes, needs"),
    (dict(workspace=_P + 8), r"256-byte aligned"),
    (dict(row_lse=0), r"row_lse is a null pointer"),
])
def test_extension_rejects_bad_arguments(fn, change, pattern):
    _needs_cuda_build()
    args = (_fwd_args if fn == "cuda_fwd" else _bwd_args)(**change)
    with pytest.raises(ValueError, match=pattern):
        getattr(C, fn)(**args)


def test_extension_bwd_rejects_bad_output_pointers():
    _needs_cuda_build()
    with pytest.raises(ValueError, match="dx and dy"):
        C.cuda_bwd(**_bwd_args(dy=_P + 1))
    with pytest.raises(ValueError, match="dscale"):
        C.cuda_bwd(**_bwd_args(dscale=0))


def test_auto_order_table():
    order = ["cuda", "triton", "reference"]
    assert cuda_preference.auto_order(order, (8, 0)) == ["cuda", "triton", "reference"]
    assert cuda_preference.auto_order(order, (9, 0)) == ["triton", "cuda", "reference"]
    assert cuda_preference.auto_order(order, (12, 1)) == ["triton", "cuda", "reference"]
    assert cuda_preference.auto_order(order, (7, 5)) == ["triton", "cuda", "reference"]
    assert cuda_preference.auto_order(["reference"], (9, 0)) == ["reference"]
    if not torch.cuda.is_available():
        assert cuda_preference.auto_order(order) == order


# ------------------------------------------------------------------------ GPU side
def _torch_err(x, y, scale, normalize, ref):
    """Errors of the naive formula evaluated by PyTorch in x's dtype (the §5 yardstick)."""
    t = run(lambda a, b, s, normalize: clip_loss_naive(a, b, s, normalize), x, y, scale, normalize)
    return [rel_err(o, r) for o, r in zip(t, ref)]


def _check(x, y, scale, normalize, *, tf32=False):
    out = run(fastclip.clip_loss, x, y, scale, normalize, backend="cuda")
    ref = oracle(x.cpu(), y.cpu(), scale, normalize)
    names = ("loss", "d_image", "d_text", "d_scale")
    for o in out:
        assert torch.isfinite(o).all()
    if x.dtype == torch.float32 and not tf32:
        for name, o, r in zip(names, out, ref):
            assert rel_err(o, r) <= FP32_TOL, (name, rel_err(o, r))
        return out
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        errs = _torch_err(x, y, scale, normalize, ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for name, o, r, e in zip(names, out, ref, errs):
        assert rel_err(o, r) <= max(2 * e, FP32_TOL), (name, rel_err(o, r), e)
    return out


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("n,d", list(itertools.product((1, 2, 3, 127, 129, 1000), (1, 7, 64, 513))))
def test_matches_fp64_oracle(gpu, dtype, n, d):
    g = torch.Generator().manual_seed(1000 * n + d)
    x, y = embeddings("random", n, d, gen=g)
    _check(x.to(gpu, dtype), y.to(gpu, dtype), 1 / 0.07, True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("scale", (1.0, 14.3, 100.0))
@pytest.mark.parametrize("normalize", (False, True))
def test_scales_and_normalisation(gpu, dtype, scale, normalize):
    g = torch.Generator().manual_seed(7)
    x, y = embeddings("random", 300, 96, gen=g)
    if not normalize:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    _check(x.to(gpu, dtype), y.to(gpu, dtype), scale, normalize)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", ("orthogonal", "identical"))
@pytest.mark.parametrize("scale", (1.0, 100.0))
def test_statistics_do_not_underflow(gpu, dtype, kind, scale):
    g = torch.Generator().manual_seed(3)
    x, y = embeddings(kind, 64, 256, gen=g)
    out = run(fastclip.clip_loss, x.to(gpu, dtype), y.to(gpu, dtype), scale, True, backend="cuda")
    for o in out:
        assert torch.isfinite(o).all()
    if kind == "identical":   # every logit equal: loss = log N exactly, gradients ~0
        assert abs(out[0].item() - math.log(64)) <= 1e-3 * math.log(64)


def test_tf32_path(gpu):
    g = torch.Generator().manual_seed(5)
    x, y = embeddings("random", 257, 200, gen=g)
    torch.backends.cuda.matmul.allow_tf32 = True
    _check(x.to(gpu), y.to(gpu), 1 / 0.07, True, tf32=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", ("row_stride_vec", "row_stride_odd", "offset", "col_stride",
                                    "transposed", "expanded"))
def test_non_contiguous_inputs(gpu, dtype, layout):
    g = torch.Generator().manual_seed(11)
    n, d = 131, 72
    if layout == "row_stride_vec":      # ld = 80: 16-byte rows, cp.async path
        bx, by = torch.randn(n, 80, generator=g), torch.randn(n, 80, generator=g)
        x, y = bx[:, :d], by[:, :d]
    elif layout == "row_stride_odd":    # ld = d + 3: scalar fallback
        bx, by = torch.randn(2 * n, d + 3, generator=g), torch.randn(2 * n, d + 3, generator=g)
        x, y = bx[::2, :d], by[::2, 1:d + 1]
    elif layout == "offset":            # base pointer not 16-byte aligned
        bx, by = torch.randn(n * d + 1, generator=g), torch.randn(n * d + 3, generator=g)
        x, y = bx[1:].view(n, d), by[3:].view(n, d)
    elif layout == "col_stride":
        bx, by = torch.randn(n, 2 * d, generator=g), torch.randn(n, 2 * d, generator=g)
        x, y = bx[:, ::2], by[:, 1::2]
    elif layout == "transposed":
        x, y = torch.randn(d, n, generator=g).T, torch.randn(d, n, generator=g).T
    else:
        x, y = torch.randn(1, d, generator=g).expand(n, d), torch.randn(n, d, generator=g)
    xd, yd = x.to(dtype).to(gpu), y.to(dtype).to(gpu)
    if layout in ("row_stride_vec", "row_stride_odd", "offset"):
        # keep the layout on the device: move the base, then take the same view
        base_x, base_y = bx.to(dtype).to(gpu), by.to(dtype).to(gpu)
        xd = base_x.as_strided(x.shape, x.stride(), x.storage_offset())
        yd = base_y.as_strided(y.shape, y.stride(), y.storage_offset())
    _check(xd, yd, 20.0, True)


@pytest.mark.parametrize("pos_offset", (0, 3, -2, 50))
@pytest.mark.parametrize("normalize", (False, True))
def test_block_functions_match_reference(gpu, pos_offset, normalize):
    """fwd/bwd with M != N and pos_offset, against the reference block functions in fp64
    (fp32 inputs, exact path: design.md §5's 1e-5; half dtypes go through clip_loss above)."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(17 + pos_offset)
    n, m, d = 77, 190, 40
    x = torch.randn(n, d, generator=g).to(gpu, dtype)
    y = torch.randn(m, d, generator=g).to(gpu, dtype)
    s = torch.tensor(12.0, device=gpu)
    b = get_backend("cuda")
    out = b.fwd(x, y, s, normalize, 1e-12, pos_offset)
    ref = reference.block_fwd(x.double(), y.double(), s.double(), normalize, 1e-12, pos_offset)
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= FP32_TOL
    gr, gc, gp = (torch.randn(k, generator=g).to(gpu) for k in (n, m, n))
    gout = b.bwd(x, y, s, normalize, 1e-12, pos_offset, out[0], out[1], gr, gc, gp)
    gref = reference.block_bwd(x.double(), y.double(), s.double(), normalize, 1e-12, pos_offset,
                               ref[0], ref[1], gr.double(), gc.double(), gp.double())
    for o, r in zip(gout, gref):
        assert rel_err(o, r) <= FP32_TOL


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_every_output_element_is_written(gpu, dtype):
    """Outputs poisoned with NaN before the call come back finite everywhere."""
    g = torch.Generator().manual_seed(2)
    n, m, d = 200, 131, 65
    x = torch.randn(n, d, generator=g).to(gpu, dtype)
    y = torch.randn(m, d, generator=g).to(gpu, dtype)
    s = torch.tensor(30.0, device=gpu)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    st = torch.cuda.current_stream().cuda_stream
    row, col, pos = (torch.full((k,), float("nan"), device=gpu) for k in (n, m, n))
    wb = C.cuda_fwd_workspace_bytes(n, m, d)
    ws = torch.full((wb,), 255, dtype=torch.uint8, device=gpu)   # NaN-filled workspace
    C.cuda_fwd(x.data_ptr(), y.data_ptr(), n, m, d, d, d, code, False, s.data_ptr(), True, 1e-12,
               5, row.data_ptr(), col.data_ptr(), pos.data_ptr(), ws.data_ptr(), wb, st)
    gr, gc, gp = (torch.randn(k, generator=g).to(gpu) for k in (n, m, n))
    dx = torch.full((n, d), float("nan"), dtype=dtype, device=gpu)
    dy = torch.full((m, d), float("nan"), dtype=dtype, device=gpu)
    ds = torch.full((), float("nan"), device=gpu)
    wb = C.cuda_bwd_workspace_bytes(n, m, d)
    ws = torch.full((wb,), 255, dtype=torch.uint8, device=gpu)
    C.cuda_bwd(x.data_ptr(), y.data_ptr(), n, m, d, d, d, code, False, s.data_ptr(), True, 1e-12,
               5, row.data_ptr(), col.data_ptr(), gr.data_ptr(), gc.data_ptr(), gp.data_ptr(),
               dx.data_ptr(), dy.data_ptr(), ds.data_ptr(), ws.data_ptr(), wb, st)
    torch.cuda.synchronize()
    for t in (row, col, pos, dx, dy, ds):
        assert torch.isfinite(t).all()


def test_deterministic(gpu):
    g = torch.Generator().manual_seed(4)
    x, y = embeddings("random", 1000, 128, dtype=torch.bfloat16, gen=g)
    a = run(fastclip.clip_loss, x.to(gpu), y.to(gpu), 50.0, True, backend="cuda")
    b = run(fastclip.clip_loss, x.to(gpu), y.to(gpu), 50.0, True, backend="cuda")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("n,dtype", ((32768, torch.bfloat16), (262144, torch.float32)))
def test_large_batches(gpu, n, dtype):
    """Large N: bf16 against the naive bf16 formula's error; fp32 against the chunked
    reference backend in float64 on the GPU (the naive oracle would need N^2 memory)."""
    g = torch.Generator(device="cuda").manual_seed(9)
    d = 32
    x = torch.randn(n, d, device=gpu, generator=g).to(dtype)
    y = torch.randn(n, d, device=gpu, generator=g).to(dtype)
    out = run(fastclip.clip_loss, x, y, 1 / 0.07, True, backend="cuda")
    ref = run(fastclip.clip_loss, x.double(), y.double(), 1 / 0.07, True, backend="reference")
    for o in out:
        assert torch.isfinite(o).all()
    if dtype == torch.float32:
        for o, r in zip(out, ref):
            assert rel_err(o, r) <= FP32_TOL
    else:
        errs = _torch_err(x, y, 1 / 0.07, True, ref)
        for o, r, e in zip(out, ref, errs):
            assert rel_err(o, r) <= max(2 * e, FP32_TOL)


def test_matches_triton_backend(gpu):
    if not get_backend("triton").available():
        pytest.skip("triton backend unavailable")
    g = torch.Generator().manual_seed(8)
    x, y = embeddings("random", 515, 128, gen=g)
    x, y = x.to(gpu), y.to(gpu)
    a = run(fastclip.clip_loss, x, y, 1 / 0.07, True, backend="cuda")
    b = run(fastclip.clip_loss, x, y, 1 / 0.07, True, backend="triton")
    ref = oracle(x.cpu(), y.cpu(), 1 / 0.07, True)
    for u, v, r in zip(a, b, ref):
        assert rel_err(u, v) <= 2 * FP32_TOL
        assert rel_err(u, r) <= FP32_TOL


def test_torch_compile_fullgraph(gpu):
    model = torch.nn.Linear(32, 16).to(gpu)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=gpu))

    def step(a, b):
        fa, fb = model(a), model(b)
        return fastclip.clip_loss(fa, fb, scale.exp(), normalize=True, backend="cuda")

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(100, 32, device=gpu, generator=g)
    b = torch.randn(100, 32, device=gpu, generator=g)
    loss_c = compiled(a, b)
    grads_c = torch.autograd.grad(loss_c, [model.weight, scale])
    loss_e = step(a, b)
    grads_e = torch.autograd.grad(loss_e, [model.weight, scale])
    assert rel_err(loss_c, loss_e) <= 1e-6
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= 1e-5


def test_opcheck(gpu):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(70, 24, generator=g).to(gpu)
    y = torch.randn(90, 24, generator=g).to(gpu)
    s = torch.tensor(9.0, device=gpu)
    torch.library.opcheck(torch.ops.fastclip.contrastive_loss_fwd.default,
                          (x, y, s, True, 1e-12, 3, "cuda"),
                          test_utils=("test_schema", "test_faketensor"))
