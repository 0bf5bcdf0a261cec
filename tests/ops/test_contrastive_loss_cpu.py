"""Block-level contract tests of the ``cpu`` backend (csrc/contrastive_loss/cpu).

The C++ block functions ``fwd``/``bwd`` are compared with the pure-PyTorch block
functions of :mod:`fastclip.ops.reference` computed in float64 (design.md §5: float32
within 1e-5 relative, ‖out − ref‖/‖ref‖; float64 to rounding). Covered: odd sizes that
are multiples of no tile (n, m in 1..1000, D in 1, 7, 64, 513), pos_offset negative,
positive and out of range, both normalisations, scales 1 / 14.3 / 100, nearly orthogonal
and identical embeddings, strided rows, the three ISA builds (AVX-512, AVX2, generic,
forced with FASTCLIP_CPU_ISA), the chunked dY path (FASTCLIP_CPU_DY_BUDGET), threading
determinism, and NaN/Inf inputs (non-finite outputs, never a crash).
"""

from __future__ import annotations

import pytest
import torch

import fastclip
from fastclip.ops import reference as ref
from fastclip.ops.backends import get_backend

from ._helpers import embeddings, rel_err

pytestmark = pytest.mark.skipif("cpu" not in fastclip.available_backends("cpu"),
                                reason="fastclip._C is not built")

EPS = 1e-12
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
ISAS = ("avx2", "generic")


def _inputs(n, m, d, dtype, normalize, gen, kind="random"):
    if kind == "random":
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        y = torch.randn(m, d, generator=gen, dtype=torch.float64)
        if not normalize:   # unit-size rows: logits of size `scale`, as with normalize
            x, y = x / d ** 0.5, y / d ** 0.5
    else:
        x, y = embeddings(kind, n, d, dtype=torch.float64, gen=gen)
    return x.to(dtype), y.to(dtype)


def _upstream(n, m, gen):
    # Gradients of the single-device loss (rows and columns 1/(2n), positives -1/n) plus
    # noise, so that no term of G can cancel another by construction.
    gr = torch.full((n,), 0.5 / n, dtype=torch.float64) + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64) / n
    gc = torch.full((m,), 0.5 / m, dtype=torch.float64) + 0.1 * torch.rand(m, generator=gen, dtype=torch.float64) / m
    gp = -torch.full((n,), 1.0 / n, dtype=torch.float64)
    return gr, gc, gp


def _dscale_size(x, y, scale, normalize, pos_offset, lse, g):
    """Σ_ij |G_ij L_ij| / s in fp64: the size of the terms whose sum is dscale."""
    xd, yd = x.double(), y.double()
    if normalize:
        xd = xd / xd.norm(dim=1, keepdim=True).clamp_min(EPS)
        yd = yd / yd.norm(dim=1, keepdim=True).clamp_min(EPS)
    L = scale * xd @ yd.T
    G = g[0][:, None] * torch.exp(L - lse[0][:, None]) + g[1][None, :] * torch.exp(L - lse[1][None, :])
    i = torch.arange(x.shape[0])
    ok = (i + pos_offset >= 0) & (i + pos_offset < y.shape[0])
    G[i[ok], i[ok] + pos_offset] += g[2][ok]
    return (G * L).abs().sum().item() / scale


def _check(x, y, scale, normalize, pos_offset, gen, d_zero_grad=False, geometry=False):
    """Run the cpu block fwd/bwd in x's dtype and compare with the fp64 reference.

    geometry: an ill-conditioned case (identical or nearly orthogonal rows), judged as in
    tests/ops/test_contrastive_loss.py: within max(tol, 2x the error of the same block
    functions computed by PyTorch in x's dtype); dscale, whose terms cancel there, against
    the size of its terms."""
    dt = x.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    n, m = x.shape[0], y.shape[0]
    cpu = get_backend("cpu")
    xd, yd, sd = x.double(), y.double(), torch.tensor(scale, dtype=torch.float64)
    want_f = ref.block_fwd(xd, yd, sd, normalize, EPS, pos_offset)
    got_f = cpu.fwd(x, y, sd.to(acc), normalize, EPS, pos_offset)
    tol = TOL[dt]
    g = _upstream(n, m, gen)
    want_b = ref.block_bwd(xd, yd, sd, normalize, EPS, pos_offset, want_f[0], want_f[1], *g)
    allowed = [tol] * 6
    if geometry:
        tf = ref.block_fwd(x, y, sd.to(acc), normalize, EPS, pos_offset)
        tb = ref.block_bwd(x, y, sd.to(acc), normalize, EPS, pos_offset, want_f[0].to(acc),
                           want_f[1].to(acc), *(t.to(acc) for t in g))
        allowed = [max(tol, 2 * rel_err(a, b)) for a, b in zip((*tf, *tb), (*want_f, *want_b))]
    for name, o, r, tl in zip(("row_lse", "col_lse", "pos"), got_f, want_f, allowed[:3]):
        assert o.dtype == acc and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        err = rel_err(o, r)
        assert err <= tl, f"{name}: rel err {err:.2e} > {tl:.2e}"
    got_b = cpu.bwd(x, y, sd.to(acc), normalize, EPS, pos_offset, want_f[0].to(acc),
                    want_f[1].to(acc), *(t.to(acc) for t in g))
    for name, o, r, like, tl in zip(("dx", "dy", "dscale"), got_b, want_b, (x, y, sd.to(acc)),
                                    allowed[3:]):
        assert o.dtype == like.dtype and o.shape == like.shape, name
        assert torch.isfinite(o).all(), name
        if d_zero_grad and name != "dscale":
            # D=1 with normalisation: x̂ = sign(x) is constant, the exact gradient is 0 and
            # both sides hold rounding noise of size |x̂|·|dL/dx̂|·eps.
            assert o.double().abs().max().item() <= 10 * tol * (scale + 1), name
            continue
        if geometry and name == "dscale":
            # dscale = Σ G_ij L_ij / s cancels to ~1e-3 of its terms here, so ‖out − ref‖/‖ref‖
            # measures luck (nearly orthogonal, 4 seeds: fp32 PyTorch block_bwd 4e-7..3.4e-5,
            # the kernel 4e-6..1.8e-5); judge it against the size of its terms.
            size = _dscale_size(x, y, scale, normalize, pos_offset, want_f, g)
            assert abs(o.item() - r.item()) <= tol * size, (o.item(), r.item(), size)
            continue
        err = rel_err(o, r)
        assert err <= tl, f"{name}: rel err {err:.2e} > {tl:.2e}"


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param != "native":
        monkeypatch.setenv("FASTCLIP_CPU_ISA", request.param)
    return request.param


SIZES = [(1, 1, 1), (2, 3, 7), (3, 2, 64), (127, 129, 64), (129, 127, 513), (1000, 3, 7),
         (3, 1000, 64), (200, 1000, 1)]


def _sizes_case(n, m, d, dtype):
    gen = torch.Generator().manual_seed(n * 7919 + m * 31 + d)
    for normalize, scale in ((True, 14.3), (False, 1.0)):
        x, y = _inputs(n, m, d, dtype, normalize, gen)
        _check(x, y, scale, normalize, 0, gen, d_zero_grad=(d == 1 and normalize))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,d", SIZES)
def test_odd_sizes(dtype, n, m, d):
    _sizes_case(n, m, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,d", [(2, 3, 7), (129, 127, 513), (3, 200, 64)])
def test_other_isa_builds(isa, dtype, n, m, d):
    # The AVX2 and generic (SSE2/NEON) builds have other register tiles (6x16, 4x8 fp32)
    # and so other edge cases; FASTCLIP_CPU_ISA forces them on this CPU.
    _sizes_case(n, m, d, dtype)


@pytest.mark.parametrize("pos_offset", [-130, -5, -1, 1, 7, 128, 10_000, -10_000])
def test_pos_offset(pos_offset):
    gen = torch.Generator().manual_seed(abs(pos_offset) + 3)
    x, y = _inputs(129, 200, 64, torch.float32, True, gen)
    _check(x, y, 14.3, True, pos_offset, gen)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_scales(scale, normalize):
    gen = torch.Generator().manual_seed(int(scale * 10) + normalize)
    x, y = _inputs(300, 257, 96, torch.float32, normalize, gen)
    _check(x, y, scale, normalize, 0, gen)


@pytest.mark.parametrize("kind", ["orthogonal", "identical"])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_geometry(kind, scale):
    # Nearly orthogonal (all logits ≈ 0) and identical rows (all logits = s): the
    # statistics must neither overflow nor underflow. Rows are unit-norm and the kernel
    # does not normalise: with identical rows the normalisation's gradient is exactly 0
    # (dL/dx̂ is parallel to x̂), which would leave only rounding noise to compare.
    gen = torch.Generator().manual_seed(17)
    x, y = _inputs(100, 100, 256, torch.float64, True, gen, kind=kind)
    if kind == "orthogonal":
        x = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)   # "nearly"
    x = (x / x.norm(dim=1, keepdim=True)).float()
    y = (y / y.norm(dim=1, keepdim=True)).float()
    _check(x, y, scale, False, 0, gen, geometry=True)
    if kind == "orthogonal":
        _check(x, y, scale, True, 0, gen, geometry=True)


def test_strided_rows():
    gen = torch.Generator().manual_seed(5)
    bx = torch.randn(131, 80, generator=gen)
    by = torch.randn(150, 100, generator=gen)
    x, y = bx[:, 3:70], by[:, 10:77]                  # ldx=80, ldy=100 > d=67
    assert x.stride(0) > x.shape[1] and x.stride(1) == 1
    _check(x, y, 14.3, True, 2, gen)


def test_chunked_dy(monkeypatch):
    # A tiny dY budget forces the column-chunked backward (one BN=192-column chunk at a
    # time), which large m and many threads take in practice.
    monkeypatch.setenv("FASTCLIP_CPU_DY_BUDGET", "1")
    gen = torch.Generator().manual_seed(9)
    x, y = _inputs(250, 500, 70, torch.float32, True, gen)
    _check(x, y, 14.3, True, -3, gen)


def test_threads_deterministic_and_consistent():
    gen = torch.Generator().manual_seed(11)
    x, y = _inputs(400, 390, 64, torch.float32, True, gen)
    cpu = get_backend("cpu")
    s = torch.tensor(14.3)
    g = [t.float() for t in _upstream(400, 390, gen)]
    old = torch.get_num_threads()
    try:
        outs = {}
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            f = cpu.fwd(x, y, s, True, EPS, 0)
            runs = [cpu.bwd(x, y, s, True, EPS, 0, f[0], f[1], *g) for _ in range(2)]
            for a, b in zip(*runs):                    # same thread count: bit-identical
                assert torch.equal(a, b)
            outs[nt] = (*f, *runs[0])
        for nt in (2, 3):                               # other thread counts: same values
            for a, b in zip(outs[1], outs[nt]):
                assert rel_err(a, b) <= 1e-6
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("which", ["native", *ISAS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(which, bad, monkeypatch):
    if which != "native":
        monkeypatch.setenv("FASTCLIP_CPU_ISA", which)
    gen = torch.Generator().manual_seed(13)
    x, y = _inputs(130, 200, 33, torch.float32, True, gen)
    x[5, 7] = bad
    cpu = get_backend("cpu")
    s = torch.tensor(14.3)
    for normalize in (True, False):
        row, col, pos = cpu.fwd(x, y, s, normalize, EPS, 0)
        assert not torch.isfinite(row[5]), "the row holding the non-finite value"
        assert not torch.isfinite(col).all(), "every column sees row 5"
        assert torch.isfinite(row[torch.arange(130) != 5]).all(), "other rows stay finite"
        g = [t.float() for t in _upstream(130, 200, gen)]
        dx, dy, ds = cpu.bwd(x, y, s, normalize, EPS, 0, row, col, *g)
        assert not torch.isfinite(dy).all() and not torch.isfinite(ds)
