// CPU kernels of the fused contrastive loss: the block contract of
// src/fastclip/ops/backends/__init__.py (row/column log-sum-exp forward and its
// vector-Jacobian product), for float and double.
#pragma once
#include <cstdint>

namespace fastclip::cpu {

// x [n, d] (row stride ldx), y [m, d] (row stride ldy). num_threads OpenMP threads,
// statically scheduled: a fixed count gives bit-identical results. Extra memory
// O((n+m)·d + threads·tile) forward, plus at most 64 MB of dY buffers backward.
// Non-finite inputs give non-finite outputs (no -ffast-math anywhere).
// Writes row_lse [n], col_lse [m], pos [n] (pos_i = L_{i,i+pos_offset} or 0).
template <typename T>
void contrastive_loss_fwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                          int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                          T* row_lse, T* col_lse, T* pos, int num_threads);

// Writes dx [n, d], dy [m, d] (contiguous) and returns dscale.
template <typename T>
T contrastive_loss_bwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                       int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                       const T* row_lse, const T* col_lse, const T* grad_row,
                       const T* grad_col, const T* grad_pos, T* dx, T* dy, int num_threads);

}  // namespace fastclip::cpu
