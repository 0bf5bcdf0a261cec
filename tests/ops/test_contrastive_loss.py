"""The conformance suite of the fused contrastive losses: every behaviour once, for every
(loss, backend) pair of the registries (docs/design.md §5).

Each backend runs on its own device (its GPU when one is here, else the CPU; GPU-only
backends are marked ``gpu`` at collection and skip without one). Judged against the
float64 oracle of each loss (its naive formula) with the one tolerance table of
``_helpers.py``: fp32 within 1e-5 relative (loss and every gradient), float64 to rounding,
half precision within 2x PyTorch's own error in that dtype. Backends that run through an
interpreter here (``Backend.emulated``) take the small shapes of each matrix only.
Per-backend files hold only what is specific to one backend (ISA builds, Triton waves,
CUDA workspaces).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import fastclip
import fastclip.ops.contrastive_loss as op
from fastclip.ops.backends import all_backends, get_backend
from fastclip.ops.losses import get_loss

from ._helpers import (
    EPS,
    HALF_FACTOR,
    TOL,
    backend_device,
    backend_ok,
    block_oracle,
    cases,
    default_params,
    embeddings,
    emulated,
    naive_in,
    names,
    oracle,
    params_for,
    rel_err,
    run,
    scale_grad_size,
    takes,
    unit_rows,
    upstream,
)

CASES = cases()
FP32 = cases(dtypes=(torch.float32,))


def _setup(loss, backend, dtype=torch.float32):
    backend_ok(backend)
    if not takes(backend, dtype):
        pytest.skip(f"backend {backend!r} does not take {dtype}")
    return backend_device(backend)


def _compare(loss, out, want, tol, what=""):
    for name, o, r in zip(names(loss), out, want):
        assert torch.isfinite(o).all(), f"{what} {name}: not finite"
        # The oracle rounded to the output's dtype: a loss of 1e-73 is 0 in fp32.
        err = rel_err(o, r.to(o.dtype))
        assert err <= tol, f"{what} {name}: rel err {err:.2e} > {tol:.1e}"


def _check_fp32(loss, backend, x, y, params, normalize, dev):
    want = oracle(loss, x, y, params, normalize)
    out = run(loss, x.to(dev), y.to(dev), params, normalize, backend)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    n = x.shape[0]
    if n == 1 and loss == "clip":
        # N=1: the CLIP loss and its gradients are exactly 0 (row = col = pos). The loss is
        # exactly 0 here too: pos is the logit its tile's statistics saw (docs/design.md §1).
        # The gradients are each a cancellation of terms of size |<x̂,ŷ>| (scale) or s·‖ŷ‖
        # (features).
        assert out[0].item() == 0.0, f"N=1 loss {out[0].item():.3e}, not 0"
        xd, yd = x.double(), y.double()
        if normalize:
            xd, yd = unit_rows(xd), unit_rows(yd)
        dot, s = (xd @ yd.T).abs().item(), params[0]
        size = (s * yd.norm().item(), s * xd.norm().item(), dot)
        for name, o, sz in zip(names(loss)[1:], out[1:], size):
            assert o.abs().max().item() <= TOL[torch.float32] * max(sz, 1e-30), name
        return
    _compare(loss, out, want, TOL[torch.float32], f"{loss}/{backend}")


# --------------------------------------------------------------------- value matrix
SHAPES = list(itertools.product((1, 2, 3, 127, 129, 1000), (1, 7, 64, 513)))
SMALL_SHAPES = list(itertools.product((1, 2, 3, 33, 70), (1, 7, 64)))
SCALES = (1.0, 1 / 0.07, 100.0)
BIASES = (-20.0, -10.0, 0.0, 5.0)


@pytest.mark.parametrize("loss,backend", CASES)
@pytest.mark.parametrize("k", range(len(SHAPES)))
def test_matches_fp64_oracle(loss, backend, k):
    dev = _setup(loss, backend)
    shapes = SMALL_SHAPES if emulated(backend) else SHAPES
    if k >= len(shapes):
        pytest.skip("interpreted backend: the small shapes only")
    n, d = shapes[k]
    g = torch.Generator().manual_seed(1000 * n + d)
    x, y = embeddings("random", n, d, gen=g)
    # Cycle scale, bias and normalisation over the shapes so every pair is covered
    # somewhere. D=1 runs unnormalised: normalised 1-D rows are ±1 and their gradient is
    # analytically zero, so a relative error has nothing to measure.
    normalize = bool((n + d) % 2) and d > 1
    if not normalize:
        x, y = x / d ** 0.5, y / d ** 0.5          # unit-size rows: logits of size s
    params = params_for(loss, SCALES[(n + d) % 3], BIASES[(n + d) % 4])
    _check_fp32(loss, backend, x, y, params, normalize, dev)


@pytest.mark.parametrize("loss,backend", CASES)
@pytest.mark.parametrize("normalize", (False, True))
def test_scales_and_biases(loss, backend, normalize):
    dev = _setup(loss, backend)
    n, d = (45, 24) if emulated(backend) else (300, 96)
    g = torch.Generator().manual_seed(7 + normalize)
    x, y = embeddings("random", n, d, gen=g)
    if not normalize:
        x, y = unit_rows(x), unit_rows(y)
    biases = BIASES if len(get_loss(loss).params) > 1 else (0.0,)
    grid = [params_for(loss, s, b) for s in SCALES for b in biases]
    for params in grid:
        _check_fp32(loss, backend, x, y, params, normalize, dev)


# The GPU backends' cases, marked gpu (the triton backend also runs interpreted on the CPU,
# where these sizes would take hours).
GPU_CASES = [pytest.param(loss, name, id=f"{loss}-{name}", marks=pytest.mark.gpu)
             for name, b in all_backends().items() if "cuda" in b.devices and name != "reference"
             for loss in b.losses]


@pytest.mark.parametrize("loss,backend", GPU_CASES)
@pytest.mark.parametrize("n,dtype", ((32768, torch.bfloat16), (262144, torch.float32)),
                         ids=("32768-bf16", "262144-fp32"))
def test_large_batches(loss, backend, n, dtype):
    """Large N within memory, IEEE fp32 (TF32 off): bf16 within 2x PyTorch's own bf16 error,
    fp32 within the fp32 table, where a gradient element sums N terms (an fp32 sum in one
    chain of 262144 adds drifts to ~1e-4; the kernels sum in levels). The oracle is the
    chunked reference backend in float64 on the GPU (the naive formula would need N^2
    memory)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend_ok(backend)
    if not takes(backend, dtype):
        pytest.skip(f"backend {backend!r} does not take {dtype}")
    gpu = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(9)
    d = 32
    x = torch.randn(n, d, device=gpu, generator=g).to(dtype)
    y = torch.randn(n, d, device=gpu, generator=g).to(dtype)
    params = default_params(loss)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = run(loss, x, y, params, True, backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    want = run(loss, x.double(), y.double(), params, True, "reference")
    for name, o in zip(names(loss), out):
        assert torch.isfinite(o).all(), name
    if dtype == torch.float32:
        for name, o, r in zip(names(loss), out, want):
            assert rel_err(o, r) <= TOL[torch.float32], (name, rel_err(o, r))
        return
    torch_half = naive_in(loss, x, y, params, True, dtype)
    for name, o, t, r in zip(names(loss), out, torch_half, want):
        assert rel_err(o, r) <= max(TOL[torch.float32], HALF_FACTOR * rel_err(t, r)), name


@pytest.mark.parametrize("loss,backend", CASES)
@pytest.mark.parametrize("scale", (1e3, 1e4))
def test_large_logits(loss, backend, scale):
    # |z| up to 1e4: no overflow anywhere (softplus, log-sum-exp), and a forward and a
    # backward that round each logit alike (a one-ulp disagreement at 1e4 is 1e-3 in every
    # exp). Held to max(TOL, 2x PyTorch's fp32 error): the logits' own rounding is ε·|z|.
    # A backend whose backward recomputes the logits differently (Backend.exact_logits)
    # meets the table up to its bound and stays within 2^-23·max|z| beyond it.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(int(scale))
    x, y = embeddings("random", 37, 19, gen=g)
    params = params_for(loss, scale, -scale / 2)
    bound = all_backends()[backend].exact_logits
    for normalize in (True, False):
        xi, yi = (x, y) if normalize else (unit_rows(x), unit_rows(y))
        want = oracle(loss, xi, yi, params, normalize)
        out = run(loss, xi.to(dev), yi.to(dev), params, normalize, backend)
        torch32 = naive_in(loss, xi, yi, params, normalize, torch.float32)
        zmax = 1.5 * scale                             # |s·u + b| <= s + s/2
        for name, o, t, r in zip(names(loss), out, torch32, want):
            assert torch.isfinite(o).all(), name
            tol = max(TOL[torch.float32], HALF_FACTOR * rel_err(t, r))
            if zmax > bound:
                tol = max(tol, 2.0 ** -23 * zmax)
            assert rel_err(o, r) <= tol, (name, normalize, rel_err(o, r), rel_err(t, r))


@pytest.mark.parametrize("loss,backend", cases(losses=("clip",), dtypes=(torch.float32,)))
@pytest.mark.parametrize("noise", (0.0, 0.03))
@pytest.mark.parametrize("scale", (30.0, 100.0))
def test_clip_loss_of_well_separated_pairs(loss, backend, noise, scale):
    # A batch whose pairs are (almost) perfectly separated has a loss of ~1e-20 (noise 0)
    # or ~1e-5 (noise 0.03) made of row_i - pos_i with row_i ≈ pos_i ≈ s: pos must be the
    # logit the row's statistics summed, or the positive's fp32 rounding (~1e-5 at s = 100)
    # is the whole value, and the loss reads as negative (docs/design.md §1). Judged as the
    # table's ill-conditioned cases, plus one fp32 ulp at 1 (the resolution of a row's sum of
    # exps that the positive's exp(0) = 1 dominates).
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(11)
    n, d = (33 if emulated(backend) else 129), 64
    x = unit_rows(torch.randn(n, d, generator=g))
    y = unit_rows(x + noise * torch.randn(n, d, generator=g))
    params = params_for(loss, scale)
    want = oracle(loss, x, y, params, True)[0].item()
    got = run(loss, x.to(dev), y.to(dev), params, True, backend)[0].item()
    t32 = naive_in(loss, x, y, params, True, torch.float32)[0].item()
    bound = max(TOL[torch.float32] * abs(want), 2 * abs(t32 - want)) + 2.0 ** -23
    assert got >= 0.0 and abs(got - want) <= bound, (got, want, t32)


@pytest.mark.parametrize("loss,backend", CASES)
@pytest.mark.parametrize("kind", ("orthogonal", "identical"))
@pytest.mark.parametrize("scale", (1.0, 100.0))
def test_statistics_do_not_overflow_or_underflow(loss, backend, kind, scale):
    # Nearly orthogonal rows at scale 100: every logit ≈ 0 while a fixed shift by s would
    # make exp(z - s) = exp(-100) underflow; identical rows: every logit = s.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(3)
    x, y = embeddings(kind, 32 if emulated(backend) else 64, 200, gen=g)
    if kind == "orthogonal":
        x = x + 1e-3 * torch.randn(x.shape, generator=g)
    n = x.shape[0]
    params = params_for(loss, scale, -scale / 2)
    want = oracle(loss, x, y, params, True)
    out = run(loss, x.to(dev), y.to(dev), params, True, backend)
    if kind == "identical" and loss == "clip":
        # Every logit is s: loss = log N, and every gradient is analytically zero (the rows
        # of G sum to zero), a cancellation of terms of size s·‖ŷ‖ = s (features) and
        # Σ|G_ij| ≤ 2 (scale): judge each against that size.
        assert abs(out[0].item() - math.log(n)) <= TOL[torch.float32] * math.log(n)
        for o in out[1:]:
            assert o.abs().max().item() <= TOL[torch.float32] * scale
        return
    # Where fp32 PyTorch itself misses 1e-5, 2x PyTorch's fp32 error. The scale's gradient
    # of nearly orthogonal rows is a sum of N² terms that cancel to ~1e-3 of their size:
    # judged against that size (its relative error is luck: 4e-7..3.4e-5 for PyTorch's own
    # fp32 over seeds).
    torch32 = naive_in(loss, x, y, params, True, torch.float32)
    for name, o, t, r in zip(names(loss), out, torch32, want):
        assert torch.isfinite(o).all(), name
        if kind == "orthogonal" and name == "d_logit_scale":
            size = scale_grad_size(loss, x, y, params, True)
            assert abs(o.item() - r.item()) <= TOL[torch.float32] * size, (o.item(), r.item())
            continue
        if kind == "identical" and name == "d_image" or kind == "identical" and name == "d_text":
            # x̂ = ŷ for every row: the feature gradient is parallel to x̂ and removed by
            # the normalisation's backward, exactly 0: judge its size against s.
            assert o.abs().max().item() <= TOL[torch.float32] * scale, name
            continue
        tol = max(TOL[torch.float32], HALF_FACTOR * rel_err(t, r))
        assert rel_err(o, r) <= tol, (name, rel_err(o, r), rel_err(t, r))


# ------------------------------------------------------------------------- layouts
LAYOUTS = ("row_stride", "col_stride", "transposed", "expanded_col", "broadcast_row",
           "single_row_t", "overlapping_rows", "offset")


def _layout(kind: str, n: int, d: int, g, dev):
    """(x, y) of a layout PyTorch calls valid, on ``dev``; every backend must take it (the
    op layer copies what a kernel cannot read) and give the right value."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)
    if kind == "row_stride":
        return rnd(2 * n, d + 3)[::2, :d], rnd(2 * n, d + 3)[::2, 1:d + 1]
    if kind == "col_stride":
        return rnd(n, 2 * d)[:, ::2], rnd(n, 2 * d)[:, 1::2]
    if kind == "transposed":
        return rnd(d, n).T, rnd(d, n).T
    if kind == "expanded_col":
        return rnd(n, 1).expand(n, d), rnd(n, d)
    if kind == "broadcast_row":   # row stride 0: one text embedding for every row
        return rnd(n, d), rnd(1, d).expand(n, d)
    if kind == "single_row_t":    # contiguous [1, D] with row stride 1 (size-1 dims: free)
        return rnd(d, 1).t(), rnd(d, 1).t()
    if kind == "overlapping_rows":
        return rnd(n + d).as_strided((n, d), (1, 1)), rnd(n, d)
    if kind == "offset":
        return rnd(n + 1, d)[1:], rnd(n + 2, d)[2:]
    raise ValueError(kind)


@pytest.mark.parametrize("loss,backend", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_valid_layout(loss, backend, layout):
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(11)
    x, y = _layout(layout, 41 if emulated(backend) else 77, 40, g, dev)
    params = default_params(loss)
    want = oracle(loss, x, y, params, True)
    out = run(loss, x, y, params, True, backend)
    if layout == "single_row_t" and loss == "clip":
        assert abs(out[0].item()) <= 1e-5 * params[0]       # N = 1: exactly 0
        return
    _compare(loss, out, want, TOL[torch.float32], layout)


# ------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("loss,backend", cases(dtypes=(torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("normalize", (False, True))
def test_half_precision_inputs(loss, backend, dtype, normalize):
    dev = _setup(loss, backend, dtype)
    g = torch.Generator().manual_seed(5)
    x, y = embeddings("random", 70 if emulated(backend) else 257, 96, dtype=dtype, gen=g)
    x, y = x / 4, y / 4
    params = params_for(loss, 14.0, -5.0)
    want = oracle(loss, x, y, params, normalize)               # fp64 of the same half inputs
    out = run(loss, x.to(dev), y.to(dev), params, normalize, backend)
    torch_half = naive_in(loss, x, y, params, normalize, dtype)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert out[0].dtype == torch.float32
    for name, o, t, r in zip(names(loss), out, torch_half, want):
        assert not torch.isnan(o).any(), name
        assert rel_err(o, r) <= HALF_FACTOR * rel_err(t, r) + 1e-7, (name, rel_err(o, r),
                                                                    rel_err(t, r))


@pytest.mark.parametrize("loss,backend", cases(dtypes=(torch.float16,)))
def test_half_gradients_take_the_upstream_scale(loss, backend):
    """fp16 with loss scaling (GradScaler): the upstream gradient reaches the feature
    gradients before their rounding to fp16, so a scale of 2^16 lifts the small ones out of
    fp16's subnormal range. Judged against the best any fp16 result can be: the exact
    scaled gradient rounded once."""
    dev = _setup(loss, backend, torch.float16)
    g = torch.Generator().manual_seed(7)
    x, y = embeddings("random", 70 if emulated(backend) else 300, 32, dtype=torch.float16,
                      gen=g)
    params = params_for(loss, 10.0, -10.0)        # SigLIP's initialisation: tiny gradients
    want = oracle(loss, x, y, params, True)
    scale = 2.0 ** 16
    xs, ys = x.to(dev).requires_grad_(), y.to(dev).requires_grad_()
    out = fastclip.ops.fused_loss(loss, xs, ys, list(params), normalize=True, backend=backend)
    got = torch.autograd.grad(out * scale, (xs, ys))
    for name, o, r in zip(("d_image", "d_text"), got, want[1:3]):
        best = (r * scale).to(torch.float16).double() / scale
        assert not ((o == 0) & (best != 0)).any(), f"{name}: gradients flushed to zero"
        err, floor = rel_err(o.double().cpu() / scale, r), rel_err(best, r)
        assert err <= HALF_FACTOR * floor, (name, err, floor)


@pytest.mark.parametrize("loss,backend", cases(dtypes=(torch.float64,)))
def test_float64_to_rounding(loss, backend):
    dev = _setup(loss, backend, torch.float64)
    g = torch.Generator().manual_seed(1)
    x, y = embeddings("random", 40, 12, dtype=torch.float64, gen=g)
    params = params_for(loss, 9.0, -3.0)
    out = run(loss, x.to(dev), y.to(dev), params, True, backend)
    assert out[0].dtype == torch.float64
    _compare(loss, out, oracle(loss, x, y, params, True), TOL[torch.float64])


@pytest.mark.parametrize("loss,backend", cases(dtypes=(torch.float64,)))
@pytest.mark.parametrize("normalize", (False, True))
def test_gradcheck_fp64(loss, backend, normalize):
    dev = _setup(loss, backend, torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g).to(dev).requires_grad_()
    y = torch.randn(6, 5, dtype=torch.float64, generator=g).to(dev).requires_grad_()
    ps = [torch.tensor(p, dtype=torch.float64, device=dev, requires_grad=True)
          for p in params_for(loss, 3.0, -1.5)]

    def fn(a, b, *p):
        return fastclip.ops.fused_loss(loss, a, b, p, normalize=normalize, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, y, *ps), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------- the block contract
@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("pos_offset", (0, 3, -2, 50))
@pytest.mark.parametrize("normalize", (False, True))
def test_block_functions_match_reference(loss, backend, pos_offset, normalize):
    # n ≠ m, positives off the diagonal or outside the block, random upstream gradients.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(abs(pos_offset) * 2 + normalize)
    n, m, d = (33, 45, 24) if emulated(backend) else (129, 200, 67)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(m, d, generator=g)
    if not normalize:
        x, y = unit_rows(x), unit_rows(y)
    params = params_for(loss, 12.0, -4.0)
    spec, be = get_loss(loss), get_backend(backend)
    grads = upstream(n, m, g)
    (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, normalize, pos_offset, grads)
    p = torch.tensor(params, dtype=torch.float32, device=dev)
    xs, ys = x.to(dev), y.to(dev)
    row, col, pos = be.fwd(spec, xs, ys, p, normalize, EPS, pos_offset)
    tol = TOL[torch.float32]
    for name, o, r in (("row", row, wr), ("col", col, wc), ("pos", pos, wp)):
        assert o.dtype == torch.float64 and o.shape == r.shape, name
        assert rel_err(o, r) <= tol, (name, rel_err(o, r))
    gd = [t.to(dev) for t in grads]
    dx, dy, dp = be.bwd(spec, xs, ys, p, normalize, EPS, pos_offset, wr.to(dev), wc.to(dev), *gd)
    for name, o, r in (("dx", dx, wdx), ("dy", dy, wdy), ("dparams", dp, wdp)):
        assert o.shape == r.shape, name
        assert rel_err(o, r) <= tol, (name, rel_err(o, r))
    if spec.one_pass:
        both = op._fwd_bwd_impl(be, spec, xs, ys, p, normalize, EPS, pos_offset, *gd)
        for name, o, r in zip(("row", "col", "pos", "dx", "dy", "dparams"), both,
                              (wr, wc, wp, wdx, wdy, wdp)):
            assert rel_err(o, r) <= tol, ("fwd_bwd", name, rel_err(o, r))


@pytest.mark.parametrize("loss,backend", FP32)
def test_opcheck(loss, backend):
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, generator=g).to(dev).requires_grad_()
    y = torch.randn(12, 6, generator=g).to(dev).requires_grad_()
    p = torch.tensor(params_for(loss, 2.5, -1.0), device=dev, requires_grad=True)
    for off in (0, 3, -2):
        torch.library.opcheck(op.contrastive_loss_fwd, (x, y, p, loss, True, EPS, off, backend))
    r, c, _ = op.contrastive_loss_fwd(x, y, p, loss, True, EPS, 0, backend)
    gr, gc, gp = upstream(9, 12, g, device=dev)
    torch.library.opcheck(op.contrastive_loss_bwd,
                          (x.detach(), y.detach(), p.detach(), loss, True, EPS, 0, backend,
                           r.detach(), c.detach(), gr, gc, gp),
                          test_utils=("test_schema", "test_faketensor"))
    if get_loss(loss).one_pass:
        torch.library.opcheck(op.contrastive_loss_fwd_bwd,
                              (x.detach(), y.detach(), p.detach(), loss, True, EPS, 1, backend,
                               gr, gc, gp),
                              test_utils=("test_schema", "test_faketensor"))
    # Dense but transposed features: the fake gradients must have the real (contiguous) strides.
    xt = torch.randn(6, 9, generator=g).to(dev).t()
    yt = torch.randn(6, 12, generator=g).to(dev).t()
    torch.library.opcheck(op.contrastive_loss_bwd,
                          (xt, yt, p.detach(), loss, True, EPS, 0, backend, r.detach(), c.detach(), gr, gc, gp),
                          test_utils=("test_schema", "test_faketensor"))
    if get_loss(loss).one_pass:
        torch.library.opcheck(op.contrastive_loss_fwd_bwd,
                              (xt, yt, p.detach(), loss, True, EPS, 0, backend, gr, gc, gp),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("loss,backend", FP32)
def test_eager_and_custom_op_paths_agree(loss, backend):
    # Eager calls skip the dispatcher (no compiler import, less overhead); the custom ops
    # are what torch.compile sees. Same backend functions, same numbers.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(6)
    n = 50
    x, y = (t.to(dev) for t in embeddings("random", n, 16, gen=g))
    params = params_for(loss, 20.0, -8.0)
    eager = run(loss, x, y, params, True, backend)
    spec = get_loss(loss)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ps = torch.tensor(params, dtype=torch.float32, device=dev, requires_grad=True)
    if spec.one_pass:
        z = torch.zeros(n, dtype=torch.float64, device=dev)
        gr, gc, gp = (torch.full_like(z, w / spec.denominator(n)) for w in spec.head.coef)
        r, c, p, dx, dy, dp = op.contrastive_loss_fwd_bwd(xs.detach(), ys.detach(), ps.detach(),
                                                         loss, True, EPS, 0, backend, gr, gc, gp)
        viaop = (spec.head(r, c, p) / spec.denominator(n), dx, dy, *dp)
    else:
        r, c, p = op.contrastive_loss_fwd(xs, ys, ps, loss, True, EPS, 0, backend)
        lo = spec.head(r, c, p) / spec.denominator(n)
        viaop = (lo.detach(), *torch.autograd.grad(lo, (xs, ys, ps)))
        viaop = (*viaop[:3], *viaop[3])
    for name, a, b in zip(names(loss), eager, viaop):
        assert torch.allclose(a, b.reshape(a.shape).to(a.dtype), rtol=1e-6, atol=0), name


@pytest.mark.parametrize("loss,backend", FP32)
def test_torch_compile_fullgraph(loss, backend):
    dev = _setup(loss, backend)
    model = torch.nn.Linear(16, 8).to(dev)
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=dev))
    bias = torch.nn.Parameter(torch.tensor(-3.0, device=dev))

    def step(a, b):
        fa, fb = model(a), model(b)
        ps = (scale.exp(), bias)[:len(get_loss(loss).params)]
        return fastclip.ops.fused_loss(loss, fa, fb, ps, normalize=True, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 16, generator=g).to(dev), torch.randn(24, 16, generator=g).to(dev)
    wrt = [model.weight, scale, bias][:2 + len(get_loss(loss).params) - 1]
    _agrees_with_eager(compiled(a, b), step(a, b), wrt)


def _agrees_with_eager(got, want, wrt, what=""):
    """A traced/compiled loss against the eager one: value within 1e-6, gradients (in
    ``wrt``) within 1e-5."""
    assert rel_err(got, want) <= 1e-6, (what, got, want)
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt)):
        assert rel_err(a, b) <= 1e-5, what


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_torch_compile_dynamic_shapes_inductor(loss):
    # dynamic=True through Inductor (aot_eager alone, below, does not lower the graph): the
    # batch size is symbolic in everything the op layer computes from it.
    lin = torch.nn.Linear(6, 5)
    ps = [torch.tensor(p, requires_grad=True) for p in get_loss(loss).init]
    f = torch.compile(lambda a, b: fastclip.ops.fused_loss(loss, lin(a), lin(b), ps,
                                                             normalize=True),
                      fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(3)
    for n in (9, 14):
        x, y = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
        _agrees_with_eager(f(x, y), fastclip.ops.fused_loss(loss, lin(x), lin(y), ps, normalize=True),
                           [lin.weight, *ps], n)


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_torch_compile_dynamic_python_float_parameters_compile_once(loss):
    # A schedule that passes the scale (and bias) as Python floats: with dynamic=True one
    # graph serves every value (torch.tensor(v) inside the op specialised on each value: a
    # recompile per step until the cache limit).
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    lin = torch.nn.Linear(6, 5)
    f = torch.compile(lambda a, b, ps: fastclip.ops.fused_loss(loss, lin(a), lin(b), ps,
                                                                 normalize=True), dynamic=True)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)
    for k in range(3):
        ps = [v * (1.0 + 0.37 * k) for v in get_loss(loss).init]
        _agrees_with_eager(f(x, y, ps), fastclip.ops.fused_loss(loss, lin(x), lin(y), ps,
                                                                normalize=True), [lin.weight], k)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_torch_compile_dynamic_two_one_pass_losses():
    # Two SigLIP losses that need gradients in one dynamic graph (a symmetric step, a loss per
    # tower pair): the one pass's unit upstream gradients, made inside the Function's forward
    # from the symbolic row count, failed Dynamo ("lift_tracked_freevar_to_input should not
    # be called on root SubgraphTracer"); they are made outside it now.
    lin = torch.nn.Linear(6, 5)
    s, b = (torch.tensor(p, requires_grad=True) for p in get_loss("siglip").init)

    def step(a, c):
        x, y = lin(a), lin(c)
        return fastclip.siglip_loss(x, y, s, b, normalize=True) + fastclip.siglip_loss(
            y, x, s, b, normalize=True)

    f = torch.compile(step, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(5)
    for n in (9, 14):
        a, c = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
        _agrees_with_eager(f(a, c), step(a, c), [lin.weight, s, b], n)


_COLD_COMPILE = """
import torch, fastclip
from fastclip.ops.losses import get_loss
for loss in ("clip", "siglip"):
    ps = get_loss(loss).init
    lin = torch.nn.Linear(6, 5)
    for dynamic in (False, True):
        # The first fastclip call of the process is inside the compiled function.
        f = torch.compile(lambda a, b: fastclip.ops.fused_loss(loss, lin(a), lin(b), ps,
                                                                 normalize=True),
                          fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for n in (9, 14):
            x, y = torch.randn(n, 6), torch.randn(n, 6)
            lc = f(x, y)
            gc, = torch.autograd.grad(lc, lin.weight)
            le = fastclip.ops.fused_loss(loss, lin(x), lin(y), ps, normalize=True)
            ge, = torch.autograd.grad(le, lin.weight)
            assert torch.allclose(lc, le, rtol=1e-6) and torch.allclose(gc, ge, rtol=1e-5), (
                loss, dynamic, n)
print("ok")
"""


def test_torch_compile_in_a_fresh_process():
    # fullgraph=True as a process's first fastclip call (no eager call has loaded and resolved
    # the backend registry yet), and with dynamic shapes: one graph, the eager numbers.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COLD_COMPILE], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_backend_resolution_is_marked_constant_as_the_public_decorator_marks_it():
    """The op marks its backend resolution for torch.compile by hand (the public decorator
    imports torch._dynamo, 1.5 s, at `import fastclip`): the decorator must still mark a
    function exactly so, and `import fastclip` must not import torch._dynamo."""
    def f():
        return 1
    before = set(vars(f))
    assert torch.compiler.assume_constant_result(f) is f
    added = {k: v for k, v in vars(f).items() if k not in before}
    assert added == {"_dynamo_marked_constant": True}
    assert op._resolved_name._dynamo_marked_constant is True
    r = subprocess.run([sys.executable, "-c", "import sys, fastclip; print('torch._dynamo' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


_FLOPS = """
import sys, torch, fastclip
assert "torch.utils.flop_counter" not in sys.modules     # not imported by fastclip itself
from torch.utils.flop_counter import FlopCounterMode
x, y = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
with FlopCounterMode(display=False) as fc:
    fastclip.clip_loss(x, y[:5], 10.0).backward()
print(fc.get_total_flops())
"""


def test_flop_counter_counts_the_fused_products():
    """A custom op counted 0 FLOPs in FlopCounterMode (a trainer's MFU undercounted the loss).
    Forward: the logits, 2·n·m·D; backward: the logits again and two gradient products, 6·n·m·D;
    SigLIP's one pass: three products. The formulas reach the counter whichever of the two is
    imported first."""
    from torch.utils.flop_counter import FlopCounterMode
    n, m, d = 37, 37, 19
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        fastclip.clip_loss(x, y, 10.0).backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts == {"fastclip.contrastive_loss_fwd": 2 * n * m * d, "fastclip.contrastive_loss_bwd": 6 * n * m * d}
    with FlopCounterMode(display=False) as fc:
        fastclip.siglip_loss(x, y, 10.0, -10.0).backward()
    assert fc.get_total_flops() == 6 * n * m * d
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fastclip.clip_loss(x, y, 10.0)
    assert fc.get_total_flops() == 2 * n * m * d
    r = subprocess.run([sys.executable, "-c", _FLOPS], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(8 * 5 * 5 * 3), r.stderr


@pytest.mark.parametrize("loss,backend", FP32)
def test_deterministic(loss, backend):
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(12)
    x, y = (t.to(dev) for t in embeddings("random", 70 if emulated(backend) else 300, 48, gen=g))
    a = run(loss, x, y, default_params(loss), True, backend)
    b = run(loss, x, y, default_params(loss), True, backend)
    for name, u, v in zip(names(loss), a, b):
        assert torch.equal(u, v), name


@pytest.mark.parametrize("loss,backend", FP32)
def test_autocast_does_not_reach_the_kernels(loss, backend):
    # Inside an open_clip trainer's autocast() the features may arrive in fp32 (F.normalize
    # runs in fp32 under autocast): the loss keeps their dtype, on every backend, the
    # backward included. Without the registry's guard the reference backend's matmuls ran
    # in bf16 (a loss of 6.50605 for 6.50613 at N = 300).
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(14)
    x, y = (t.to(dev) for t in embeddings("random", 40, 16, gen=g))
    params = params_for(loss, 20.0, -6.0)
    plain = run(loss, x, y, params, True, backend)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        under = run(loss, x, y, params, True, backend)
    for name, a, b in zip(names(loss), plain, under):
        assert a.dtype == b.dtype and torch.equal(a, b), name


# ------------------------------------------------------------------ autograd corners
def _penalised(loss, fn, x, y, ps):
    """L + ‖dL/dx‖²: a gradient penalty, which needs d²L (create_graph=True)."""
    out = fn(x, y, ps)
    gx, = torch.autograd.grad(out, x, create_graph=True)
    return out + (gx ** 2).sum()


@pytest.mark.parametrize("loss,backend", FP32)
def test_second_derivative(loss, backend):
    # A backward with create_graph=True gets a differentiable gradient (the reference formula
    # re-run with autograd), never a constant one: the penalty's own gradient would vanish
    # silently.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(21)
    x, y = embeddings("random", 7, 5, gen=g)
    params = params_for(loss, 4.0, -2.0)

    def fused(a, b, ps):
        return fastclip.ops.fused_loss(loss, a, b, ps, normalize=True, backend=backend)

    def naive(a, b, ps):
        return get_loss(loss).naive(a, b, *ps, normalize=True)

    got, want = [], []
    for fn, dtype, where, out in ((fused, torch.float32, dev, got),
                                  (naive, torch.float64, "cpu", want)):
        a, b = (t.to(where, dtype).requires_grad_() for t in (x, y))
        ps = [torch.tensor(v, dtype=dtype, device=where, requires_grad=True) for v in params]
        total = _penalised(loss, fn, a, b, ps)
        out += [total.detach(), *torch.autograd.grad(total, (a, b, *ps))]
    for name, o, r in zip(("penalised loss", "x", "y", *get_loss(loss).params), got, want):
        assert rel_err(o, r) <= TOL[torch.float32], name


@pytest.mark.parametrize("loss,backend", FP32)
def test_second_derivative_under_autocast_keeps_the_features_dtype(loss, backend):
    # The differentiable path re-runs the reference formula: under autocast its matmuls ran
    # in bf16, and a create_graph gradient of fp32 features came out 1e-2 off (the first-order
    # one stayed exact). Autocast is off there as in the kernels.
    dev = _setup(loss, backend)
    g = torch.Generator().manual_seed(23)
    x, y = embeddings("random", 16, 8, gen=g)
    params = params_for(loss, 30.0, -3.0)
    grads = []
    for ctx in (contextlib.nullcontext(), torch.autocast(torch.device(dev).type, dtype=torch.bfloat16)):
        a = x.to(dev).requires_grad_()
        with ctx:
            out = fastclip.ops.fused_loss(loss, a, y.to(dev), params, backend=backend)
            gx, = torch.autograd.grad(out, a, create_graph=True)
        grads.append(gx.detach())
    assert grads[1].dtype == torch.float32 and rel_err(grads[1], grads[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_first_order_backward_stays_fused(loss, monkeypatch):
    # The differentiable (O(N²)) path is for create_graph=True only: a plain backward, eager
    # or compiled (whose backward is traced with autograd on), never takes it.
    calls = []
    real = op.differentiable_vjp
    monkeypatch.setattr(op, "differentiable_vjp", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = torch.nn.Linear(6, 5)
    ps = default_params(loss)

    def step(a, b):
        return fastclip.ops.fused_loss(loss, lin(a), lin(b), ps, normalize=True, backend="cpu")

    x, y = torch.randn(9, 6), torch.randn(9, 6)
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        fn(x, y).backward()
    assert not calls


@pytest.mark.parametrize("loss,backend", FP32)
def test_features_from_inference_mode(loss, backend):
    # Features computed under torch.inference_mode() with a scale that still learns (a frozen
    # tower): the loss saves the features for its backward, which inference tensors refuse.
    dev = _setup(loss, backend)
    with torch.inference_mode():
        x, y = (t.to(dev) for t in embeddings("random", 12, 6, gen=torch.Generator().manual_seed(3)))
    params = params_for(loss, 5.0, -3.0)
    ps = [torch.tensor(v, device=dev, requires_grad=True) for v in params]
    out = fastclip.ops.fused_loss(loss, x, y, ps, normalize=True, backend=backend)
    out.backward()
    want = oracle(loss, x.clone(), y.clone(), params, True)
    assert rel_err(out, want[0]) <= TOL[torch.float32]
    for p, r in zip(ps, want[3:]):
        assert rel_err(p.grad, r) <= TOL[torch.float32]


@pytest.mark.parametrize("loss,backend", FP32)
def test_another_default_device(loss, backend):
    # torch.set_default_device("meta") (or "cuda" with CPU features): every buffer the backend
    # makes lives on the features' device, not the default one (a meta buffer reached the CPU
    # kernel as a null pointer).
    dev = _setup(loss, backend)
    x, y = (t.to(dev) for t in embeddings("random", 9, 7, gen=torch.Generator().manual_seed(8)))
    params = params_for(loss, 4.0, -2.0)
    ps = [torch.tensor(v, device=dev, requires_grad=True) for v in params]
    x.requires_grad_(True)
    want = oracle(loss, x.detach(), y, params, True)
    torch.set_default_device("meta")
    try:
        out = fastclip.ops.fused_loss(loss, x, y, ps, normalize=True, backend=backend)
        out.backward()
    finally:
        torch.set_default_device(None)
    assert out.device == x.device and rel_err(out, want[0]) <= TOL[torch.float32]
    assert rel_err(x.grad, want[1]) <= TOL[torch.float32]
    for p, r in zip(ps, want[3:]):
        assert rel_err(p.grad, r) <= TOL[torch.float32]


@pytest.mark.parametrize("loss,backend", FP32)
def test_torch_func(loss, backend):
    # torch.func.grad composes with the fused loss; vmap (and what is built on it) is refused
    # with a message, not PyTorch's internal error about setup_context.
    dev = _setup(loss, backend)
    x, y = (t.to(dev) for t in embeddings("random", 10, 6, gen=torch.Generator().manual_seed(5)))
    params = params_for(loss, 6.0, -4.0)

    def f(a):
        return fastclip.ops.fused_loss(loss, a, y, params, normalize=True, backend=backend)

    got = torch.func.grad(f)(x)
    want = oracle(loss, x, y, params, True)[1]
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(torch.func.grad_and_value(f)(x)[0], want) <= TOL[torch.float32]
    # The others are refused with the message, not PyTorch's internal errors ("element 0 of
    # tensors does not require grad" from vjp and jacrev, "You must implement the jvp
    # function" from jacfwd and hessian).
    msg = "support torch.func.grad and grad_and_value, not vmap, vjp"
    with pytest.raises(NotImplementedError, match=msg):
        torch.func.vmap(f)(torch.stack([x, x]))
    with pytest.raises(NotImplementedError, match=msg):
        torch.func.vjp(f, x)[1](torch.tensor(1.0, device=dev))
    if not emulated(backend):    # each is a few seconds per call under Triton's interpreter
        for transform in (torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
            with pytest.raises(NotImplementedError, match=msg):
                transform(f)(x)


@pytest.mark.parametrize("loss,backend", FP32)
def test_batched_backward_and_forward_mode_get_the_message_or_the_answer(loss, backend):
    """torch.autograd.grad(..., is_grads_batched=True) (what jacobian(vectorize=True) runs) sent
    batched gradients into the CLIP kernels ("Cannot access data pointer of Tensor that doesn't
    have storage"); forward-mode AD got PyTorch's "You must implement the jvp function". The
    SigLIP one pass holds its gradients, which batched upstream gradients only scale."""
    from torch.autograd import forward_ad
    dev = _setup(loss, backend)
    x, y = (t.to(dev) for t in embeddings("random", 5, 4, gen=torch.Generator().manual_seed(6)))
    params = params_for(loss, 5.0, -3.0)
    msg = "support torch.func.grad and grad_and_value, not vmap, vjp"
    xg = x.clone().requires_grad_()
    out = fastclip.ops.fused_loss(loss, xg, y, params, normalize=True, backend=backend)
    seeds = torch.tensor([1.0, 2.0], device=dev)
    if loss == "siglip":
        got, = torch.autograd.grad(out, xg, seeds, is_grads_batched=True)
        want = oracle(loss, x, y, params, True)[1]
        assert rel_err(got[1], 2 * want) <= TOL[torch.float32]
        if takes(backend, torch.float16):     # float16 runs two passes: refused as CLIP is
            xh = x.half().requires_grad_()
            out = fastclip.ops.fused_loss(loss, xh, y.half(), params, normalize=True,
                                          backend=backend)
            with pytest.raises(NotImplementedError, match=msg):
                torch.autograd.grad(out, xh, seeds, is_grads_batched=True)
    else:
        with pytest.raises(NotImplementedError, match=msg):
            torch.autograd.grad(out, xg, seeds, is_grads_batched=True)
    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match=msg):
        fastclip.ops.fused_loss(loss, forward_ad.make_dual(x, torch.ones_like(x)), y, params, normalize=True,
                                backend=backend)


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("size", ("huge", "tiny"))
@pytest.mark.parametrize("d", (8, 512))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the interpreter's numpy overflows
def test_extreme_row_norms_never_give_a_finite_wrong_loss(loss, backend, size, d):
    # normalize=True with rows of norm 4e19 (at D = 8 their fp32 dot products overflow) or ~3e-20
    # with eps = 1e-30 (products below fp32's normal range): a kernel that forms raw dot
    # products in fp32 may return a non-finite loss, never a finite wrong one; the
    # reference backend (float64 norms) gets them right. At D = 512 the dot products of
    # random rows stay finite while an fp32 sum of squares overflows: a kernel with fp32
    # norms would scale every logit by 0 and return log N (or SigLIP's loss at z = b).
    dev = _setup(loss, backend)
    x, y = embeddings("random", 6, d, gen=torch.Generator().manual_seed(8))
    if size == "huge":      # rows of norm 4e19 exactly: a sum of squares of 1.6e39 > fp32's max
        x, y, factor = unit_rows(x), unit_rows(y), 4e19
    else:
        factor = 1e-20
    params = default_params(loss)
    want = oracle(loss, x, y, params, True)[0]
    out = fastclip.ops.fused_loss(loss, (x * factor).to(dev), (y * factor).to(dev), params,
                                  normalize=True, backend=backend, eps=1e-30)
    if backend == "reference" or torch.isfinite(out):
        assert rel_err(out, want) <= TOL[torch.float32], out


def _eps_oracle(loss, x, y, params, eps):
    """(loss, dx, dy, dparams...) in float64 of the loss of F.normalize(x, eps=eps) and of y's."""
    xd, yd = x.clone().requires_grad_(), y.clone().requires_grad_()
    pd = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    xh = torch.nn.functional.normalize(xd, dim=-1, eps=eps)
    yh = torch.nn.functional.normalize(yd, dim=-1, eps=eps)
    ref_ = get_loss(loss).naive(xh, yh, *pd, normalize=False)
    return (ref_.detach(), *torch.autograd.grad(ref_, (xd, yd, *pd)))


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("fx,fy", ((1e25, 1e-20), (1e-20, 1e25)))
def test_gradients_at_row_norms_far_from_one(loss, backend, fx, fy):
    """normalize=True at norms ~1e25 or ~1e-20 (with an eps below them): the loss was right and
    the feature gradients, finite in fp32, were not: rho² rounded to fp32 in the normalisation's
    backward vanished (24% off) or overflowed (an infinite gradient) on the cpu, triton and
    gemm backends."""
    dev = _setup(loss, backend)
    gen = torch.Generator().manual_seed(13)
    eps = 1e-25
    x = torch.randn(7, 9, generator=gen, dtype=torch.float64) * fx   # their dot products stay
    y = torch.randn(7, 9, generator=gen, dtype=torch.float64) * fy   # in range (~1e5)
    params = params_for(loss, 5.0, -2.0)
    want = _eps_oracle(loss, x, y, params, eps)
    out = run(loss, x.float().to(dev), y.float().to(dev), params, True, backend, eps=eps)
    _compare(loss, out, want, TOL[torch.float32], f"{loss}/{backend}/{fx}")


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_rows_that_eps_clamps_have_a_gradient_without_projection(loss, backend, dtype):
    """normalize=True divides by max(||x||, eps), as F.normalize: a row below eps is x / eps,
    linear in x, so its gradient has no projection term. Every backend projected every row:
    under eps = 2 a row of norm 1.82 had its gradient 48% off in float64."""
    dev = _setup(loss, backend, dtype)
    gen = torch.Generator().manual_seed(11)
    eps = 1.0
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    x[[1, 4]] *= 0.2                                    # norms ~0.5: clamped
    y[[0, 7]] *= 0.1
    x[6] *= 1e-14
    assert (x.norm(dim=1) < eps).sum() >= 3 and (y.norm(dim=1) < eps).sum() >= 2
    params = params_for(loss, 5.0, -2.0)
    want = _eps_oracle(loss, x, y, params, eps)
    out = run(loss, x.to(dtype).to(dev), y.to(dtype).to(dev), params, True, backend, eps=eps)
    _compare(loss, out, want, TOL[dtype], f"{loss}/{backend}/{dtype}")


@pytest.mark.parametrize("loss,backend", FP32)
def test_positive_offsets_far_outside_the_block(loss, backend):
    """Offsets near or beyond the int64 range mean "no positive" like any offset past the block
    (they overflowed the kernels' i + offset, or were a TypeError in the binding)."""
    dev = _setup(loss, backend)
    x, y = embeddings("random", 5, 8, gen=torch.Generator().manual_seed(2))
    x, y = x.to(dev), y.to(dev)
    params = default_params(loss)
    for far, near in ((2 ** 63 - 1, 5), (2 ** 70, 5), (-2 ** 63, -5), (-2 ** 70, -5)):
        a = fastclip.ops.fused_loss(loss, x, y, params, normalize=True, backend=backend, pos_offset=far)
        b = fastclip.ops.fused_loss(loss, x, y, params, normalize=True, backend=backend, pos_offset=near)
        assert torch.equal(a, b), (far, a, b)


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("pos_offset", (3, 12))
def test_positive_offset(loss, backend, pos_offset):
    # fused_loss(pos_offset=k): row i's positive is column i + k; k >= N: every pair a
    # negative (open_clip's SigLipLoss on another rank's texts). Value and gradients against
    # the materialised formula in float64.
    dev = _setup(loss, backend)
    n = 12
    x, y = embeddings("random", n, 5, gen=torch.Generator().manual_seed(pos_offset))
    params = params_for(loss, 7.0, -5.0)
    got = run(loss, x.to(dev), y.to(dev), params, True, backend, pos_offset=pos_offset)
    xd, yd = (t.double().requires_grad_() for t in (x, y))
    pd = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in params]
    xh, yh = torch.nn.functional.normalize(xd, dim=1), torch.nn.functional.normalize(yd, dim=1)
    z = pd[0] * xh @ yh.T + (pd[1] if len(pd) > 1 else 0.0)                 # [n, n]
    is_pos = torch.arange(n)[None, :] == torch.arange(n)[:, None] + pos_offset
    row, col = get_loss(loss).ref_stats(z, is_pos)
    pos = torch.where(is_pos, z, 0.0).sum(1)
    ref = get_loss(loss).head(row, col, pos) / get_loss(loss).denominator(n)
    want = [ref, *torch.autograd.grad(ref, (xd, yd, *pd))]
    for name, o, r in zip(names(loss), got, want):
        assert rel_err(o, r) <= TOL[torch.float32], name


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("bad", ("nan", "inf", "-inf"))
@pytest.mark.parametrize("normalize", (False, True))
def test_non_finite_features_give_non_finite_loss(loss, backend, bad, normalize):
    dev = _setup(loss, backend)
    x, y = embeddings("random", 50, 8, gen=torch.Generator().manual_seed(9))
    (x if bad != "-inf" else y)[17, 3] = float(bad)
    out = fastclip.ops.fused_loss(loss, x.to(dev), y.to(dev), default_params(loss),
                                        normalize=normalize, backend=backend)
    assert not torch.isfinite(out)


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("which", range(2))
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
@pytest.mark.parametrize("as_tensor", (False, True))
def test_non_finite_parameters_give_non_finite_loss(loss, backend, which, bad, as_tensor):
    # A float and a tensor are treated alike: a non-finite scale or bias is not an input
    # error but a diverged run, which AMP's GradScaler must see as a non-finite loss.
    dev = _setup(loss, backend)
    if which >= len(get_loss(loss).params):
        pytest.skip("the loss has no such parameter")
    x, y = embeddings("random", 20, 8, gen=torch.Generator().manual_seed(10))
    params = list(default_params(loss))
    params[which] = torch.tensor(bad, device=dev) if as_tensor else bad
    out = fastclip.ops.fused_loss(loss, x.to(dev), y.to(dev), params, normalize=True,
                                        backend=backend)
    assert not torch.isfinite(out)


@pytest.mark.parametrize("loss,backend", FP32)
@pytest.mark.parametrize("scale", (0.0, -3.0))
def test_any_real_scale(loss, backend, scale):
    # The kernels never divide by the scale: s = 0 (every logit equals the bias) and s < 0
    # are exact, as float or as tensor.
    dev = _setup(loss, backend)
    x, y = embeddings("random", 30, 8, gen=torch.Generator().manual_seed(14))
    params = params_for(loss, scale, -1.0)
    out = run(loss, x.to(dev), y.to(dev), params, True, backend)
    _compare(loss, out, oracle(loss, x, y, params, True), TOL[torch.float32])
    if loss == "clip" and scale == 0.0:
        assert abs(out[0].item() - math.log(30)) <= 1e-6 * math.log(30)


# -------------------------------------------------------------- validation (no kernel)
def _bad_case(case):
    x, y, p = torch.randn(8, 4), torch.randn(8, 4), [1.0, -1.0]
    kw = {}
    if case == "rank1":
        x = torch.randn(8)
    elif case == "rank3":
        y = torch.randn(2, 4, 4)
    elif case == "n_mismatch":
        y = torch.randn(7, 4)
    elif case == "d_mismatch":
        y = torch.randn(8, 5)
    elif case == "empty":
        x, y = torch.randn(0, 4), torch.randn(0, 4)
    elif case == "zero_d":
        x, y = torch.randn(8, 0), torch.randn(8, 0)
    elif case == "int":
        x = torch.ones(8, 4, dtype=torch.long)
    elif case == "devices":
        y = torch.empty(8, 4, device="meta")
    elif case == "not_tensor":
        x = x.tolist()
    elif case == "sparse":
        x = x.to_sparse()
    elif case == "nested":
        y = torch.nested.nested_tensor([y[:2], y[2:5]], layout=torch.jagged)   # rows of 2 and 3
    elif case == "scale_sparse":
        p[0] = torch.tensor([3.0]).to_sparse()
    elif case == "scale_shape":
        p[0] = torch.ones(2)
    elif case == "scale_bool_tensor":
        p[0] = torch.tensor(True)
    elif case == "scale_int_beyond":
        p[0] = 10 ** 400
    elif case == "scale_string":
        p[0] = "10"
    elif case == "bias_shape":
        p[1] = torch.ones(1, 2)
    elif case == "bias_string":
        p[1] = "-10"
    elif case == "eps_zero":
        kw["eps"] = 0.0
    elif case == "eps_negative":
        kw["eps"] = -1.0
    elif case == "eps_nan":
        kw["eps"] = float("nan")
    elif case == "eps_below_normal":
        # 1/eps is inf in fp32: a row of zeros normalised to 0 * inf = NaN, silently
        kw["eps"], kw["normalize"] = 1e-300, True
    elif case == "normalize_str":
        kw["normalize"] = "yes"
    elif case == "backend_type":
        kw["backend"] = 3
    elif case == "scale_beyond_fp32":
        p[0] = 1e39
    elif case == "bias_beyond_fp32":
        p[1] = -1e39
    elif case == "pos_offset_float":
        kw["pos_offset"] = 1.5
    return x, y, p, kw


BAD = [
    ("rank1", ValueError, r"image_features must be 2-D \[N, D\], got shape \(8,\)"),
    ("rank3", ValueError, r"text_features must be 2-D .*\(2, 4, 4\)"),
    ("n_mismatch", ValueError, r"N=8 .* M=7"),
    ("d_mismatch", ValueError, r"must share D"),
    ("empty", ValueError, r"empty batch"),
    ("zero_d", ValueError, r"D=0"),
    ("int", TypeError, r"image_features must be float32.*torch.int64"),
    ("devices", ValueError, r"image_features is on cpu but text_features is on meta"),
    ("not_tensor", TypeError, r"image_features must be a torch.Tensor"),
    ("sparse", TypeError, r"image_features must be a dense \(strided\) tensor, got a sparse_coo"),
    ("nested", TypeError, r"text_features must be a dense \(strided\) tensor, got a nested"),
    ("scale_sparse", TypeError, r"logit_scale must be a dense \(strided\) tensor.* shape \[\] or \[1\]"),
    ("scale_shape", ValueError, r"logit_scale must have exactly one element, got shape \(2,\)"),
    ("scale_bool_tensor", TypeError, r"logit_scale must be a real number tensor, got torch.bool"),
    ("scale_int_beyond", ValueError, r"logit_scale=1000.* is beyond the range of torch.float32"),
    ("scale_string", TypeError, r"logit_scale must be a float or a tensor"),
    ("bias_shape", ValueError, r"logit_bias must have exactly one element"),
    ("bias_string", TypeError, r"logit_bias must be a float or a tensor"),
    ("eps_zero", ValueError, r"eps must be a finite positive float.*got 0.0"),
    ("eps_negative", ValueError, r"eps must be a finite positive float.*got -1.0"),
    ("eps_nan", ValueError, r"eps must be a finite positive float.*got nan"),
    ("eps_below_normal", ValueError, r"eps=1e-300 is below 1.175e-38, the smallest normal number "
                                     r"of torch.float32"),
    ("normalize_str", TypeError, r"normalize must be a bool, got 'yes'"),
    ("backend_type", TypeError, r"backend must be a string"),
    ("scale_beyond_fp32", ValueError, r"logit_scale=1e\+39 is beyond the range of torch.float32"),
    ("bias_beyond_fp32", ValueError, r"logit_bias=-1e\+39 is beyond the range of torch.float32"),
    ("pos_offset_float", TypeError, r"pos_offset must be an int, got 1.5"),
]


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
@pytest.mark.parametrize("case,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_errors(loss, case, exc, pattern):
    if case.startswith("bias") and "logit_bias" not in get_loss(loss).params:
        pytest.skip("the loss has no bias")
    x, y, p, kw = _bad_case(case)
    params = p[:len(get_loss(loss).params)]
    with pytest.raises(exc, match=pattern):
        fastclip.ops.fused_loss(loss, x, y, params, **kw)


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_params_must_be_all_of_the_losses(loss):
    """zip(spec.params, params) dropped what was missing: siglip given [scale] ran with bias 0."""
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    names = get_loss(loss).params
    for params in ([10.0] * (len(names) - 1), [10.0] * (len(names) + 1), 10.0):
        with pytest.raises(ValueError, match=rf"params of loss '{loss}' must be its {len(names)} parameters "
                                             rf"\({', '.join(names)}\)"):
            fastclip.ops.fused_loss(loss, x, y, params)
    # A 1-D tensor [P] is a sequence of them.
    p = [10.0, -3.0][:len(names)]
    assert torch.equal(fastclip.ops.fused_loss(loss, x, y, torch.tensor(p)), fastclip.ops.fused_loss(loss, x, y, p))


def test_block_ops_check_their_arguments():
    # The block ops are public (fastclip.ops, torch.ops.fastclip): the kernels read their
    # tensors raw, so a wrong length or dtype must be refused, never read out of bounds.
    g = torch.Generator().manual_seed(2)
    x, y = embeddings("random", 6, 4, gen=g)
    y5 = y[:5]
    p1, p2 = torch.tensor([10.0]), torch.tensor([10.0, -10.0])
    z = lambda k: torch.zeros(k, dtype=torch.float64)   # noqa: E731
    fwd, bwd, fb = (torch.ops.fastclip.contrastive_loss_fwd, op.contrastive_loss_bwd,
                    op.contrastive_loss_fwd_bwd)
    bad = [
        (lambda: fwd(x, torch.randn(6, 9), p1, "clip", False, EPS, 0, "cpu"), ValueError,
         r"must share D"),
        (lambda: fwd(x, y.double(), p1, "clip", False, EPS, 0, "cpu"), TypeError,
         r"same dtype"),
        (lambda: fwd(x.long(), y.long(), p1, "clip", False, EPS, 0, "cpu"), TypeError,
         r"image_features must be float32"),
        (lambda: fwd(x, y, p1, "siglip", False, EPS, 0, "cpu"), ValueError,
         r"params must be a 1-D torch.float32 tensor of 2 element\(s\) \(logit_scale, "
         r"logit_bias\).*got shape \(1,\)"),
        (lambda: fwd(x, y, p1.double(), "clip", False, EPS, 0, "cpu"), ValueError,
         r"params must be a 1-D torch.float32 tensor.*torch.float64"),
        (lambda: fwd(x, y, p1, "clip", False, -1.0, 0, "cpu"), ValueError, r"eps must be"),
        (lambda: fwd(x, y, p1, "clip", False, EPS, 0, "tpu"), ValueError,
         r"not a fastclip backend"),
        (lambda: fwd(x, y, p1, "nope", False, EPS, 0, "cpu"), ValueError, r"nope"),
        (lambda: fb(x, y, p2, "siglip", False, EPS, 0, "cpu", z(1), z(6), z(6)), ValueError,
         r"grad_row must be a 1-D torch.float64 tensor of 6 elements.*got shape \(1,\)"),
        (lambda: fb(x, y5, p2, "siglip", False, EPS, 0, "cpu", z(6), z(6), z(6)), ValueError,
         r"grad_col must be a 1-D torch.float64 tensor of 5 elements"),
        (lambda: bwd(x, y5, p1, "clip", False, EPS, 0, "cpu", z(6), z(5), z(6), z(5),
                     z(6).float()), ValueError, r"grad_pos must be a 1-D torch.float64"),
        (lambda: bwd(x, y5, p1, "clip", False, EPS, 0, "cpu", z(5), z(5), z(6), z(5), z(6)),
         ValueError, r"row must be a 1-D torch.float64 tensor of 6 elements"),
    ]
    for call, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            call()
    # An offset beyond the block: clamped as fused_loss clamps it (no row has a positive).
    far = fwd(x, y, p1, "clip", False, EPS, 2 ** 62, "cpu")
    near = fwd(x, y, p1, "clip", False, EPS, 6, "cpu")
    for a, b in zip(far, near):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_negated_views_are_read_as_their_values(loss):
    # A negated view's memory holds the values before the negation (torch's neg bit).
    g = torch.Generator().manual_seed(4)
    c = torch.randn(9, 5, dtype=torch.complex64, generator=g)
    x = c.conj().imag                                    # a view with the neg bit set
    assert x.is_neg()
    y = torch.randn(9, 5, generator=g)
    params = list(get_loss(loss).init)
    want = fastclip.ops.fused_loss(loss, x.clone(), y, params, normalize=True)
    leaf = torch.randn(9, 5, generator=g, requires_grad=True)
    got = fastclip.ops.fused_loss(loss, x, y, params, normalize=True)
    assert torch.equal(got, want)
    neg = torch._neg_view(leaf)                          # differentiable, neg bit set
    out = fastclip.ops.fused_loss(loss, neg, y, params, normalize=True)
    ref = fastclip.ops.fused_loss(loss, -leaf, y, params, normalize=True)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, leaf)[0], torch.autograd.grad(ref, leaf)[0])


@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_mixed_feature_dtypes_are_promoted(loss):
    # bf16 image features beside cached fp32 text features (open_clip's matmul takes them
    # under autocast): computed in the common dtype, each gradient in its own input's dtype.
    g = torch.Generator().manual_seed(8)
    xb, yf = torch.randn(10, 6, generator=g).bfloat16(), torch.randn(10, 6, generator=g)
    params = list(get_loss(loss).init)
    for ctx in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        a, b = xb.clone().requires_grad_(), yf.clone().requires_grad_()
        with ctx:
            got = fastclip.ops.fused_loss(loss, a, b, params, normalize=True)
        ga, gb = torch.autograd.grad(got, (a, b))
        a32, b32 = xb.float().requires_grad_(), yf.clone().requires_grad_()
        want = fastclip.ops.fused_loss(loss, a32, b32, params, normalize=True)
        wa, wb = torch.autograd.grad(want, (a32, b32))
        assert torch.equal(got, want)
        assert ga.dtype == torch.bfloat16 and torch.equal(ga, wa.bfloat16())
        assert torch.equal(gb, wb)
    with pytest.raises(TypeError, match="same dtype"):       # the block ops take one dtype
        op.contrastive_loss_fwd(xb, yf, torch.tensor([1.0]), "clip", False, EPS, 0, "cpu")


@pytest.mark.parametrize("strict", (False, True))
@pytest.mark.parametrize("loss", list(fastclip.ops.LOSSES))
def test_torch_export_trains(loss, strict):
    # An exported program keeps the custom ops; its backward is theirs (SigLIP's one-pass
    # autograd.Function is not in the graph: export takes the two passes).
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5)
            self.ps = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.tensor(v)) for v in get_loss(loss).init])

        def forward(self, a, b):
            return fastclip.ops.fused_loss(loss, self.lin(a), self.lin(b), list(self.ps),
                                           normalize=True)

    m = Head()
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(11, 6, generator=g), torch.randn(11, 6, generator=g)
    ep = torch.export.export(m, (a, b), strict=strict)
    _agrees_with_eager(ep.module()(a, b), m(a, b), list(m.parameters()))


@pytest.mark.parametrize("value", (10, 10.0, "np32", "np64", "t0", "t1", "int_tensor"))
def test_scale_types_accepted_alike(value):
    import numpy as np
    x, y = embeddings("random", 16, 8, gen=torch.Generator().manual_seed(0))
    v = {"np32": np.float32(10), "np64": np.float64(10), "t0": torch.tensor(10.0),
         "t1": torch.tensor([10.0]), "int_tensor": torch.tensor(10)}.get(value, value)
    ref = fastclip.clip_loss(x, y, 10.0)
    assert torch.allclose(fastclip.clip_loss(x, y, v), ref)
    assert torch.allclose(fastclip.siglip_loss(x, y, v, np.float32(-3) if value == "np32" else -3.0),
                          fastclip.siglip_loss(x, y, 10.0, -3.0))


# ---------------------------------------------------------------------- dispatch
def test_cpu_backend_is_built():
    # The compiled extension must be there in every supported install (CI included).
    assert "cpu" in fastclip.available_backends("cpu"), all_backends()["cpu"].availability()


def test_registry_codes_and_priorities():
    bs = all_backends()
    codes = [b.code for b in bs.values()]
    assert len(set(codes)) == len(codes), "backend codes must be unique"
    assert "reference" in bs and set(bs["reference"].losses) >= set(fastclip.ops.LOSSES)
    # auto on the CPU: the highest-priority available backend that takes the dtype and loss
    for loss in fastclip.ops.LOSSES:
        for dt in (torch.float32, torch.float64):
            fits = [b for b in bs.values() if "cpu" in b.devices and b.available()
                    and dt in b.dtypes and loss in b.losses]
            best = max(fits, key=lambda b: b.rank(torch.device("cpu")))
            assert op.select_backend("auto", torch.device("cpu"), dt, loss) is best


def test_auto_and_environment(monkeypatch):
    x, y = embeddings("random", 8, 4)
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    assert op.select_backend("auto", x.device, x.dtype).name == "cpu"
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    assert op.select_backend("auto", x.device, x.dtype).name == "reference"
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    with pytest.raises(fastclip.BackendUnavailableError, match="cuda"):
        fastclip.clip_loss(x, y, 1.0)


def test_unavailable_backend_says_why():
    x, y = embeddings("random", 8, 4)
    with pytest.raises(fastclip.BackendUnavailableError, match=r"backend='cuda'.*(CUDA|cuda)"):
        fastclip.clip_loss(x, y, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="not a fastclip backend"):
        fastclip.clip_loss(x, y, 1.0, backend="tpu")


def test_loss_a_backend_lacks_is_refused_by_name(monkeypatch):
    # A backend named explicitly must implement the loss; auto skips those that do not.
    from fastclip.ops import backends as reg
    fake = reg.Backend(name="clip-only", code=99, devices=("cpu",), dtypes=(torch.float32,),
                       priority=1000, availability=lambda: (True, ""),
                       fwd=get_backend("reference").fwd, bwd=get_backend("reference").bwd,
                       losses=("clip",))
    monkeypatch.setitem(reg._REGISTRY, "clip-only", fake)
    reg._RESOLVED.clear()
    try:
        x, y = embeddings("random", 8, 4)
        with pytest.raises(fastclip.BackendUnavailableError, match="does not implement the 'siglip'"):
            fastclip.siglip_loss(x, y, 10.0, -10.0, backend="clip-only")
        assert op.select_backend("auto", x.device, x.dtype, "clip").name == "clip-only"
        assert op.select_backend("auto", x.device, x.dtype, "siglip").name != "clip-only"
    finally:
        reg._RESOLVED.clear()


_TF32 = r"""
import torch
from fastclip.ops.backends import tf32_matmul
flags = torch.backends.cuda.matmul
out = [tf32_matmul()]
{setting}
out.append(tf32_matmul())
try:
    from fastclip.ops.triton.contrastive_loss import _precision
    out.append(_precision(torch.float32) == "tf32" and _precision(torch.bfloat16) == "ieee")
except ImportError:
    out.append(True)
print(out)
"""


@pytest.mark.parametrize("setting", ('flags.fp32_precision = "tf32"', 'torch.backends.fp32_precision = "tf32"',
                                     'torch.set_float32_matmul_precision("high")', "flags.allow_tf32 = True"))
def test_tf32_setting_is_read_whichever_api_set_it(setting):
    """torch >= 2.9 raises when the legacy allow_tf32 is read after the new fp32_precision API
    set TF32: the kernels read the one setting both APIs write (a fresh process per API)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _TF32.replace("{setting}", setting)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[False, True, True]"


_THREADS_FIRST_CALL = r"""
import importlib, threading, time
import torch
import fastclip
import fastclip.ops.backends as B
assert not B._LOADED, "the registry was loaded at import: this check needs a cold one"
real = importlib.import_module


class Slow:         # each backend module takes a while to import, as Triton's does
    def import_module(self, name, *args):
        time.sleep(0.2)
        return real(name, *args)


B.importlib = Slow()
barrier, errors = threading.Barrier(4), []


def call():
    barrier.wait()
    try:
        fastclip.clip_loss(torch.randn(8, 4), torch.randn(8, 4), torch.tensor(3.0), normalize=True)
    except Exception as e:
        errors.append(repr(e))


threads = [threading.Thread(target=call) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
print("ok")
"""


def test_first_calls_from_several_threads_wait_for_the_whole_registry():
    """The registry marked itself loaded before importing its backends: threads whose first call
    came while another was loading found it empty ("no fastclip backend runs the 'clip' loss")."""
    r = subprocess.run([sys.executable, "-c", _THREADS_FIRST_CALL], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
