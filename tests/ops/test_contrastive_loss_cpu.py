"""What only the ``cpu`` backend has (csrc/contrastive_loss/cpu): three ISA builds of its
fp32 micro-kernel with their own register tiles and edge cases, the bf16-product build, the
column-chunked dY path, its OpenMP threading. Every behaviour shared by all backends is in the conformance suite
(test_contrastive_loss.py); here the C++ block functions are compared with the float64
reference block functions for both losses, with the tolerance table of _helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import fastclip
from fastclip.ops.backends import get_backend
from fastclip.ops.losses import LOSSES, get_loss

from ._helpers import EPS, TOL, block_oracle, rel_err, unit_rows, upstream

pytestmark = pytest.mark.skipif("cpu" not in fastclip.available_backends("cpu"),
                                reason="fastclip._C is not built")

ISAS = ("native", "avx2", "generic")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param != "native":
        monkeypatch.setenv("FASTCLIP_CPU_ISA", request.param)
    return request.param


def _inputs(n, m, d, dtype, normalize, gen):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if not normalize:   # unit-size rows: logits of size `scale`, as with normalize
        x, y = unit_rows(x), unit_rows(y)
    return x.to(dtype), y.to(dtype)


def _check(loss, x, y, params, normalize, pos_offset, gen, zero_grad=False):
    """The cpu block fwd, bwd (and fwd_bwd for one-pass losses) against the float64
    reference. zero_grad: D = 1 with normalisation, whose exact feature gradient is 0."""
    spec, cpu = get_loss(loss), get_backend("cpu")
    n, m = x.shape[0], y.shape[0]
    tol = TOL[x.dtype]
    grads = upstream(n, m, gen)
    (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, normalize, pos_offset, grads)
    p = torch.tensor(params, dtype=x.dtype)
    got_f = cpu.fwd(spec, x, y, p, normalize, EPS, pos_offset)
    got_b = cpu.bwd(spec, x, y, p, normalize, EPS, pos_offset, wr, wc, *grads)
    outs = list(zip(("row", "col", "pos", "dx", "dy", "dparams"), (*got_f, *got_b),
                    (wr, wc, wp, wdx, wdy, wdp)))
    if spec.one_pass:
        both = cpu.fwd_bwd(spec, x, y, p, normalize, EPS, pos_offset, *grads)
        outs += [(f"fwd_bwd {k}", o, r) for (k, _, r), o in zip(outs, both)]
    for name, o, r in outs:
        assert torch.isfinite(o).all(), name
        if zero_grad and name.endswith(("dx", "dy")):
            # x̂ = sign(x) is constant: both sides hold rounding noise of size |dL/dx̂|·eps.
            assert o.double().abs().max().item() <= 10 * tol * (params[0] + 1), name
            continue
        err = rel_err(o, r.to(o.dtype) if o.dtype != torch.float64 else r)
        assert err <= tol, f"{loss} {name}: rel err {err:.2e} > {tol:.1e}"


SIZES = [(1, 1, 1), (2, 3, 7), (3, 2, 64), (127, 129, 64), (129, 127, 513), (1000, 3, 7),
         (3, 1000, 64), (200, 1000, 1)]


def _sizes_case(loss, n, m, d, dtype):
    gen = torch.Generator().manual_seed(n * 7919 + m * 31 + d)
    for normalize, scale, bias in ((True, 14.3, -6.0), (False, 1.0, 2.0)):
        x, y = _inputs(n, m, d, dtype, normalize, gen)
        params = (scale, bias)[:len(get_loss(loss).params)]
        _check(loss, x, y, params, normalize, 0, gen, zero_grad=(d == 1 and normalize))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,d", SIZES)
def test_odd_sizes(loss, dtype, n, m, d):
    _sizes_case(loss, n, m, d, dtype)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m,d", [(2, 3, 7), (129, 127, 513), (3, 200, 64)])
def test_other_isa_builds(isa, loss, dtype, n, m, d):
    # The AVX2 and generic (SSE2/NEON) builds have other register tiles (6x16, 4x8 fp32)
    # and so other edge cases; FASTCLIP_CPU_ISA forces them on this CPU.
    _sizes_case(loss, n, m, d, dtype)


def test_softmax_statistics_do_not_drift_with_the_number_of_tiles():
    # A row's (column's) log-sum-exp is a chain of one rescale-and-add per column (row) tile,
    # N / 192 of them: kept in fp32 it drifted with N (±1 features, D = 1, scale 1, where every
    # logit is exact: loss error 2.7e-7 at N = 8192, 1.7e-6 at 16384, 5.5e-6 at 50000, half the
    # fp32 tolerance). Kept in double it stays at the tiles' own fp32 sums' error (3.7e-8 at
    # 8192; the driver code is the same for every ISA build).
    g = torch.Generator().manual_seed(0)
    n = 8192
    x = (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1).float()
    y = (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1).float()
    with torch.no_grad():
        want = fastclip.clip_loss(x.double(), y.double(), 1.0, backend="cpu").item()
        got = fastclip.clip_loss(x, y, 1.0, backend="cpu").item()
    assert abs(got - want) <= 1e-7 * abs(want), (got, want)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("pos_offset", [-130, -5, -1, 1, 7, 128, 10_000, -10_000])
def test_pos_offset(loss, pos_offset):
    gen = torch.Generator().manual_seed(abs(pos_offset) + 3)
    x, y = _inputs(129, 200, 64, torch.float32, True, gen)
    _check(loss, x, y, (14.3, -7.0)[:len(get_loss(loss).params)], True, pos_offset, gen)


@pytest.mark.parametrize("loss", LOSSES)
def test_chunked_dy(loss, monkeypatch):
    # A tiny dY budget forces the column-chunked backward (one BN=192-column chunk at a
    # time), which large m and many threads take in practice; the one-pass statistics
    # then accumulate across chunks.
    monkeypatch.setenv("FASTCLIP_CPU_DY_BUDGET", "1")
    gen = torch.Generator().manual_seed(9)
    x, y = _inputs(250, 500, 70, torch.float32, True, gen)
    _check(loss, x, y, (14.3, -7.0)[:len(get_loss(loss).params)], True, -3, gen)


@pytest.mark.parametrize("loss", LOSSES)
def test_threads_deterministic_and_consistent(loss):
    gen = torch.Generator().manual_seed(11)
    x, y = _inputs(400, 390, 64, torch.float32, True, gen)
    spec, cpu = get_loss(loss), get_backend("cpu")
    p = torch.tensor((14.3, -7.0)[:len(spec.params)])
    g = upstream(400, 390, gen)
    old = torch.get_num_threads()
    try:
        outs = {}
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            f = cpu.fwd(spec, x, y, p, True, EPS, 0)
            runs = [cpu.bwd(spec, x, y, p, True, EPS, 0, f[0], f[1], *g) for _ in range(2)]
            for a, b in zip(*runs):                    # same thread count: bit-identical
                assert torch.equal(a, b)
            outs[nt] = (*f, *runs[0])
        for nt in (2, 3):                               # other thread counts: same values
            for a, b in zip(outs[1], outs[nt]):
                assert rel_err(a, b) <= 1e-6
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("which", ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(loss, which, bad, monkeypatch):
    if which != "native":
        monkeypatch.setenv("FASTCLIP_CPU_ISA", which)
    gen = torch.Generator().manual_seed(13)
    x, y = _inputs(130, 200, 33, torch.float32, True, gen)
    x[5, 7] = bad
    spec, cpu = get_loss(loss), get_backend("cpu")
    p = torch.tensor((14.3, -7.0)[:len(spec.params)])
    for normalize in (True, False):
        row, col, pos = cpu.fwd(spec, x, y, p, normalize, EPS, 0)
        other = torch.arange(130) != 5
        assert torch.isfinite(row[other]).all(), "other rows stay finite"
        g = upstream(130, 200, gen)
        dx, dy, dp = cpu.bwd(spec, x, y, p, normalize, EPS, 0, row, col, *g)
        if normalize or bad != bad:
            # Row 5 normalised by an infinite (or NaN) norm is NaN: everything it touches
            # is NaN, never a crash and never a silently finite answer.
            assert not torch.isfinite(row[5]) and not torch.isfinite(col).all()
            assert not torch.isfinite(dy).all() and not torch.isfinite(dp).all()
        else:
            # ±inf in row 5 makes some of its logits ±inf: a softmax row of +inf is inf; a
            # sigmoid term is inf for a +inf negative logit or a -inf positive one.
            assert not torch.isfinite(row[5]) or loss == "siglip"
            assert not (torch.isfinite(row).all() and torch.isfinite(col).all()
                        and torch.isfinite(dx).all() and torch.isfinite(dy).all())


_SMALL_TEAM = r"""
import torch, fastclip
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
for loss, params in (("clip", [10.0]), ("siglip", [10.0, -10.0])):
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    y = torch.randn(300, 64, generator=g, dtype=torch.float64)
    grads = []
    for backend in ("cpu", "reference"):
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        fastclip.ops.fused_loss(loss, xr, yr, params, normalize=True, backend=backend).backward()
        grads.append((xr.grad, yr.grad))
    (dx, dy), (rx, ry) = grads
    print(loss, float((dx - rx).norm() / rx.norm()), float((dy - ry).norm() / ry.norm()))
"""


@pytest.mark.parametrize("env", ({"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "1"}))
def test_gradients_when_openmp_runs_fewer_threads_than_asked(env):
    """OpenMP may give a parallel region fewer threads than it asks for (OMP_THREAD_LIMIT,
    OMP_DYNAMIC on a busy machine, a call from inside another parallel region): the backward's
    per-thread dY buffers of the missing threads must still be zero (they were summed
    uninitialised: dy off by a factor of 10^3 and more)."""
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _SMALL_TEAM], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "2", **env})
    assert r.returncode == 0, r.stderr
    for line in r.stdout.strip().splitlines():
        loss, ex, ey = line.split()
        assert float(ex) <= 1e-12 and float(ey) <= 1e-12, line


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def test_isa_names_the_build_the_calls_run(monkeypatch):
    from fastclip.ops.backends.cpu import isa
    monkeypatch.delenv("FASTCLIP_CPU_ISA", raising=False)
    native = isa()
    assert native in ("avx512bf16", "avx512", "avx2", "generic")
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "generic")
    assert isa() == "generic"
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx2")           # a lesser build, where the CPU has it
    assert isa() == ("generic" if native == "generic" else "avx2")
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512")         # never more than the CPU has
    assert isa() == ("avx512" if native == "avx512bf16" else native)
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512bf16")  # forced on any CPU that has it
    forced = isa()
    assert forced in (native, "avx512bf16") and (native != "avx512bf16" or forced == native)
    if forced == "avx512bf16":
        # Unforced, the bf16 products are AMD's only: on an Intel Xeon vdpbf16ps ran slower
        # than the fp32 FMAs it would replace (csrc/contrastive_loss/cpu, chosen_isa).
        assert native == ("avx512bf16" if _cpu_vendor() == "AuthenticAMD" else "avx512")
    # A name the kernels do not know ran the best build without a word.
    import fastclip
    x = torch.randn(4, 3)
    for bad in ("AVX2", "sse", "bogus"):
        monkeypatch.setenv("FASTCLIP_CPU_ISA", bad)
        want = f"FASTCLIP_CPU_ISA='{bad}': expected one of avx512bf16, avx512, avx2, generic"
        with pytest.raises(ValueError, match=want):
            fastclip.clip_loss(x, x, 1.0, backend="cpu")


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_offsets_in_a_direct_call_mean_no_positive(loss):
    """The kernels form i + pos_offset - j0 in int64: an offset near +-2^63 handed to the
    module directly (the op layer clamps first) overflowed (undefined behaviour, seen by
    UBSan). The module clamps to [-n, m]: any offset out there means no positive here."""
    from fastclip.ops.backends import cpu
    spec = get_loss(loss)
    g = torch.Generator().manual_seed(5)
    x, y = unit_rows(torch.randn(5, 8, generator=g)), unit_rows(torch.randn(200, 8, generator=g))
    params = torch.tensor([10.0, -3.0][:len(spec.params)])
    for far, near in ((2 ** 63 - 1, 200), (-(2 ** 63), -5)):
        a = cpu.fwd(spec, x, y, params, False, EPS, far)
        b = cpu.fwd(spec, x, y, params, False, EPS, near)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------ bf16 products
def _has_bf16_products() -> bool:
    """Whether this CPU and build can run the bf16 products (forced: unforced they are the
    default on AMD CPUs only)."""
    from fastclip.ops.backends.cpu import isa
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCLIP_CPU_ISA", "avx512bf16")
        return isa() == "avx512bf16"


@pytest.fixture
def bf16_products(monkeypatch):
    """The bf16 products for the test's bfloat16 calls, on any CPU that has them."""
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512bf16")


def _block_all(loss, x, y, params, normalize, pos_offset, grads):
    """fwd, bwd and (one-pass losses) fwd_bwd of the cpu backend, as one list of outputs."""
    spec, cpu = get_loss(loss), get_backend("cpu")
    p = torch.tensor(params, dtype=torch.float32)
    f = cpu.fwd(spec, x, y, p, normalize, EPS, pos_offset)
    b = cpu.bwd(spec, x, y, p, normalize, EPS, pos_offset, f[0], f[1], *grads)
    out = [*f, *b]
    if spec.one_pass:
        out += list(cpu.fwd_bwd(spec, x, y, p, normalize, EPS, pos_offset, *grads))
    return out


@pytest.mark.skipif(not _has_bf16_products(), reason="the CPU has no AVX512_BF16")
@pytest.mark.usefixtures("bf16_products")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n,m,d,pos_offset", [(1, 1, 1, 0), (5, 7, 3, 0), (130, 200, 33, -4),
                                              (385, 190, 65, 17), (97, 450, 128, 0),
                                              (64, 64, 512, 0)])
@pytest.mark.parametrize("normalize", (False, True))
def test_bf16_products_against_the_oracle(loss, n, m, d, pos_offset, normalize, monkeypatch):
    """bfloat16 features on an AVX512_BF16 CPU: the three products take bf16 pairs. The
    statistics and the scalar gradients stay within the fp32 tolerance (a product of two bf16
    values is exact in fp32: only the summation order differs from the fp32 products); the
    feature gradients, whose products take dloss/dz rounded to bf16, within 3x the error of
    the fp32 products on the same inputs (forced with FASTCLIP_CPU_ISA=avx512), since that
    rounding adds an error of the size of the result's own rounding to bf16 (1.0-1.6x
    measured on these cases). Odd D, odd tiles, offsets and a dY budget of one column chunk included."""
    gen = torch.Generator().manual_seed(n * 31 + m * 7 + d)
    x, y = _inputs(n, m, d, torch.float64, normalize, gen)
    x, y = x.bfloat16(), y.bfloat16()
    params = (11.0, -6.0)[:len(get_loss(loss).params)]
    grads = upstream(n, m, gen)
    (wr, wc, wp), (wdx, wdy, wdp) = block_oracle(loss, x, y, params, normalize, pos_offset, grads)
    want = [wr, wc, wp, wdx, wdy, wdp] * 2
    names = ["row", "col", "pos", "dx", "dy", "dparams"] * 2
    monkeypatch.setenv("FASTCLIP_CPU_DY_BUDGET", "1")            # one 192-column chunk at a time
    fast = _block_all(loss, x, y, params, normalize, pos_offset, grads)
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512")
    fp32 = _block_all(loss, x, y, params, normalize, pos_offset, grads)
    for name, o, o32, r in zip(names, fast, fp32, want):
        assert torch.isfinite(o).all(), name
        err = rel_err(o, r)
        if name in ("dx", "dy"):
            assert o.dtype == torch.bfloat16, name
            assert err <= 3 * rel_err(o32, r) + 1e-7, (name, err, rel_err(o32, r))
        else:
            assert err <= TOL[torch.float32], (name, err)


@pytest.mark.skipif(not _has_bf16_products(), reason="the CPU has no AVX512_BF16")
@pytest.mark.usefixtures("bf16_products")
@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_products_thread_counts_and_non_finite_inputs(loss):
    """The bf16 path keeps the backend's promises: bit-identical results for a fixed thread
    count, the same values within one bf16 rounding for another, and a non-finite input that makes its row and the
    column statistics non-finite instead of being skipped."""
    gen = torch.Generator().manual_seed(3)
    x, y = _inputs(1000, 500, 96, torch.float64, True, gen)     # 1 and 2 threads: other blocks
    x, y = x.bfloat16(), y.bfloat16()
    params = (14.0, -5.0)[:len(get_loss(loss).params)]
    grads = upstream(1000, 500, gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = (_block_all(loss, x, y, params, True, 0, grads) for _ in range(2))
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        torch.set_num_threads(1)
        c = _block_all(loss, x, y, params, True, 0, grads)
        for u, v in zip(a, c):      # bf16 gradients: some elements one bf16 rounding apart
            assert rel_err(u, v) <= (2.0 ** -8 if u.dtype == torch.bfloat16 else 1e-6)
    finally:
        torch.set_num_threads(old)
    x[5, 7] = float("nan")
    out = _block_all(loss, x, y, params, True, 0, grads)
    row, col, dx = out[0], out[1], out[3]
    assert torch.isnan(row[5]) and not torch.isfinite(col).all()
    assert not torch.isfinite(dx[5]).all() and torch.isfinite(row[torch.arange(1000) != 5]).all()


def _public_grads(loss, x, y, params, normalize, eps=EPS):
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = fastclip.ops.fused_loss(loss, xr, yr, list(params), normalize=normalize, eps=eps,
                                  backend="cpu")
    return [out.detach(), *torch.autograd.grad(out, (xr, yr))]


def _bf16_against_fp32_products(loss, x, y, params, normalize, monkeypatch, eps=EPS):
    """Errors against the float64 oracle: (bf16 products, fp32 products), per output."""
    want = _public_grads(loss, x.double(), y.double(), params, normalize, eps)
    fast = _public_grads(loss, x, y, params, normalize, eps)
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512")
    slow = _public_grads(loss, x, y, params, normalize, eps)
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512bf16")
    return fast, slow, [(rel_err(f, w), rel_err(s, w)) for f, s, w in zip(fast, slow, want)]


@pytest.mark.skipif(not _has_bf16_products(), reason="the CPU has no AVX512_BF16")
@pytest.mark.usefixtures("bf16_products")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("common", (3.0, 10.0))
def test_bf16_products_with_features_that_share_a_direction(loss, common, monkeypatch):
    """Embeddings share a large common direction (pairwise cosines ~0.9 at common = 3, ~0.99
    at 10), and open_clip hands them over normalised (normalize=False). CLIP's rows of G sum
    to ~0, and rounding H to bf16 broke that: the gradient error grew with the shared part
    (3.6x and 12x the fp32 products' error) until the products were centred."""
    g = torch.Generator().manual_seed(int(common))
    base = torch.randn(1, 256, generator=g, dtype=torch.float64)
    x = unit_rows(torch.randn(512, 256, generator=g, dtype=torch.float64) + common * base)
    y = unit_rows(torch.randn(512, 256, generator=g, dtype=torch.float64) + common * base)
    params = (10.0, -10.0)[:len(get_loss(loss).params)]
    _, _, errs = _bf16_against_fp32_products(loss, x.bfloat16(), y.bfloat16(), params, False,
                                             monkeypatch)
    for name, (ef, es) in zip(("loss", "dx", "dy"), errs):
        bound = 3 * es if name != "loss" else TOL[torch.float32]
        assert ef <= bound, (name, ef, es)


@pytest.mark.skipif(not _has_bf16_products(), reason="the CPU has no AVX512_BF16")
@pytest.mark.usefixtures("bf16_products")
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("norm,eps", ((3e18, EPS), (1e18, EPS), (1e-18, 1e-30)))
def test_bf16_products_at_extreme_feature_norms(loss, norm, eps, monkeypatch):
    """vdpbf16ps and the bf16 conversions flush subnormals whatever MXCSR says. Huge rows
    (normalize=True, norms ~1e18: s rho sigma ~1e-36) made every H of a tile subnormal and
    the gradients exactly 0; the tile is now scaled by a power of two first. Tiny rows with a
    small eps (norms ~1e-18: products below 2^-126) flushed the logits (CLIP's loss 4.6e-3
    off); such calls now take the fp32 products, bit-identical to FASTCLIP_CPU_ISA=avx512."""
    g = torch.Generator().manual_seed(4)
    x = (unit_rows(torch.randn(64, 64, generator=g, dtype=torch.float64)) * norm).bfloat16()
    y = (unit_rows(torch.randn(64, 64, generator=g, dtype=torch.float64)) * norm).bfloat16()
    params = (1.0, -2.0)[:len(get_loss(loss).params)]
    fast, slow, errs = _bf16_against_fp32_products(loss, x, y, params, True, monkeypatch, eps)
    if norm < 1:
        assert all(torch.equal(f, s) for f, s in zip(fast, slow))
        return
    assert (fast[1] != 0).any() and (fast[2] != 0).any()
    for name, (ef, es) in zip(("loss", "dx", "dy"), errs):
        assert ef <= (3 * es if name != "loss" else TOL[torch.float32]), (name, ef, es)


@pytest.mark.skipif(not _has_bf16_products(), reason="the CPU has no AVX512_BF16")
@pytest.mark.usefixtures("bf16_products")
@pytest.mark.parametrize("where", ("x", "y"))
def test_bf16_products_keep_the_fp32_products_non_finite_pattern(where, monkeypatch):
    """An inf feature makes the products it enters non-finite on either path; the bf16 path's
    centring term turned some of those infs into NaNs (22 of 160 random trials differed)."""
    gen = torch.Generator().manual_seed(5)
    x, y = _inputs(5, 200, 130, torch.float64, False, gen)
    x, y = x.bfloat16(), y.bfloat16()
    (x if where == "x" else y)[0, 124] = -float("inf")
    params, grads = (1e4, -15.0), upstream(5, 200, gen)
    fast = _block_all("siglip", x, y, params, False, -4, grads)
    monkeypatch.setenv("FASTCLIP_CPU_ISA", "avx512")
    slow = _block_all("siglip", x, y, params, False, -4, grads)
    for name, f, s in zip(("row", "col", "pos", "dx", "dy", "dparams") * 2, fast, slow):
        assert torch.equal(torch.isnan(f), torch.isnan(s)), name
        assert torch.equal(torch.isinf(f), torch.isinf(s)), name
