// Backward of the contrastive-loss block on CUDA (design.md §2, two-kernel form).
//
// G_ij = g_row_i exp(L_ij - r_i) + g_col_j exp(L_ij - c_j) is symmetric under
// (x, r, g_row) <-> (y, c, g_col), so ONE tile kernel, "rows outer", computes
//     W[sp, i, :] = sum_{j in split sp} G_ij sigma_j y_j       (= dX^_i / s, partial)
// and is launched twice: (x rows, y columns) for dX, then (y rows, x columns) for dY.
// Per 64x64 tile it recomputes S over D (2*64*64*D FLOP), forms G in registers, stages
// G*sigma (in the input dtype; fp16 tiles are scaled by a power of two first) in shared
// memory and multiplies it with the column rows of y chunk by chunk along D (64 wide,
// another 2*64*64*D FLOP), adding into the fp32 workspace row block that the CTA owns.
// FLOP: 4 x 2nmD in all (2 recomputes + 2 products), against 3 x 2nmD for a one-kernel
// form with atomics; deterministic, no atomics.
// G includes g_pos on the positive pair (j == i + pos_offset), added in fp32 before G is
// rounded for the tensor cores. A finalize kernel per side sums the column splits in
// order and applies the normalisation backward rho (g - x^ <x^, g>); dscale =
// sum_ij G_ij L_ij / s is reduced from per-CTA partials in a fixed order by one block.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "contrastive_loss/cuda/contrastive_loss_cuda.cuh"

namespace fastclip {
namespace cuda {
namespace {

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

using namespace dev;

template <typename T>
constexpr size_t bwd_smem_bytes() {
  using S = Strides<T>;
  constexpr size_t stage1 = size_t(2 * (kBM + kBN) * S::LDK);
  constexpr size_t stage2 = size_t(2 * kBN * S::LDN);
  return (stage1 > stage2 ? stage1 : stage2) * sizeof(T) + size_t(kBM * S::LDG) * sizeof(T) +
         8 * sizeof(float);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class P>
__global__ void __launch_bounds__(kThreads)
bwd_tiles_kernel(const typename P::T* __restrict__ a, const typename P::T* __restrict__ b, int na,
                 int nb, int d, int64_t lda, int64_t ldb, bool vec, const float* __restrict__ scale,
                 const float* __restrict__ rho_a, const float* __restrict__ rho_b,
                 const float* __restrict__ lse_a, const float* __restrict__ lse_b,
                 const float* __restrict__ g_a, const float* __restrict__ g_b,
                 const float* __restrict__ gpos, int64_t pos_offset, bool gp_by_col,
                 float* __restrict__ W, int64_t ldw, int splits, float* __restrict__ dspart) {
  using T = typename P::T;
  using S = Strides<T>;
  constexpr int LDK = S::LDK, LDN = S::LDN, LDG = S::LDG;
  constexpr size_t stage1 = size_t(2 * (kBM + kBN) * LDK), stage2 = size_t(2 * kBN * LDN);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* region = reinterpret_cast<T*>(smem_raw);   // stage 1 (sA, sB) or stage 2 (sY) buffers
  T* sA = region;
  T* sB = region + 2 * kBM * LDK;
  T* sY = region;
  T* sG = region + (stage1 > stage2 ? stage1 : stage2);
  float* sRed = reinterpret_cast<float*>(sG + kBM * LDG);   // [4] per-warp reductions

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rb = blockIdx.x, sp = blockIdx.y;
  const int64_t col_blocks = cdiv(nb, kBN);
  const int cb0 = int(sp * col_blocks / splits), cb1 = int((sp + 1) * col_blocks / splits);
  const int row0 = rb * kBM;
  const float s = *scale;

  // Per-row values of the 4 rows this thread holds.
  bool rv[2][2];
  float ra[2][2], la[2][2], ga[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
      rv[mi][h] = r < na;
      ra[mi][h] = rv[mi][h] ? rho_a[r] : 0.f;
      la[mi][h] = rv[mi][h] ? lse_a[r] : 0.f;
      ga[mi][h] = rv[mi][h] ? g_a[r] : 0.f;
    }
  float ds = 0.f;   // sum G_ij L_ij / s over this CTA's tiles

  for (int cb = cb0; cb < cb1; ++cb) {
    const int col0 = cb * kBN;
    Acc acc;
    tile_scores<P>(acc, a + int64_t(row0) * lda, lda, na - row0, b + int64_t(col0) * ldb, ldb,
                   nb - col0, d, vec, sA, sB);
    float gmax = 0.f;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + wn * 32 + ni * 8 + 2 * t + e;
        const bool cv = c < nb;
        const float rbc = cv ? rho_b[c] : 0.f, lb = cv ? lse_b[c] : 0.f, gb = cv ? g_b[c] : 0.f;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& v = acc[mi][ni][2 * h + e];
            float gp = 0.f;
            if (rv[mi][h] && cv) {
              const float tt = ra[mi][h] * rbc * v;   // L / s
              const float L = s * tt;
              float G = ga[mi][h] * __expf(L - la[mi][h]) + gb * __expf(L - lb);
              // The positive pair's g_pos joins G before any rounding, so that G = 0
              // exactly where the softmax gradients cancel it (n = 1, or P = delta).
              const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
              if (int64_t(c) == r + pos_offset) G += gpos[gp_by_col ? c : r];
              ds = fmaf(G, tt, ds);
              gp = G * rbc;                            // fold sigma_j: products use raw y
            }
            v = gp;
            gmax = fmaxf(gmax, fabsf(gp));
          }
      }
    float gs = 1.f, ginv = 1.f;
    if constexpr (P::kScaleG) {
      gmax = warp_max(gmax);
      if (lane == 0) sRed[warp] = gmax;
      __syncthreads();
      gmax = fmaxf(fmaxf(sRed[0], sRed[1]), fmaxf(sRed[2], sRed[3]));
      if (gmax > 0.f && gmax <= 3.0e38f) {   // finite and nonzero: scale into [2^14, 2^15)
        int e2;
        frexpf(gmax, &e2);                     // gmax < 2^e2
        const int k = max(-126, min(126, 15 - e2));
        gs = __int_as_float((127 + k) << 23);
        ginv = __int_as_float((127 - k) << 23);
      }
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          store2(sG + (wm * 32 + mi * 16 + g + 8 * h) * LDG + wn * 32 + ni * 8 + 2 * t,
                 acc[mi][ni][2 * h] * gs, acc[mi][ni][2 * h + 1] * gs);

    // Stage 2: W[rows, chunk] += G' [64 x 64] . y[cols, chunk] [64 x kDC], chunk by chunk.
    const T* bcol = b + int64_t(col0) * ldb;
    const int nd = (d + kDC - 1) / kDC;
    load_tile<T, kBN, kDC, LDN>(sY, bcol, ldb, nb - col0, 0, d, vec);
    cp_async_commit();
    for (int dc = 0; dc < nd; ++dc) {
      if (dc + 1 < nd) {
        load_tile<T, kBN, kDC, LDN>(sY + ((dc + 1) & 1) * kBN * LDN, bcol, ldb, nb - col0,
                                    (dc + 1) * kDC, d, vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();   // chunk dc landed; on dc == 0 also publishes sG
      zero(acc);
      P::template mma<true, kBN>(acc, sG + wm * 32 * LDG, LDG, sY + (dc & 1) * kBN * LDN + wn * 32,
                                 LDN);
      __syncthreads();   // chunk buffer free for dc + 2 (and region free for the next tile)
      // The same thread always updates the same W entries: plain read-modify-write.
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
          if (r >= na) continue;
          float* wrow = W + (int64_t(sp) * na + r) * ldw + dc * kDC + wn * 32 + 2 * t;
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            float2* p = reinterpret_cast<float2*>(wrow + ni * 8);
            float2 v = make_float2(acc[mi][ni][2 * h] * ginv, acc[mi][ni][2 * h + 1] * ginv);
            if (cb != cb0) {
              const float2 o = *p;
              v.x += o.x;
              v.y += o.y;
            }
            *p = v;
          }
        }
    }
  }

  if (dspart != nullptr) {
    ds = warp_sum(ds);
    __syncthreads();   // sRed may still be read by the last tile's scale reduction
    if (lane == 0) sRed[warp] = ds;
    __syncthreads();
    if (threadIdx.x == 0)
      dspart[int64_t(sp) * gridDim.x + rb] = (sRed[0] + sRed[1]) + (sRed[2] + sRed[3]);
  }
}

// out_i = rho_i (dA^_i - a^_i <a^_i, dA^_i>) (or dA^_i without normalize), where
// dA^_i = s * sum_sp W[sp, i] (the splits summed in order). One warp per row; D is
// walked twice (dot product, then output) instead of being held.
template <typename T>
__global__ void grad_finalize_kernel(const T* __restrict__ a, int64_t lda, int na, int d,
                                     const float* __restrict__ rho_a,
                                     const float* __restrict__ scale, const float* __restrict__ W,
                                     int64_t ldw, int splits, bool normalize,
                                     T* __restrict__ out) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= na) return;
  const float s = *scale, ra = rho_a[i];
  const T* arow = a + i * lda;
  const float* wrow = W + i * ldw;
  const int64_t wsplit = int64_t(na) * ldw;
  auto dah = [&](int k) {
    float v = 0.f;
    for (int q = 0; q < splits; ++q) v += wrow[q * wsplit + k];
    return v * s;
  };
  float dot = 0.f;
  if (normalize) {
    for (int k = lane; k < d; k += 32) dot = fmaf(ra * to_f(arow[k]), dah(k), dot);
    dot = warp_sum(dot);
  }
  T* orow = out + i * d;
  for (int k = lane; k < d; k += 32) {
    float v = dah(k);
    if (normalize) v = ra * (v - ra * to_f(arow[k]) * dot);
    orow[k] = from_f<T>(v);
  }
}

// dscale = sum(dspart), in a fixed order (deterministic); one block.
__global__ void dscale_kernel(const float* __restrict__ dspart, int64_t nparts,
                              float* __restrict__ dscale) {
  __shared__ float red[256];
  float v = 0.f;
  for (int64_t k = threadIdx.x; k < nparts; k += 256) v += dspart[k];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = 128; w; w >>= 1) {
    if (int(threadIdx.x) < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *dscale = red[0];
}

template <class P>
void launch_bwd_tiles(const typename P::T* a, const typename P::T* b, int64_t na, int64_t nb,
                      int64_t d, int64_t lda, int64_t ldb, bool vec, const float* scale,
                      const float* rho_a, const float* rho_b, const float* lse_a,
                      const float* lse_b, const float* g_a, const float* g_b,
                      const float* gpos, int64_t pos_offset, bool gp_by_col, float* W,
                      int64_t ldw, int64_t splits, float* dspart, cudaStream_t st) {
  using T = typename P::T;
  constexpr const char* fn = "cuda_bwd";
  constexpr size_t smem = bwd_smem_bytes<T>();
  auto kern = bwd_tiles_kernel<P>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               fn, "cudaFuncSetAttribute(bwd_tiles_kernel, MaxDynamicSharedMemorySize)");
  kern<<<dim3(unsigned(cdiv(na, kBM)), unsigned(splits)), kThreads, smem, st>>>(
      a, b, int(na), int(nb), int(d), lda, ldb, vec, scale, rho_a, rho_b, lse_a, lse_b, g_a, g_b,
      gpos, pos_offset, gp_by_col, W, ldw, int(splits), dspart);
  check_cuda(cudaGetLastError(), fn, "bwd_tiles_kernel<<<>>>");
}

template <class P>
void run_bwd(const void* xv, const void* yv, int64_t n, int64_t m, int64_t d, int64_t ldx,
             int64_t ldy, const float* scale, bool normalize, float eps, int64_t pos_offset,
             const float* row_lse, const float* col_lse, const float* grad_row,
             const float* grad_col, const float* grad_pos, void* dxv, void* dyv, float* dscale,
             void* workspace, cudaStream_t st) {
  using T = typename P::T;
  constexpr const char* fn = "cuda_bwd";
  const T* x = static_cast<const T*>(xv);
  const T* y = static_cast<const T*>(yv);
  T* dx = static_cast<T*>(dxv);
  T* dy = static_cast<T*>(dyv);
  const BwdPlan pl = bwd_plan(n, m, d);
  char* ws = static_cast<char*>(workspace);
  float* rho = reinterpret_cast<float*>(ws);
  ws += align256(n * 4);
  float* sig = reinterpret_cast<float*>(ws);
  ws += align256(m * 4);
  float* W = reinterpret_cast<float*>(ws);
  ws += align256(size_t(std::max(pl.splits_x * n, pl.splits_y * m)) * pl.ldw * 4);
  float* dspart = reinterpret_cast<float*>(ws);
  const int64_t nparts = cdiv(n, kBM) * pl.splits_x;

  constexpr int CE = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(y) % 16 == 0 && ldx % CE == 0 && ldy % CE == 0 &&
                   d % CE == 0;

  launch_inv_norm<T>(x, n, int(d), ldx, normalize, eps, rho, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (x)");
  launch_inv_norm<T>(y, m, int(d), ldy, normalize, eps, sig, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (y)");

  const unsigned fin_x = unsigned(cdiv(n * 32, 256)), fin_y = unsigned(cdiv(m * 32, 256));
  // dX: rows of x against the columns y (W holds splits_x partial sums per row).
  launch_bwd_tiles<P>(x, y, n, m, d, ldx, ldy, vec, scale, rho, sig, row_lse, col_lse, grad_row,
                      grad_col, grad_pos, pos_offset, false, W, pl.ldw, pl.splits_x, dspart, st);
  grad_finalize_kernel<T><<<fin_x, 256, 0, st>>>(x, ldx, int(n), int(d), rho, scale, W, pl.ldw,
                                                 int(pl.splits_x), normalize, dx);
  check_cuda(cudaGetLastError(), fn, "grad_finalize_kernel<<<>>> (dx)");
  dscale_kernel<<<1, 256, 0, st>>>(dspart, nparts, dscale);
  check_cuda(cudaGetLastError(), fn, "dscale_kernel<<<>>>");
  // dY: the same kernel with the roles swapped (the positive of y row j is x row
  // j - pos_offset, whose g_pos is indexed by the column); W is reused (stream order).
  launch_bwd_tiles<P>(y, x, m, n, d, ldy, ldx, vec, scale, sig, rho, col_lse, row_lse, grad_col,
                      grad_row, grad_pos, -pos_offset, true, W, pl.ldw, pl.splits_y, nullptr, st);
  grad_finalize_kernel<T><<<fin_y, 256, 0, st>>>(y, ldy, int(m), int(d), sig, scale, W, pl.ldw,
                                                 int(pl.splits_y), normalize, dy);
  check_cuda(cudaGetLastError(), fn, "grad_finalize_kernel<<<>>> (dy)");
}

}  // namespace

BwdPlan bwd_plan(int64_t n, int64_t m, int64_t d) {
  BwdPlan p{};
  const int64_t rbx = cdiv(n, kBM), rby = cdiv(m, kBM);
  // Split the columns only when the row blocks alone cannot fill the GPU (n small
  // against m, e.g. one shard's rows against the gathered columns).
  p.splits_x = std::max<int64_t>(1, std::min(kBwdTargetCtas / rbx, cdiv(m, kBN)));
  p.splits_y = std::max<int64_t>(1, std::min(kBwdTargetCtas / rby, cdiv(n, kBN)));
  p.ldw = cdiv(d, kDC) * kDC;
  const int64_t wrows = std::max(p.splits_x * n, p.splits_y * m);
  p.bytes = align256(size_t(n) * 4) + align256(size_t(m) * 4) +
            align256(size_t(wrows) * p.ldw * 4) + align256(size_t(rbx * p.splits_x) * 4);
  return p;
}

void contrastive_loss_bwd(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* scale, bool normalize, float eps, int64_t pos_offset,
                          const float* row_lse, const float* col_lse, const float* grad_row,
                          const float* grad_col, const float* grad_pos, void* dx, void* dy,
                          float* dscale, void* workspace, cudaStream_t stream) {
#define FASTCLIP_RUN_BWD(PATH)                                                                   \
  return run_bwd<PATH>(x, y, n, m, d, ldx, ldy, scale, normalize, eps, pos_offset, row_lse,     \
                       col_lse, grad_row, grad_col, grad_pos, dx, dy, dscale, workspace, stream)
  switch (dtype) {
    case DType::kBFloat16: FASTCLIP_RUN_BWD(Bf16Path);
    case DType::kFloat16: FASTCLIP_RUN_BWD(F16Path);
    case DType::kFloat32:
      if (allow_tf32) FASTCLIP_RUN_BWD(Tf32Path);
      FASTCLIP_RUN_BWD(F32Path);
  }
#undef FASTCLIP_RUN_BWD
  throw std::invalid_argument("cuda_bwd: unknown dtype code");
}

}  // namespace cuda
}  // namespace fastclip
