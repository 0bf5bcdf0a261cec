// CPU kernels of the fused contrastive losses: the block contract of
// src/fastclip/ops/backends/__init__.py (per-loss row/column statistics forward, their
// vector-Jacobian product, and both in one pass for one-pass losses), for float and double.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastclip::cpu {

// x [n, d] (row stride ldx), y [m, d] (row stride ldy); the logits are
// z_ij = scale * rho_i * sigma_j * <x_i, y_j> + bias (bias is 0 for kSoftmax). num_threads
// OpenMP threads, statically scheduled: a fixed count gives bit-identical results. Extra
// memory O((n+m)·d + threads·tile), plus at most 64 MB of dY buffers for the gradients.
// Non-finite inputs give non-finite outputs (no -ffast-math anywhere).
// bf16 (float only): every value of x and y is a bfloat16 value (an exact upcast); where the
// CPU has AVX512_BF16 the three products then run on bf16 pairs (vdpbf16ps), the gradient
// products with dloss/dz rounded to bf16 (see the .inc); elsewhere it changes nothing.

// Statistics are double whatever T is (src/fastclip/ops/losses: an fp32 log-sum-exp of
// logits of 1e4 is off by 5e-4); every tile is computed in T.

// Writes row [n], col [m], pos [n] (pos_i = z_{i,i+pos_offset} as its tile rounded it, or 0).
template <typename T>
void contrastive_loss_fwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, T scale, T bias, bool normalize, T eps,
                          int64_t pos_offset, double* row, double* col, double* pos,
                          int num_threads, bool bf16 = false);

// Writes dx [n, d], dy [m, d] (contiguous); returns (sum G u, sum G) = (dscale, dbias).
template <typename T>
ParamGrads contrastive_loss_bwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m,
                                int64_t d, int64_t ldx, int64_t ldy, T scale, T bias,
                                bool normalize, T eps, int64_t pos_offset, const double* row,
                                const double* col, const T* grad_row, const T* grad_col,
                                const T* grad_pos, T* dx, T* dy, int num_threads,
                                bool bf16 = false);

// One pass (kSigmoid only): the forward's outputs and the backward's for the given
// upstream gradients, recomputing nothing (three products instead of four).
template <typename T>
ParamGrads contrastive_loss_fwd_bwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m,
                                    int64_t d, int64_t ldx, int64_t ldy, T scale, T bias,
                                    bool normalize, T eps, int64_t pos_offset,
                                    const T* grad_row, const T* grad_col, const T* grad_pos,
                                    double* row, double* col, double* pos, T* dx, T* dy,
                                    int num_threads, bool bf16 = false);

// The tile kernels' build the calls run (FASTCLIP_CPU_ISA and the CPU decide):
// "avx512bf16" (AVX-512 with bf16 products for bfloat16 features), "avx512", "avx2" or
// "generic" (128-bit: SSE2, NEON).
const char* cpu_isa();

}  // namespace fastclip::cpu
