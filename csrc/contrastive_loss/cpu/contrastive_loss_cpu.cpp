// CPU kernels of the fused contrastive loss (OpenMP); contract in contrastive_loss_cpu.h.
//
// Structure. The three matrix products of the loss (S = X Y^T, dX = G Y, dY = G^T X)
// run through one register-blocked micro-kernel (contrastive_loss_cpu_kernels.inc)
// compiled three times: AVX-512 (Zen 4, Ice Lake+), AVX2+FMA, and a generic 128-bit
// build (SSE2 / NEON) for everything else; `__builtin_cpu_supports` picks one at run
// time, so the wheel stays portable. This file holds the ISA-independent driver:
// norms, packing, threading, the exact merges of per-thread column statistics.
//
// Tiles. Row blocks of BM = 96 rows are the unit of work (static OpenMP schedule:
// the same thread count gives bit-identical results). Each block walks all column
// tiles of BN = 192: S tile = 96 x 192 fp32 (72 KB, L2-resident), exp/log-sum-exp
// epilogue fused on it while hot. Forward: 2NMD FLOP; backward recomputes S and
// does both gradient products from the same H tile: 6NMD FLOP (8NMD in all, the
// floor of design.md §2). BM x BN measured (fp32, N=3072, D=512, 1 thread, GFLOP/s per
// CPU-second, three interleaved rounds, fwd / bwd): 96x192 77-79 / 71-74; 48x192 60-76 /
// 54-61 (the x block is re-read per 192 columns); 96x384 71-77 / 66-73; 192x192 63-77 /
// 58-79 (dX accumulator 384 KB competes for L2); 144x192 71-74 / 69-81. 96x192 is the
// steadiest of the best.
//
// Speed, fwd+bwd through fastclip.clip_loss(normalize=True) + backward, D=512 fp32,
// torch.set_num_threads(2), Zen 4 with 2 cores shared with other jobs (load 3-8), so
// min of interleaved repeats, two sessions; wall seconds, and in brackets GFLOP per
// busy CPU-second on 8N²D FLOP, which the steal time does not distort (micro-kernel
// peak ~107):
//            fused                naive (does 6N²D)     floor: 4 torch.matmul
//   N=4096   1.03-1.07 s (64-69)  1.61-1.78 s (39-43)   1.13-1.15 s (60-62)
//   N=8192   3.48-4.10 s (67-73)  3.55-6.41 s (43-47)   2.65-5.11 s (55-61)
// i.e. per CPU-second fused/naive = 0.58-0.65, fused/floor = 0.80-0.92. Peak RSS over
// inputs and their gradients: +41 MiB at N=4096, +257 MiB at N=32768 (117 s), +322 MiB
// for a 192 x 65536 block (the m-sized part of N=65536: Y^T pack 128 MB, dY buffers
// 64 MB, the dy output 128 MB); the naive formula needs ~5.3 N² x 4 bytes.
//
// dY accumulation: per-thread dY buffers (rows outer), reduced in a fixed order,
// instead of a second columns-outer pass. The second pass would recompute S and the
// exps (+2NMD FLOP): from the measured parts (N=3072, 1 thread: S + epilogue as in the
// forward at 77 GFLOP/CPU-s, whole backward at 72) it would take 6/72 + 2/77 = 0.109
// vs 0.083 s per N²D GFLOP, +31% on the backward; the buffers cost
// threads x W x D x 4 bytes and one O(threads·m·D) reduction. The buffers cover a
// chunk of W columns at a time, W chosen so that they hold at most kDyBudget = 64 MB
// (W = m up to threads·m·D = 16M floats, e.g. m = 16384 at D = 512 and 2 threads;
// beyond that the columns are processed in chunks, each a full rows-outer sweep over
// its columns only, so nothing is recomputed: a chunk costs one extra pass over dx
// and one barrier), so memory stays bounded for any thread count:
// O((n+m)·D + threads·(W·D + tile)).
#include "contrastive_loss_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace fastclip::cpu {
namespace {

constexpr int64_t BM = 96, BN = 192;              // multiples of every MR and NR below
constexpr int64_t kDyBudget = int64_t(64) << 20;   // bytes of per-thread dY buffers

template <typename T>
struct TileCtx {
  const T* x;
  const T* y;
  int64_t n, m, d, ldx, ldy, dp, bm, bn;
  const T* yp;        // Y^T packed in panels of NR columns [ceil(m/NR)][d][NR]
  const T* arow;      // s * rho_i                        [n]
  const T* sig;       // sigma_j, 0 on padded columns     [mpad]
  const T* bias;      // 0, -inf on padded columns        [mpad]
  T scale;
  int64_t pos_offset;
  const T* row_lse;   // backward only
  const T* col_lse;   // [mpad]
  const T* grad_row;
  const T* grad_col;  // [mpad]
  const T* grad_pos;
};

template <typename T>
struct Kernels {
  int mr, nr, lanes;
  void (*pack_yt)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
  void (*fwd_tile)(const TileCtx<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*, T*, T*, T*,
                   T*, T*);
  double (*bwd_tile)(const TileCtx<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*, T*, T*,
                     T*);
};

}  // namespace

// ---- the ISA builds of the tile kernels ------------------------------------------
// MR x NR register tiles, fp32, measured on Zen 4 (2 cores, shared machine, min of
// repeats), S = X Y^T tile product alone at N=8192, D=512: see the table in
// the `isa_avx512` section.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
// MR=6, NR=4x16: 24 zmm accumulators + 4 B vectors. Measured (fp32, D=512, 1 thread,
// GFLOP/s per CPU-second so that the shared machine's steal time drops out; noise about
// +-8%, each the min of repeats): micro-kernel alone on L1-resident data: ~100-107 for
// 8x32, 12x32, 6x64 and 8x48 alike (the core's peak: 32 FLOP/cycle at ~3.3 GHz); whole
// fwd / bwd at N=3072 (three interleaved rounds): 6x64 fwd 74-82, bwd 69-75; 8x32 fwd
// 72-81, bwd 59-70; 12x32 fwd 72-84, bwd 60-71; 14x32 needs tiles that are multiples of 14,
// 4x96 spills (20). 6x64 wins the backward, whose two gradient products stream the B
// operand (rows of x or y) once per 6 rows instead of once per 8-12 columns-pairs.
#define FASTCLIP_VBYTES 64
#ifdef FASTCLIP_TUNE_MR       // tuning harness only
#define FASTCLIP_MR FASTCLIP_TUNE_MR
#define FASTCLIP_NRV FASTCLIP_TUNE_NRV
#else
#define FASTCLIP_MR 6
#define FASTCLIP_NRV 4
#endif
#include "contrastive_loss_cpu_kernels.inc"
#undef FASTCLIP_VBYTES
#undef FASTCLIP_MR
#undef FASTCLIP_NRV
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
// MR=6, NR=2x8: 12 ymm accumulators + 2 B vectors of the 16 registers.
#define FASTCLIP_VBYTES 32
#define FASTCLIP_MR 6
#define FASTCLIP_NRV 2
#include "contrastive_loss_cpu_kernels.inc"
#undef FASTCLIP_VBYTES
#undef FASTCLIP_MR
#undef FASTCLIP_NRV
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_generic {
// 128-bit vectors (SSE2 on any x86-64, NEON on aarch64): MR=4, NR=2x4.
#define FASTCLIP_VBYTES 16
#define FASTCLIP_MR 4
#define FASTCLIP_NRV 2
#include "contrastive_loss_cpu_kernels.inc"
#undef FASTCLIP_VBYTES
#undef FASTCLIP_MR
#undef FASTCLIP_NRV
}  // namespace isa_generic

namespace {

// FASTCLIP_CPU_ISA=avx512|avx2|generic forces a build (tests use it to cover all three);
// an ISA the CPU lacks falls back to the best one it has.
template <typename T>
Kernels<T> pick_kernels() {
  const char* env = std::getenv("FASTCLIP_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "generic") return isa_generic::kernels<T>();
  if (avx512 && want != "avx2") return isa_avx512::kernels<T>();
  if (avx2) return isa_avx2::kernels<T>();
#endif
  return isa_generic::kernels<T>();
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// 1 / max(||a_i||, eps), or 1; fp64 accumulation (O(rows·d), off the hot path).
template <typename T>
void inv_norms(const T* a, int64_t rows, int64_t d, int64_t ld, bool normalize, T eps, T* out,
               int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    if (!normalize) { out[i] = T(1); continue; }
    double s[4] = {0, 0, 0, 0};
    const T* r = a + i * ld;
    int64_t k = 0;
    for (; k + 4 <= d; k += 4)
      for (int u = 0; u < 4; ++u) s[u] += double(r[k + u]) * double(r[k + u]);
    for (; k < d; ++k) s[0] += double(r[k]) * double(r[k]);
    out[i] = T(1) / std::max(T(std::sqrt((s[0] + s[1]) + (s[2] + s[3]))), eps);
  }
}

template <typename T>
double dot(const T* a, const T* b, int64_t d) {
  double s[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4)
    for (int u = 0; u < 4; ++u) s[u] += double(a[k + u]) * double(b[k + u]);
  for (; k < d; ++k) s[0] += double(a[k]) * double(b[k]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Column-side vectors padded to mpad: sigma (0 past m) and the -inf bias that keeps
// padded columns out of the row statistics.
template <typename T>
struct Prep {
  int64_t mpad, dp;
  std::vector<T> rho, arow, sig, bias, yp;
};

template <typename T>
Prep<T> prepare(const Kernels<T>& K, const T* x, const T* y, int64_t n, int64_t m, int64_t d,
                int64_t ldx, int64_t ldy, T scale, bool normalize, T eps, int nt) {
  Prep<T> p;
  p.mpad = round_up(m, BN);
  p.dp = round_up(d, K.nr);
  p.rho.resize(n);
  p.arow.resize(n);
  p.sig.assign(p.mpad, T(0));
  p.bias.assign(p.mpad, -std::numeric_limits<T>::infinity());
  inv_norms(x, n, d, ldx, normalize, eps, p.rho.data(), nt);
  inv_norms(y, m, d, ldy, normalize, eps, p.sig.data(), nt);
  for (int64_t i = 0; i < n; ++i) p.arow[i] = scale * p.rho[i];
  std::fill(p.bias.begin(), p.bias.begin() + m, T(0));
  const int64_t panels = (m + K.nr - 1) / K.nr;
  p.yp.resize(size_t(panels) * d * K.nr);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
    K.pack_yt(y, m, d, ldy, panels * t / T_, panels * (t + 1) / T_, p.yp.data());
  }
  return p;
}

template <typename T>
TileCtx<T> context(const Prep<T>& p, const T* x, const T* y, int64_t n, int64_t m, int64_t d,
                   int64_t ldx, int64_t ldy, T scale, int64_t pos_offset) {
  TileCtx<T> t{};
  t.x = x; t.y = y; t.n = n; t.m = m; t.d = d; t.ldx = ldx; t.ldy = ldy;
  t.dp = p.dp; t.bm = BM; t.bn = BN;
  t.yp = p.yp.data(); t.arow = p.arow.data(); t.sig = p.sig.data(); t.bias = p.bias.data();
  t.scale = scale; t.pos_offset = pos_offset;
  return t;
}

}  // namespace

template <typename T>
void contrastive_loss_fwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                          int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                          T* row_lse, T* col_lse, T* pos, int num_threads) {
  const Kernels<T> K = pick_kernels<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t nblk = (n + BM - 1) / BM;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, nblk)));
  const Prep<T> p = prepare(K, x, y, n, m, d, ldx, ldy, scale, normalize, eps,
                            std::max(1, num_threads));
  const TileCtx<T> t = context(p, x, y, n, m, d, ldx, ldy, scale, pos_offset);
  const int64_t mp = p.mpad;
  // Per-thread column statistics (running max, sum of exp), merged exactly below.
  std::vector<T> cmax(size_t(nt) * mp, ninf), csum(size_t(nt) * mp, T(0));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    std::vector<T> S(size_t(BM) * BN), xs(size_t(K.mr) * d), tmax(BN), rm(BM), rs(BM);
    T* cm = cmax.data() + size_t(tid) * mp;
    T* cs = csum.data() + size_t(tid) * mp;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t i0 = b * BM, iv = std::min(BM, n - i0);
      std::fill(rm.begin(), rm.end(), ninf);
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t j0 = 0; j0 < m; j0 += BN)
        K.fwd_tile(t, i0, iv, j0, std::min(BN, m - j0), S.data(), xs.data(), rm.data(),
                   rs.data(), cm, cs, tmax.data());
      for (int64_t r = 0; r < iv; ++r) row_lse[i0 + r] = rm[r] + std::log(rs[r]);
    }
  }
  // Exact merge: c_j = M + log(sum_t s_t exp(m_t - M)), M = max_t m_t; a thread that saw
  // no rows (m_t = -inf, s_t = 0) adds nothing; a NaN anywhere makes c_j NaN.
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t j = 0; j < m; ++j) {
    T mx = ninf;
    for (int q = 0; q < nt; ++q) {
      const T c = cmax[size_t(q) * mp + j];
      if (c > mx || c != c) mx = c;
      if (mx != mx) break;
    }
    T s = 0;
    for (int q = 0; q < nt; ++q) {
      const T c = cmax[size_t(q) * mp + j];
      if (c != ninf) s += csum[size_t(q) * mp + j] * std::exp(c - mx);
    }
    col_lse[j] = mx + std::log(s);
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i + pos_offset;
    pos[i] = (j >= 0 && j < m)
                 ? T(double(p.arow[i]) * double(p.sig[j]) * dot(x + i * ldx, y + j * ldy, d))
                 : T(0);
  }
}

template <typename T>
T contrastive_loss_bwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                       int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                       const T* row_lse, const T* col_lse, const T* grad_row,
                       const T* grad_col, const T* grad_pos, T* dx, T* dy, int num_threads) {
  const Kernels<T> K = pick_kernels<T>();
  const int64_t nblk = (n + BM - 1) / BM;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, nblk)));
  const Prep<T> p = prepare(K, x, y, n, m, d, ldx, ldy, scale, normalize, eps,
                            std::max(1, num_threads));
  TileCtx<T> t = context(p, x, y, n, m, d, ldx, ldy, scale, pos_offset);
  const int64_t mp = p.mpad, dp = p.dp;
  std::vector<T> cl(mp, T(0)), gc(mp, T(0));
  std::copy(col_lse, col_lse + m, cl.begin());
  std::copy(grad_col, grad_col + m, gc.begin());
  t.row_lse = row_lse; t.col_lse = cl.data(); t.grad_row = grad_row; t.grad_col = gc.data();
  t.grad_pos = grad_pos;
  // Columns per chunk: all of m unless the per-thread dY buffers would exceed kDyBudget.
  // FASTCLIP_CPU_DY_BUDGET (bytes) overrides the budget; the tests use it to cover chunks.
  const char* env_budget = std::getenv("FASTCLIP_CPU_DY_BUDGET");
  const int64_t budget = env_budget ? std::max<int64_t>(0, std::atoll(env_budget)) : kDyBudget;
  const int64_t per_col = int64_t(nt) * dp * int64_t(sizeof(T));
  const int64_t W = std::min(mp, std::max(BN, budget / per_col / BN * BN));
  std::vector<T> dyb(size_t(nt) * W * dp);
  std::vector<double> gl(nt, 0.0);
  for (int64_t c0 = 0; c0 < m; c0 += W) {
    const int64_t c1 = std::min(m, c0 + W);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      T* myb = dyb.data() + size_t(tid) * W * dp;
      std::fill(myb, myb + size_t(W) * dp, T(0));
      std::vector<T> S(size_t(BM) * BN), dxa(size_t(BM) * dp),
          xs(size_t(K.mr) * d), bs(size_t(BM + BN) * K.nr);
      double acc = 0;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t i0 = b * BM, iv = std::min(BM, n - i0);
        std::fill(dxa.begin(), dxa.end(), T(0));
        for (int64_t j0 = c0; j0 < c1; j0 += BN)
          acc += K.bwd_tile(t, i0, iv, j0, std::min(BN, c1 - j0), S.data(), xs.data(),
                            dxa.data(), myb + (j0 - c0) * dp, bs.data());
        for (int64_t r = 0; r < iv; ++r) {
          T* o = dx + (i0 + r) * d;
          const T* a = dxa.data() + r * dp;
          if (c0 == 0) std::copy(a, a + d, o);
          else for (int64_t k = 0; k < d; ++k) o[k] += a[k];
        }
      }
      gl[tid] += acc;
      // (implicit barrier) dy rows of this chunk: fixed-order sum of the thread buffers.
#pragma omp for schedule(static)
      for (int64_t j = c0; j < c1; ++j) {
        T* o = dy + j * d;
        const T* b0 = dyb.data() + (j - c0) * dp;
        std::copy(b0, b0 + d, o);
        for (int q = 1; q < nt; ++q) {
          const T* bq = dyb.data() + (size_t(q) * W + (j - c0)) * dp;
          for (int64_t k = 0; k < d; ++k) o[k] += bq[k];
        }
      }
    }
  }
  // dx holds P_i = rho_i dL/dx^_i. Through the normalisation x^ = rho x:
  //   dx_i = rho_i (dL/dx^_i - x^_i <x^_i, dL/dx^_i>) = P_i - rho_i^2 x_i <x_i, P_i>.
  if (normalize) {
#pragma omp parallel num_threads(std::max(1, num_threads))
    {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = x + i * ldx;
        T* g = dx + i * d;
        const double r = p.rho[i];
        const T c = T(r * r * dot(xi, g, d));
        for (int64_t k = 0; k < d; ++k) g[k] -= c * xi[k];
      }
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m; ++j) {
        const T* yj = y + j * ldy;
        T* g = dy + j * d;
        const double s = p.sig[j];
        const T c = T(s * s * dot(yj, g, d));
        for (int64_t k = 0; k < d; ++k) g[k] -= c * yj[k];
      }
    }
  }
  double s = 0;
  for (double v : gl) s += v;
  return T(s / double(scale));
}

#define FASTCLIP_INSTANTIATE(T)                                                               \
  template void contrastive_loss_fwd<T>(const T*, const T*, int64_t, int64_t, int64_t,      \
                                        int64_t, int64_t, T, bool, T, int64_t, T*, T*, T*,   \
                                        int);                                                \
  template T contrastive_loss_bwd<T>(const T*, const T*, int64_t, int64_t, int64_t, int64_t, \
                                     int64_t, T, bool, T, int64_t, const T*, const T*,       \
                                     const T*, const T*, const T*, T*, T*, int);
FASTCLIP_INSTANTIATE(float)
FASTCLIP_INSTANTIATE(double)

}  // namespace fastclip::cpu
