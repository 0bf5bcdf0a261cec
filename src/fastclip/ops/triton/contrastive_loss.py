"""Triton kernels of the fused contrastive-loss block (design.md §1-§2).

The block contract (fastclip.ops.backends)::

    L_ij = s * rho_i * sigma_j * <x_i, y_j>
    fwd -> row_lse [n], col_lse [m], pos [n]                   (float32)
    bwd -> dx [n, D], dy [m, D] (input dtype), dscale [] (float32)

Kernels and passes (FLOP in units of 2·n·m·D, the cost of one n x m x D matrix product):

* ``_inv_norm_kernel`` (normalize only): rho = 1/max(||x_i||, eps), sigma likewise.
  O((n+m)·D). Without normalisation rho = sigma = 1 (torch.ones).
* ``_pos_kernel``: pos_i = s·rho_i·sigma_{i+off}·<x_i, y_{i+off}>, a row-wise dot, O(n·D).
* ``_fwd_kernel`` — grid (row blocks of one wave,): a program owns BLOCK_M rows and walks
  every column tile: S = X_blk·Y_tileᵀ (tl.dot, fp32 accumulation, loop over D in
  BLOCK_D chunks), L = s·rho·sigma·S; the row statistics are an exact online
  log-sum-exp in registers; the column statistics of the tile (max over the block's
  rows and the sum of exp relative to it) go to a partial buffer [wave, m] of (max, sum)
  pairs. 1 unit of FLOP.
* ``_col_merge_kernel`` — grid (column blocks,): folds the partial buffer of a wave into
  the running (max, sum) of each column with the exact pairwise log-sum-exp merge and
  finally writes col_lse. The waves bound the partial buffer at _PARTIAL_BYTES whatever
  n and m are (n = m = 262144 would otherwise need 4 GiB of pairs for BLOCK_M=128); the
  merge reads each pair once: 8 bytes per (row block, column), O(n·m/BLOCK_M).
  Chosen over a 64-bit compare-and-swap merge (nondeterministic, contended loops) and
  over a second pass with x and y swapped (+1 unit of FLOP); measured on no GPU yet.
* ``_bwd_kernel`` — launched twice, rows outer (A: dx) and, with the roles of x and y
  swapped, columns outer (B: dy); grid (row blocks, D / BLOCK_DO). A program recomputes
  each tile of L over the full D, forms
      G = g_row·exp(L − row_lse) + g_col·exp(L − col_lse) + g_pos·[j == i + off]
  and accumulates acc += (G·sigma)·Y[:, d-chunk] in registers (tensor cores on the
  input dtype), plus t_i = Σ_j G_ij L_ij. The epilogue is fused:
      dx_i = rho_i·s·acc_i − rho_i²·t_i·x_i
  because <x̂_i, ∂/∂x̂_i> = Σ_j G_ij L_ij = t_i: the normalisation backward needs no
  reduction over D and no fp32 scratch of [n, D]. dscale = Σ_i t_i / s from pass A
  (a deterministic torch.sum; no atomics anywhere, results are bitwise reproducible).
  FLOP per kernel: P·1 (recompute, P = cdiv(D, BLOCK_DO) programs per row block) + 1
  (gradient product); backward = 2·(P + 1) units, 4 for D ≤ BLOCK_DO. Forward+backward
  = 5 units for D ≤ BLOCK_DO against the floor of 4 (design.md §2); the extra unit buys
  deterministic, atomic-free gradients. BLOCK_DO is at most 256 (512 with 32-row blocks):
  register capacity, see _BWD_CONFIGS. Wider D pays P > 1 (D = 1024: P = 4, 11 units in
  all); the remedy for D > 512 is a variant that writes the G tiles of a row chunk in the
  input dtype and hands the two gradient products to cuBLAS (3-4 units of backward at
  any D) — not written: it needs GPU measurements (split-K behaviour of the skinny products,
  chunk size vs memory) that were not possible here.

Precision: statistics and accumulation in fp32; bf16/fp16 operands go to tensor cores
as they are; the probabilities·sigma tile is cast to the input dtype for the gradient
product (as FlashAttention does with P). fp32 inputs use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is True at call time, IEEE fp32 otherwise.
The scale is read from its 0-dim device tensor inside the kernels (no host sync).
Every logsumexp uses a running maximum (no fixed shift), so any scale and any cosine
range is exact.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["fwd", "bwd", "INTERPRET"]

# Evaluated once, at import: the @triton.jit decorators below have already chosen
# interpreter or compiler by then (pitfalls.md).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Upper bound on the forward's partial column statistics ((max, sum) fp32 pairs, one row
# per row block of a wave). 512 MiB keeps >= 256 row blocks per wave (about two CTAs per
# SM on an H100) up to m = 262144, and the whole forward within the 1 GiB budget of the
# large-N test. Unmeasured prior.
_PARTIAL_BYTES = 512 << 20

# Debug hook for tests: allocate every output filled with NaN so that a test can prove
# that the kernels write each element (the poisoned-output check).
POISON_OUTPUTS = False

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _tile_dot(a_ptr, b_ptr, sa, sb, rows, cols, rmask, cmask, D,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """S = A[rows] · B[cols]ᵀ over the full D, fp32 accumulation. Rows/cols int64."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        a = tl.load(a_ptr + rows[:, None] * sa + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * sb + ks[:, None],
                    mask=cmask[None, :] & kmask[:, None], other=0.0)      # [BLOCK_D, BLOCK_N]
        if UPCAST:   # the interpreter's tl.dot is wrong on bf16 (pitfalls.md)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _inv_norm_kernel(x_ptr, sx, n, D, eps, out_ptr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    ss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + r64[:, None] * sx + ks[None, :],
                    mask=rmask[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(v * v, 1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(ss), eps), mask=rmask)


@triton.jit
def _pos_kernel(x_ptr, y_ptr, sx, sy, rho_ptr, sig_ptr, scale_ptr, n, m, D, off, pos_ptr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n
    j = rows + off
    valid = rmask & (j >= 0) & (j < m)
    r64 = rows.to(tl.int64)
    j64 = tl.where(valid, j, 0).to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        km = (ks < D)[None, :]
        a = tl.load(x_ptr + r64[:, None] * sx + ks[None, :], mask=valid[:, None] & km, other=0.0)
        b = tl.load(y_ptr + j64[:, None] * sy + ks[None, :], mask=valid[:, None] & km, other=0.0)
        dot += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    s = tl.load(scale_ptr).to(tl.float32)
    rho = tl.load(rho_ptr + rows, mask=valid, other=0.0)
    sig = tl.load(sig_ptr + j64, mask=valid, other=0.0)
    tl.store(pos_ptr + rows, tl.where(valid, s * rho * sig * dot, 0.0), mask=rmask)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, rho_ptr, sig_ptr, scale_ptr, row_lse_ptr, pmax_ptr, psum_ptr,
                n, m, D, sx, sy, rb0, n_key, m_key,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # n_key, m_key: power-of-two buckets of n, m, only read by the autotuner's key.
    pid = tl.program_id(0)                      # row block rb0 + pid, partial row pid
    rows = (rb0 + pid) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    s = tl.load(scale_ptr).to(tl.float32)
    rs = tl.load(rho_ptr + rows, mask=rmask, other=0.0) * s
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    prow = pid.to(tl.int64) * m
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < m
        c64 = cols.to(tl.int64)
        sg = tl.load(sig_ptr + cols, mask=cmask, other=0.0)
        acc = _tile_dot(x_ptr, y_ptr, sx, sy, r64, c64, rmask, cmask, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        L = acc * rs[:, None] * sg[None, :]
        L = tl.where(rmask[:, None] & cmask[None, :], L, float("-inf"))
        # rows: online log-sum-exp. A max of -inf (padding rows only) is replaced by 0 so
        # that exp(-inf - (-inf)) never forms a NaN.
        m_new = tl.maximum(m_i, tl.max(L, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(L - m_use[:, None]), 1)
        m_i = m_new
        # columns: this block's (max, sum of exp relative to it), merged later.
        cm = tl.max(L, 0)
        cm_use = tl.where(cm == float("-inf"), 0.0, cm)
        cs = tl.sum(tl.exp(L - cm_use[None, :]), 0)
        tl.store(pmax_ptr + prow + cols, cm, mask=cmask)
        tl.store(psum_ptr + prow + cols, cs, mask=cmask)
    # padding rows have l_i = 0: log(1) keeps them finite (they are not stored). The
    # statistic is float64 (the max exact, log(l) small): see fastclip.ops.losses.STAT_DTYPE.
    tl.store(row_lse_ptr + rows, m_i.to(tl.float64) + tl.log(tl.where(rmask, l_i, 1.0).to(tl.float64)),
             mask=rmask)


@triton.jit
def _col_merge_kernel(pmax_ptr, psum_ptr, g, m, cmax_ptr, csum_ptr, col_lse_ptr,
                      FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < m
    if FIRST:
        mx = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
        sm = tl.zeros((BLOCK_C,), dtype=tl.float32)
    else:
        mx = tl.load(cmax_ptr + cols, mask=cmask, other=0.0)
        sm = tl.load(csum_ptr + cols, mask=cmask, other=0.0)
    pm_ptrs = pmax_ptr + cols      # stepped by m per partial row: 64-bit pointer arithmetic
    ps_ptrs = psum_ptr + cols
    for _ in range(0, g):
        pm = tl.load(pm_ptrs, mask=cmask, other=0.0)
        ps = tl.load(ps_ptrs, mask=cmask, other=0.0)
        pm_ptrs += m
        ps_ptrs += m
        new = tl.maximum(mx, pm)
        use = tl.where(new == float("-inf"), 0.0, new)
        sm = sm * tl.exp(mx - use) + ps * tl.exp(pm - use)
        mx = new
    if LAST:
        tl.store(col_lse_ptr + cols, mx.to(tl.float64) + tl.log(tl.where(cmask, sm, 1.0).to(tl.float64)),
                 mask=cmask)
    else:
        tl.store(cmax_ptr + cols, mx, mask=cmask)
        tl.store(csum_ptr + cols, sm, mask=cmask)


@triton.jit
def _bwd_kernel(a_ptr, b_ptr, sa, sb, ra_ptr, rb_ptr, scale_ptr, lse_a_ptr, lse_b_ptr,
                ga_ptr, gb_ptr, gp_ptr, da_ptr, sda, t_ptr, na, nb, D, off, n_key, m_key,
                POS_BY_ROW: tl.constexpr, NORMALIZE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Rows of A outer: da = d/dA Σ G∘L, t = Σ_cols G∘L. Pass A: (A, B) = (x, y);
    pass B: (A, B) = (y, x), lse/g swapped, the positive at col == row + off (off negated
    by the caller) with its coefficient indexed by the column (POS_BY_ROW=False)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < na
    r64 = rows.to(tl.int64)
    s = tl.load(scale_ptr).to(tl.float32)
    ra = tl.load(ra_ptr + rows, mask=rmask, other=0.0)
    rs = ra * s
    # float64 statistics as hi + lo: exp((L - hi) - lo) keeps their precision.
    lse_a64 = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0)
    lse_a = lse_a64.to(tl.float32)
    lse_a_lo = (lse_a64 - lse_a.to(tl.float64)).to(tl.float32)
    g_a = tl.load(ga_ptr + rows, mask=rmask, other=0.0)
    if POS_BY_ROW:
        gp_a = tl.load(gp_ptr + rows, mask=rmask, other=0.0)
    dcols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dmask = dcols < D
    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, nb, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < nb
        c64 = cols.to(tl.int64)
        rb = tl.load(rb_ptr + cols, mask=cmask, other=0.0)
        lse_b64 = tl.load(lse_b_ptr + cols, mask=cmask, other=0.0)
        lse_b = lse_b64.to(tl.float32)
        lse_b_lo = (lse_b64 - lse_b.to(tl.float64)).to(tl.float32)
        g_b = tl.load(gb_ptr + cols, mask=cmask, other=0.0)
        S = _tile_dot(a_ptr, b_ptr, sa, sb, r64, c64, rmask, cmask, D,
                      BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
        U = S * ra[:, None] * rb[None, :]          # unscaled: dscale needs no division by s
        L = U * s
        G = (g_a[:, None] * tl.exp((L - lse_a[:, None]) - lse_a_lo[:, None])
             + g_b[None, :] * tl.exp((L - lse_b[None, :]) - lse_b_lo[None, :]))
        diag = cols[None, :] == rows[:, None] + off
        if POS_BY_ROW:
            G += tl.where(diag, gp_a[:, None], 0.0)
        else:
            gp_b = tl.load(gp_ptr + cols, mask=cmask, other=0.0)
            G += tl.where(diag, gp_b[None, :], 0.0)
        G = tl.where(rmask[:, None] & cmask[None, :], G, 0.0)
        t += tl.sum(G * U, 1)
        bt = tl.load(b_ptr + c64[:, None] * sb + dcols[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)     # [BLOCK_N, BLOCK_DO]
        W = G * rb[None, :]
        if UPCAST:
            bt = bt.to(tl.float32)
        else:
            W = W.to(bt.dtype)
        acc = tl.dot(W, bt, acc, input_precision=PRECISION)
    # Fused normalisation backward: <â_i, ∂/∂â_i> = s Σ_j G_ij U_ij = s t_i, so
    # da_i = ra_i·s·acc_i − ra_i²·s·t_i·a_i needs no reduction over D.
    da = acc * rs[:, None]
    if NORMALIZE:
        at = tl.load(a_ptr + r64[:, None] * sa + dcols[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        da = da - (ra * ra * t * s)[:, None] * at
    tl.store(da_ptr + r64[:, None] * sda + dcols[None, :], da.to(da_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(t_ptr + rows, t, mask=rmask)


# --------------------------------------------------------------------------- autotune
# GPU tile configurations. UNMEASURED PRIORS (no GPU was available when they were
# written): FlashAttention-2-style tiles, 128x64 / 128x128 logit tiles with 64-wide K
# steps, 4-8 warps, 2-4 pipeline stages; sizes whose shared memory does not fit on
# Ampere (164 KB) or Hopper (227 KB) are dropped by the autotuner (OutOfResources).
# The forward's BLOCK_M is chosen on the host (it sizes the partial buffer); the rest is
# autotuned per (n bucket, m bucket, D, input dtype, precision).
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
]
# Backward: the fp32 accumulator [BLOCK_M, BLOCK_DO] lives in registers next to the
# [BLOCK_M, BLOCK_N] logit tile. Register use was checked offline (triton.compile for
# sm_90 and sm_80 + cuobjdump --dump-resource-usage, no GPU): 64x64 tiles with
# BLOCK_DO=256 and 8 warps compile without spills for bf16 (sm_80, sm_90) and fp32
# (sm_90); 128x64x256 spilled 168-520 bytes of stack and was dropped; BLOCK_DO=512 spills
# with 8 or 16 warps, hence BLOCK_DO <= 256 (D > 256 takes cdiv(D, BLOCK_DO) programs per
# row block, each recomputing the logit tiles). Speeds are unmeasured priors.
# BLOCK_DO is clipped to next_pow2(D) by _prune_bwd.
_BWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 256},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 128},
                  num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_DO": 128},
                  num_warps=4, num_stages=3),
    # 32-row blocks hold a 32x512 accumulator without spilling (8 B of stack on sm_90,
    # none on sm_80): one program per row block up to D = 512 (no recompute per D chunk),
    # at the price of tiles too small for Hopper's 64-row wgmma. The autotuner decides.
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_DO": 512},
                  num_warps=8, num_stages=2),
]


def _prune_bwd(configs, named_args, **kwargs):
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
# test sizes 33 and 70 straddling block edges.
_INTERP_BLOCK = 32

if INTERPRET:
    _fwd_launch = _fwd_kernel
    _bwd_launch = _bwd_kernel
else:
    _fwd_launch = triton.autotune(_FWD_CONFIGS, key=["n_key", "m_key", "D", "PRECISION"])(
        _fwd_kernel)
    _bwd_launch = triton.autotune(_BWD_CONFIGS, key=["n_key", "m_key", "D", "PRECISION",
                                                      "POS_BY_ROW", "NORMALIZE"],
                                  prune_configs_by={"early_config_prune": _prune_bwd})(
        _bwd_kernel)


# --------------------------------------------------------------------------- launchers
def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 features; "
                            f"{name} is {t.dtype} (shape {tuple(t.shape)}, device {t.device}); "
                            f"use backend='cpu', 'cuda' or 'reference' for {t.dtype}")
        if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] != 1):
            raise ValueError(f"{name} must be 2-D with unit stride along D, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"the triton backend runs on CUDA tensors, got x on {x.device}")


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype: torch.dtype) -> str:
    # Read at every call, as torch.matmul does; only meaningful for fp32 operands.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _row_stride(t: torch.Tensor) -> int:
    # A [k, 1] tensor may carry any stride along D; rows then step by stride(0) alone.
    return t.stride(0)


def _inv_norms(t: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    k, d = t.shape
    if not normalize:
        return torch.ones(k, dtype=torch.float32, device=t.device)
    out = torch.empty(k, dtype=torch.float32, device=t.device)
    br = 16 if INTERPRET else 32
    bd = min(128, max(16, triton.next_power_of_2(d)))
    _inv_norm_kernel[(triton.cdiv(k, br),)](t, _row_stride(t), k, d, float(eps), out,
                                             BLOCK_R=br, BLOCK_D=bd)
    return out


def _bucket(k: int) -> int:
    return triton.next_power_of_2(max(int(k), 1))


def _on_device(t: torch.Tensor):
    # Triton launches on the *current* CUDA device, not on the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, normalize: bool, eps: float,
        pos_offset: int):
    """Block forward (see fastclip.ops.backends): (row_lse [n], col_lse [m], pos [n]), fp32.

    x [n, D], y [m, D]: float32/float16/bfloat16, unit stride along D (any row stride);
    scale: 0-dim float32 tensor on the same device.
    """
    _check(x, y)
    with _on_device(x):
        return _fwd(x, y, scale, normalize, eps, pos_offset)


def _fwd(x, y, scale, normalize, eps, pos_offset):
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    scale = scale.reshape(()).to(device=dev, dtype=torch.float32)
    rho = _inv_norms(x, normalize, eps)
    sig = _inv_norms(y, normalize, eps)
    row_lse = _empty((n,), torch.float64, dev)
    col_lse = _empty((m,), torch.float64, dev)
    pos = _empty((n,), torch.float32, dev)
    prec, up = _precision(x.dtype), _upcast(x.dtype)
    sx, sy = _row_stride(x), _row_stride(y)

    br = 16 if INTERPRET else 64
    bd = min(128, max(16, triton.next_power_of_2(d)))
    _pos_kernel[(triton.cdiv(n, br),)](x, y, sx, sy, rho, sig, scale, n, m, d, int(pos_offset),
                                       pos, BLOCK_R=br, BLOCK_D=bd)

    if INTERPRET:
        bm, fixed = _INTERP_BLOCK, {"BLOCK_N": _INTERP_BLOCK, "BLOCK_D": _INTERP_BLOCK}
    else:
        # 128-row blocks (FA-2 prior) once there are enough of them to fill the GPU.
        bm, fixed = (128 if n >= 128 * 132 else 64), {}
    nblk = triton.cdiv(n, bm)
    wave = max(1, min(nblk, _PARTIAL_BYTES // (8 * m)))
    pmax = torch.empty((wave, m), dtype=torch.float32, device=dev)
    psum = torch.empty((wave, m), dtype=torch.float32, device=dev)
    cmax = torch.empty((m,), dtype=torch.float32, device=dev) if wave < nblk else pmax[0]
    csum = torch.empty((m,), dtype=torch.float32, device=dev) if wave < nblk else psum[0]
    bc = 64 if INTERPRET else 256
    for rb0 in range(0, nblk, wave):
        g = min(wave, nblk - rb0)
        _fwd_launch[(g,)](x, y, rho, sig, scale, row_lse, pmax, psum, n, m, d, sx, sy, rb0,
                          _bucket(n), _bucket(m), BLOCK_M=bm, PRECISION=prec, UPCAST=up,
                          **fixed)
        _col_merge_kernel[(triton.cdiv(m, bc),)](pmax, psum, g, m, cmax, csum, col_lse,
                                                 FIRST=rb0 == 0, LAST=rb0 + g >= nblk,
                                                 BLOCK_C=bc)
    return row_lse, col_lse, pos


def _bwd_pass(a, b, ra, rb, scale, lse_a, lse_b, g_a, g_b, g_p, off, pos_by_row, normalize,
              prec, up):
    na, d = a.shape
    nb = b.shape[0]
    da = _empty((na, d), a.dtype, a.device)
    t = _empty((na,), torch.float32, a.device)
    args = (a, b, _row_stride(a), _row_stride(b), ra, rb, scale, lse_a, lse_b, g_a, g_b, g_p,
            da, da.stride(0), t, na, nb, d, int(off), _bucket(na), _bucket(nb))
    consts = dict(POS_BY_ROW=pos_by_row, NORMALIZE=bool(normalize), PRECISION=prec, UPCAST=up)
    if INTERPRET:
        b_ = _INTERP_BLOCK
        do = min(b_, max(16, triton.next_power_of_2(d)))
        _bwd_launch[(triton.cdiv(na, b_), triton.cdiv(d, do))](
            *args, BLOCK_M=b_, BLOCK_N=b_, BLOCK_D=b_, BLOCK_DO=do, **consts)
    else:
        grid = lambda META: (triton.cdiv(na, META["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(d, META["BLOCK_DO"]))
        _bwd_launch[grid](*args, **consts)
    return da, t


def bwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, normalize: bool, eps: float,
        pos_offset: int, row_lse: torch.Tensor, col_lse: torch.Tensor, grad_row: torch.Tensor,
        grad_col: torch.Tensor, grad_pos: torch.Tensor):
    """Block backward (see fastclip.ops.backends): (dx [n, D], dy [m, D], dscale []).

    dx, dy in the dtype of x, y (contiguous); dscale 0-dim float32. The statistics and
    upstream gradients are float32 vectors ([n], [m], [n], [m], [n]).
    """
    _check(x, y)
    with _on_device(x):
        return _bwd(x, y, scale, normalize, eps, pos_offset, row_lse, col_lse, grad_row,
                    grad_col, grad_pos)


def _bwd(x, y, scale, normalize, eps, pos_offset, row_lse, col_lse, grad_row, grad_col,
         grad_pos):
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    scale = scale.reshape(()).to(**f32)
    f64 = dict(dtype=torch.float64, device=dev)
    row_lse, col_lse = row_lse.to(**f64).contiguous(), col_lse.to(**f64).contiguous()
    grad_row, grad_col = grad_row.to(**f32).contiguous(), grad_col.to(**f32).contiguous()
    grad_pos = grad_pos.to(**f32).contiguous()
    rho = _inv_norms(x, normalize, eps)
    sig = _inv_norms(y, normalize, eps)
    prec, up = _precision(x.dtype), _upcast(x.dtype)
    # Pass A (rows of x outer): dx and t_i = Σ_j G_ij L_ij.
    dx, t = _bwd_pass(x, y, rho, sig, scale, row_lse, col_lse, grad_row, grad_col, grad_pos,
                      pos_offset, True, normalize, prec, up)
    # Pass B (rows of y outer): the positive of y-row j is x-row j - pos_offset.
    dy, _ = _bwd_pass(y, x, sig, rho, scale, col_lse, row_lse, grad_col, grad_row, grad_pos,
                      -pos_offset, False, normalize, prec, up)
    dscale = t.sum()             # Σ_ij G_ij U_ij: exact for any scale, 0 included
    return dx, dy, dscale
