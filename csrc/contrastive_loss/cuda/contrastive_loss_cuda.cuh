// Device building blocks of the CUDA contrastive-loss kernels (included by the fwd and
// bwd translation units only).
//
// Every tile product runs through one of four "paths" that share the accumulator layout
// of mma.sync's m16n8 C fragment, so the epilogues (statistics, G) are written once:
//   Bf16Path / F16Path: mma.sync.aligned.m16n8k16 (fp32 accumulate), fragments by ldmatrix
//                       (.trans for [k][n] operands), tiles staged by cp.async.
//   Tf32Path:           fp32 inputs with allow_tf32 (torch.backends.cuda.matmul.allow_tf32):
//                       mma.sync m16n8k8 .tf32 (inputs rounded to tf32, fp32 accumulate).
//   F32Path:            fp32 inputs otherwise: exact fp32 FFMA on the same ownership map
//                       (each thread owns 4 rows x 8 columns of its warp's 32x32 tile).
// Hopper and Blackwell run these sm_80 instructions as they are; a wgmma/TMA path is not
// written, so on H100 SASS shows HMMA, not HGMMA.
//
// What a tile of logits becomes is the loss's epilogue policy Epi<LOSS> (LossKind of
// csrc/common.h = LossSpec.code of src/fastclip/ops/losses), written once here and used by
// the forward, the backward and the one-pass kernels alike.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "contrastive_loss/cuda/contrastive_loss_cuda.h"

namespace fastclip {
namespace cuda {

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t b) { return (b + 255) / 256 * 256; }

constexpr int kSoftmax = int(LossKind::kSoftmax);
constexpr int kSigmoid = int(LossKind::kSigmoid);

namespace dev {

constexpr float kNegInf = -__builtin_huge_valf();

// ------------------------------------------------------------------------- element I/O
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two adjacent elements (columns 2t, 2t+1 of a C fragment) into shared memory.
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// ---------------------------------------------------------------------------- cp.async
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global->shared copy; src_bytes = 0 writes zeros (tails of rows and of D).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Stage a ROWS x COLS tile of a row-major global matrix (rows from `base`, columns from
// col0, stride ld elements) into shared memory with row stride LDS. Rows >= rows_valid
// and columns >= d are zero. vec: 16-byte cp.async (the host checked the alignment of
// the base pointer, of ld and of d); otherwise synchronous element loads.
template <typename T, int ROWS, int COLS, int LDS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ base,
                                          int64_t ld, int rows_valid, int col0, int d,
                                          bool vec) {
  if (vec) {
    constexpr int CE = 16 / sizeof(T);           // elements per 16-byte chunk
    constexpr int CPR = COLS / CE;               // chunks per row
    static_assert(COLS % CE == 0, "tile width must be a multiple of 16 bytes");
    static_assert((LDS * sizeof(T)) % 16 == 0, "shared rows must stay 16-byte aligned");
    for (int c = threadIdx.x; c < ROWS * CPR; c += kThreads) {
      const int r = c / CPR, cc = (c % CPR) * CE;
      const bool ok = r < rows_valid && col0 + cc < d;   // d % CE == 0: whole chunks
      const T* src = ok ? base + r * ld + col0 + cc : base;
      cp_async16(dst + r * LDS + cc, src, ok ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
      const int r = e / COLS, cc = e % COLS;
      const bool ok = r < rows_valid && col0 + cc < d;
      dst[r * LDS + cc] = ok ? base[r * ld + col0 + cc] : from_f<T>(0.f);
    }
  }
}

// -------------------------------------------------------------------------- mma paths
// acc[mi][ni][e]: warp-tile row 16*mi + g + 8*(e>>1), column 8*ni + 2*t + (e&1)
// (g = lane/4, t = lane%4): the C-fragment layout of mma.sync m16n8.
using Acc = float[2][4][4];

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ void mma1688tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory row strides (elements). 16-bit: +8 elements (16 B) so the 8 row
// addresses of one ldmatrix phase fall in distinct banks (80 B and 144 B strides).
// fp32: +4 for [row][k] tiles (bank = 4g + t, conflict-free fragment reads), +8 for
// [k][n] tiles (bank = 8t + g).
template <typename T>
struct Strides {
  static constexpr bool k16 = sizeof(T) == 2;
  static constexpr int LDK = kBK + (k16 ? 8 : 4);   // [row][k] tiles of X and Y
  static constexpr int LDN = kDC + 8;               // [k = row][n = d] chunks of X or Y
  static constexpr int LDG = kBN + (k16 ? 8 : 4);   // H tile [row i][column j]
};

// One warp's 32x32 block of C += A B over K. A is [32 rows][K] at the warp's first row
// (stride lda), or, with AT, stored transposed as [K][32] at the warp's first column
// (the H^T X product of dY reads H [i][j] as A(m = j, k = i)). B is [32 cols][K] (NK:
// the B^T product S = X Y^T) or [K][32 cols] (KN: H Y, H^T X), at the warp's first column.
struct Bf16Path {
  using T = __nv_bfloat16;
  static constexpr bool kScaleG = false;   // bf16 has fp32's exponent range
  template <bool AT, bool KN, int K>
  __device__ static void mma(Acc& acc, const T* sA, int lda, const T* sB, int ldb);
};
struct F16Path {
  using T = __half;
  // H ~ s/N underflows fp16 (normal min 6e-5): each H tile is scaled by a power of two
  // into [2^14, 2^15) before the cast and the products scaled back (exact).
  static constexpr bool kScaleG = true;
  template <bool AT, bool KN, int K>
  __device__ static void mma(Acc& acc, const T* sA, int lda, const T* sB, int ldb);
};
struct Tf32Path {
  using T = float;
  static constexpr bool kScaleG = false;
  template <bool AT, bool KN, int K>
  __device__ static void mma(Acc& acc, const T* sA, int lda, const T* sB, int ldb);
};
struct F32Path {
  using T = float;
  static constexpr bool kScaleG = false;
  template <bool AT, bool KN, int K>
  __device__ static void mma(Acc& acc, const T* sA, int lda, const T* sB, int ldb);
};

template <bool BF16, bool AT, bool KN, int K, typename T>
__device__ __forceinline__ void mma16_warp(Acc& acc, const T* sA, int lda, const T* sB,
                                           int ldb) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      if constexpr (AT) {
        // matrices (m lo, k lo), (m hi, k lo), (m lo, k hi), (m hi, k hi) of A stored
        // [k][m]: .trans hands lane (g, t) A(m = g, k = 2t..2t+1), the row-major fragment.
        ldsm_x4_trans(a[mi], sA + (kk + (lane >> 4) * 8 + (lane & 7)) * lda + mi * 16 +
                                 ((lane >> 3) & 1) * 8);
      } else {
        ldsm_x4(a[mi], sA + (mi * 16 + (lane & 15)) * lda + kk + (lane >> 4) * 8);
      }
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t b[4];
      if constexpr (KN) {
        // matrices: (k lo, n 16np), (k hi, n 16np), (k lo, n 16np+8), (k hi, n 16np+8)
        ldsm_x4_trans(b, sB + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + np * 16 +
                             (lane >> 4) * 8);
      } else {
        // matrices: (n 16np.., k lo), (n 16np.., k hi), (n 16np+8.., k lo), (.., k hi)
        ldsm_x4(b, sB + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * ldb + kk +
                       ((lane >> 3) & 1) * 8);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        mma16816<BF16>(acc[mi][2 * np], a[mi], b[0], b[1]);
        mma16816<BF16>(acc[mi][2 * np + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

template <bool AT, bool KN, int K>
__device__ __forceinline__ void Bf16Path::mma(Acc& acc, const T* sA, int lda, const T* sB,
                                              int ldb) {
  mma16_warp<true, AT, KN, K>(acc, sA, lda, sB, ldb);
}
template <bool AT, bool KN, int K>
__device__ __forceinline__ void F16Path::mma(Acc& acc, const T* sA, int lda, const T* sB,
                                             int ldb) {
  mma16_warp<false, AT, KN, K>(acc, sA, lda, sB, ldb);
}

template <bool AT, bool KN, int K>
__device__ __forceinline__ void Tf32Path::mma(Acc& acc, const float* sA, int lda,
                                              const float* sB, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kk = 0; kk < K; kk += 8) {
    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      // fragment: a0 (m g, k t), a1 (m g+8, k t), a2 (m g, k t+4), a3 (m g+8, k t+4)
      if constexpr (AT) {
        const float* p = sA + (kk + t) * lda + mi * 16 + g;
        a[mi][0] = tf32(p[0]);
        a[mi][1] = tf32(p[8]);
        a[mi][2] = tf32(p[4 * lda]);
        a[mi][3] = tf32(p[4 * lda + 8]);
      } else {
        const float* p = sA + (mi * 16 + g) * lda + kk + t;
        a[mi][0] = tf32(p[0]);
        a[mi][1] = tf32(p[8 * lda]);
        a[mi][2] = tf32(p[4]);
        a[mi][3] = tf32(p[8 * lda + 4]);
      }
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      uint32_t b0, b1;
      if constexpr (KN) {
        b0 = tf32(sB[(kk + t) * ldb + ni * 8 + g]);
        b1 = tf32(sB[(kk + t + 4) * ldb + ni * 8 + g]);
      } else {
        b0 = tf32(sB[(ni * 8 + g) * ldb + kk + t]);
        b1 = tf32(sB[(ni * 8 + g) * ldb + kk + t + 4]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) mma1688tf32(acc[mi][ni], a[mi], b0, b1);
    }
  }
}

template <bool AT, bool KN, int K>
__device__ __forceinline__ void F32Path::mma(Acc& acc, const float* sA, int lda,
                                             const float* sB, int ldb) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float a[2][2], b[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        a[mi][h] = AT ? sA[k * lda + mi * 16 + g + 8 * h] : sA[(mi * 16 + g + 8 * h) * lda + k];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        b[ni][e] = KN ? sB[k * ldb + ni * 8 + 2 * t + e] : sB[(ni * 8 + 2 * t + e) * ldb + k];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = fmaf(a[mi][e >> 1], b[ni][e & 1], acc[mi][ni][e]);
  }
}

__device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
}

// S = A_blk B_blk^T for one 64x64 tile, over all of D, double-buffered through shared
// memory (cp.async for stage k+1 in flight while stage k feeds the tensor cores).
// sA, sB: two stages each of [64][LDK]. Ends with a barrier: the buffers are free.
// The forward and the gradient kernels call this with the same operands (x rows as A, y
// rows as B) and the same K blocking, so a logit tile is bitwise the same in both.
template <class P>
__device__ __forceinline__ void tile_scores(Acc& acc, const typename P::T* A, int64_t lda,
                                            int a_rows, const typename P::T* B, int64_t ldb,
                                            int b_rows, int d, bool vec, typename P::T* sA,
                                            typename P::T* sB) {
  using T = typename P::T;
  constexpr int LDK = Strides<T>::LDK;
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  zero(acc);
  const int nk = (d + kBK - 1) / kBK;
  load_tile<T, kBM, kBK, LDK>(sA, A, lda, a_rows, 0, d, vec);
  load_tile<T, kBN, kBK, LDK>(sB, B, ldb, b_rows, 0, d, vec);
  cp_async_commit();
  for (int kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) {
      const int nb = (kt + 1) & 1;
      load_tile<T, kBM, kBK, LDK>(sA + nb * kBM * LDK, A, lda, a_rows, (kt + 1) * kBK, d, vec);
      load_tile<T, kBN, kBK, LDK>(sB + nb * kBN * LDK, B, ldb, b_rows, (kt + 1) * kBK, d, vec);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int cb = kt & 1;
    P::template mma<false, false, kBK>(acc, sA + cb * kBM * LDK + wm * 32 * LDK, LDK,
                                       sB + cb * kBN * LDK + wn * 32 * LDK, LDK);
    __syncthreads();
  }
}

// ------------------------------------------------------------------------- the logit
// z_ij = (s * (rho_i * sigma_j)) * S_ij + b, with explicitly rounded operations so that no
// kernel can contract them differently: the forward and the gradient pass compute every
// logit bit for bit alike (at s = 1e4 one ulp of a logit is 1e-3, and a forward and a
// backward that disagree by one ulp put that error into every exp(z - lse)).
// rr = rho_i * sigma_j; coef = s * rr is also the factor of H = coef * G.
__device__ __forceinline__ float logit(float coef, float S, float b) {
  return __fmaf_rn(coef, S, b);
}

// ------------------------------------------------------------------ epilogue policies
// (max, sum) pairs of an online logsumexp. The max is shifted to 0 when it is -inf so
// that exp(-inf - shift) = 0 and a NaN anywhere still reaches the sum.
__device__ __forceinline__ float safe_shift(float mx) { return mx == kNegInf ? 0.f : mx; }
__device__ __forceinline__ float2 lse_merge(float2 a, float2 b) {
  const float mx = fmaxf(a.x, b.x), sh = safe_shift(mx);
  return make_float2(mx, a.y * __expf(a.x - sh) + b.y * __expf(b.x - sh));
}

// log1p(u) for u in [0, 1]: f = u / (2 + u) lies in [0, 1/3] and
// log1p(u) = 2 atanh(f) = 2f (1 + f^2/3 + f^4/5 + ...); seven terms leave a truncation
// below 1.5e-8 relative, and tiny u keeps its full precision (log(1 + u) would lose it:
// softplus of a logit of -20 is 2e-9, and N^2 such terms make up the loss of a trained
// SigLIP model). The same series as the CPU kernels. NaN propagates.
__device__ __forceinline__ float log1p01(float u) {
  // The denominator lies in [2, 3]: the fast division is exact to 2 ulp there.
  const float f = __fdividef(u, u + 2.f);
  const float f2 = f * f;
  float p = 1.f / 13.f;
  p = fmaf(p, f2, 1.f / 11.f);
  p = fmaf(p, f2, 1.f / 9.f);
  p = fmaf(p, f2, 1.f / 7.f);
  p = fmaf(p, f2, 1.f / 5.f);
  p = fmaf(p, f2, 1.f / 3.f);
  p = fmaf(p, f2, 1.f);
  return __fmul_rn(f + f, p);
}

// softplus(t) = max(t, 0) + log1p(exp(-|t|)) and sigmoid(t), from one exp; exact for any
// |t| (exp(-|t|) <= 1 never overflows: t = ±1e4 gives softplus = max(t, 0), sigmoid = 1
// or 0). expf is the accurate one (2 ulp on its whole range; __expf's error grows with
// |t|, 1.2e-6 relative at t = -20, where the loss of a trained model lives). The last
// multiply and add are explicitly rounded (no contraction into an FMA that one kernel
// might choose and another not): the forward and the one-pass kernels fold bitwise equal
// terms. NaN propagates into both.
__device__ __forceinline__ float softplus_of(float t, float e) {
  return __fadd_rn(fmaxf(t, 0.f), log1p01(e));
}
__device__ __forceinline__ float softplus(float t) { return softplus_of(t, expf(-fabsf(t))); }
__device__ __forceinline__ void softplus_sigmoid(float t, float& sp, float& sg) {
  const float e = expf(-fabsf(t));
  const float inv = __fdividef(1.f, 1.f + e);   // denominator in [1, 2]
  sg = t < 0.f ? e * inv : inv;
  sp = softplus_of(t, e);
}

// A float64 statistic as hi + lo in fp32, so that the gradient's exp((z - hi) - lo) keeps
// its precision ((z - hi) is exact where the result is not negligible, by Sterbenz).
__device__ __forceinline__ void split_hi_lo(double v, float& hi, float& lo) {
  hi = __double2float_rn(v);
  lo = isfinite(hi) ? __double2float_rn(v - double(hi)) : 0.f;   // keep inf/NaN as they are
}

// Epi<LOSS>: what a tile of logits becomes (docs/design.md §2).
//   value(z, positive):  the term a valid entry folds into its row and its column
//   pad():               the term of an entry outside the block
//   reduce<LO, HI>(v):   the tile statistic of a thread's N terms and the lanes
//                        lane ^ LO, ..., lane ^ HI (a row: 1..2, a column: 4..16)
//   tile(a, b):          the two warps' tile statistics as a running statistic Run
//   merge(a, b):         two running statistics
//   finish(parts, k, stride, count): the float64 statistic of `count` partials
// Row, column and dz: kSoftmax (clip) row_i = logsumexp_j z_ij, dz = g_row exp(z - row)
// + g_col exp(z - col); kSigmoid (siglip) row_i = sum_j softplus(-l_ij z_ij), dz =
// (g_row + g_col) (-l) sigmoid(-l z) (l = +1 on the positive, -1 elsewhere).
template <int LOSS>
struct Epi;

template <>
struct Epi<kSoftmax> {
  using Run = float2;                    // (max, sum of exp(z - max)); 8 bytes
  static constexpr bool kBias = false;   // a softmax is shift-invariant: no bias
  __device__ static Run empty() { return make_float2(kNegInf, 0.f); }
  __device__ static float value(float z, bool) { return z; }
  __device__ static float pad() { return kNegInf; }
  template <int LO, int HI, int N>
  __device__ static float2 reduce(const float (&v)[N]) {
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < N; ++k) mx = fmaxf(mx, v[k]);
#pragma unroll
    for (int o = LO; o <= HI; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float sh = safe_shift(mx);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) sum += __expf(v[k] - sh);
#pragma unroll
    for (int o = LO; o <= HI; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    return make_float2(mx, sum);
  }
  __device__ static Run tile(float2 a, float2 b) { return lse_merge(a, b); }
  __device__ static Run merge(Run a, Run b) { return lse_merge(a, b); }
  // Exact merge of the partial (max, sum) pairs: M = max, row = M + log(sum s_p e^(m_p - M)),
  // the sum in float64 (the max is exact in fp32, log(sum) small).
  __device__ static double finish(const Run* parts, int64_t k, int64_t stride, int count) {
    float mx = kNegInf;
    for (int p = 0; p < count; ++p) mx = fmaxf(mx, parts[p * stride + k].x);
    const float sh = safe_shift(mx);
    double s = 0.0;
    for (int p = 0; p < count; ++p) {
      const Run r = parts[p * stride + k];
      s += double(r.y) * double(expf(r.x - sh));
    }
    return double(mx) + log(s);
  }
};

template <>
struct Epi<kSigmoid> {
  using Run = double;                    // a sum of up to N positive terms; 8 bytes
  static constexpr bool kBias = true;
  __device__ static Run empty() { return 0.0; }
  __device__ static float value(float z, bool positive) { return softplus(positive ? -z : z); }
  __device__ static float pad() { return 0.f; }
  template <int LO, int HI, int N>
  __device__ static float2 reduce(const float (&v)[N]) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < N; ++k) sum += v[k];
#pragma unroll
    for (int o = LO; o <= HI; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    return make_float2(sum, 0.f);
  }
  __device__ static Run tile(float2 a, float2 b) { return double(a.x) + double(b.x); }
  __device__ static Run merge(Run a, Run b) { return a + b; }
  __device__ static double finish(const Run* parts, int64_t k, int64_t stride, int count) {
    double s = 0.0;
    for (int p = 0; p < count; ++p) s += parts[p * stride + k];
    return s;
  }
};

// row_i = finish over the row_parts partials of row i ([row_parts][n]); likewise the
// columns ([col_parts][m], m = 0: none). Fixed order: deterministic.
template <int LOSS>
__global__ void merge_parts_kernel(const typename Epi<LOSS>::Run* __restrict__ rowpart,
                                   int row_parts, int n,
                                   const typename Epi<LOSS>::Run* __restrict__ colpart,
                                   int col_parts, int m, double* __restrict__ row,
                                   double* __restrict__ col) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < int64_t(n) + m;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < n)
      row[i] = Epi<LOSS>::finish(rowpart, i, n, row_parts);
    else
      col[i - n] = Epi<LOSS>::finish(colpart, i - n, m, col_parts);
  }
}

template <int LOSS>
inline void launch_merge_parts(const typename Epi<LOSS>::Run* rowpart, int64_t row_parts,
                               int64_t n, const typename Epi<LOSS>::Run* colpart,
                               int64_t col_parts, int64_t m, double* row, double* col,
                               cudaStream_t st) {
  const int64_t blocks = std::min<int64_t>(cdiv(n + m, 256), 4096);
  merge_parts_kernel<LOSS><<<unsigned(blocks), 256, 0, st>>>(
      rowpart, int(row_parts), int(n), colpart, int(col_parts), int(m), row, col);
}

// ------------------------------------------------------------------ row-wise kernels
// ||p|| of one row of d elements, by a whole warp; every lane gets it. The sum of squares in
// double: in fp32 it overflows for norms above ~1.8e19, rho became 0 and every logit of the
// row 0 (a finite, wrong loss). inv_norm_kernel and grad_finalize_kernel both call it, so
// they agree bit for bit on which rows eps clamps.
template <typename T>
__device__ __forceinline__ double warp_row_norm(const T* __restrict__ p, int d, int lane) {
  double ss = 0.0;
  for (int k = lane; k < d; k += 32) {
    const double v = double(to_f(p[k]));
    ss = fma(v, v, ss);
  }
#pragma unroll
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  return sqrt(ss);
}

// rho_i = 1/max(||a_i||, eps) (1 when !normalize); one warp per row. O(rows·d): off the
// hot path.
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ a, int64_t rows, int d, int64_t ld,
                                bool normalize, float eps, float* __restrict__ out) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  if (!normalize) {
    if (lane == 0) out[r] = 1.f;
    return;
  }
  const double nrm = warp_row_norm(a + r * ld, d, lane);
  if (lane == 0) out[r] = float(1.0 / fmax(nrm, double(eps)));
}

template <typename T>
inline void launch_inv_norm(const T* a, int64_t rows, int d, int64_t ld, bool normalize,
                            float eps, float* out, cudaStream_t st) {
  const int64_t blocks = (rows * 32 + 255) / 256;
  inv_norm_kernel<T><<<dim3(unsigned(blocks)), 256, 0, st>>>(a, rows, d, ld, normalize, eps, out);
}

// 16-byte cp.async applies when both bases, both row strides and d are whole chunks.
template <typename T>
inline bool vec_ok(const T* x, const T* y, int64_t ldx, int64_t ldy, int64_t d) {
  constexpr int CE = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
         ldx % CE == 0 && ldy % CE == 0 && d % CE == 0;
}

}  // namespace dev
}  // namespace cuda
}  // namespace fastclip
