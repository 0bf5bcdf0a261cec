// Host API of the CUDA contrastive-loss kernels: the block contract of
// src/fastclip/ops/backends/__init__.py for every loss of csrc/common.h (LossKind).
// Everything takes raw device pointers, sizes, row strides (in elements), the caller's
// stream and a device pointer to the loss's fp32 parameters (params[0] = scale s,
// params[1] = bias b for the sigmoid), so nothing here synchronises with the host.
// Statistics (row, col, pos) and their upstream gradients are float64 for every input
// dtype; dparams is fp32. Workspaces are allocated by the caller (torch's caching
// allocator) with the sizes of the plans below; those depend on the sizes only (no device
// query), so they are callable without a GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace fastclip {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tile geometry shared by every path (kernels and host plans). 64x64 output tiles,
// 4 warps (2x2, 32x32 each), K-steps of 32 along D, D-chunks of 64 for the gradient
// products. Chosen for a small register/smem footprint that compiles once for every
// target architecture and needs no per-shape tuning; tuned sizes need a GPU measurement.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kDC = 64;
constexpr int kThreads = 128;
// CTAs the forward aims for (rows x column groups) and the gradient pass (row blocks x
// column splits): enough to fill 132 SMs several times over; fixed so that workspace
// sizes do not depend on the device.
constexpr int64_t kFwdTargetCtas = 1024;
constexpr int64_t kGradTargetCtas = 512;

// Forward: grid (row_groups, col_groups); workspace rho[n], sig[m] (fp32) and 8-byte
// partial statistics rowpart[col_groups][n], colpart[row_groups][m].
struct FwdPlan {
  int64_t row_blocks, col_blocks;  // cdiv(n, kBM), cdiv(m, kBN)
  int64_t rows_per_group;          // row blocks per CTA (grid.x = row_groups)
  int64_t cols_per_group;          // column blocks per CTA (grid.y = col_groups)
  int64_t row_groups, col_groups;
  size_t off_rho, off_sig, off_rowpart, off_colpart;
  size_t bytes;
};

// Gradient pass (backward, and the one-pass forward+backward): one CTA per unit = (row
// block, column split); workspace rho[n], sig[m], the fp32 accumulators Wx[splits][n][ldw]
// (dX partials, one per split) and Wy[m][ldw] (dY, summed in row-block order), the
// one-pass row-sum partials rowpart[splits][n] (float64), one turnstile flag per column
// block, the unit counter, and (sum G u, sum G) per unit (float64).
struct GradPlan {
  int64_t row_blocks, col_blocks, splits, units;
  int64_t ldw;                     // row stride of Wx and Wy: ceil(d / kDC) * kDC
  size_t off_rho, off_sig, off_wx, off_wy, off_rowpart, off_flags, off_dpart;
  size_t bytes;
};

FwdPlan fwd_plan(int64_t n, int64_t m, int64_t d);
// stats: the one-pass form (also row sums); the backward needs no rowpart.
GradPlan grad_plan(int64_t n, int64_t m, int64_t d, bool stats);

// Thrown as std::runtime_error("<fn>: <call> failed: <cuda error>") by the launchers.
void check_cuda(cudaError_t err, const char* fn, const char* call);

// row [n], col [m], pos [n] (float64) of the loss's epilogue; pos_i = z_{i, i+pos_offset}
// (0 where that column is outside the block).
void contrastive_loss_fwd(LossKind loss, const void* x, const void* y, int64_t n, int64_t m,
                          int64_t d, int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* params, bool normalize, float eps, int64_t pos_offset,
                          double* row, double* col, double* pos, void* workspace,
                          cudaStream_t stream);

// dx [n, d], dy [m, d] (contiguous, input dtype) and dparams [num_params] (fp32) for the
// upstream gradients of (row, col, pos); row and col are the merged forward statistics
// (read by the softmax only).
void contrastive_loss_bwd(LossKind loss, const void* x, const void* y, int64_t n, int64_t m,
                          int64_t d, int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* params, int num_params, bool normalize, float eps,
                          int64_t pos_offset, const double* row, const double* col,
                          const double* grad_row, const double* grad_col,
                          const double* grad_pos, void* dx, void* dy, float* dparams,
                          void* workspace, cudaStream_t stream);

// One pass (kSigmoid only): the forward's outputs and the backward's for the given
// upstream gradients, from one product per tile plus the two gradient products.
void contrastive_loss_fwd_bwd(LossKind loss, const void* x, const void* y, int64_t n,
                              int64_t m, int64_t d, int64_t ldx, int64_t ldy, DType dtype,
                              bool allow_tf32, const float* params, int num_params,
                              bool normalize, float eps, int64_t pos_offset,
                              const double* grad_row, const double* grad_col,
                              const double* grad_pos, double* row, double* col, double* pos,
                              void* dx, void* dy, float* dparams, void* workspace,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
