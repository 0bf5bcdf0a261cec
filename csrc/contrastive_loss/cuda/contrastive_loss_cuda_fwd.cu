// Forward of the contrastive-loss block on CUDA (docs/design.md §2): one pass over the
// 64x64 logit tiles, for every loss (template parameter LOSS: the epilogue policy Epi of
// contrastive_loss_cuda.cuh). Row statistics are running statistics per row (exact online
// logsumexps for the softmax, sums for the sigmoid); column statistics go through a
// partial buffer [row_groups, m] merged by a second small kernel, in a fixed order, as are
// the row partials [col_groups, n]: deterministic, no atomics. The positive logits
// pos_i = z_{i,i+offset} are written by the tile that holds them. FLOP: 2nmD (one
// product), plus O((n+m)D).
//
// Grid: (row_groups, col_groups). A CTA owns rows_per_group row blocks x cols_per_group
// column blocks and walks them columns-outer, rows-inner, so that the running column
// statistics of one column block stay in registers (threads 64..127, one column each)
// and the row statistics of its column group are merged in place in rowpart[cg, :]
// (threads 0..63, one row each, always the same thread for the same row: no races).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "contrastive_loss/cuda/contrastive_loss_cuda.cuh"

namespace fastclip {
namespace cuda {

void check_cuda(cudaError_t err, const char* fn, const char* call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear a sticky-free error so the next call starts clean
  throw std::runtime_error(std::string(fn) + ": " + call + " failed: " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

namespace {

using namespace dev;

static_assert(kBM + kBN == kThreads, "rows and columns of a tile each get half the CTA");

template <class P, int LOSS>
__global__ void __launch_bounds__(kThreads)
fwd_tiles_kernel(const typename P::T* __restrict__ x, const typename P::T* __restrict__ y, int n,
                 int m, int d, int64_t ldx, int64_t ldy, bool vec, const float* __restrict__ params,
                 const float* __restrict__ rho, const float* __restrict__ sig,
                 int rows_per_group, int cols_per_group, int row_blocks, int col_blocks,
                 typename Epi<LOSS>::Run* __restrict__ rowpart,
                 typename Epi<LOSS>::Run* __restrict__ colpart, int64_t pos_offset,
                 double* __restrict__ pos) {
  using T = typename P::T;
  using E = Epi<LOSS>;
  using Run = typename E::Run;
  constexpr int LDK = Strides<T>::LDK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + 2 * kBM * LDK;
  float* sRow = reinterpret_cast<float*>(sB + 2 * kBN * LDK);  // [wn][2][kBM]
  float* sCol = sRow + 4 * kBM;                                // [wm][2][kBN]

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rg = blockIdx.x, cg = blockIdx.y;
  const int rb0 = rg * rows_per_group, rb1 = min(row_blocks, rb0 + rows_per_group);
  const int cb0 = cg * cols_per_group, cb1 = min(col_blocks, cb0 + cols_per_group);
  const float s = params[0];
  float bias = 0.f;
  if constexpr (E::kBias) bias = params[1];

  for (int cb = cb0; cb < cb1; ++cb) {
    const int col0 = cb * kBN;
    Run run = E::empty();   // column (threadIdx.x - kBM), threads >= kBM
    float sg[4][2];
    bool cv[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + wn * 32 + ni * 8 + 2 * t + e;
        cv[ni][e] = c < m;
        sg[ni][e] = cv[ni][e] ? sig[c] : 0.f;
      }

    for (int rb = rb0; rb < rb1; ++rb) {
      const int row0 = rb * kBM;
      Acc acc;
      tile_scores<P>(acc, x + int64_t(row0) * ldx, ldx, n - row0, y + int64_t(col0) * ldy, ldy,
                     m - col0, d, vec, sA, sB);
      // The logits, then the policy's term of each entry (pad() outside the block). The
      // positive logit z_{i, i+pos_offset} is taken from the tile itself (one tile, one
      // thread holds it), so that pos and the statistics see the same rounding: for the
      // softmax at n = m = 1 the loss r - pos is exactly 0, as in the fp64 oracle.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
          const bool rv = r < n;
          const float rr = rv ? rho[r] : 0.f;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& v = acc[mi][ni][2 * h + e];
              const int c = col0 + wn * 32 + ni * 8 + 2 * t + e;
              if (rv && cv[ni][e]) {
                const float z = logit(__fmul_rn(s, __fmul_rn(rr, sg[ni][e])), v, bias);
                const bool positive = int64_t(c) == r + pos_offset;
                if (positive) pos[r] = double(z);
                v = E::value(z, positive);
              } else {
                v = E::pad();
              }
            }
        }
      // Row statistics of the tile: 8 terms per thread, then the 4 lanes of a quad,
      // then the two warps (wn) that share the rows, through shared memory.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[8];
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) v[2 * ni + e] = acc[mi][ni][2 * h + e];
          const float2 p = E::template reduce<1, 2>(v);
          if (t == 0) {
            const int lr = wm * 32 + mi * 16 + g + 8 * h;
            sRow[(wn * 2) * kBM + lr] = p.x;
            sRow[(wn * 2 + 1) * kBM + lr] = p.y;
          }
        }
      // Column statistics: 4 terms per thread, then the 8 quads (g), then the two
      // warps (wm) that share the columns.
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v[4];
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) v[2 * mi + h] = acc[mi][ni][2 * h + e];
          const float2 p = E::template reduce<4, 16>(v);
          if (g == 0) {
            const int lc = wn * 32 + ni * 8 + 2 * t + e;
            sCol[(wm * 2) * kBN + lc] = p.x;
            sCol[(wm * 2 + 1) * kBN + lc] = p.y;
          }
        }
      __syncthreads();
      if (threadIdx.x < kBM) {
        const int lr = threadIdx.x, r = row0 + lr;
        if (r < n) {
          const Run v = E::tile(make_float2(sRow[lr], sRow[kBM + lr]),
                                make_float2(sRow[2 * kBM + lr], sRow[3 * kBM + lr]));
          Run* dst = rowpart + int64_t(cg) * n + r;
          *dst = (cb == cb0) ? v : E::merge(*dst, v);
        }
      } else {
        const int lc = threadIdx.x - kBM;
        run = E::merge(run, E::tile(make_float2(sCol[lc], sCol[kBN + lc]),
                                    make_float2(sCol[2 * kBN + lc], sCol[3 * kBN + lc])));
      }
      // No barrier needed here: sRow/sCol are next written after the next tile_scores,
      // whose barriers order these reads before those writes.
    }
    if (threadIdx.x >= kBM) {
      const int c = col0 + threadIdx.x - kBM;
      if (c < m) colpart[int64_t(rg) * m + c] = run;
    }
  }
}

template <class P, int LOSS>
void run_fwd(const void* xv, const void* yv, int64_t n, int64_t m, int64_t d, int64_t ldx,
             int64_t ldy, const float* params, bool normalize, float eps, int64_t pos_offset,
             double* row, double* col, double* pos, void* workspace, cudaStream_t st) {
  using T = typename P::T;
  using Run = typename Epi<LOSS>::Run;
  static_assert(sizeof(Run) == 8, "the workspace plan counts 8 bytes per partial statistic");
  constexpr const char* fn = "cuda_fwd";
  const T* x = static_cast<const T*>(xv);
  const T* y = static_cast<const T*>(yv);
  const FwdPlan pl = fwd_plan(n, m, d);
  char* ws = static_cast<char*>(workspace);
  float* rho = reinterpret_cast<float*>(ws + pl.off_rho);
  float* sig = reinterpret_cast<float*>(ws + pl.off_sig);
  Run* rowpart = reinterpret_cast<Run*>(ws + pl.off_rowpart);
  Run* colpart = reinterpret_cast<Run*>(ws + pl.off_colpart);
  const bool vec = vec_ok(x, y, ldx, ldy, d);

  launch_inv_norm<T>(x, n, int(d), ldx, normalize, eps, rho, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (x)");
  launch_inv_norm<T>(y, m, int(d), ldy, normalize, eps, sig, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (y)");

  // pos_i = 0 where i + pos_offset is outside [0, m); the tiles write the others.
  check_cuda(cudaMemsetAsync(pos, 0, size_t(n) * sizeof(double), st), fn, "cudaMemsetAsync(pos)");

  constexpr int LDK = Strides<T>::LDK;
  const size_t smem = size_t(2 * (kBM + kBN) * LDK) * sizeof(T) + 4 * (kBM + kBN) * sizeof(float);
  auto kern = fwd_tiles_kernel<P, LOSS>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               fn, "cudaFuncSetAttribute(fwd_tiles_kernel, MaxDynamicSharedMemorySize)");
  kern<<<dim3(unsigned(pl.row_groups), unsigned(pl.col_groups)), kThreads, smem, st>>>(
      x, y, int(n), int(m), int(d), ldx, ldy, vec, params, rho, sig, int(pl.rows_per_group),
      int(pl.cols_per_group), int(pl.row_blocks), int(pl.col_blocks), rowpart, colpart,
      pos_offset, pos);
  check_cuda(cudaGetLastError(), fn, "fwd_tiles_kernel<<<>>>");

  launch_merge_parts<LOSS>(rowpart, pl.col_groups, n, colpart, pl.row_groups, m, row, col, st);
  check_cuda(cudaGetLastError(), fn, "merge_parts_kernel<<<>>>");
}

template <int LOSS>
void fwd_loss(const void* x, const void* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
              int64_t ldy, DType dtype, bool allow_tf32, const float* params, bool normalize,
              float eps, int64_t pos_offset, double* row, double* col, double* pos,
              void* workspace, cudaStream_t stream) {
#define FASTCLIP_RUN_FWD(PATH)                                                                 \
  return run_fwd<PATH, LOSS>(x, y, n, m, d, ldx, ldy, params, normalize, eps, pos_offset, row, \
                             col, pos, workspace, stream)
  switch (dtype) {
    case DType::kBFloat16: FASTCLIP_RUN_FWD(Bf16Path);
    case DType::kFloat16: FASTCLIP_RUN_FWD(F16Path);
    case DType::kFloat32:
      if (allow_tf32) FASTCLIP_RUN_FWD(Tf32Path);
      FASTCLIP_RUN_FWD(F32Path);
  }
#undef FASTCLIP_RUN_FWD
  throw std::invalid_argument("cuda_fwd: unknown dtype code");
}

}  // namespace

FwdPlan fwd_plan(int64_t n, int64_t m, int64_t d) {
  (void)d;
  FwdPlan p{};
  p.row_blocks = cdiv(n, kBM);
  p.col_blocks = cdiv(m, kBN);
  // gr x gc ~ kFwdTargetCtas, split in proportion to the block counts so that the two
  // partial buffers (gc x n and gr x m entries) stay ~sqrt(target) x (n + m) x 8 bytes.
  const double ratio = double(p.row_blocks) / double(p.col_blocks);
  int64_t gr = int64_t(std::sqrt(double(kFwdTargetCtas) * ratio) + 0.5);
  gr = std::max<int64_t>(1, std::min(gr, p.row_blocks));
  int64_t gc = std::max<int64_t>(1, std::min(cdiv(kFwdTargetCtas, gr), p.col_blocks));
  p.rows_per_group = cdiv(p.row_blocks, gr);
  p.cols_per_group = cdiv(p.col_blocks, gc);
  p.row_groups = cdiv(p.row_blocks, p.rows_per_group);
  p.col_groups = cdiv(p.col_blocks, p.cols_per_group);
  p.off_rho = 0;
  p.off_sig = p.off_rho + align256(size_t(n) * 4);
  p.off_rowpart = p.off_sig + align256(size_t(m) * 4);
  p.off_colpart = p.off_rowpart + align256(size_t(p.col_groups) * n * 8);
  p.bytes = p.off_colpart + align256(size_t(p.row_groups) * m * 8);
  return p;
}

void contrastive_loss_fwd(LossKind loss, const void* x, const void* y, int64_t n, int64_t m,
                          int64_t d, int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* params, bool normalize, float eps, int64_t pos_offset,
                          double* row, double* col, double* pos, void* workspace,
                          cudaStream_t stream) {
  if (loss == LossKind::kSoftmax)
    return fwd_loss<kSoftmax>(x, y, n, m, d, ldx, ldy, dtype, allow_tf32, params, normalize,
                              eps, pos_offset, row, col, pos, workspace, stream);
  if (loss == LossKind::kSigmoid)
    return fwd_loss<kSigmoid>(x, y, n, m, d, ldx, ldy, dtype, allow_tf32, params, normalize,
                              eps, pos_offset, row, col, pos, workspace, stream);
  throw std::invalid_argument("cuda_fwd: unknown loss code");
}

}  // namespace cuda
}  // namespace fastclip
