"""Triton kernels of the fused contrastive-loss block, for every loss (the block contract of
fastclip.ops.backends; docs/design.md §1-§2).

    u_ij = rho_i * sigma_j * <x_i, y_j>,   z_ij = s * u_ij (+ b),   j = i + off: i's positive
    fwd     -> row [n], col [m], pos [n]                                   (float64)
    bwd     -> dx [n, D], dy [m, D] (input dtype), dparams [P] = (Σ G u, Σ G)[:P] (float32)
    fwd_bwd -> all of them in one launch sequence (one-pass losses)

The loss is a constexpr policy of every kernel, ``LOSS`` = ``LossSpec.code``:

* ``SOFTMAX`` (0, clip): row_i = logsumexp_j z_ij, col_j = logsumexp_i z_ij (merge "lse");
  dz = g_row_i exp(z - row_i) + g_col_j exp(z - col_j).
* ``SIGMOID`` (1, siglip): with t = -l z (l = +1 on the positive, -1 elsewhere),
  phi = softplus(t), row_i = Σ_j phi, col_j = Σ_i phi (merge "sum");
  dz = (g_row_i + g_col_j) (-l) sigmoid(t).

plus g_pos_i on the positive for both. The epilogues are the @triton.jit helpers
``_softmax_dz``, ``_softplus`` and ``_softplus_sigmoid``; every tile loop below is shared.

Kernels and passes (FLOP in units of 2·n·m·D, the cost of one n x m x D matrix product):

* ``_inv_norm_kernel`` (normalize only): rho = 1/max(||x_i||, eps), sigma likewise.
  O((n+m)·D). Without normalisation rho = sigma = 1 (torch.ones).
* ``_pos_kernel`` (the one pass only): pos_i = s·rho_i·sigma_{i+off}·<x_i, y_{i+off}> + b, a
  row-wise dot in float64, O(n·D). The forward takes pos_i from the tile that holds it instead
  (the logit as the statistics see it: a CLIP row's row_i - pos_i cancels its rounding).
* ``_fwd_kernel`` — grid (row blocks of one wave,): a program owns BLOCK_M rows and walks
  every column tile: S = X_blk·Y_tileᵀ (tl.dot, fp32 accumulation, loop over D in BLOCK_D
  chunks), z = _logits(S, ...); the row statistic stays in registers (softmax: an exact
  online log-sum-exp, fp32 max and float64 running sum; sigmoid: per-tile fp32 sums added
  in float64); the column statistic
  of the block goes to a partial buffer [wave, m] (softmax: (max, sum of exp) pairs;
  sigmoid: sums). 1 unit of FLOP.
* ``_col_merge_kernel`` — grid (column blocks,): folds the partial buffer of a wave into
  each column's running statistic in a fixed order (softmax: the exact pairwise
  log-sum-exp merge; sigmoid: a float64 sum) and finally writes col. The waves bound the
  partial buffer at _PARTIAL_BYTES whatever n and m are (n = m = 262144 would otherwise
  need 4 GiB of pairs for BLOCK_M=128); the merge reads each entry once: 4-8 bytes per
  (row block, column), O(n·m/BLOCK_M), against 2·BLOCK_M·D FLOP per entry. Chosen over
  atomics (nondeterministic) and over a second pass with a columns-outer loop (+1 unit).
* ``_bwd_kernel`` — launched twice. Pass A: rows of x outer, grid (row blocks,
  D / BLOCK_DO), dx; pass B: rows of y outer (columns of z), grid (column blocks,
  D / BLOCK_DO), dy. A program walks every tile of its block, computes S in the forward's
  orientation (X rows · Y rowsᵀ, the same helper, the same operand order: pass B feeds
  the transpose of its G tile to the gradient product instead of computing Y·Xᵀ), so
  every logit is rounded exactly as in the forward (see "Rounding" below); forms G and
  accumulates acc += W·Y[:, d-chunk] (pass A, W = G·sigma) or Wᵀ·X[:, d-chunk] (pass B,
  W = G·rho) in registers (tensor cores on the input dtype), plus t = Σ G·u along its
  block. The epilogue is fused: da = ra·s·acc − ra²·s·t·a, because
  <â, ∂/∂â> = s·Σ G u = s·t: the normalisation backward needs no reduction over D and no
  fp32 scratch of [n, D]. dparams = (Σ_i t_i, Σ_i Σ_j G_ij) from pass A, per-row float64
  partials summed by torch (deterministic; no atomics anywhere: results are bitwise
  reproducible). FLOP per pass: P·1 (recompute, P = cdiv(D, BLOCK_DO) programs per block)
  + 1 (gradient product); backward = 2·(P + 1) units, 4 for D ≤ BLOCK_DO. Forward +
  backward = 5 units for D ≤ BLOCK_DO against the floor of 4 (docs/design.md §2); the
  extra unit buys deterministic, atomic-free gradients. BLOCK_DO is at most 256 (512 with
  32-row blocks): register capacity, see _BWD_CONFIGS. Wider D pays P > 1 (D = 1024:
  P = 2-4, 7-11 units in all).
* ``fwd_bwd`` (one-pass losses: the sigmoid): the same two passes with STATS=True, from
  the head's upstream gradients (known before any statistic): pass A also sums each
  row's phi, pass B each column's, in registers (no partial buffer, no merge); no
  forward kernel runs. 4 units for D ≤ BLOCK_DO, against 5 for fwd then bwd. The CPU
  backend gets to 3 by reducing per-thread dY buffers; on a GPU the dY contributions of
  every row block would have to be reduced through memory: atomics (nondeterministic) or
  per-row-block partials, 8·n·m·D/BLOCK_M bytes of traffic (2.2 TB at n = m = 262144,
  D = 512) against one unit of recompute (7e13 FLOP, ~0.1 s on an H100's tensor cores).

Rounding. z is computed by one helper, ``_logits``: S·(s·rho_i) then an explicit fma with
sigma_j and the bias, so no compiler contraction choice can differ between kernels. S comes
from the same ``_tile_dot`` with x as the left operand everywhere. For float32 inputs
(IEEE, the default: TF32 only when allowed, below) Triton lowers tl.dot to one fma chain
per output element over k = 0..K-1 in order, continued through the accumulator across
BLOCK_D chunks, whatever the tile shape, layout or warp count; masked k past D adds exact
zeros. So the forward and both backward passes round every logit identically for any
autotuned configurations (Backend.exact_logits = inf; checked on the PTX of an offline
sm_80/sm_90 build: an IEEE fp32 tl.dot compiles to fma.rn.f32 only). Tensor-core dtypes
(bf16, fp16, TF32) are not claimed: the MMA instruction may differ between configurations
(wgmma for 64-row tiles on Hopper, mma.sync for 32-row ones); their inputs' own rounding
is far larger and is what the tolerance table judges them by. Under TRITON_INTERPRET=1
every kernel uses the same 32-wide tiles, aligned alike, so each tl.dot sees identical
operands.

Precision: statistics in float64 (per-tile fp32 partial results, see
fastclip.ops.losses.STAT_DTYPE; every sum that runs over tiles or row blocks, whose count
grows with N, is carried in float64), tiles in fp32; bf16/fp16 operands go to tensor cores as
they are; the W tile is cast to the input dtype for the gradient product (as
FlashAttention does with P). For fp16, whose normal range is 6e-5 .. 65504, W is first
scaled by a power of two that brings its bound to 2^14 (computed on the device from the
upstream gradients and the norms: no host sync) and the accumulator unscaled after:
|G| ~ 1/N otherwise falls below fp16's range at large N and flushes to zero. fp32 inputs use
TF32 only when torch lets float32 matrix products use it at call time (``tf32_matmul`` in
fastclip/ops/backends/__init__.py: ``allow_tf32``, ``fp32_precision``), IEEE fp32
otherwise. The scale and the bias are read from the parameter tensor on the device inside
the kernels (no host sync). Every log-sum-exp uses a running
maximum (no fixed shift) and softplus is max(t, 0) + log1p(exp(-|t|)) (exp of a
non-positive argument: no overflow at any |z|; log1p by a series accurate for tiny
arguments), so any scale, bias and cosine range is exact.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

from ..losses import get_loss

__all__ = ["fwd", "bwd", "fwd_bwd", "interpreter_problem", "INTERPRET", "SOFTMAX", "SIGMOID"]

# Evaluated once, at import: the @triton.jit decorators below have already chosen
# interpreter or compiler by then (the environment variable must be set before import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The epilogue policies, by LossSpec.code (csrc/common.h's LossKind uses the same codes).
SOFTMAX = tl.constexpr(0)
SIGMOID = tl.constexpr(1)
_MERGE = {0: "lse", 1: "sum"}
assert get_loss("clip").code == SOFTMAX.value and get_loss("siglip").code == SIGMOID.value
assert all(get_loss(n).merge == _MERGE[get_loss(n).code] for n in ("clip", "siglip"))

# Upper bound on the forward's partial column statistics (per row block of a wave: an fp32
# (max, sum) pair per column for the softmax, an fp32 sum for the sigmoid). 512 MiB keeps
# >= 256 row blocks per wave (about two CTAs per SM on an H100) up to m = 262144, and the
# whole forward within the 1 GiB budget of the large-N test. Unmeasured prior.
_PARTIAL_BYTES = 512 << 20

# Debug hook for tests: allocate every output filled with NaN so that a test can prove
# that the kernels write each element (the poisoned-output check).
POISON_OUTPUTS = False

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)

# Compile options of every launch. FP fusion (mul + add -> fma in the epilogues) is pinned
# rather than left to Triton's default, which changes in Triton 3.10 (3.9 warns on every
# compile while it is unset). The logits do not depend on it: _logits fuses explicitly.
_OPTS = {"enable_fp_fusion": True}


# ---------------------------------------------------------------------------- helpers
@triton.jit
def _tile_dot(a_ptr, b_ptr, sa, sb, rows, cols, rmask, cmask, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S = A[rows] · B[cols]ᵀ over the full D, fp32 accumulation. Rows/cols int64.
    Every logit tile of every kernel is this call with A = x and B = y."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        a = tl.load(a_ptr + rows[:, None] * sa + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * sb + ks[:, None],
                    mask=cmask[None, :] & kmask[:, None], other=0.0)      # [BLOCK_D, BLOCK_N]
        if UPCAST:   # the interpreter's tl.dot is wrong on bf16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logits(S, a, sg, b):
    """z = S·(s·rho_i)·sigma_j + b. One product, then one fma: the same roundings in every
    kernel, whatever the compiler's contraction settings (b = 0 for the softmax: exact)."""
    prod = S * a[:, None]
    prod, sgb = tl.broadcast(prod, sg[None, :])
    return tl.fma(prod, sgb, tl.zeros_like(prod) + b)


@triton.jit
def _log1p01(u):
    """log1p(u) for u in [0, 1] (fp32): f = u / (2 + u) lies in [0, 1/3] and
    log1p(u) = 2 atanh(f) = 2f (1 + f²/3 + f⁴/5 + ...); seven terms leave a truncation below
    1.5e-8 relative, and tiny u keeps its full precision (log1p(u) -> u), which log(1 + u)
    would lose: softplus of a logit of -20 is 2e-9, and N² such terms make up the loss of a
    trained SigLIP model. NaN propagates."""
    f = u / (u + 2.0)
    f2 = f * f
    p = f2 * (1.0 / 13.0) + 1.0 / 11.0
    p = p * f2 + 1.0 / 9.0
    p = p * f2 + 1.0 / 7.0
    p = p * f2 + 1.0 / 5.0
    p = p * f2 + 1.0 / 3.0
    p = p * f2 + 1.0
    return (f + f) * p


@triton.jit
def _softplus(t):
    """softplus(t) = max(t, 0) + log1p(exp(-|t|)): exp of a non-positive argument, never
    overflows; +inf -> inf, -inf -> 0, NaN -> NaN."""
    return tl.maximum(t, 0.0) + _log1p01(tl.exp(-tl.abs(t)))


@triton.jit
def _sigmoid(t):
    """sigmoid(t) from exp(-|t|) (never overflows)."""
    e = tl.exp(-tl.abs(t))
    inv = 1.0 / (1.0 + e)
    return tl.where(t < 0, e * inv, inv)


@triton.jit
def _softplus_sigmoid(t):
    """(softplus(t), sigmoid(t)) from one exp(-|t|) (never overflows)."""
    e = tl.exp(-tl.abs(t))
    inv = 1.0 / (1.0 + e)
    return tl.maximum(t, 0.0) + _log1p01(e), tl.where(t < 0, e * inv, inv)


@triton.jit
def _split(v):
    """A float64 statistic as hi + lo in fp32 (lo = 0 where hi is not finite), so that
    exp((z - hi) - lo) keeps its precision: (z - hi) is exact where the result matters."""
    hi = v.to(tl.float32)
    lo = (v - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def _softmax_dz(z, g_r, rhi, rlo, g_c, chi, clo):
    """d/dz of g_row·row + g_col·col for row = logsumexp_j z, col = logsumexp_i z."""
    return (g_r[:, None] * tl.exp((z - rhi[:, None]) - rlo[:, None])
            + g_c[None, :] * tl.exp((z - chi[None, :]) - clo[None, :]))


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _inv_norm_kernel(x_ptr, sx, n, D, eps, out_ptr, keep_ptr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    # The sum of squares in float64: in fp32 it overflows for norms above ~1.8e19, rho became 0
    # and the row's logits 0 (a finite, wrong loss). O(n·D): off the hot path.
    ss = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + r64[:, None] * sx + ks[None, :],
                    mask=rmask[:, None] & (ks < D)[None, :], other=0.0).to(tl.float64)
        ss += tl.sum(v * v, 1)
    nrm = tl.sqrt(ss)
    inv = 1.0 / tl.maximum(nrm, eps)
    tl.store(out_ptr + rows, inv.to(tl.float32), mask=rmask)
    # 1 where the norm is at least eps, 0 where eps clamps it (x̂ = x/eps: no projection in
    # the backward, as F.normalize's clamp_min).
    tl.store(keep_ptr + rows, (nrm >= eps).to(tl.float32), mask=rmask)


@triton.jit
def _pos_kernel(x_ptr, y_ptr, sx, sy, rho_ptr, sig_ptr, p_ptr, n, m, D, off, pos_ptr,
                LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # float64 dot products (O(n·D)): pos is a float64 statistic like row and col.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    j = rows + off
    valid = rmask & (j >= 0) & (j < m)
    r64 = rows.to(tl.int64)
    j64 = tl.where(valid, j, 0).to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        km = (ks < D)[None, :]
        a = tl.load(x_ptr + r64[:, None] * sx + ks[None, :], mask=valid[:, None] & km, other=0.0)
        b = tl.load(y_ptr + j64[:, None] * sy + ks[None, :], mask=valid[:, None] & km, other=0.0)
        dot += tl.sum(a.to(tl.float64) * b.to(tl.float64), 1)
    s = tl.load(p_ptr).to(tl.float32)
    a_i = tl.load(rho_ptr + rows, mask=valid, other=0.0) * s
    sg = tl.load(sig_ptr + j64, mask=valid, other=0.0)
    z = a_i.to(tl.float64) * sg.to(tl.float64) * dot
    if LOSS == SIGMOID:
        z += tl.load(p_ptr + 1).to(tl.float64)
    tl.store(pos_ptr + rows, tl.where(valid, z, 0.0), mask=rmask)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, rho_ptr, sig_ptr, p_ptr, row_ptr, pos_ptr, pa_ptr, pb_ptr,
                n, m, D, sx, sy, off, rb0, n_key, m_key,
                LOSS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # n_key, m_key: power-of-two buckets of n, m, only read by the autotuner's key.
    pid = tl.program_id(0)                      # row block rb0 + pid, partial row pid
    rows = (rb0 + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    s = tl.load(p_ptr).to(tl.float32)
    b = 0.0
    if LOSS == SIGMOID:
        b = tl.load(p_ptr + 1).to(tl.float32)
    a = tl.load(rho_ptr + rows, mask=rmask, other=0.0) * s
    if LOSS == SOFTMAX:
        # The running max in fp32 (exact: a logit), the running sum of exps in float64: it
        # adds one fp32 tile sum per column tile, m / BLOCK_N of them (65536 at m = 4M), and
        # an fp32 chain that long drifts by ~1e-5 relative, the whole fp32 tolerance.
        # Compiled offline (scripts/triton_resources.py --pass fwd): bf16/fp16 on sm_90 +2-4
        # registers per thread, no spills; fp32 IEEE (FMA, no tensor cores) configurations,
        # which spilled already, spill up to 64 bytes more, and sm_80 bf16 64x64 w4 104
        # bytes instead of 56. A float64 rescale factor (exp in float64) was tried: 1352
        # bytes of spill for fp32 64x64 w4, so the factor stays fp32 (it is 1 exactly
        # whenever the max does not rise).
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float64)
    else:
        r_acc = tl.zeros((BLOCK_M,), dtype=tl.float64)
    prow = pid.to(tl.int64) * m
    jp = rows + off                             # the rows' positives
    jp_lo = (rb0 + pid) * BLOCK_M + off
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < m
        c64 = cols.to(tl.int64)
        sg = tl.load(sig_ptr + cols, mask=cmask, other=0.0)
        S = _tile_dot(x_ptr, y_ptr, sx, sy, r64, c64, rmask, cmask, D,
                      BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        z = _logits(S, a, sg, b)
        valid = rmask[:, None] & cmask[None, :]
        # pos_i: the positive's logit from this tile, where it holds it (the tiles that meet
        # the block's diagonal band only), rounded as the statistics below see it.
        if (c0 < jp_lo + BLOCK_M) & (c0 + BLOCK_N > jp_lo):
            on = cols[None, :] == jp[:, None]
            here = rmask & (jp >= c0) & (jp < c0 + BLOCK_N) & (jp < m)
            tl.store(pos_ptr + rows, tl.sum(tl.where(on & valid, z, 0.0), 1).to(tl.float64),
                     mask=here)
        if LOSS == SOFTMAX:
            L = tl.where(valid, z, float("-inf"))
            # rows: online log-sum-exp. A max of -inf (padding rows only) is replaced by 0
            # so that exp(-inf - (-inf)) never forms a NaN.
            m_new = tl.maximum(m_i, tl.max(L, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = (l_i * tl.exp(m_i - m_use).to(tl.float64)
                   + tl.sum(tl.exp(L - m_use[:, None]), 1).to(tl.float64))
            m_i = m_new
            # columns: this block's (max, sum of exp relative to it), merged later.
            cm = tl.max(L, 0)
            cm_use = tl.where(cm == float("-inf"), 0.0, cm)
            cs = tl.sum(tl.exp(L - cm_use[None, :]), 0)
            tl.store(pa_ptr + prow + cols, cm, mask=cmask)
            tl.store(pb_ptr + prow + cols, cs, mask=cmask)
        else:
            diag = cols[None, :] == rows[:, None] + off
            phi = tl.where(valid, _softplus(tl.where(diag, -z, z)), 0.0)
            r_acc += tl.sum(phi, 1).to(tl.float64)
            tl.store(pa_ptr + prow + cols, tl.sum(phi, 0), mask=cmask)
    if LOSS == SOFTMAX:
        # padding rows have l_i = 0: log(1) keeps them finite (they are not stored). The
        # statistic is float64 (the max exact, log(l) small).
        tl.store(row_ptr + rows,
                 m_i.to(tl.float64) + tl.log(tl.where(rmask, l_i, 1.0)),
                 mask=rmask)
    else:
        tl.store(row_ptr + rows, r_acc, mask=rmask)


@triton.jit
def _col_merge_kernel(pa_ptr, pb_ptr, g, m, cmax_ptr, csum_ptr, col_ptr,
                      LOSS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Fold the g partial rows of a wave into the columns' running statistics, in row-block
    order (deterministic). The softmax's running sum is float64, carried between waves in
    a float64 buffer: it adds one partial per row block, n / BLOCK_M of them."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < m
    pa_ptrs = pa_ptr + cols        # stepped by m per partial row: 64-bit pointer arithmetic
    if LOSS == SOFTMAX:
        if FIRST:
            mx = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
            sm = tl.zeros((BLOCK_C,), dtype=tl.float64)
        else:
            mx = tl.load(cmax_ptr + cols, mask=cmask, other=0.0)
            sm = tl.load(csum_ptr + cols, mask=cmask, other=0.0)
        pb_ptrs = pb_ptr + cols
        for _ in range(0, g):
            pm = tl.load(pa_ptrs, mask=cmask, other=0.0)
            ps = tl.load(pb_ptrs, mask=cmask, other=0.0)
            pa_ptrs += m
            pb_ptrs += m
            new = tl.maximum(mx, pm)
            use = tl.where(new == float("-inf"), 0.0, new)
            sm = sm * tl.exp(mx - use).to(tl.float64) + (ps * tl.exp(pm - use)).to(tl.float64)
            mx = new
        if LAST:
            tl.store(col_ptr + cols,
                     mx.to(tl.float64) + tl.log(tl.where(cmask, sm, 1.0)),
                     mask=cmask)
        else:
            tl.store(cmax_ptr + cols, mx, mask=cmask)
            tl.store(csum_ptr + cols, sm, mask=cmask)
    else:
        # The running sums live in the float64 output itself.
        if FIRST:
            acc = tl.zeros((BLOCK_C,), dtype=tl.float64)
        else:
            acc = tl.load(col_ptr + cols, mask=cmask, other=0.0)
        for _ in range(0, g):
            acc += tl.load(pa_ptrs, mask=cmask, other=0.0).to(tl.float64)
            pa_ptrs += m
        tl.store(col_ptr + cols, acc, mask=cmask)


@triton.jit
def _bwd_kernel(x_ptr, y_ptr, sx, sy, rho_ptr, sig_ptr, p_ptr, row_ptr, col_ptr,
                gr_ptr, gc_ptr, gp_ptr, ws_ptr, keep_ptr, out_ptr, sout, tu_ptr, tg_ptr, stat_ptr,
                n, m, D, off, n_key, m_key,
                LOSS: tl.constexpr, COLS_OUTER: tl.constexpr, STATS: tl.constexpr,
                NORMALIZE: tl.constexpr, SCALE_W: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One backward pass. COLS_OUTER=False (pass A): the program owns BLOCK_M rows of x and
    walks the columns: out = dx, tu_i = Σ_j G u, tg_i = Σ_j G (for dparams). COLS_OUTER=True
    (pass B): it owns BLOCK_M rows of y (columns of z) and walks the rows of x: out = dy.
    Every tile is [x rows, y rows], computed as in the forward. STATS (one-pass losses):
    also the statistic of the program's block (row sums in pass A, column sums in pass B)
    into stat_ptr. The softmax reads the merged float64 statistics row_ptr / col_ptr."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    blk = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.load(p_ptr).to(tl.float32)
    b = 0.0
    if LOSS == SIGMOID:
        b = tl.load(p_ptr + 1).to(tl.float32)
    if COLS_OUTER:
        nblk = m
        ntile = n
        blk_ptr = y_ptr
        sblk = sy
        tile_ptr = x_ptr
        stile = sx
    else:
        nblk = n
        ntile = m
        blk_ptr = x_ptr
        sblk = sx
        tile_ptr = y_ptr
        stile = sy
    bmask = blk < nblk
    b64 = blk.to(tl.int64)
    # The block's side of the tile: loaded once.
    if COLS_OUTER:
        sg = tl.load(sig_ptr + blk, mask=bmask, other=0.0)
        ra = sg
        g_c = tl.load(gc_ptr + blk, mask=bmask, other=0.0)
        if LOSS == SOFTMAX:
            chi, clo = _split(tl.load(col_ptr + blk, mask=bmask, other=0.0))
    else:
        rho = tl.load(rho_ptr + blk, mask=bmask, other=0.0)
        ra = rho
        a = rho * s
        g_r = tl.load(gr_ptr + blk, mask=bmask, other=0.0)
        g_p = tl.load(gp_ptr + blk, mask=bmask, other=0.0)
        if LOSS == SOFTMAX:
            rhi, rlo = _split(tl.load(row_ptr + blk, mask=bmask, other=0.0))
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    tu = tl.zeros((BLOCK_M,), dtype=tl.float64)
    tg = tl.zeros((BLOCK_M,), dtype=tl.float64)
    st = tl.zeros((BLOCK_M,), dtype=tl.float64)
    if SCALE_W:
        wsc = tl.load(ws_ptr)
    for t0 in range(0, ntile, BLOCK_N):
        tix = t0 + tl.arange(0, BLOCK_N)
        tmask = tix < ntile
        t64 = tix.to(tl.int64)
        # The tile's side, and the tile [x rows, y rows] as the forward computes it.
        if COLS_OUTER:
            xi = tix
            yj = blk
            imask = tmask
            jmask = bmask
            rho = tl.load(rho_ptr + tix, mask=tmask, other=0.0)
            a = rho * s
            g_r = tl.load(gr_ptr + tix, mask=tmask, other=0.0)
            g_p = tl.load(gp_ptr + tix, mask=tmask, other=0.0)
            if LOSS == SOFTMAX:
                rhi, rlo = _split(tl.load(row_ptr + tix, mask=tmask, other=0.0))
            S = _tile_dot(x_ptr, y_ptr, sx, sy, t64, b64, tmask, bmask, D,
                          BLOCK_N, BLOCK_M, BLOCK_D, PRECISION, UPCAST)
        else:
            xi = blk
            yj = tix
            imask = bmask
            jmask = tmask
            sg = tl.load(sig_ptr + tix, mask=tmask, other=0.0)
            g_c = tl.load(gc_ptr + tix, mask=tmask, other=0.0)
            if LOSS == SOFTMAX:
                chi, clo = _split(tl.load(col_ptr + tix, mask=tmask, other=0.0))
            S = _tile_dot(x_ptr, y_ptr, sx, sy, b64, t64, bmask, tmask, D,
                          BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        z = _logits(S, a, sg, b)
        valid = imask[:, None] & jmask[None, :]
        diag = yj[None, :] == xi[:, None] + off
        # The loss's epilogue: G = dloss/dz (+ g_pos on the positive).
        if LOSS == SOFTMAX:
            G = _softmax_dz(z, g_r, rhi, rlo, g_c, chi, clo)
        else:
            if STATS:
                phi, sgm = _softplus_sigmoid(tl.where(diag, -z, z))
                phi = tl.where(valid, phi, 0.0)
            else:
                sgm = _sigmoid(tl.where(diag, -z, z))
            G = (g_r[:, None] + g_c[None, :]) * tl.where(diag, -sgm, sgm)
        G = tl.where(diag, G + g_p[:, None], G)
        G = tl.where(valid, G, 0.0)
        U = S * rho[:, None] * sg[None, :]        # u: dscale needs no division by s
        if COLS_OUTER:
            tu += tl.sum(G * U, 0).to(tl.float64)
            if STATS:
                st += tl.sum(phi, 0).to(tl.float64)
            W = G * rho[:, None]
            bt = tl.load(tile_ptr + t64[:, None] * stile + dcols[None, :],
                         mask=tmask[:, None] & dmask[None, :], other=0.0)  # x [BLOCK_N, BLOCK_DO]
        else:
            tu += tl.sum(G * U, 1).to(tl.float64)
            tg += tl.sum(G, 1).to(tl.float64)
            if STATS:
                st += tl.sum(phi, 1).to(tl.float64)
            W = G * sg[None, :]
            bt = tl.load(tile_ptr + t64[:, None] * stile + dcols[None, :],
                         mask=tmask[:, None] & dmask[None, :], other=0.0)  # y [BLOCK_N, BLOCK_DO]
        if SCALE_W:
            W = W * wsc
        if UPCAST:
            bt = bt.to(tl.float32)
        else:
            W = W.to(bt.dtype)
        if COLS_OUTER:
            W = tl.trans(W)
        acc = tl.dot(W, bt, acc, input_precision=PRECISION)
    if SCALE_W:
        acc = acc * tl.load(ws_ptr + 1)
    # Fused normalisation backward: <â_i, ∂/∂â_i> = s Σ_j G_ij u_ij = s t_i, so
    # da_i = ra_i·s·(acc_i − t_i·â_i) with â_i = ra_i·a_i needs no reduction over D (the second
    # term only where the norm is at least eps: keep_ptr, the block side's). Not ra_i²·t_i·a_i:
    # ra_i² overflowed fp32 for ra above ~1.8e19 and vanished below ~1e-19, where the gradient
    # is finite (an infinite one at norms ~1e-20 with a small eps, 24% off at norms ~1e25).
    da = acc
    if NORMALIZE:
        ab = tl.load(blk_ptr + b64[:, None] * sblk + dcols[None, :],
                     mask=bmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        kp = tl.load(keep_ptr + blk, mask=bmask, other=0.0)
        da = da - (kp * tu.to(tl.float32))[:, None] * (ra[:, None] * ab)
    da = da * (ra * s)[:, None]
    tl.store(out_ptr + b64[:, None] * sout + dcols[None, :], da.to(out_ptr.dtype.element_ty),
             mask=bmask[:, None] & dmask[None, :])
    if pid_d == 0:
        if not COLS_OUTER:
            tl.store(tu_ptr + blk, tu, mask=bmask)
            tl.store(tg_ptr + blk, tg, mask=bmask)
        if STATS:
            tl.store(stat_ptr + blk, st, mask=bmask)


# --------------------------------------------------------------------------- autotune
# GPU tile configurations: FlashAttention-2-style 64-128 x 64-128 logit tiles, 32-64-wide
# K steps, 4-8 warps, 2-4 pipeline stages; the autotuner measures them on the user's GPU
# and drops those whose shared memory does not fit (OutOfResources). Measured on an H200
# (Triton 3.6, bf16, D = 512; benchmarks/results/cuda-nvidia-h200-notes.md): the backward
# picks 32x64 with BLOCK_DO 512 or 64x64 with 256 and runs at ~71 TFLOP/s, register-bound
# (178-255 registers per thread, one CTA per SM); 64- and 128-row tiles with wider
# accumulators spill at 8 and 16 warps (scripts/triton_resources.py), so they are not
# listed. Register use was also measured before any GPU run: every kernel variant (loss x
# pass x STATS, NORMALIZE=True) compiled offline with triton.compile (Triton 3.9) for sm_90
# and sm_80, with the launcher's specialisation for 16-aligned pointers and sizes, read
# with cuobjdump --dump-resource-usage (now scripts/triton_resources.py). The lists keep
# tiles that compile without spills (or with a few bytes of stack) for bf16 on both
# architectures, plus small tiles for IEEE fp32, whose tl.dot is an fma loop over register
# operands (larger tiles spill kilobytes there, pass B most).
# The forward's BLOCK_M is chosen on the host (it sizes the partial buffer: 128 rows at
# large n, else 64); the rest is autotuned per (n bucket, m bucket, D, precision, loss).
# No spills: 64 x BLOCK_N with 4 or 8 warps and 128 x 64 with 8 warps, bf16 and IEEE fp32,
# both losses; 128 x 128 with 8 warps spills 64 B for the sigmoid on sm_80 only.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=4),
]
# Backward: the fp32 accumulator [BLOCK_M, BLOCK_DO] lives in registers next to the
# [BLOCK_M, BLOCK_N] logit tile. Offline register use (as above; stack bytes, worst of the
# five variants): 64x64, BLOCK_DO 256 or 128, 8 warps: none for bf16 on sm_80 and sm_90
# and for TF32; 64x32x128 with 4 warps: none on sm_90, <= 56 B on sm_80; 32x64x512:
# none on sm_80, <= 8 B on sm_90; 64x32, BLOCK_D 32, BLOCK_DO 64, 4 warps: 8 B for IEEE
# fp32 (64x64x128 spills up to 1.6 KB there). Dropped: 128x64 and 64x128 logit tiles
# (32-120 B on bf16, up to 3.8 KB on fp32) and 4-warp 64x64 tiles (up to 232 B).
# D > BLOCK_DO takes cdiv(D, BLOCK_DO) programs per block, each recomputing the logit
# tiles; 32-row blocks hold a 32x512 accumulator: one program per block up to D = 512,
# at the price of tiles too small for Hopper's 64-row wgmma. The autotuner decides.
# BLOCK_DO is clipped to next_pow2(D) by _prune_bwd.
_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 256},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 512},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_DO": 64},
                  num_warps=4, num_stages=2),
]


def _prune_bwd(configs, named_args, **kwargs):
    """Clip BLOCK_DO to next_pow2(D) (at least 16, tl.dot's minimum) and drop the configs
    that become duplicates: a D = 64 problem benchmarks each distinct tile once."""
    d = named_args["D"] if "D" in named_args else kwargs["D"]
    cap = max(16, triton.next_power_of_2(int(d)))
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        kw["BLOCK_DO"] = min(kw["BLOCK_DO"], cap)
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


# Under TRITON_INTERPRET=1 autotuning is meaningless (and slow): one small fixed config.
# 32 (not 16) keeps the interpreter's per-tile Python overhead down and still leaves the
# test sizes 33 and 70 straddling block edges. Every kernel uses the same 32-wide tiles,
# so each logit tile of the backward sees exactly the forward's operands.
_INTERP_BLOCK = 32

# BLOCK_M is the host's choice (64 or 128 rows by n, in _fwd), not the tuner's: it is part of
# the key, else a configuration tuned for one block height (and kept on disk) was reused for
# the other within one n bucket (n = 16500 and 17000 share the 32768 bucket and differ in
# BLOCK_M), where its shared memory may not fit.
_FWD_KEY = ["n_key", "m_key", "D", "PRECISION", "LOSS", "BLOCK_M"]
_BWD_KEY = ["n_key", "m_key", "D", "PRECISION", "LOSS", "COLS_OUTER", "STATS", "NORMALIZE",
            "SCALE_W"]

# The autotuner's choice is kept on disk (Triton's cache, keyed by Triton's version, the
# GPU architecture, the kernel source, the tuning key and the configurations) where the
# installed Triton can (cache_results, Triton >= 3.4): a first call per shape bucket and
# dtype compiles and benchmarks every configuration, 2.5-30 s measured on an H200
# (benchmarks/results/cuda-nvidia-h200-notes.md); later processes then compile only the
# chosen one, or load it from the compile cache.
_AUTOTUNE_OPTS = ({"cache_results": True}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})

if INTERPRET:
    _fwd_launch = _fwd_kernel
    _bwd_launch = _bwd_kernel
else:
    _fwd_launch = triton.autotune(_FWD_CONFIGS, key=_FWD_KEY, **_AUTOTUNE_OPTS)(_fwd_kernel)
    _bwd_launch = triton.autotune(_BWD_CONFIGS, key=_BWD_KEY,
                                  prune_configs_by={"early_config_prune": _prune_bwd},
                                  **_AUTOTUNE_OPTS)(_bwd_kernel)


# --------------------------------------------------------------------------- launchers
def _check(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor) -> None:
    if loss not in _MERGE:
        raise ValueError(f"the triton kernels implement the losses of codes {sorted(_MERGE)} "
                         f"(clip, siglip), got loss code {loss!r}")
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 features; "
                            f"{name} is {t.dtype} (shape {tuple(t.shape)}, device {t.device}); "
                            f"use backend='cpu', 'cuda' or 'reference' for {t.dtype}")
        if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] != 1):
            raise ValueError(f"{name} must be 2-D with unit stride along D, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if x.shape[1] != y.shape[1] or x.device != y.device or x.dtype != y.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} on {x.device} and y {tuple(y.shape)} "
                         f"{y.dtype} on {y.device} must share D, dtype and device")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"the triton backend runs on CUDA tensors, got x on {x.device}")
    need = 2 if loss == SIGMOID.value else 1
    if params.dim() != 1 or params.numel() < need or params.device != x.device:
        raise ValueError(f"params must be a 1-D tensor of at least {need} element(s) on "
                         f"{x.device} (scale{', bias' if need == 2 else ''}), got shape "
                         f"{tuple(params.shape)} on {params.device}")


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    # Read at every call, as torch.matmul does; only meaningful for fp32 operands.
    from ..backends import tf32_matmul  # noqa: PLC0415  (the registry imports this module lazily)
    if dtype == torch.float32 and tf32_matmul():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _row_stride(t: torch.Tensor) -> int:
    # A [k, 1] tensor may carry any stride along D; rows then step by stride(0) alone.
    return t.stride(0)


def _inv_norms(t: torch.Tensor, normalize: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho [k] fp32 = 1/max(||t_i||, eps) or 1, keep [k] fp32 = 1 where ||t_i|| >= eps)."""
    k, d = t.shape
    if not normalize:
        return (torch.ones(k, dtype=torch.float32, device=t.device),
                torch.zeros(k, dtype=torch.float32, device=t.device))
    out = torch.empty(k, dtype=torch.float32, device=t.device)
    keep = torch.empty(k, dtype=torch.float32, device=t.device)
    br = 16 if INTERPRET else 32
    bd = min(128, max(16, triton.next_power_of_2(d)))
    _inv_norm_kernel[(triton.cdiv(k, br),)](t, _row_stride(t), k, d, float(eps), out, keep,
                                             BLOCK_R=br, BLOCK_D=bd, **_OPTS)
    return out, keep


def _bucket(k: int) -> int:
    return triton.next_power_of_2(max(int(k), 1))


def _on_device(t: torch.Tensor):
    # Triton launches on the *current* CUDA device, not on the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _params(params: torch.Tensor) -> torch.Tensor:
    return params.detach().to(torch.float32).contiguous()


def _pos(loss, x, y, rho, sig, p, pos_offset):
    n, d = x.shape
    pos = _empty((n,), torch.float64, x.device)
    br = 16 if INTERPRET else 64
    bd = min(128, max(16, triton.next_power_of_2(d)))
    _pos_kernel[(triton.cdiv(n, br),)](x, y, _row_stride(x), _row_stride(y), rho, sig, p, n,
                                       y.shape[0], d, int(pos_offset), pos, LOSS=loss,
                                       BLOCK_R=br, BLOCK_D=bd, **_OPTS)
    return pos


def fwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, normalize: bool,
        eps: float, pos_offset: int):
    """Block forward (see fastclip.ops.backends): (row [n], col [m], pos [n]), float64.

    loss: LossSpec.code (SOFTMAX 0: clip, SIGMOID 1: siglip). x [n, D], y [m, D]:
    float32/float16/bfloat16, unit stride along D (any row stride). params: 1-D tensor on
    the features' device, params[0] = scale, params[1] = bias (sigmoid).
    """
    _check(loss, x, y, params)
    with _on_device(x):
        return _fwd(loss, x, y, _params(params), normalize, eps, pos_offset)


def _fwd(loss, x, y, p, normalize, eps, pos_offset):
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    rho = _inv_norms(x, normalize, eps)[0]
    sig = _inv_norms(y, normalize, eps)[0]
    row = _empty((n,), torch.float64, dev)
    col = _empty((m,), torch.float64, dev)
    # 0 where a row's positive is outside [0, m); the kernel writes the others.
    pos = torch.zeros((n,), dtype=torch.float64, device=dev)
    prec, up = _precision(x.dtype), _upcast(x.dtype)
    sx, sy = _row_stride(x), _row_stride(y)

    if INTERPRET:
        bm, fixed = _INTERP_BLOCK, {"BLOCK_N": _INTERP_BLOCK, "BLOCK_D": _INTERP_BLOCK}
    else:
        # 128-row blocks (FA-2 prior) once there are enough of them to fill the GPU.
        bm, fixed = (128 if n >= 128 * 132 else 64), {}
    nblk = triton.cdiv(n, bm)
    softmax = loss == SOFTMAX.value
    per_col = 8 if softmax else 4          # partial bytes per (row block, column)
    wave = max(1, min(nblk, _PARTIAL_BYTES // (per_col * m)))
    f32 = dict(dtype=torch.float32, device=dev)
    pa = torch.empty((wave, m), **f32)
    pb = torch.empty((wave, m), **f32) if softmax else pa
    multi = wave < nblk
    cmax = torch.empty((m,), **f32) if softmax and multi else pa[0]
    # The running sums between waves, float64 (one wave: never read; col, float64, stands in).
    csum = torch.empty((m,), dtype=torch.float64, device=dev) if softmax and multi else col
    bc = 64 if INTERPRET else 256
    for rb0 in range(0, nblk, wave):
        g = min(wave, nblk - rb0)
        _fwd_launch[(g,)](x, y, rho, sig, p, row, pos, pa, pb, n, m, d, sx, sy, int(pos_offset),
                          rb0, _bucket(n), _bucket(m), LOSS=loss, BLOCK_M=bm, PRECISION=prec,
                          UPCAST=up, **fixed, **_OPTS)
        _col_merge_kernel[(triton.cdiv(m, bc),)](pa, pb, g, m, cmax, csum, col, LOSS=loss,
                                                 FIRST=rb0 == 0, LAST=rb0 + g >= nblk,
                                                 BLOCK_C=bc, **_OPTS)
    return row, col, pos


def _g_bound(x, grad_row, grad_col, grad_pos):
    """max|G| <= max|g_row| + max|g_col| + max|g_pos| for both epilogues (|dphi/dz| <= 1,
    exp(z - lse) <= 1): a float64 device scalar, for fp16 only (None otherwise)."""
    if x.dtype != torch.float16 or _upcast(x.dtype):
        return None
    return sum(g.abs().amax().double() for g in (grad_row, grad_col, grad_pos))


def _w_scale(g_bound, side):
    """(2^k, 2^-k) as a float32 device tensor, 2^k·max|W| <= 2^14 with W = G·side (side =
    sigma in pass A, rho in pass B): fp16's range (6e-5 normal .. 65504) then holds W's
    values relative to its maximum down to 2^-28. Torch ops on the device: no host sync."""
    if g_bound is None:
        return None
    e = torch.ceil(torch.log2(g_bound * side.abs().amax().double()))
    k = (14.0 - torch.where(torch.isfinite(e), e, torch.zeros_like(e))).clamp(-120.0, 120.0)
    return torch.stack((torch.exp2(k), torch.exp2(-k))).to(torch.float32)


def _bwd_pass(loss, cols_outer, stats, x, y, rho, sig, p, row, col, gr, gc, gp, ws, keep,
              normalize, pos_offset, prec, up):
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    k = m if cols_outer else n
    out = _empty((k, d), x.dtype, dev)
    tu = _empty((n,), torch.float64, dev) if not cols_outer else None
    tg = _empty((n,), torch.float64, dev) if not cols_outer else None
    st = _empty((k,), torch.float64, dev) if stats else None
    dummy = gr                                 # never read where a buffer is not used
    args = (x, y, _row_stride(x), _row_stride(y), rho, sig, p,
            row if row is not None else dummy, col if col is not None else dummy,
            gr, gc, gp, ws if ws is not None else dummy, keep, out, out.stride(0),
            tu if tu is not None else dummy, tg if tg is not None else dummy,
            st if st is not None else dummy, n, m, d, int(pos_offset), _bucket(n), _bucket(m))
    consts = dict(LOSS=loss, COLS_OUTER=cols_outer, STATS=stats, NORMALIZE=bool(normalize),
                  SCALE_W=ws is not None, PRECISION=prec, UPCAST=up)
    if INTERPRET:
        b_ = _INTERP_BLOCK
        do = min(b_, max(16, triton.next_power_of_2(d)))
        _bwd_launch[(triton.cdiv(k, b_), triton.cdiv(d, do))](
            *args, BLOCK_M=b_, BLOCK_N=b_, BLOCK_D=b_, BLOCK_DO=do, **consts, **_OPTS)
    else:
        grid = lambda META: (triton.cdiv(k, META["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(d, META["BLOCK_DO"]))
        _bwd_launch[grid](*args, **consts, **_OPTS)
    return out, tu, tg, st


def _grads(loss, stats, x, y, p, normalize, eps, pos_offset, row, col, grad_row, grad_col,
           grad_pos):
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    gr, gc, gp = (g.to(**f32).contiguous() for g in (grad_row, grad_col, grad_pos))
    rho, keep_x = _inv_norms(x, normalize, eps)
    sig, keep_y = _inv_norms(y, normalize, eps)
    prec, up = _precision(x.dtype), _upcast(x.dtype)
    gb = _g_bound(x, gr, gc, gp)
    # Pass A (rows of x outer): dx, Σ_j G u and Σ_j G per row (and the row statistics).
    dx, tu, tg, row_out = _bwd_pass(loss, False, stats, x, y, rho, sig, p, row, col, gr, gc,
                                    gp, _w_scale(gb, sig), keep_x, normalize, pos_offset, prec, up)
    # Pass B (rows of y outer): dy (and the column statistics).
    dy, _, _, col_out = _bwd_pass(loss, True, stats, x, y, rho, sig, p, row, col, gr, gc, gp,
                                  _w_scale(gb, rho), keep_y, normalize, pos_offset, prec, up)
    # Σ_ij G_ij u_ij and Σ_ij G_ij: exact for any scale, 0 and negative included.
    dparams = torch.stack((tu.sum(), tg.sum()))[:p.numel()].to(torch.float32)
    return dx, dy, dparams, rho, sig, row_out, col_out


def bwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, normalize: bool,
        eps: float, pos_offset: int, row: torch.Tensor, col: torch.Tensor,
        grad_row: torch.Tensor, grad_col: torch.Tensor, grad_pos: torch.Tensor):
    """Block backward (see fastclip.ops.backends): (dx [n, D], dy [m, D], dparams [P]).

    dx, dy in the dtype of x, y (contiguous); dparams float32, P = params.numel(). row and
    col: the merged float64 statistics (read by the softmax only); grad_row [n],
    grad_col [m], grad_pos [n]: their upstream gradients (any float dtype).
    """
    _check(loss, x, y, params)
    with _on_device(x):
        p = _params(params)
        f64 = dict(dtype=torch.float64, device=x.device)
        row = row.to(**f64).contiguous()
        col = col.to(**f64).contiguous()
        dx, dy, dp, *_ = _grads(loss, False, x, y, p, normalize, eps, pos_offset, row, col,
                                grad_row, grad_col, grad_pos)
        return dx, dy, dp


def fwd_bwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor,
            normalize: bool, eps: float, pos_offset: int, grad_row: torch.Tensor,
            grad_col: torch.Tensor, grad_pos: torch.Tensor):
    """Statistics and gradients of a one-pass loss (the sigmoid) in one launch sequence:
    (row [n], col [m], pos [n], dx [n, D], dy [m, D], dparams [P]); no forward kernel runs.
    grad_row/grad_col/grad_pos: the head's gradients, known before the statistics."""
    _check(loss, x, y, params)
    if loss != SIGMOID.value:
        raise ValueError("fwd_bwd: the softmax (clip) needs its merged statistics for the "
                         "gradient; run fwd, then bwd")
    with _on_device(x):
        p = _params(params)
        dx, dy, dp, rho, sig, row, col = _grads(loss, True, x, y, p, normalize, eps, pos_offset,
                                                None, None, grad_row, grad_col, grad_pos)
        pos = _pos(loss, x, y, rho, sig, p, pos_offset)
        return row, col, pos, dx, dy, dp


# ------------------------------------------------------------------ interpreter probe
@triton.jit
def _probe_kernel(out_ptr, n, BLOCK: tl.constexpr):
    # The constructs the kernels above lean on: a loop bounded by a runtime scalar, a
    # masked block load and a reduction.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        acc += tl.load(out_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def interpreter_problem() -> str:
    """Under TRITON_INTERPRET=1: why Triton's interpreter cannot run the kernels here, or "".

    Triton 3.5's interpreter turns a runtime scalar into an index with ``int()`` of a
    one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); Triton 3.8 and 3.9 do not. A probe kernel finds out once.
    """
    if not INTERPRET:
        return ""
    x = torch.arange(1.0, 6.0)
    try:
        _probe_kernel[(1,)](x, 5, BLOCK=4)
    except Exception as e:   # noqa: BLE001  (any failure of the interpreter is the answer)
        import numpy as np  # noqa: PLC0415
        return (f"Triton {triton.__version__}'s interpreter fails here with NumPy "
                f"{np.__version__} ({type(e).__name__}: {e})")
    if x[0].item() != 15.0:
        return f"Triton {triton.__version__}'s interpreter computed a wrong sum ({x[0].item()})"
    return ""
