// Host API of the CUDA contrastive-loss kernels (block contract of
// src/fastclip/ops/backends/__init__.py). Everything takes raw device pointers, sizes,
// row strides (in elements), the caller's stream and a device pointer to the fp32
// scale, so nothing here synchronises with the host. Workspaces are allocated by the
// caller (torch's caching allocator) with the sizes the *_workspace_bytes functions give;
// those depend on the sizes only (no device query), so they are callable without a GPU.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fastclip {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tile geometry shared by every path (kernels and host plans). 64x64 output tiles,
// 4 warps (2x2, 32x32 each), K-steps of 32 along D, D-chunks of 64 for the gradient
// products. Chosen for a small register/smem footprint that compiles once for sm_80 and
// sm_90a and needs no per-shape tuning; tuned sizes need a GPU (see the report of issue 7).
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kDC = 64;
constexpr int kThreads = 128;
// CTAs the forward aims for (rows x column groups) and the backward (row blocks x
// column splits): enough to fill 132 SMs several times over; fixed so that workspace
// sizes do not depend on the device.
constexpr int64_t kFwdTargetCtas = 1024;
constexpr int64_t kBwdTargetCtas = 512;

struct FwdPlan {
  int64_t row_blocks, col_blocks;  // cdiv(n, kBM), cdiv(m, kBN)
  int64_t rows_per_group;          // row blocks per CTA (grid.x = row_groups)
  int64_t cols_per_group;          // column blocks per CTA (grid.y = col_groups)
  int64_t row_groups, col_groups;
  size_t bytes;                    // workspace: rho[n], sig[m], rowpart, colpart
};

struct BwdPlan {
  int64_t splits_x, splits_y;      // column splits of the dX and dY launches
  int64_t ldw;                     // row stride of the fp32 gradient workspace
  size_t bytes;                    // workspace: rho, sig, W, dscale partials
};

FwdPlan fwd_plan(int64_t n, int64_t m, int64_t d);
BwdPlan bwd_plan(int64_t n, int64_t m, int64_t d);

// Thrown as std::runtime_error("<fn>: <call> failed: <cuda error>") by the launchers.
void check_cuda(cudaError_t err, const char* fn, const char* call);

void contrastive_loss_fwd(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* scale, bool normalize, float eps, int64_t pos_offset,
                          float* row_lse, float* col_lse, float* pos, void* workspace,
                          cudaStream_t stream);

void contrastive_loss_bwd(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* scale, bool normalize, float eps, int64_t pos_offset,
                          const float* row_lse, const float* col_lse, const float* grad_row,
                          const float* grad_col, const float* grad_pos, void* dx, void* dy,
                          float* dscale, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastclip
