// Forward of the contrastive-loss block on CUDA (design.md §2): one pass over the
// 64x64 logit tiles; row statistics are exact online logsumexps, column statistics go
// through a partial buffer [row_groups, m] of (max, sum) merged by a second small
// kernel, in a fixed order (deterministic). The positive logits pos_i = L_{i,i+offset}
// are written by the tile that holds them. FLOP: 2nmD (one product), plus O((n+m)D).
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

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

using namespace dev;

static_assert(kBM + kBN == kThreads, "rows and columns of a tile each get half the CTA");

template <class P>
__global__ void __launch_bounds__(kThreads)
fwd_tiles_kernel(const typename P::T* __restrict__ x, const typename P::T* __restrict__ y, int n,
                 int m, int d, int64_t ldx, int64_t ldy, bool vec, const float* __restrict__ scale,
                 const float* __restrict__ rho, const float* __restrict__ sig,
                 int rows_per_group, int cols_per_group, int row_blocks, int col_blocks,
                 float2* __restrict__ rowpart, float2* __restrict__ colpart, int64_t pos_offset,
                 float* __restrict__ pos) {
  using T = typename P::T;
  constexpr int LDK = Strides<T>::LDK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);
  T* sB = sA + 2 * kBM * LDK;
  float* sRow = reinterpret_cast<float*>(sB + 2 * kBN * LDK);  // [wn][max|sum][kBM]
  float* sCol = sRow + 4 * kBM;                                // [wm][max|sum][kBN]

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rg = blockIdx.x, cg = blockIdx.y;
  const int rb0 = rg * rows_per_group, rb1 = min(row_blocks, rb0 + rows_per_group);
  const int cb0 = cg * cols_per_group, cb1 = min(col_blocks, cb0 + cols_per_group);
  const float s = *scale;

  for (int cb = cb0; cb < cb1; ++cb) {
    const int col0 = cb * kBN;
    float2 run = make_float2(kNegInf, 0.f);   // column (threadIdx.x - kBM), threads >= kBM
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
      // Logits L = s rho_i sigma_j S_ij; -inf outside the block. The positive logit
      // L_{i, i+pos_offset} is taken from the tile itself (one tile, one thread holds it),
      // so that pos and the statistics see the same rounding: for n = m = 1 the loss
      // r - pos is exactly 0, as in the fp64 oracle.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
          const bool rv = r < n;
          const float sr = rv ? s * rho[r] : 0.f;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& v = acc[mi][ni][2 * h + e];
              const int c = col0 + wn * 32 + ni * 8 + 2 * t + e;
              if (rv && cv[ni][e]) {
                v = sr * sg[ni][e] * v;
                if (int64_t(c) == r + pos_offset) pos[r] = v;
              } else {
                v = kNegInf;
              }
            }
        }
      // Row statistics of the tile: 8 values per thread, then the 4 lanes of a quad,
      // then the two warps (wn) that share the rows, through shared memory.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = kNegInf;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) mx = fmaxf(mx, acc[mi][ni][2 * h + e]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float sh = safe_shift(mx);
          float sum = 0.f;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) sum += __expf(acc[mi][ni][2 * h + e] - sh);
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          if (t == 0) {
            const int lr = wm * 32 + mi * 16 + g + 8 * h;
            sRow[(wn * 2) * kBM + lr] = mx;
            sRow[(wn * 2 + 1) * kBM + lr] = sum;
          }
        }
      // Column statistics: 4 values per thread, then the 8 quads (g), then the two
      // warps (wm) that share the columns.
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float mx = kNegInf;
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) mx = fmaxf(mx, acc[mi][ni][2 * h + e]);
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
          const float sh = safe_shift(mx);
          float sum = 0.f;
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) sum += __expf(acc[mi][ni][2 * h + e] - sh);
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
          if (g == 0) {
            const int lc = wn * 32 + ni * 8 + 2 * t + e;
            sCol[(wm * 2) * kBN + lc] = mx;
            sCol[(wm * 2 + 1) * kBN + lc] = sum;
          }
        }
      __syncthreads();
      if (threadIdx.x < kBM) {
        const int lr = threadIdx.x, r = row0 + lr;
        if (r < n) {
          const float2 v = lse_merge(make_float2(sRow[lr], sRow[kBM + lr]),
                                     make_float2(sRow[2 * kBM + lr], sRow[3 * kBM + lr]));
          float2* dst = rowpart + int64_t(cg) * n + r;
          *dst = (cb == cb0) ? v : lse_merge(*dst, v);
        }
      } else {
        const int lc = threadIdx.x - kBM;
        run = lse_merge(run, lse_merge(make_float2(sCol[lc], sCol[kBN + lc]),
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

// row_lse_i = merge over column groups; col_lse_j = merge over row groups (fixed order).
__global__ void fwd_merge_kernel(const float2* __restrict__ rowpart, int col_groups, int n,
                                 const float2* __restrict__ colpart, int row_groups, int m,
                                 float* __restrict__ row_lse, float* __restrict__ col_lse) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < int64_t(n) + m;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool is_row = i < n;
    const int64_t k = is_row ? i : i - n, stride = is_row ? n : m;
    const int parts = is_row ? col_groups : row_groups;
    const float2* src = is_row ? rowpart : colpart;
    float2 v = src[k];
    for (int p = 1; p < parts; ++p) v = lse_merge(v, src[p * stride + k]);
    (is_row ? row_lse : col_lse)[k] = v.x + logf(v.y);
  }
}

template <class P>
void run_fwd(const void* xv, const void* yv, int64_t n, int64_t m, int64_t d, int64_t ldx,
             int64_t ldy, const float* scale, bool normalize, float eps, int64_t pos_offset,
             float* row_lse, float* col_lse, float* pos, void* workspace, cudaStream_t st) {
  using T = typename P::T;
  constexpr const char* fn = "cuda_fwd";
  const T* x = static_cast<const T*>(xv);
  const T* y = static_cast<const T*>(yv);
  const FwdPlan pl = fwd_plan(n, m, d);
  char* ws = static_cast<char*>(workspace);
  float* rho = reinterpret_cast<float*>(ws);
  float* sig = reinterpret_cast<float*>(ws + align256(n * 4));
  float2* rowpart = reinterpret_cast<float2*>(ws + align256(n * 4) + align256(m * 4));
  float2* colpart = reinterpret_cast<float2*>(reinterpret_cast<char*>(rowpart) +
                                              align256(size_t(pl.col_groups) * n * 8));
  constexpr int CE = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(y) % 16 == 0 && ldx % CE == 0 && ldy % CE == 0 &&
                   d % CE == 0;

  launch_inv_norm<T>(x, n, int(d), ldx, normalize, eps, rho, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (x)");
  launch_inv_norm<T>(y, m, int(d), ldy, normalize, eps, sig, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (y)");

  // pos_i = 0 where i + pos_offset is outside [0, m); the tiles write the others.
  check_cuda(cudaMemsetAsync(pos, 0, size_t(n) * sizeof(float), st), fn, "cudaMemsetAsync(pos)");

  constexpr int LDK = Strides<T>::LDK;
  const size_t smem = size_t(2 * (kBM + kBN) * LDK) * sizeof(T) + 4 * (kBM + kBN) * sizeof(float);
  auto kern = fwd_tiles_kernel<P>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               fn, "cudaFuncSetAttribute(fwd_tiles_kernel, MaxDynamicSharedMemorySize)");
  kern<<<dim3(unsigned(pl.row_groups), unsigned(pl.col_groups)), kThreads, smem, st>>>(
      x, y, int(n), int(m), int(d), ldx, ldy, vec, scale, rho, sig, int(pl.rows_per_group),
      int(pl.cols_per_group), int(pl.row_blocks), int(pl.col_blocks), rowpart, colpart,
      pos_offset, pos);
  check_cuda(cudaGetLastError(), fn, "fwd_tiles_kernel<<<>>>");

  const int64_t merge_blocks = std::min<int64_t>(cdiv(n + m, 256), 4096);
  fwd_merge_kernel<<<unsigned(merge_blocks), 256, 0, st>>>(rowpart, int(pl.col_groups), int(n),
                                                            colpart, int(pl.row_groups), int(m),
                                                            row_lse, col_lse);
  check_cuda(cudaGetLastError(), fn, "fwd_merge_kernel<<<>>>");

}

}  // namespace

FwdPlan fwd_plan(int64_t n, int64_t m, int64_t d) {
  (void)d;
  FwdPlan p{};
  p.row_blocks = cdiv(n, kBM);
  p.col_blocks = cdiv(m, kBN);
  // gr x gc ~ kFwdTargetCtas, split in proportion to the block counts so that the two
  // partial buffers (gc x n and gr x m pairs) stay ~sqrt(target) x (n + m) x 8 bytes.
  const double ratio = double(p.row_blocks) / double(p.col_blocks);
  int64_t gr = int64_t(std::sqrt(double(kFwdTargetCtas) * ratio) + 0.5);
  gr = std::max<int64_t>(1, std::min(gr, p.row_blocks));
  int64_t gc = std::max<int64_t>(1, std::min(cdiv(kFwdTargetCtas, gr), p.col_blocks));
  p.rows_per_group = cdiv(p.row_blocks, gr);
  p.cols_per_group = cdiv(p.col_blocks, gc);
  p.row_groups = cdiv(p.row_blocks, p.rows_per_group);
  p.col_groups = cdiv(p.col_blocks, p.cols_per_group);
  p.bytes = align256(size_t(n) * 4) + align256(size_t(m) * 4) +
            align256(size_t(p.col_groups) * n * 8) + align256(size_t(p.row_groups) * m * 8);
  return p;
}

void contrastive_loss_fwd(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* scale, bool normalize, float eps, int64_t pos_offset,
                          float* row_lse, float* col_lse, float* pos, void* workspace,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16:
      return run_fwd<Bf16Path>(x, y, n, m, d, ldx, ldy, scale, normalize, eps, pos_offset,
                               row_lse, col_lse, pos, workspace, stream);
    case DType::kFloat16:
      return run_fwd<F16Path>(x, y, n, m, d, ldx, ldy, scale, normalize, eps, pos_offset,
                              row_lse, col_lse, pos, workspace, stream);
    case DType::kFloat32:
      if (allow_tf32)
        return run_fwd<Tf32Path>(x, y, n, m, d, ldx, ldy, scale, normalize, eps, pos_offset,
                                 row_lse, col_lse, pos, workspace, stream);
      return run_fwd<F32Path>(x, y, n, m, d, ldx, ldy, scale, normalize, eps, pos_offset,
                              row_lse, col_lse, pos, workspace, stream);
  }
  throw std::invalid_argument("cuda_fwd: unknown dtype code");
}

}  // namespace cuda
}  // namespace fastclip
