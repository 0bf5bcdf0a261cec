"""Op-level tests of the fused contrastive loss on the CPU backends (design.md §5).

Every CPU backend (``cpu``: the C++ kernel; ``reference``: chunked PyTorch) is judged
against the float64 naive formula: loss and all three gradients within 1e-5 relative
for float32 inputs; half-precision inputs within 2× PyTorch's own error in that dtype.
The Triton and CUDA backends have their own files (interpreter / GPU).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastclip
from fastclip.ops import contrastive_loss as op
from fastclip.ops.backends import BackendUnavailableError, all_backends
from fastclip.ops.reference import clip_loss_naive

from ._helpers import embeddings, oracle, rel_err, run

CPU_BACKENDS = [b for b in ("cpu", "reference") if b in fastclip.available_backends("cpu")]
SCALES = (1.0, 1 / 0.07, 100.0)
FP32_TOL = 1e-5


def _check_fp32(backend, x, y, scale, normalize):
    ref = oracle(x, y, scale, normalize)
    out = run(fastclip.clip_loss, x, y, scale, normalize, backend=backend)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    for name, o, r in zip(("loss", "d_image", "d_text", "d_scale"), out, ref):
        assert torch.isfinite(o).all(), name
        if x.shape[0] == 1:
            # N=1: loss and gradients are exactly 0 (r_1 = L_11, G_11 = 0), each a
            # cancellation of two terms of size |L_11| (loss), |<x̂,ŷ>| (d_scale) or
            # s·‖ŷ‖ (d_image/d_text): the achievable error is relative to those.
            xd, yd = x.double(), y.double()
            if normalize:
                xd, yd = torch.nn.functional.normalize(xd, dim=1), torch.nn.functional.normalize(yd, dim=1)
            dot = (xd @ yd.T).abs().item()
            size = {"loss": scale * dot, "d_scale": dot, "d_image": scale * yd.norm().item(),
                    "d_text": scale * xd.norm().item()}[name]
            assert o.abs().max().item() <= FP32_TOL * max(size, 1e-30), name
            continue
        err = rel_err(o, r)
        assert err <= FP32_TOL, f"{backend} {name}: rel err {err:.2e} > {FP32_TOL}"


def test_cpu_backend_is_built():
    # The compiled extension must be there in every supported install (CI included).
    assert "cpu" in fastclip.available_backends("cpu"), all_backends()["cpu"].availability()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", list(itertools.product((1, 2, 3, 127, 129, 1000), (1, 7, 64, 513))))
def test_matches_fp64_oracle(backend, n, d):
    g = torch.Generator().manual_seed(1000 * n + d)
    x, y = embeddings("random", n, d, gen=g)
    # Cycle scale and normalisation over the shapes so every pair is covered somewhere.
    # D=1 is run unnormalised: normalised 1-D rows are ±1 and their gradient is
    # analytically zero, so a relative error has nothing to measure.
    k = n + d
    _check_fp32(backend, x, y, SCALES[k % 3], normalize=bool(k % 2) and d > 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("normalize", (False, True))
def test_scales_and_normalisation(backend, scale, normalize):
    g = torch.Generator().manual_seed(7)
    x, y = embeddings("random", 300, 96, gen=g)
    if not normalize:   # unnormalised inputs are assumed to be unit rows
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    _check_fp32(backend, x, y, scale, normalize)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ("orthogonal", "identical"))
@pytest.mark.parametrize("scale", (1.0, 100.0))
def test_statistics_do_not_underflow(backend, kind, scale):
    # Nearly orthogonal rows at scale 100: every logit ≈ 0 while a fixed shift by s would
    # make exp(L - s) = exp(-100) underflow; identical rows: every logit = s.
    g = torch.Generator().manual_seed(3)
    x, y = embeddings(kind, 64, 200, gen=g)
    if kind == "orthogonal":
        x = x + 1e-3 * torch.randn(x.shape, generator=g)
    ref = oracle(x, y, scale, True)
    out = run(fastclip.clip_loss, x, y, scale, True, backend=backend)
    if kind == "identical":
        # Every logit is s: loss = log N, and every gradient is analytically zero (the
        # rows of G sum to zero), a cancellation of terms of size s·‖ŷ‖ = s (features)
        # and Σ|G_ij| ≤ 2 (scale): judge each against that size.
        assert abs(out[0].item() - math.log(64)) <= FP32_TOL * math.log(64)
        for o in out[1:]:
            assert o.abs().max().item() <= FP32_TOL * scale
        return
    # Near-orthogonal rows at scale 1: d_scale = Σ G_ij L_ij / s is a sum of N² terms of
    # size 1/N² that cancel to ~1e-5, an ill-conditioned quantity; where fp32 PyTorch itself
    # misses 1e-5 on it, the kernel is held to 2× PyTorch's fp32 error (flash-attention's rule).
    torch32 = run(lambda a, b, s, normalize: clip_loss_naive(a, b, s, normalize), x, y, scale, True)
    for name, o, t, r in zip(("loss", "d_image", "d_text", "d_scale"), out, torch32, ref):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) <= max(FP32_TOL, 2 * rel_err(t, r)), (name, rel_err(o, r), rel_err(t, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ("row_stride", "col_stride", "transposed", "expanded"))
def test_non_contiguous_inputs(backend, layout):
    g = torch.Generator().manual_seed(11)
    n, d = 77, 40
    if layout == "row_stride":
        bx, by = torch.randn(2 * n, d + 3, generator=g), torch.randn(2 * n, d + 3, generator=g)
        x, y = bx[::2, :d], by[::2, 1:d + 1]
    elif layout == "col_stride":
        bx, by = torch.randn(n, 2 * d, generator=g), torch.randn(n, 2 * d, generator=g)
        x, y = bx[:, ::2], by[:, 1::2]
    elif layout == "transposed":
        x, y = torch.randn(d, n, generator=g).T, torch.randn(d, n, generator=g).T
    else:
        x = torch.randn(n, 1, generator=g).expand(n, d)          # stride (1, 0)
        y = torch.randn(n, d, generator=g)
    assert not x.is_contiguous()
    _check_fp32(backend, x, y, 10.0, normalize=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("normalize", (False, True))
def test_half_precision_inputs(backend, dtype, normalize):
    g = torch.Generator().manual_seed(5)
    x, y = embeddings("random", 257, 96, dtype=dtype, gen=g)
    x = x / 4
    ref = oracle(x, y, 14.0, normalize)                         # fp64 of the same half inputs
    out = run(fastclip.clip_loss, x, y, 14.0, normalize, backend=backend)
    torch_half = run(lambda a, b, s, normalize: clip_loss_naive(a, b, s.to(dtype), normalize),
                     x, y, 14.0, normalize)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for name, o, t, r in zip(("loss", "d_image", "d_text", "d_scale"), out, torch_half, ref):
        assert not torch.isnan(o).any(), name
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-7, (name, rel_err(o, r), rel_err(t, r))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalize", (False, True))
def test_gradcheck_fp64(backend, normalize):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, c: fastclip.clip_loss(a, b, c, normalize=normalize, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y, s), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pos_offset", (0, 3, -2, 50))
def test_opcheck(backend, pos_offset):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    y = torch.randn(12, 6, generator=g, requires_grad=True)
    s = torch.tensor(2.5, requires_grad=True)
    torch.library.opcheck(op.contrastive_loss_fwd, (x, y, s, True, 1e-12, pos_offset, backend))
    r, c, p = op.contrastive_loss_fwd(x, y, s, True, 1e-12, pos_offset, backend)
    args = (x.detach(), y.detach(), s.detach(), True, 1e-12, pos_offset, backend, r.detach(),
            c.detach(), torch.rand(9, generator=g), torch.rand(12, generator=g),
            torch.rand(9, generator=g))
    torch.library.opcheck(op.contrastive_loss_bwd, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_as_float_and_requires_grad_paths(backend):
    g = torch.Generator().manual_seed(8)
    x, y = embeddings("random", 33, 16, gen=g)
    ref = clip_loss_naive(x.double(), y.double(), 20.0, normalize=True)
    out = fastclip.clip_loss(x, y, 20.0, normalize=True, backend=backend)
    assert rel_err(out, ref) <= FP32_TOL
    # A one-element tensor of shape [1] (how some trainers keep the scale) is accepted.
    s = torch.full((1,), 20.0, requires_grad=True)
    out = fastclip.clip_loss(x, y, s, normalize=True, backend=backend)
    out.backward()
    assert s.grad is not None and s.grad.shape == (1,)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", ("nan", "inf", "-inf"))
@pytest.mark.parametrize("normalize", (False, True))
def test_non_finite_inputs_give_non_finite_loss(backend, bad, normalize):
    x, y = embeddings("random", 50, 8, gen=torch.Generator().manual_seed(9))
    (x if bad != "-inf" else y)[17, 3] = float(bad)
    loss = fastclip.clip_loss(x, y, 10.0, normalize=normalize, backend=backend)
    assert not torch.isfinite(loss)


def test_fp64_runs_natively_on_cpu_backend():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    x, y = embeddings("random", 40, 12, dtype=torch.float64, gen=torch.Generator().manual_seed(1))
    out = run(fastclip.clip_loss, x, y, 9.0, True, backend="cpu")
    ref = oracle(x, y, 9.0, True)
    assert out[0].dtype == torch.float64
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-12


# ------------------------------------------------------------------- dispatch / errors
def test_available_backends_and_auto(monkeypatch):
    names = fastclip.available_backends()
    assert "reference" in names
    x, y = embeddings("random", 8, 4)
    monkeypatch.delenv("FASTCLIP_BACKEND", raising=False)
    assert op.select_backend("auto", x.device, x.dtype).name == CPU_BACKENDS[0]
    monkeypatch.setenv("FASTCLIP_BACKEND", "reference")
    assert op.select_backend("auto", x.device, x.dtype).name == "reference"
    monkeypatch.setenv("FASTCLIP_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastclip.clip_loss(x, y, 1.0)


def test_unavailable_backend_says_why():
    x, y = embeddings("random", 8, 4)
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda'.*(CUDA|cuda)"):
        fastclip.clip_loss(x, y, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="not a fastclip backend"):
        fastclip.clip_loss(x, y, 1.0, backend="tpu")


@pytest.mark.parametrize("case,exc,pattern", [
    ("rank1", ValueError, r"image_features must be 2-D \[N, D\], got shape \(8,\)"),
    ("rank3", ValueError, r"text_features must be 2-D .*\(2, 4, 4\)"),
    ("n_mismatch", ValueError, r"N=8 .* M=7"),
    ("d_mismatch", ValueError, r"must share D"),
    ("empty", ValueError, r"empty batch"),
    ("zero_d", ValueError, r"D=0"),
    ("int", TypeError, r"image_features must be float32.*torch.int64"),
    ("dtype_mismatch", TypeError, r"float32 but text_features is torch.float64"),
    ("devices", ValueError, r"image_features is on cpu but text_features is on meta"),
    ("not_tensor", TypeError, r"image_features must be a torch.Tensor"),
    ("scale_shape", ValueError, r"logit_scale must have exactly one element"),
    ("scale_negative", ValueError, r"finite positive"),
    ("scale_int_tensor", TypeError, r"logit_scale must be a floating-point tensor"),
])
def test_bad_input_errors(case, exc, pattern):
    x, y, s = torch.randn(8, 4), torch.randn(8, 4), 1.0
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
    elif case == "dtype_mismatch":
        y = y.double()
    elif case == "devices":
        y = torch.empty(8, 4, device="meta")
    elif case == "not_tensor":
        x = x.tolist()
    elif case == "scale_shape":
        s = torch.ones(2)
    elif case == "scale_negative":
        s = -1.0
    elif case == "scale_int_tensor":
        s = torch.tensor(3)
    with pytest.raises(exc, match=pattern):
        fastclip.clip_loss(x, y, s)


# ------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    backend = CPU_BACKENDS[0]
    model = torch.nn.Linear(16, 8)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def step(a, b):
        fa, fb = model(a), model(b)
        return fastclip.clip_loss(fa, fb, scale.exp(), normalize=True, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    loss_c = compiled(a, b)
    grads_c = torch.autograd.grad(loss_c, [model.weight, scale])
    loss_e = step(a, b)
    grads_e = torch.autograd.grad(loss_e, [model.weight, scale])
    assert rel_err(loss_c, loss_e) <= 1e-6
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) <= 1e-5
