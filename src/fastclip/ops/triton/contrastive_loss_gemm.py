"""The fused contrastive-loss block with the gradient products on the vendor GEMM: the
kernels and launchers of the ``gemm`` backend (fastclip.ops.backends.gemm).

Same block contract, same epilogues and the same logit helpers as the fused kernels of
``contrastive_loss.py`` beside this file (read its docstring first); what differs is where
the two gradient products run. The fused backward keeps each block's gradient in
registers and walks every tile twice (pass A for dx, pass B for dy: 4 units of
2·n·m·D FLOP for the sigmoid, 5 for the softmax); a [BLOCK_M, D] fp32 accumulator beside
the logit tile holds 178-255 registers per thread at D = 512, one CTA per SM, ~71 TFLOP/s
on an H200 (benchmarks/results/cuda-nvidia-h200-notes.md). Here the rows go by in chunks
of R rows, and each chunk takes three steps:

1. ``_grad_tile_kernel`` — grid (m / BLOCK_N, R / BLOCK_M): one program per logit tile.
   S = X_tile·Y_tileᵀ by ``_tile_dot`` (the forward's helper, operands and K order: every
   logit rounded as the forward rounds it), z by ``_logits``, G by the loss's epilogue,
   then Ĝ = G·rho_i·sigma_j (times 2^k for fp16, see below) stored in the input dtype
   into the chunk's buffer [R, m]; per-tile fp32 partial sums: rows Σ_j G u, Σ_j G (and
   Σ_j phi for a one-pass loss) into [m / BLOCK_N, R], columns Σ_i G u (and Σ_i phi)
   into [R / BLOCK_M, m], added up in float64 by torch (deterministic, no atomics).
   1 unit of FLOP; the buffer is written once and read twice.
2. dX rows of the chunk: Ĝ·Y, one GEMM [R, m] x [m, D] with fp32 output (torch.mm:
   cuBLAS on a GPU), then the normalisation backward in torch, O(R·D):
   dx_i = s·(ĜY)_i − s·rho_i²·(Σ_j G u)_i·x_i (the second term only with normalize, and
   not where eps clamps the norm).
3. dY: += Ĝᵀ·X_chunk, one GEMM [m, R] x [R, D] into an fp32 accumulator [m, D]; after the
   last chunk dy_j = s·acc_j − s·sigma_j²·(Σ_i G u)_j·y_j.

FLOP: 1 unit per step, 3 in all: the floor of a one-pass loss (the sigmoid: no forward
kernel), 4 for the softmax (its forward is the fused forward kernel of contrastive_loss.py,
which also gives the merged statistics the gradient needs). Memory: the chunk buffer
(R·m elements, R chosen so that it stays within _CHUNK_BYTES, at least one 128-row
block), the fp32 dY accumulator and one fp32 GEMM result ([m, D] each; fp32 inputs
beyond _GROUP chunks add the group's sum) and O(n + m) statistics: O(m·D + chunk),
never n x m. Against the fused backend: the same epilogues on a bounded slice of the
logit matrix in exchange for tensor-core GEMMs at vendor speed.

Precision: the logits, G and every statistic as in the fused kernels (fp32 tiles, float64
sums of per-tile fp32 partials). Ĝ is rounded to the input dtype for the GEMMs, as the
fused kernels round their W tile; the GEMMs accumulate in fp32 (bf16/fp16 inputs: an fp32
output, ``torch.mm(..., out_dtype=torch.float32)``; fp32: IEEE or TF32 by
torch's TF32 setting, as the Triton tiles). fp16 scales Ĝ by a power
of two so that max|Ĝ| <= 2^14 (|G| ~ 1/N would otherwise fall below fp16's normal range
at large N), the GEMM results unscaled in fp32. dY sums its chunks in fp32 in two levels
(groups of _GROUP chunks for fp32 inputs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .contrastive_loss import (
    _AUTOTUNE_OPTS,
    _INTERP_BLOCK,
    _OPTS,
    INTERPRET,
    SIGMOID,
    SOFTMAX,
    _bucket,
    _check,
    _empty,
    _g_bound,
    _inv_norms,
    _logits,
    _on_device,
    _params,
    _pos,
    _precision,
    _row_stride,
    _sigmoid,
    _softmax_dz,
    _softplus_sigmoid,
    _split,
    _tile_dot,
    _upcast,
    _w_scale,
)
from .contrastive_loss import fwd as _fused_fwd

__all__ = ["fwd", "bwd", "fwd_bwd", "chunk_rows"]

# Bytes of one chunk's gradient buffer Ĝ [R, m]. 256 MiB: R = 4096 rows of bf16 at
# m = 32768 (8 chunks at n = 32768), so that each GEMM is large enough to run at the
# tensor cores' rate ([4096, 32768] x [32768, 512]) while the buffer stays a small part of
# what the N x N logits would take (2 GiB in bf16 at n = m = 32768). Unmeasured prior.
_CHUNK_BYTES = 256 << 20

# The smallest tile side among the configurations below: the partial-sum buffers are sized
# for it and zeroed (a larger tile leaves its extra partial rows at zero; the autotuner
# re-zeroes them between the configurations it measures: reset_to_zero below).
_MIN_BLOCK = _INTERP_BLOCK if INTERPRET else 64


@triton.jit
def _grad_tile_kernel(x_ptr, y_ptr, sx, sy, rho_ptr, sig_ptr, p_ptr, row_ptr, col_ptr,
                      gr_ptr, gc_ptr, gp_ptr, ws_ptr, g_ptr, r0, R, m, D, off, sp,
                      rgu_ptr, rg_ptr, rphi_ptr, cgu_ptr, cphi_ptr, r_key, m_key,
                      LOSS: tl.constexpr, STATS: tl.constexpr, SCALE_W: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One logit tile of the chunk of rows [r0, r0 + R): Ĝ = G·rho·sigma (·2^k) into
    g_ptr [R, m] (row stride m), and this tile's partial sums: rows (Σ_j G u, Σ_j G,
    Σ_j phi) at [pid_n, :R] (row stride sp >= R), columns (Σ_i G u, Σ_i phi) at
    [pid_m, m]. r_key, m_key:
    power-of-two buckets of R and m, read by the autotuner's key only."""
    pid_n = tl.program_id(0)      # column tiles on axis 0: axis 1 stops at 65535 tiles
    pid_m = tl.program_id(1)
    lr = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # rows of the chunk
    rmask = lr < R
    rows = r0 + lr
    r64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < m
    c64 = cols.to(tl.int64)
    s = tl.load(p_ptr).to(tl.float32)
    b = 0.0
    if LOSS == SIGMOID:
        b = tl.load(p_ptr + 1).to(tl.float32)
    rho = tl.load(rho_ptr + rows, mask=rmask, other=0.0)
    sg = tl.load(sig_ptr + cols, mask=cmask, other=0.0)
    g_r = tl.load(gr_ptr + rows, mask=rmask, other=0.0)
    g_c = tl.load(gc_ptr + cols, mask=cmask, other=0.0)
    g_p = tl.load(gp_ptr + rows, mask=rmask, other=0.0)
    S = _tile_dot(x_ptr, y_ptr, sx, sy, r64, c64, rmask, cmask, D,
                  BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, UPCAST)
    z = _logits(S, rho * s, sg, b)
    # Ordered so that few [BLOCK_M, BLOCK_N] tiles are live at once (a 128 x 128 fp32 tile
    # is 64 registers per thread at 8 warps): S dies into U (as in _bwd_kernel: u needs no
    # division by s), z into G, phi into its sums right away.
    U = S * rho[:, None] * sg[None, :]
    valid = rmask[:, None] & cmask[None, :]
    diag = cols[None, :] == rows[:, None] + off
    # The loss's epilogue: G = dloss/dz (+ g_pos on the positive), as in _bwd_kernel.
    if LOSS == SOFTMAX:
        rhi, rlo = _split(tl.load(row_ptr + rows, mask=rmask, other=0.0))
        chi, clo = _split(tl.load(col_ptr + cols, mask=cmask, other=0.0))
        G = _softmax_dz(z, g_r, rhi, rlo, g_c, chi, clo)
    else:
        if STATS:
            phi, sgm = _softplus_sigmoid(tl.where(diag, -z, z))
            phi = tl.where(valid, phi, 0.0)
            tl.store(rphi_ptr + pid_n * sp + lr, tl.sum(phi, 1), mask=rmask)
            tl.store(cphi_ptr + pid_m * m + c64, tl.sum(phi, 0), mask=cmask)
        else:
            sgm = _sigmoid(tl.where(diag, -z, z))
        G = (g_r[:, None] + g_c[None, :]) * tl.where(diag, -sgm, sgm)
    G = tl.where(diag, G + g_p[:, None], G)
    G = tl.where(valid, G, 0.0)
    GU = G * U                                             # G·u: dscale, and the norms' term
    tl.store(rgu_ptr + pid_n * sp + lr, tl.sum(GU, 1), mask=rmask)
    tl.store(rg_ptr + pid_n * sp + lr, tl.sum(G, 1), mask=rmask)
    tl.store(cgu_ptr + pid_m * m + c64, tl.sum(GU, 0), mask=cmask)
    W = G * rho[:, None] * sg[None, :]
    if SCALE_W:
        W = W * tl.load(ws_ptr)
    tl.store(g_ptr + lr.to(tl.int64)[:, None] * m + c64[None, :],
             W.to(g_ptr.dtype.element_ty), mask=valid)


# GPU tile configurations: GEMM tiles of 64-128 x 64-128 with 32-64-wide K steps; the
# autotuner measures them on the user's GPU and drops those whose shared memory does not
# fit (OutOfResources). Unmeasured on a GPU so far; register use compiled offline for sm_90
# with Triton 3.6 (scripts/triton_resources.py --pass gemm; bf16, D = 512; registers per
# thread / stack bytes, worst of the three variants): 128x128 at 8 warps 255 / 160 for the
# softmax (its two exps), 255 / 0-8 for the sigmoid; 128x64 and 64x128 at 8 warps 179-226 / 0;
# 64x64 at 4 warps 168-212 / 0. The same 128x64 and 64x128 tiles at 4 warps hit the 255
# cap (up to 112 bytes of stack), and 128x128 at 16 warps the 128 cap (up to 136 bytes): not
# listed. Every dot is a wgmma on sm_90. Recompiled with Triton 3.9.0: 128x128 now spills more,
# 208 bytes for the softmax and 568-592 for the sigmoid's statistics form (the form the
# one-pass loss runs), the other tiles still none; the autotuner, which times every listed
# tile on the user's GPU, then prefers a smaller tile where the spill costs more than the
# larger tile saves (Triton's version comes with torch's CUDA build).
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
]
assert min(min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _CONFIGS) >= _MIN_BLOCK

_KEY = ["r_key", "m_key", "D", "PRECISION", "LOSS", "STATS", "SCALE_W"]
_PARTIALS = ["rgu_ptr", "rg_ptr", "rphi_ptr", "cgu_ptr", "cphi_ptr"]

# Below this many logits per chunk (power-of-two buckets: 2048 x 2048) the chunk is a few
# microseconds of work whatever the tile, and benchmarking five compiled configurations
# would cost seconds on the first call of every shape bucket: the small tile only.
_SMALL_LOGITS = 1 << 22


def _prune(configs, named_args, **kwargs):
    """All configurations for a large chunk; the 64 x 64 one for a small chunk."""
    args = {**named_args, **kwargs}
    if int(args["r_key"]) * int(args["m_key"]) > _SMALL_LOGITS:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 64]

if INTERPRET:
    _grad_tile_launch = _grad_tile_kernel
else:
    _grad_tile_launch = triton.autotune(_CONFIGS, key=_KEY, reset_to_zero=_PARTIALS,
                                        prune_configs_by={"early_config_prune": _prune},
                                        **_AUTOTUNE_OPTS)(_grad_tile_kernel)


# ------------------------------------------------------------------------------- GEMMs
@functools.lru_cache(maxsize=None)
def _out_dtype_mm_probe(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return False
    a = torch.ones((1, 1), dtype=dtype, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _out_dtype_mm(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch.mm takes out_dtype=torch.float32 for ``dtype`` (16-bit) inputs on
    ``device`` (PyTorch's CUDA GEMM does; its CPU build does not register it). Asked at
    every call for fp16: PyTorch refuses an fp32 output for fp16 inputs while
    ``torch.backends.cuda.matmul.allow_fp16_accumulation`` is set, a flag a trainer may
    flip at any time."""
    if dtype == torch.float16 and _fp16_accumulation():
        return False
    return _out_dtype_mm_probe(device, dtype)


def _fp16_accumulation() -> bool:
    return bool(getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False))


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [k, l] @ b [l, q] -> fp32 [k, q] with fp32 accumulation. 16-bit inputs stay 16-bit
    for the tensor cores where torch.mm has an fp32 output; elsewhere (the CPU, for the
    interpreter's tests) they are widened first: bf16/fp16 products are exact in fp32, so
    both sum the same exact products in fp32."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _out_dtype_mm(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


# Chunks per group of the dY sum (two-level: see _grads).
_GROUP = 32


# Row tiles run on grid axis 1, which stops at 65535: a chunk holds at most 65535 tiles of the
# smallest tile height (64 rows), rounded down to a multiple of 128. The byte bound alone gave
# R = 4,194,304 rows for m <= 16 fp32 columns (65,536 tiles of 64: the launch failed).
_MAX_CHUNK_ROWS = (65535 * 64) // 128 * 128


def chunk_rows(n: int, m: int, itemsize: int) -> int:
    """Rows per chunk: the chunk buffer [R, m] within _CHUNK_BYTES, a multiple of 128 (at
    least 128: one block of the largest tile), at most _MAX_CHUNK_ROWS and at most n."""
    r = max(128, (_CHUNK_BYTES // max(1, m * itemsize)) // 128 * 128)
    return min(n, r, _MAX_CHUNK_ROWS)


# --------------------------------------------------------------------------- launchers
def _grads(loss, stats, x, y, p, normalize, eps, pos_offset, row, col, grad_row, grad_col,
           grad_pos):
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    f64 = dict(dtype=torch.float64, device=dev)
    gr, gc, gp = (g.to(**f32).contiguous() for g in (grad_row, grad_col, grad_pos))
    rho, keep_x = _inv_norms(x, normalize, eps)
    sig, keep_y = _inv_norms(y, normalize, eps)
    prec, up = _precision(x.dtype), _upcast(x.dtype)
    gb = _g_bound(x, gr, gc, gp)
    # fp16: 2^k·max|Ĝ| <= 2^14, max|Ĝ| <= max|G|·max rho·max sigma.
    ws = None if gb is None else _w_scale(gb * rho.abs().amax().double(), sig)
    s = p[0]
    R = chunk_rows(n, m, x.element_size())
    gbuf = torch.empty((R, m), dtype=x.dtype, device=dev)
    nrp = triton.cdiv(m, _MIN_BLOCK)             # row partials: one per column tile
    ncp = triton.cdiv(R, _MIN_BLOCK)             # column partials: one per row tile
    rpart = torch.zeros((3 if stats else 2, nrp, R), **f32)
    cpart = torch.zeros((2 if stats else 1, ncp, m), **f32)
    dx = _empty((n, d), x.dtype, dev)
    acc_y = None                                 # [m, D] fp32: the sum of the groups
    grp = None                                   # [m, D] fp32: the group of chunks in hand
    ngrp = 0
    # fp32 gradients are held to 1e-5 (docs/design.md §5); 16-bit ones round far more
    # coarsely at the end, and keep one [m, D] buffer fewer: one group.
    group = _GROUP if x.dtype == torch.float32 else n
    tu = torch.empty((n,), **f64)               # Σ_j G u per row
    tg = torch.zeros((), **f64)                 # Σ_ij G
    cgu = torch.zeros((m,), **f64)              # Σ_i G u per column
    row_out = _empty((n,), torch.float64, dev) if stats else None
    col_out = torch.zeros((m,), **f64) if stats else None
    dummy = gr                                   # never read where a buffer is not used
    # The unused partial buffers (no statistics): a spare of their own, never an input,
    # since the autotuner zeroes every buffer of _PARTIALS between the configurations.
    spare = torch.zeros((1,), **f32)
    consts = dict(LOSS=loss, STATS=stats, SCALE_W=ws is not None, PRECISION=prec, UPCAST=up)
    for r0 in range(0, n, R):
        rr = min(R, n - r0)
        g = gbuf[:rr]                            # [rr, m], row stride m
        if rr < R:
            rpart.zero_()
            cpart.zero_()
        args = (x, y, _row_stride(x), _row_stride(y), rho, sig, p,
                row if row is not None else dummy, col if col is not None else dummy,
                gr, gc, gp, ws if ws is not None else dummy, g, r0, rr, m, d, int(pos_offset),
                R, rpart[0], rpart[1], rpart[2] if stats else spare, cpart[0],
                cpart[1] if stats else spare, _bucket(rr), _bucket(m))
        if INTERPRET:
            b_ = _INTERP_BLOCK
            _grad_tile_launch[(triton.cdiv(m, b_), triton.cdiv(rr, b_))](
                *args, BLOCK_M=b_, BLOCK_N=b_, BLOCK_D=b_, **consts, **_OPTS)
        else:
            grid = lambda META, rr=rr: (triton.cdiv(m, META["BLOCK_N"]),  # noqa: E731
                                        triton.cdiv(rr, META["BLOCK_M"]))
            _grad_tile_launch[grid](*args, **consts, **_OPTS)
        # The partial rows of this chunk, in float64: [nrp, R] -> [rr].
        rsum = rpart[:, :, :rr].sum(1, dtype=torch.float64)
        tu[r0:r0 + rr] = rsum[0]
        tg += rsum[1].sum()
        csum = cpart.sum(1, dtype=torch.float64)
        cgu += csum[0]
        if stats:
            row_out[r0:r0 + rr] = rsum[2]
            col_out += csum[1]
        # dX of the chunk's rows: one GEMM over every column, then the norms' term.
        xs = x[r0:r0 + rr]
        ax = _mm32(g, y)                                          # [rr, D] fp32
        if ws is not None:
            ax.mul_(ws[1])
        ax.mul_(s)
        if normalize:
            # (none where eps clamps the norm: keep = 0). The term as (rho t)·(rho x): rho²
            # rounded to fp32 overflowed for rho above ~1.8e19 and vanished below ~1e-19.
            ri = rho[r0:r0 + rr]
            t = (ri.double() * keep_x[r0:r0 + rr] * tu[r0:r0 + rr]).to(torch.float32) * s
            ax.addcmul_(xs.float() * ri[:, None], t[:, None], value=-1.0)
        dx[r0:r0 + rr] = ax
        # dY: this chunk's rows' share, in fp32, summed in two levels for fp32 inputs
        # (groups of _GROUP chunks, then the groups), so that fp32's rounding grows with
        # _GROUP + chunks / _GROUP additions per element, not with the chunk count
        # (1024 chunks at n = m = 262144 in fp32).
        part = _mm32(g.t(), xs)                                   # [m, D] fp32
        grp = part if grp is None else grp.add_(part)
        ngrp += 1
        part = None           # freed before the next chunk's result is allocated
        if ngrp == group or r0 + rr >= n:
            acc_y = grp if acc_y is None else acc_y.add_(grp)
            grp, ngrp = None, 0
    del gbuf, g, part, grp
    if ws is not None:
        acc_y.mul_(ws[1])
    acc_y.mul_(s)
    if normalize:
        t = (sig.double() * keep_y * cgu).to(torch.float32) * s
        for a in range(0, y.shape[0], 16384):   # ŷ = sig·y in slices: no second [m, D] buffer
            b = min(a + 16384, y.shape[0])
            acc_y[a:b].addcmul_(y[a:b].float() * sig[a:b, None], t[a:b, None], value=-1.0)
    dy = acc_y.to(y.dtype)
    dparams = torch.stack((tu.sum(), tg))[:p.numel()].to(torch.float32)
    return dx, dy, dparams, rho, sig, row_out, col_out


def fwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, normalize: bool,
        eps: float, pos_offset: int):
    """Block forward (see fastclip.ops.backends): (row [n], col [m], pos [n]), float64.
    The fused forward kernel of contrastive_loss.py: one unit of FLOP, no n x m buffer; its
    logits are the ones ``bwd`` recomputes (the same helper and operands)."""
    return _fused_fwd(loss, x, y, params, normalize, eps, pos_offset)


def bwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, normalize: bool,
        eps: float, pos_offset: int, row: torch.Tensor, col: torch.Tensor,
        grad_row: torch.Tensor, grad_col: torch.Tensor, grad_pos: torch.Tensor):
    """Block backward (see fastclip.ops.backends): (dx [n, D], dy [m, D], dparams [P]).

    x [n, D], y [m, D]: float32/float16/bfloat16, unit stride along D. row, col: the merged
    float64 statistics (read by the softmax only); grad_row [n], grad_col [m],
    grad_pos [n]: their upstream gradients. dx, dy in the features' dtype, dparams fp32.
    """
    _check(loss, x, y, params)
    with _on_device(x):
        p = _params(params)
        f64 = dict(dtype=torch.float64, device=x.device)
        dx, dy, dp, *_ = _grads(loss, False, x, y, p, normalize, eps, pos_offset,
                                row.to(**f64).contiguous(), col.to(**f64).contiguous(),
                                grad_row, grad_col, grad_pos)
        return dx, dy, dp


def fwd_bwd(loss: int, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor,
            normalize: bool, eps: float, pos_offset: int, grad_row: torch.Tensor,
            grad_col: torch.Tensor, grad_pos: torch.Tensor):
    """Statistics and gradients of a one-pass loss (the sigmoid) from one sweep of the
    chunks: (row [n], col [m], pos [n], dx [n, D], dy [m, D], dparams [P]), 3 units of
    FLOP (the floor: X·Yᵀ, Ĝ·Y, Ĝᵀ·X)."""
    _check(loss, x, y, params)
    if loss != SIGMOID.value:
        raise ValueError("fwd_bwd: the softmax (clip) needs its merged statistics for the "
                         "gradient; run fwd, then bwd")
    with _on_device(x):
        p = _params(params)
        dx, dy, dp, rho, sig, row, col = _grads(loss, True, x, y, p, normalize, eps,
                                                pos_offset, None, None, grad_row, grad_col,
                                                grad_pos)
        pos = _pos(loss, x, y, rho, sig, p, pos_offset)
        return row, col, pos, dx, dy, dp
