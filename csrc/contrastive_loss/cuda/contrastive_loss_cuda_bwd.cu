// Gradient pass of the contrastive-loss block on CUDA (docs/design.md §2): the backward of
// every loss, and the one-pass forward+backward of one-pass losses (the sigmoid), in one
// kernel family templated on the loss's epilogue policy Epi<LOSS>.
//
// Three products per 64x64 tile, nothing recomputed. A CTA runs one unit = (row block rb,
// column split sp) and walks the split's column blocks; per tile it
//   1. forms S = X_blk Y_blk^T with tile_scores, exactly as the forward does (same
//      operands, same K blocking: the logits are bitwise the forward's);
//   2. forms G_ij = dloss/dz_ij by the policy (plus grad_pos on the positive) and
//      H_ij = s rho_i sigma_j G_ij (the logit's own coefficient), staged in shared memory
//      in the input dtype (fp16 tiles scaled by a power of two first); with `stats` (the
//      one-pass form) also the softplus sums of its rows and columns and its positives;
//   3. dY: Wy[j, :] += sum_i H_ij x_i  (H read transposed by ldmatrix.trans), added into
//      the column block's fp32 rows in row-block order (the turnstile below);
//   4. dX: Wx[sp, i, :] += sum_j H_ij y_j into the unit's own rows (no other CTA touches
//      them: plain read-modify-write).
// FLOP: 3 x 2nmD (the floor of a one-pass loss; a softmax backward given its statistics
// too: 6nmD, 8nmD with its forward). Finalize kernels sum the splits of Wx in order and
// apply the normalisation's backward: dx_i = P_i - rho_i^2 x_i <x_i, P_i> with
// P_i = rho_i dL/dx^_i (what Wx holds); dparams = (sum G u, sum G) is reduced from per-unit
// float64 partials in a fixed order by one block.
//
// Determinism without atomics (the turnstile). dY_j sums over every row block. Each
// column block cb has a flag = the number of row blocks already added into Wy[cb]; the
// unit of row block rb waits (one thread, ld.acquire) until flag == rb, adds, and
// publishes rb + 1 (fences, st.release). Every Wy row and every column sum is therefore
// added in row-block order whatever the schedule: bitwise reproducible. Deadlock-free:
// units take their index from an atomic counter when they start (as CUB's decoupled
// look-back does), so a unit only ever waits for a unit with a smaller index, which is
// already running; by induction down to rb = 0, which never waits. Units of one split
// walk their columns in the same order, so the successor's wait overlaps the
// predecessor's dX product (step 4 after the release). Memory: Wx splits x n x D and Wy
// m x D (fp32), the rest O(n + m); splits > 1 only when the row blocks alone cannot fill
// the GPU (n < kGradTargetCtas x kBM rows), so splits x n stays <= 32768 rows.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "contrastive_loss/cuda/contrastive_loss_cuda.cuh"

namespace fastclip {
namespace cuda {
namespace {

using namespace dev;

static_assert(kBM == kBN, "the dX and dY products share one staging buffer and one K loop");

// A unit waits for its predecessor's one tile product and fp32 adds: microseconds. A wait
// that never ends is a bug; it traps (with a message) instead of hanging the device.
// With __nanosleep(64) per spin the limit is minutes of real waiting.
constexpr unsigned kSpinLimit = 1u << 31;

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void wait_turn(const unsigned* flag, unsigned want) {
  unsigned spins = 0;
  while (ld_acquire(flag) != want) {
    __nanosleep(64);
    if (++spins == kSpinLimit) {
      printf("fastclip cuda gradient pass: block %d waited too long for row block %u\n",
             int(blockIdx.x), want);
      __trap();
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
struct GradArgs {
  const T* x;
  const T* y;
  int n, m, d;
  int64_t ldx, ldy;
  bool vec;                  // 16-byte cp.async loads
  bool stats;                // one-pass: also row/column sums and positives (sigmoid)
  const float* params;       // [P]: s, (b)
  const float* rho;          // [n]
  const float* sig;          // [m]
  const double* row;         // softmax: the merged forward statistics [n], [m]
  const double* col;
  const double* grad_row;    // [n]
  const double* grad_col;    // [m]
  const double* grad_pos;    // [n]
  int64_t pos_offset;
  int splits, col_blocks;
  float* wx;                 // [splits][n][ldw]
  float* wy;                 // [m][ldw]
  int64_t ldw;
  unsigned* flags;           // [col_blocks] turnstiles, then the unit counter
  unsigned* counter;
  double* rowpart;           // stats: [splits][n] row sums
  double* col_out;           // stats: column sums [m], added in row-block order
  double* pos;               // stats: positives [n] (zeroed before the launch)
  double* dpart;             // [units][2]: (sum G u, sum G)
};

// The end of the shared memory: reductions and the unit index.
struct GradTail {
  double dred[8];       // per warp (sum G u, sum G)
  float rowt[2][kBM];   // stats: a tile's row sums, per column half (wn)
  float colt[2][kBN];   // stats: a tile's column sums, per row half (wm)
  float gmax[4];        // fp16: per-warp max |H|
  unsigned unit;
};

template <typename T>
constexpr int grad_region_elems() {
  using S = Strides<T>;
  constexpr int stage1 = 2 * (kBM + kBN) * S::LDK;   // tile_scores: sA, sB
  constexpr int stage2 = 2 * kBN * S::LDN;           // products: two chunks of y or x rows
  return stage1 > stage2 ? stage1 : stage2;
}

template <typename T>
constexpr size_t grad_smem_bytes() {
  constexpr size_t head =
      (size_t(grad_region_elems<T>()) + size_t(kBM) * Strides<T>::LDG) * sizeof(T);
  static_assert(head % 16 == 0, "GradTail must start 16-byte aligned");
  return head + sizeof(GradTail);
}

// W[r, :] (+)= sum_k A(r, k) B[k, :] for the 64 output rows of this block, D chunk by D
// chunk: A = H (stage 4, rows i, K = columns j) or H^T (AT, stage 3, rows j, K = rows i),
// B = the 64 rows of y or x at `bsrc`, staged by cp.async (two chunks in flight). The
// same thread always owns the same W entries. `turn` (dY, rb > 0): wait for the turnstile
// after the first chunk's product, before the first add.
template <class P, bool AT>
__device__ __forceinline__ void grad_product(const typename P::T* bsrc, int64_t ldb, int b_rows,
                                             int d, bool vec, const typename P::T* sG,
                                             typename P::T* sBuf, float* __restrict__ W,
                                             int64_t ldw, int out_rows, bool accumulate,
                                             float ginv, const unsigned* turn, unsigned want) {
  using T = typename P::T;
  constexpr int LDN = Strides<T>::LDN, LDG = Strides<T>::LDG;
  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* sa = AT ? sG + wm * 32 : sG + wm * 32 * LDG;
  const int nd = (d + kDC - 1) / kDC;
  load_tile<T, kBN, kDC, LDN>(sBuf, bsrc, ldb, b_rows, 0, d, vec);
  cp_async_commit();
  for (int dc = 0; dc < nd; ++dc) {
    if (dc + 1 < nd) {
      load_tile<T, kBN, kDC, LDN>(sBuf + ((dc + 1) & 1) * kBN * LDN, bsrc, ldb, b_rows,
                                  (dc + 1) * kDC, d, vec);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();   // chunk dc landed (on dc == 0 also: sG published by the caller)
    Acc acc;
    zero(acc);
    P::template mma<AT, true, kBN>(acc, sa, LDG, sBuf + (dc & 1) * kBN * LDN + wn * 32, LDN);
    __syncthreads();   // chunk buffer free for dc + 2 (and the region for the caller)
    if (dc == 0 && turn != nullptr) {
      if (threadIdx.x == 0) wait_turn(turn, want);
      __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * 32 + mi * 16 + g + 8 * h;
        if (r >= out_rows) continue;
        float* wrow = W + int64_t(r) * ldw + dc * kDC + wn * 32 + 2 * t;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          float2* p = reinterpret_cast<float2*>(wrow + ni * 8);
          float2 v = make_float2(acc[mi][ni][2 * h] * ginv, acc[mi][ni][2 * h + 1] * ginv);
          if (accumulate) {
            // L2 (.cg): another SM wrote these rows; nothing stale can come from L1.
            const float2 o = __ldcg(p);
            v.x += o.x;
            v.y += o.y;
          }
          __stcg(p, v);
        }
      }
  }
}

template <class P, int LOSS>
__global__ void __launch_bounds__(kThreads) grad_tiles_kernel(const GradArgs<typename P::T> a) {
  using T = typename P::T;
  using E = Epi<LOSS>;
  constexpr int LDK = Strides<T>::LDK, LDG = Strides<T>::LDG;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* region = reinterpret_cast<T*>(smem_raw);   // tile_scores (sA, sB) or products (sBuf)
  T* sA = region;
  T* sB = region + 2 * kBM * LDK;
  T* sBuf = region;
  T* sG = region + grad_region_elems<T>();
  GradTail* tail = reinterpret_cast<GradTail*>(sG + kBM * LDG);

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  if (threadIdx.x == 0) tail->unit = atomicAdd(a.counter, 1u);
  __syncthreads();
  const int unit = int(tail->unit);
  const int rb = unit / a.splits, sp = unit % a.splits;
  const int cb0 = int(int64_t(sp) * a.col_blocks / a.splits);
  const int cb1 = int(int64_t(sp + 1) * a.col_blocks / a.splits);
  const int row0 = rb * kBM;
  const float s = a.params[0];
  float bias = 0.f;
  if constexpr (E::kBias) bias = a.params[1];
  const bool stats = LOSS == kSigmoid && a.stats;

  // Per-row values of the 4 rows this thread holds (fixed for the unit).
  bool rv[2][2];
  float rr[2][2], gr[2][2], gp[2][2], rhi[2][2], rlo[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
      rv[mi][h] = r < a.n;
      rr[mi][h] = rv[mi][h] ? a.rho[r] : 0.f;
      gr[mi][h] = rv[mi][h] ? float(a.grad_row[r]) : 0.f;
      gp[mi][h] = rv[mi][h] ? float(a.grad_pos[r]) : 0.f;
      rhi[mi][h] = rlo[mi][h] = 0.f;
      if constexpr (LOSS == kSoftmax)
        if (rv[mi][h]) split_hi_lo(a.row[r], rhi[mi][h], rlo[mi][h]);
    }
  double du = 0.0, dg = 0.0;   // sum G u, sum G over this thread's entries
  double racc = 0.0;           // stats: row sum of row (row0 + threadIdx.x), threads < kBM

  for (int cb = cb0; cb < cb1; ++cb) {
    const int col0 = cb * kBN;
    Acc acc;
    tile_scores<P>(acc, a.x + int64_t(row0) * a.ldx, a.ldx, a.n - row0,
                   a.y + int64_t(col0) * a.ldy, a.ldy, a.m - col0, a.d, a.vec, sA, sB);
    float rs[2][2] = {{0.f, 0.f}, {0.f, 0.f}};   // stats: softplus sums of the 4 rows
    float cs[4][2] = {{0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}};   // ... of the 8 columns
    float tu = 0.f, tg = 0.f, hmax = 0.f;
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = col0 + wn * 32 + ni * 8 + 2 * t + e;
        const bool cv = c < a.m;
        const float rc = cv ? a.sig[c] : 0.f;
        const float gc = cv ? float(a.grad_col[c]) : 0.f;
        float chi = 0.f, clo = 0.f;
        if constexpr (LOSS == kSoftmax)
          if (cv) split_hi_lo(a.col[c], chi, clo);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& v = acc[mi][ni][2 * h + e];
            float H = 0.f;
            if (rv[mi][h] && cv) {
              const int r = row0 + wm * 32 + mi * 16 + g + 8 * h;
              const float q = __fmul_rn(rr[mi][h], rc);   // rho_i sigma_j
              const float coef = __fmul_rn(s, q);
              const float z = logit(coef, v, bias);
              const float u = q * v;                      // <x^_i, y^_j>
              const bool positive = int64_t(c) == r + a.pos_offset;
              float G;
              if constexpr (LOSS == kSoftmax) {
                G = gr[mi][h] * __expf((z - rhi[mi][h]) - rlo[mi][h]) +
                    gc * __expf((z - chi) - clo);
              } else {
                const float sgn = positive ? -1.f : 1.f;  // -l
                float phi, sgm;
                softplus_sigmoid(sgn * z, phi, sgm);
                G = (gr[mi][h] + gc) * (sgn * sgm);
                if (stats) {
                  rs[mi][h] += phi;
                  cs[ni][e] += phi;
                  if (positive) a.pos[r] = double(z);
                }
              }
              // The positive's grad_pos joins G before any rounding, so that G = 0 exactly
              // where the softmax's terms cancel it (n = 1, or a one-hot softmax).
              if (positive) G += gp[mi][h];
              tu = fmaf(G, u, tu);
              tg += G;
              H = coef * G;
            }
            v = H;
            hmax = fmaxf(hmax, fabsf(H));
          }
      }
    // fp32 within the tile (32 terms), float64 across tiles: dscale is a sum of n m terms
    // that cancel (by ~100x at CLIP's gradients).
    du += double(tu);
    dg += double(tg);
    if (stats) {   // uniform: every lane shuffles
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v = rs[mi][h];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          if (t == 0) tail->rowt[wn][wm * 32 + mi * 16 + g + 8 * h] = v;
        }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = cs[ni][e];
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (g == 0) tail->colt[wm][wn * 32 + ni * 8 + 2 * t + e] = v;
        }
    }
    float gs = 1.f, ginv = 1.f;
    if constexpr (P::kScaleG) {
      hmax = warp_max(hmax);
      if (lane == 0) tail->gmax[warp] = hmax;
      __syncthreads();
      hmax = fmaxf(fmaxf(tail->gmax[0], tail->gmax[1]), fmaxf(tail->gmax[2], tail->gmax[3]));
      if (hmax > 0.f && hmax <= 3.0e38f) {   // finite and nonzero: scale into [2^14, 2^15)
        int e2;
        frexpf(hmax, &e2);                     // hmax < 2^e2
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
    __syncthreads();   // H and the tile's row/column sums are visible to the whole CTA
    if (stats && threadIdx.x < kBM)
      racc += double(tail->rowt[0][threadIdx.x]) + double(tail->rowt[1][threadIdx.x]);

    // Step 3, dY: Wy[col0 + j] += sum_i H_ij x_i, in row-block order (the turnstile).
    grad_product<P, true>(a.x + int64_t(row0) * a.ldx, a.ldx, a.n - row0, a.d, a.vec, sG, sBuf,
                          a.wy + int64_t(col0) * a.ldw, a.ldw, a.m - col0, rb > 0, ginv,
                          rb > 0 ? a.flags + cb : nullptr, unsigned(rb));
    if (stats && threadIdx.x < kBN) {
      const int c = col0 + threadIdx.x;
      if (c < a.m) {
        const double prev = rb > 0 ? __ldcg(a.col_out + c) : 0.0;
        __stcg(a.col_out + c,
               prev + (double(tail->colt[0][threadIdx.x]) + double(tail->colt[1][threadIdx.x])));
      }
    }
    __threadfence();   // every thread's adds to Wy (and col_out) before the release
    __syncthreads();
    if (threadIdx.x == 0) st_release(a.flags + cb, unsigned(rb + 1));

    // Step 4, dX: Wx[sp, row0 + i] += sum_j H_ij y_j (this unit's rows only).
    grad_product<P, false>(a.y + int64_t(col0) * a.ldy, a.ldy, a.m - col0, a.d, a.vec, sG, sBuf,
                           a.wx + (int64_t(sp) * a.n + row0) * a.ldw, a.ldw, a.n - row0,
                           cb != cb0, ginv, nullptr, 0u);
  }

  if (stats && threadIdx.x < kBM) {
    const int r = row0 + threadIdx.x;
    if (r < a.n) a.rowpart[int64_t(sp) * a.n + r] = racc;
  }
  du = warp_sum(du);
  dg = warp_sum(dg);
  if (lane == 0) {
    tail->dred[2 * warp] = du;
    tail->dred[2 * warp + 1] = dg;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a.dpart[2 * int64_t(unit)] = (tail->dred[0] + tail->dred[2]) + (tail->dred[4] + tail->dred[6]);
    a.dpart[2 * int64_t(unit) + 1] =
        (tail->dred[1] + tail->dred[3]) + (tail->dred[5] + tail->dred[7]);
  }
}

// out_i = P_i - rho_i^2 a_i <a_i, P_i> (or P_i without normalize, or where eps clamps the
// norm: there a^ = a / eps is linear), where P_i = the sum of the `splits` partials W[q, i]
// in order (rho_i dL/da^_i). One warp per row; the dot product in float64 (the projection
// can cancel most of P_i).
template <typename T>
__global__ void grad_finalize_kernel(const T* __restrict__ a, int64_t lda, int na, int d,
                                     const float* __restrict__ rho_a, const float* __restrict__ W,
                                     int64_t ldw, int64_t wsplit, int splits, bool normalize,
                                     float eps, T* __restrict__ out) {
  const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= na) return;
  const T* arow = a + i * lda;
  const float* wrow = W + i * ldw;
  auto pk = [&](int k) {
    float v = wrow[k];
    for (int q = 1; q < splits; ++q) v += wrow[q * wsplit + k];
    return v;
  };
  const float ra = rho_a[i];
  // Warp-uniform: every lane holds the same norm.
  const bool project = normalize && warp_row_norm(arow, d, lane) >= double(eps);
  float c = 0.f;
  if (project) {
    double dot = 0.0;
    for (int k = lane; k < d; k += 32) dot += double(to_f(arow[k])) * double(pk(k));
    c = float(double(ra) * warp_sum(dot));
  }
  T* orow = out + i * d;
  for (int k = lane; k < d; k += 32) {
    float v = pk(k);
    if (project) v -= (ra * to_f(arow[k])) * c;
    orow[k] = from_f<T>(v);
  }
}

// dparams = (sum of the units' sum G u, sum of their sum G), in a fixed order; one block.
__global__ void dparams_kernel(const double* __restrict__ dpart, int64_t units, int num_params,
                               float* __restrict__ dparams) {
  __shared__ double red[2][256];
  double u = 0.0, gsum = 0.0;
  for (int64_t k = threadIdx.x; k < units; k += 256) {
    u += dpart[2 * k];
    gsum += dpart[2 * k + 1];
  }
  red[0][threadIdx.x] = u;
  red[1][threadIdx.x] = gsum;
  __syncthreads();
  for (int w = 128; w; w >>= 1) {
    if (int(threadIdx.x) < w) {
      red[0][threadIdx.x] += red[0][threadIdx.x + w];
      red[1][threadIdx.x] += red[1][threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    dparams[0] = float(red[0][0]);
    if (num_params > 1) dparams[1] = float(red[1][0]);
  }
}

template <class P, int LOSS>
void run_grad(const void* xv, const void* yv, int64_t n, int64_t m, int64_t d, int64_t ldx,
              int64_t ldy, const float* params, int num_params, bool normalize, float eps,
              int64_t pos_offset, const double* row_in, const double* col_in,
              const double* grad_row, const double* grad_col, const double* grad_pos,
              bool stats, double* row_out, double* col_out, double* pos_out, void* dxv,
              void* dyv, float* dparams, void* workspace, cudaStream_t st) {
  using T = typename P::T;
  const char* fn = stats ? "cuda_fwd_bwd" : "cuda_bwd";
  const T* x = static_cast<const T*>(xv);
  const T* y = static_cast<const T*>(yv);
  const GradPlan pl = grad_plan(n, m, d, stats);
  char* ws = static_cast<char*>(workspace);
  float* rho = reinterpret_cast<float*>(ws + pl.off_rho);
  float* sig = reinterpret_cast<float*>(ws + pl.off_sig);
  float* wx = reinterpret_cast<float*>(ws + pl.off_wx);
  float* wy = reinterpret_cast<float*>(ws + pl.off_wy);
  double* rowpart = reinterpret_cast<double*>(ws + pl.off_rowpart);
  unsigned* flags = reinterpret_cast<unsigned*>(ws + pl.off_flags);
  double* dpart = reinterpret_cast<double*>(ws + pl.off_dpart);

  // The turnstiles and the unit counter start at 0 (one memset: they are adjacent).
  check_cuda(cudaMemsetAsync(flags, 0, size_t(pl.col_blocks + 1) * sizeof(unsigned), st), fn,
             "cudaMemsetAsync(turnstiles)");
  if (stats)
    check_cuda(cudaMemsetAsync(pos_out, 0, size_t(n) * sizeof(double), st), fn,
               "cudaMemsetAsync(pos)");
  launch_inv_norm<T>(x, n, int(d), ldx, normalize, eps, rho, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (x)");
  launch_inv_norm<T>(y, m, int(d), ldy, normalize, eps, sig, st);
  check_cuda(cudaGetLastError(), fn, "inv_norm_kernel<<<>>> (y)");

  GradArgs<T> args{};
  args.x = x;
  args.y = y;
  args.n = int(n);
  args.m = int(m);
  args.d = int(d);
  args.ldx = ldx;
  args.ldy = ldy;
  args.vec = vec_ok(x, y, ldx, ldy, d);
  args.stats = stats;
  args.params = params;
  args.rho = rho;
  args.sig = sig;
  args.row = row_in;
  args.col = col_in;
  args.grad_row = grad_row;
  args.grad_col = grad_col;
  args.grad_pos = grad_pos;
  args.pos_offset = pos_offset;
  args.splits = int(pl.splits);
  args.col_blocks = int(pl.col_blocks);
  args.wx = wx;
  args.wy = wy;
  args.ldw = pl.ldw;
  args.flags = flags;
  args.counter = flags + pl.col_blocks;
  args.rowpart = rowpart;
  args.col_out = col_out;
  args.pos = pos_out;
  args.dpart = dpart;

  constexpr size_t smem = grad_smem_bytes<T>();
  auto kern = grad_tiles_kernel<P, LOSS>;
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               fn, "cudaFuncSetAttribute(grad_tiles_kernel, MaxDynamicSharedMemorySize)");
  kern<<<unsigned(pl.units), kThreads, smem, st>>>(args);
  check_cuda(cudaGetLastError(), fn, "grad_tiles_kernel<<<>>>");

  T* dx = static_cast<T*>(dxv);
  T* dy = static_cast<T*>(dyv);
  grad_finalize_kernel<T><<<unsigned(cdiv(n * 32, 256)), 256, 0, st>>>(
      x, ldx, int(n), int(d), rho, wx, pl.ldw, n * pl.ldw, int(pl.splits), normalize, eps, dx);
  check_cuda(cudaGetLastError(), fn, "grad_finalize_kernel<<<>>> (dx)");
  grad_finalize_kernel<T><<<unsigned(cdiv(m * 32, 256)), 256, 0, st>>>(
      y, ldy, int(m), int(d), sig, wy, pl.ldw, m * pl.ldw, 1, normalize, eps, dy);
  check_cuda(cudaGetLastError(), fn, "grad_finalize_kernel<<<>>> (dy)");
  dparams_kernel<<<1, 256, 0, st>>>(dpart, pl.units, num_params, dparams);
  check_cuda(cudaGetLastError(), fn, "dparams_kernel<<<>>>");
  if (stats) {
    // Row sums over the splits (the column sums are complete in col_out already).
    launch_merge_parts<kSigmoid>(rowpart, pl.splits, n, nullptr, 0, 0, row_out, nullptr, st);
    check_cuda(cudaGetLastError(), fn, "merge_parts_kernel<<<>>>");
  }
}

template <int LOSS>
void grad_loss(const void* x, const void* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
               int64_t ldy, DType dtype, bool allow_tf32, const float* params, int num_params,
               bool normalize, float eps, int64_t pos_offset, const double* row_in,
               const double* col_in, const double* grad_row, const double* grad_col,
               const double* grad_pos, bool stats, double* row_out, double* col_out,
               double* pos_out, void* dx, void* dy, float* dparams, void* workspace,
               cudaStream_t stream) {
#define FASTCLIP_RUN_GRAD(PATH)                                                                  \
  return run_grad<PATH, LOSS>(x, y, n, m, d, ldx, ldy, params, num_params, normalize, eps,      \
                              pos_offset, row_in, col_in, grad_row, grad_col, grad_pos, stats,  \
                              row_out, col_out, pos_out, dx, dy, dparams, workspace, stream)
  switch (dtype) {
    case DType::kBFloat16: FASTCLIP_RUN_GRAD(Bf16Path);
    case DType::kFloat16: FASTCLIP_RUN_GRAD(F16Path);
    case DType::kFloat32:
      if (allow_tf32) FASTCLIP_RUN_GRAD(Tf32Path);
      FASTCLIP_RUN_GRAD(F32Path);
  }
#undef FASTCLIP_RUN_GRAD
  throw std::invalid_argument(std::string(stats ? "cuda_fwd_bwd" : "cuda_bwd") +
                              ": unknown dtype code");
}

}  // namespace

GradPlan grad_plan(int64_t n, int64_t m, int64_t d, bool stats) {
  GradPlan p{};
  p.row_blocks = cdiv(n, kBM);
  p.col_blocks = cdiv(m, kBN);
  // Split the columns only when the row blocks alone cannot fill the GPU (n small
  // against m, e.g. one shard's rows against the gathered columns).
  p.splits = std::max<int64_t>(1, std::min(kGradTargetCtas / p.row_blocks, p.col_blocks));
  p.units = p.row_blocks * p.splits;
  p.ldw = cdiv(d, kDC) * kDC;
  p.off_rho = 0;
  p.off_sig = p.off_rho + align256(size_t(n) * 4);
  p.off_wx = p.off_sig + align256(size_t(m) * 4);
  p.off_wy = p.off_wx + align256(size_t(p.splits) * n * p.ldw * 4);
  p.off_rowpart = p.off_wy + align256(size_t(m) * p.ldw * 4);
  p.off_flags = p.off_rowpart + (stats ? align256(size_t(p.splits) * n * 8) : 0);
  p.off_dpart = p.off_flags + align256(size_t(p.col_blocks + 1) * 4);
  p.bytes = p.off_dpart + align256(size_t(p.units) * 16);
  return p;
}

void contrastive_loss_bwd(LossKind loss, const void* x, const void* y, int64_t n, int64_t m,
                          int64_t d, int64_t ldx, int64_t ldy, DType dtype, bool allow_tf32,
                          const float* params, int num_params, bool normalize, float eps,
                          int64_t pos_offset, const double* row, const double* col,
                          const double* grad_row, const double* grad_col,
                          const double* grad_pos, void* dx, void* dy, float* dparams,
                          void* workspace, cudaStream_t stream) {
  if (loss == LossKind::kSoftmax)
    return grad_loss<kSoftmax>(x, y, n, m, d, ldx, ldy, dtype, allow_tf32, params, num_params,
                               normalize, eps, pos_offset, row, col, grad_row, grad_col,
                               grad_pos, false, nullptr, nullptr, nullptr, dx, dy, dparams,
                               workspace, stream);
  if (loss == LossKind::kSigmoid)
    return grad_loss<kSigmoid>(x, y, n, m, d, ldx, ldy, dtype, allow_tf32, params, num_params,
                               normalize, eps, pos_offset, row, col, grad_row, grad_col,
                               grad_pos, false, nullptr, nullptr, nullptr, dx, dy, dparams,
                               workspace, stream);
  throw std::invalid_argument("cuda_bwd: unknown loss code");
}

void contrastive_loss_fwd_bwd(LossKind loss, const void* x, const void* y, int64_t n,
                              int64_t m, int64_t d, int64_t ldx, int64_t ldy, DType dtype,
                              bool allow_tf32, const float* params, int num_params,
                              bool normalize, float eps, int64_t pos_offset,
                              const double* grad_row, const double* grad_col,
                              const double* grad_pos, double* row, double* col, double* pos,
                              void* dx, void* dy, float* dparams, void* workspace,
                              cudaStream_t stream) {
  if (loss != LossKind::kSigmoid)
    throw std::invalid_argument(
        "cuda_fwd_bwd: only one-pass losses (code 1, sigmoid) run in one pass; the softmax "
        "needs its merged statistics: run cuda_fwd, then cuda_bwd");
  grad_loss<kSigmoid>(x, y, n, m, d, ldx, ldy, dtype, allow_tf32, params, num_params, normalize,
                      eps, pos_offset, nullptr, nullptr, grad_row, grad_col, grad_pos, true, row,
                      col, pos, dx, dy, dparams, workspace, stream);
}

}  // namespace cuda
}  // namespace fastclip
