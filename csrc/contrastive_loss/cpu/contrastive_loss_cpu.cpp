// CPU kernels of the fused contrastive losses (OpenMP); contract in contrastive_loss_cpu.h.
//
// Structure. The three matrix products of a loss (S = X Y^T, dX = G Y, dY = G^T X) run
// through one register-blocked micro-kernel (contrastive_loss_cpu_kernels.inc) compiled
// three times: AVX-512 (Zen 4, Ice Lake+), AVX2+FMA, and a generic 128-bit build (SSE2 /
// NEON) for everything else; `__builtin_cpu_supports` picks one at run time, so the wheel
// stays portable. A fourth build, AVX-512 with AVX512_BF16, adds bf16-pair products for
// bfloat16 features (the .inc's "bf16 products"). What a tile of logits becomes is the loss's epilogue policy (template
// parameter LOSS, see the .inc). This file holds the ISA- and loss-independent driver:
// norms, packing, threading, the exact merges of per-thread statistics.
//
// Tiles. Row blocks are the unit of work (static OpenMP schedule: the same n and thread
// count give bit-identical results). Their height bm is chosen per call (row_block): the
// rows split evenly over the threads, each thread's share in blocks of at most kBmMax = 384
// rows, so every thread gets the same number of blocks of (within MR) the same height.
// Each block walks all column tiles of BN = 192: S tile = bm x 192 (up to 288 KB fp32),
// the epilogue fused on it while hot. Two-pass losses (softmax): forward 2NMD FLOP,
// backward recomputes S and does both gradient products from the same H tile, 6NMD (8NMD
// in all, the floor of docs/design.md §2). One-pass losses (sigmoid): statistics and gradients from one S
// tile, 6NMD in all. Measurements behind the tile sizes, MR x NR and the dY scheme:
// benchmarks/results/cpu-kernel-tuning.md.
//
// dY accumulation: per-thread dY buffers (rows outer), reduced in a fixed order, instead
// of a second columns-outer pass that would recompute S (+31% on the backward, measured).
// The buffers cover a chunk of W columns at a time, W chosen so that they hold at most
// kDyBudget = 64 MB (W = m up to threads·m·D = 16M floats, e.g. m = 16384 at D = 512 and
// 2 threads; beyond that the columns are processed in chunks, each a full rows-outer
// sweep over its columns only, so nothing is recomputed: a chunk costs one extra pass over
// dx and one barrier), so memory stays bounded for any thread count:
// O((n+m)·D + threads·(W·D + tile)). W is at least one BN-column block, so the budget is
// exceeded where threads·BN·D already is (64 threads at D = 4096 in fp32: 201 MB).
#include "contrastive_loss_cpu.h"

#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace fastclip::cpu {
namespace {

// kBmMax: the tallest row block (a multiple of every MR below); BN: the column tile (a
// multiple of every MR and NR). Tall blocks amortise the dY accumulator's loads over more
// rows: at N = 8192, 2 threads, the sigmoid's one pass takes 1.05 s with 384-row blocks
// against 1.16 s with 96 (benchmarks/results/cpu-kernel-tuning.md, "Row block height").
constexpr int64_t kBmMax = 384, BN = 192;
constexpr int64_t kDyBudget = int64_t(64) << 20;   // bytes of per-thread dY buffers

constexpr int kSoftmax = int(LossKind::kSoftmax);
constexpr int kSigmoid = int(LossKind::kSigmoid);

// Accumulator types of each loss's statistics: double for both. The softmax's (max, sum of
// exp) pairs are rescaled at every step, so they never grow, but a row's or column's sum is
// a chain of one step per tile, N / BN of them: in fp32 it drifted by 5e-6 relative at
// N = 50000 (±1 features, D = 1, scale 1), half the fp32 tolerance. The sigmoid keeps plain
// sums of up to N positive terms. Each tile's own sums stay in T (at most BN or bm terms).
template <typename T, int LOSS>
struct Stats {
  using Row = double;
  using Col = double;
};

template <typename T>
struct TileCtx {
  const T* x;
  const T* y;
  int64_t n, m, d, ldx, ldy, dp, bn;
  const T* yp;        // Y^T packed in panels of NR columns [ceil(m/NR)][d][NR]
  const T* arow;      // s * rho_i                        [n]
  const T* rho;       // rho_i                            [n]
  const T* sig;       // sigma_j, 0 on padded columns     [mpad]
  const T* colmask;   // 0, -inf on padded columns        [mpad]
  T scale, zbias;     // s and the bias b added to every logit (0 for the softmax)
  int64_t pos_offset;
  // The positives z_{i, i+pos_offset} [n], written by the tile that holds them (forward and
  // one pass): the logit as the statistics saw it, so that a CLIP row's row_i - pos_i cancels
  // its rounding (0 exactly at n = m = 1, where a separate fp64 dot left ~1 ulp of z).
  double* pos;
  // Backward of the softmax: the float64 statistics as hi + lo in T, so that the epilogue's
  // exp((z - hi) - lo) keeps their precision ((z - hi) is exact where it matters).
  const T* row_hi;    // [n]
  const T* row_lo;
  const T* col_hi;    // [mpad]
  const T* col_lo;
  const T* grad_row;
  const T* grad_col;  // [mpad]
  const T* grad_pos;
  // bf16 products (the AVX512_BF16 build, bfloat16 features): X's rows as bf16 pairs
  // [n][kp] and Y^T in bf16 panels [ceil(m/NR)][kp][NR][2], kp = ceil(d/2); bm: the row
  // blocks' height (the bf16 workspace's layout).
  const uint16_t* xb;
  const uint16_t* yb;
  int64_t kp, bm;
};

template <typename T, int LOSS>
using FwdTile = void (*)(const TileCtx<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*,
                         typename Stats<T, LOSS>::Row*, typename Stats<T, LOSS>::Row*,
                         typename Stats<T, LOSS>::Col*, typename Stats<T, LOSS>::Col*, T*);
template <typename T>
using BwdTile = ParamGrads (*)(const TileCtx<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*,
                               T*, T*, T*, double*, double*, T*);

template <typename T>
struct Kernels {
  int mr, nr, lanes;
  void (*pack_yt)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
  FwdTile<T, kSoftmax> fwd_softmax;
  FwdTile<T, kSigmoid> fwd_sigmoid;
  BwdTile<T> bwd_softmax, bwd_sigmoid, fwd_bwd_sigmoid;
  // The same tiles with bf16 products (float only, the AVX512_BF16 build; null elsewhere).
  void (*pack_yt_bf16)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                       uint16_t*) = nullptr;
  FwdTile<T, kSoftmax> fwd_softmax_bf16 = nullptr;
  FwdTile<T, kSigmoid> fwd_sigmoid_bf16 = nullptr;
  BwdTile<T> bwd_softmax_bf16 = nullptr, bwd_sigmoid_bf16 = nullptr,
             fwd_bwd_sigmoid_bf16 = nullptr;
};

// Floats of the bf16 gradient products' per-thread workspace (grad_products_bf16 in the
// .inc): H as bf16 pairs in two layouts, one NR-sliver of Y's and X's rows as pairs, the
// rounding residuals of H's rows and columns, and the sliver's two mean rows.
int64_t bf16_workspace(int64_t bm, int64_t bn, int64_t nr) {
  return bm * (bn / 2) + (bm + 1) / 2 * bn + (bn / 2) * nr + (bm + 1) / 2 * nr + bm + bn + 2 * nr;
}

}  // namespace

// ---- the ISA builds of the tile kernels ------------------------------------------
// MR x NR register tiles, fp32, measured on Zen 4 (2 cores, shared machine, min of
// repeats): benchmarks/results/cpu-kernel-tuning.md.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
// MR=6, NR=4x16: 24 zmm accumulators + 4 B vectors. 6x64 wins the backward, whose two
// gradient products stream the B operand (rows of x or y) once per 6 rows instead of once
// per 8-12 column pairs (measurements: benchmarks/results/cpu-kernel-tuning.md). The
// AVX512_BF16 build below uses the same tile.
#ifdef FASTCLIP_TUNE_MR       // tuning harness only
#define FASTCLIP_AVX512_MR FASTCLIP_TUNE_MR
#define FASTCLIP_AVX512_NRV FASTCLIP_TUNE_NRV
#else
#define FASTCLIP_AVX512_MR 6
#define FASTCLIP_AVX512_NRV 4
#endif
#define FASTCLIP_VBYTES 64
#define FASTCLIP_MR FASTCLIP_AVX512_MR
#define FASTCLIP_NRV FASTCLIP_AVX512_NRV
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

// AVX512_BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids and later): the AVX-512 build's
// register tile, with vdpbf16ps products for bfloat16 features. Measured on a 2-core Zen 5
// (family 26): the register tile alone ~500 GFLOP/s per core against ~250 for fp32 FMAs
// (scripts/cpu_tile_peak.cpp), the whole op 1.5-1.7x faster at N = 2048-8192
// (benchmarks/results/cpu-kernel-tuning.md, "bf16 products"). On an Intel Xeon (family 6
// model 207) the same tile runs at ~75 GFLOP/s per core against ~100-140 for fp32 FMAs, and
// the whole op is 1.4-1.8x slower with it, so chosen_isa() takes it by default on AMD CPUs
// only. GCC >= 11 only: the intrinsics and __builtin_cpu_supports("avx512bf16") it needs;
// other compilers build the other three.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FASTCLIP_HAVE_BF16 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
namespace isa_avx512bf16 {
#define FASTCLIP_BF16 1
#define FASTCLIP_VBYTES 64
#define FASTCLIP_MR FASTCLIP_AVX512_MR      // with_bf16 adds to the AVX-512 build's kernels
#define FASTCLIP_NRV FASTCLIP_AVX512_NRV
#include "contrastive_loss_cpu_kernels.inc"
#undef FASTCLIP_VBYTES
#undef FASTCLIP_MR
#undef FASTCLIP_NRV
#undef FASTCLIP_BF16
}  // namespace isa_avx512bf16
#pragma GCC pop_options
#endif
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

enum class Isa { kAvx512Bf16, kAvx512, kAvx2, kGeneric };

// FASTCLIP_CPU_ISA=avx512bf16|avx512|avx2|generic forces a build (tests use it to cover
// each); an ISA the CPU lacks falls back to the best one it has. Unforced, the bf16 products
// are taken on AMD CPUs only: on Intel's (measured: a Xeon of family 6 model 207) vdpbf16ps
// runs slower than the fp32 FMAs it replaces (above).
Isa chosen_isa() {
  const char* env = std::getenv("FASTCLIP_CPU_ISA");
  const std::string want = env ? env : "";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "generic") return Isa::kGeneric;
#ifdef FASTCLIP_HAVE_BF16
  if (avx512 && __builtin_cpu_supports("avx512bf16") &&
      (want == "avx512bf16" || (want.empty() && __builtin_cpu_is("amd"))))
    return Isa::kAvx512Bf16;
#endif
  if (avx512 && want != "avx2") return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

template <typename T>
Kernels<T> pick_kernels() {
  switch (chosen_isa()) {
#if defined(__x86_64__) || defined(__i386__)
#ifdef FASTCLIP_HAVE_BF16
    case Isa::kAvx512Bf16:
      if constexpr (std::is_same_v<T, float>)
        return isa_avx512bf16::with_bf16(isa_avx512::kernels<float>());
      else
        return isa_avx512::kernels<T>();
#endif
    case Isa::kAvx512: return isa_avx512::kernels<T>();
    case Isa::kAvx2: return isa_avx2::kernels<T>();
#endif
    default: return isa_generic::kernels<T>();
  }
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Per-thread scratch, allocated before a parallel region: an allocation that fails inside
// one cannot leave it (std::terminate, the process dies); here std::bad_alloc reaches the
// binding, which reports it as an error. of(tid, k) is part k of thread tid's share, zeroed
// by zero(tid) (what the std::vectors it replaces held when constructed).
template <typename T>
struct Scratch {
  std::vector<size_t> off;  // part k of a share starts at off[k]; off.back() = the share's size
  std::unique_ptr<T[]> buf;
  Scratch(int nt, std::initializer_list<size_t> sizes) : off{0} {
    for (size_t s : sizes) off.push_back(off.back() + s);
    buf.reset(new T[size_t(nt) * off.back()]);
  }
  T* of(int tid, int k) const { return buf.get() + size_t(tid) * off.back() + off[k]; }
  void zero(int tid) const { std::fill(of(tid, 0), of(tid, 0) + off.back(), T(0)); }
};

// ||r||, fp64 accumulation: the one norm both inv_norms and the normalisation's backward
// use, so that they agree on which rows eps clamps.
template <typename T>
T row_norm(const T* r, int64_t d) {
  double s[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= d; k += 4)
    for (int u = 0; u < 4; ++u) s[u] += double(r[k + u]) * double(r[k + u]);
  for (; k < d; ++k) s[0] += double(r[k]) * double(r[k]);
  return T(std::sqrt((s[0] + s[1]) + (s[2] + s[3])));
}

// 1 / max(||a_i||, eps), or 1 (O(rows·d), off the hot path).
template <typename T>
void inv_norms(const T* a, int64_t rows, int64_t d, int64_t ld, bool normalize, T eps, T* out,
               int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < rows; ++i)
    out[i] = normalize ? T(1) / std::max(row_norm(a + i * ld, d), eps) : T(1);
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

// Column-side vectors padded to mpad: sigma (0 past m) and the -inf mask that keeps
// padded columns out of the statistics.
template <typename T>
struct Prep {
  int64_t mpad, dp;
  std::vector<T> rho, arow, sig, colmask, yp;
  std::vector<uint16_t> xb, yb;      // bf16 products only (TileCtx::xb, yb)
};

template <typename T>
Prep<T> prepare(const Kernels<T>& K, const T* x, const T* y, int64_t n, int64_t m, int64_t d,
                int64_t ldx, int64_t ldy, T scale, bool normalize, T eps, int nt, bool bf16) {
  Prep<T> p;
  p.mpad = round_up(m, BN);
  p.dp = round_up(d, K.nr);
  p.rho.resize(n);
  p.arow.resize(n);
  p.sig.assign(p.mpad, T(0));
  p.colmask.assign(p.mpad, -std::numeric_limits<T>::infinity());
  inv_norms(x, n, d, ldx, normalize, eps, p.rho.data(), nt);
  inv_norms(y, m, d, ldy, normalize, eps, p.sig.data(), nt);
  for (int64_t i = 0; i < n; ++i) p.arow[i] = scale * p.rho[i];
  std::fill(p.colmask.begin(), p.colmask.begin() + m, T(0));
  const int64_t panels = (m + K.nr - 1) / K.nr;
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) {   // the values are bf16 (upcast exactly): their top 16 bits, in pairs
      const int64_t kp = (d + 1) / 2;
      p.xb.assign(size_t(n) * kp * 2, 0);
      p.yb.resize(size_t(panels) * kp * K.nr * 2);
#pragma omp parallel num_threads(nt)
      {
        const int t = omp_get_thread_num(), T_ = omp_get_num_threads();
        K.pack_yt_bf16(y, m, d, ldy, panels * t / T_, panels * (t + 1) / T_, p.yb.data());
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t k = 0; k < d; ++k) {
            uint32_t u;
            std::memcpy(&u, x + i * ldx + k, 4);
            p.xb[size_t(i) * kp * 2 + k] = uint16_t(u >> 16);
          }
      }
      return p;
    }
  }
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
                   int64_t ldx, int64_t ldy, T scale, T bias, int64_t pos_offset) {
  TileCtx<T> t{};
  t.x = x; t.y = y; t.n = n; t.m = m; t.d = d; t.ldx = ldx; t.ldy = ldy;
  t.dp = p.dp; t.bn = BN;
  t.yp = p.yp.data(); t.arow = p.arow.data(); t.rho = p.rho.data(); t.sig = p.sig.data();
  t.colmask = p.colmask.data();
  t.scale = scale; t.zbias = bias; t.pos_offset = pos_offset;
  t.xb = p.xb.data(); t.yb = p.yb.data(); t.kp = (d + 1) / 2;
  return t;
}

// How n rows split into row blocks on num_threads threads: k = ceil(n / (threads * kBmMax))
// blocks per thread, height bm = n / (threads * k) rounded up to the register tile (mr
// divides kBmMax, so bm <= kBmMax), and the team: no more threads than blocks. 96-row
// blocks (the old fixed height) left one thread up to a block behind, and cost 10% more per
// row at N = 8192.
struct RowBlocks {
  int64_t bm, nblk;
  int nt;
};

RowBlocks row_blocks(int64_t n, int num_threads, int64_t mr) {
  const int64_t th = std::max(1, num_threads);
  const int64_t k = std::max<int64_t>(1, (n + th * kBmMax - 1) / (th * kBmMax));
  const int64_t bm = std::min(kBmMax, std::max(mr, round_up((n + th * k - 1) / (th * k), mr)));
  const int64_t nblk = (n + bm - 1) / bm;
  return {bm, nblk, int(std::max<int64_t>(1, std::min(th, nblk)))};
}

// The sigmoid's per-thread column sums, added in a fixed (thread) order.
void sum_columns(const std::vector<double>& cs, int nt, int64_t mp, int64_t m, double* col) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t j = 0; j < m; ++j) {
    double s = 0;
    for (int q = 0; q < nt; ++q) s += cs[size_t(q) * mp + j];
    col[j] = s;
  }
}

// The smallest nonzero |a_ik| (inf when every value is 0 or non-finite).
float min_nonzero(const float* a, int64_t rows, int64_t d, int64_t ld, int nt) {
  float lo = std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : lo)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < d; ++k) {
      const float v = std::fabs(a[i * ld + k]);
      if (v > 0.0f && v < lo) lo = v;
    }
  return lo;
}

// Whether the bf16 products keep every product of x's and y's values: vdpbf16ps treats
// subnormal inputs and results as zero whatever MXCSR says, so where a product of two values
// could fall below 2^-126 (features with norms ~1e-18 and a small eps: the loss was 4.6e-3 off)
// the call takes the fp32 products, which keep gradual underflow. O((n + m) d).
bool bf16_products_exact(const float* x, const float* y, int64_t n, int64_t m, int64_t d,
                         int64_t ldx, int64_t ldy, int nt) {
  return double(min_nonzero(x, n, d, ldx, nt)) * double(min_nonzero(y, m, d, ldy, nt)) >= 0x1p-126;
}

// Whether a call takes the bf16 products: bfloat16 features (the caller says so), a build
// that has them (K), and values whose products cannot underflow (bf16_products_exact).
template <typename T>
bool take_bf16(bool bf16, const Kernels<T>& K, const T* x, const T* y, int64_t n, int64_t m,
               int64_t d, int64_t ldx, int64_t ldy, int num_threads) {
  if constexpr (std::is_same_v<T, float>)
    return bf16 && K.pack_yt_bf16 &&
           bf16_products_exact(x, y, n, m, d, ldx, ldy, std::max(1, num_threads));
  else
    return false;
}

// A float64 statistic as hi + lo in T (lo = 0 for T = double).
template <typename T>
void split(const double* v, int64_t k, T* hi, T* lo) {
  for (int64_t i = 0; i < k; ++i) {
    hi[i] = T(v[i]);
    lo[i] = T(v[i] - double(hi[i]));
    if (hi[i] != hi[i] || std::isinf(hi[i])) lo[i] = T(0);   // keep inf/NaN as they are
  }
}

template <typename T, int LOSS>
void fwd_impl(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy,
              T scale, T bias, bool normalize, T eps, int64_t pos_offset, double* row,
              double* col, double* pos, int num_threads, bool bf16) {
  using Row = typename Stats<T, LOSS>::Row;
  using Col = typename Stats<T, LOSS>::Col;
  const Kernels<T> K = pick_kernels<T>();
  bf16 = take_bf16(bf16, K, x, y, n, m, d, ldx, ldy, num_threads);
  FwdTile<T, LOSS> tile;
  if constexpr (LOSS == kSoftmax) tile = bf16 ? K.fwd_softmax_bf16 : K.fwd_softmax;
  else tile = bf16 ? K.fwd_sigmoid_bf16 : K.fwd_sigmoid;
  const T ninf = -std::numeric_limits<T>::infinity();
  const RowBlocks rb = row_blocks(n, num_threads, K.mr);
  const int64_t bm = rb.bm, nblk = rb.nblk;
  const int nt = rb.nt;
  const Prep<T> p = prepare(K, x, y, n, m, d, ldx, ldy, scale, normalize, eps,
                            std::max(1, num_threads), bf16);
  TileCtx<T> t = context(p, x, y, n, m, d, ldx, ldy, scale, bias, pos_offset);
  t.bm = bm;
  std::fill(pos, pos + n, 0.0);          // rows whose positive is outside [0, m)
  t.pos = pos;
  const int64_t mp = p.mpad;
  // Per-thread column statistics, merged exactly below: (running max, sum of exp) for the
  // softmax, sums for the sigmoid.
  std::vector<Col> cmax(LOSS == kSoftmax ? size_t(nt) * mp : 0, Col(ninf));
  std::vector<Col> csum(size_t(nt) * mp, Col(0));
  const Scratch<T> sc(nt, {size_t(bm) * BN, size_t(K.mr) * d, size_t(BN)});
  const Scratch<Row> sr(nt, {size_t(bm), size_t(bm)});
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    sc.zero(tid);
    T *S = sc.of(tid, 0), *xs = sc.of(tid, 1), *tmp = sc.of(tid, 2);
    Row *rm = sr.of(tid, 0), *rs = sr.of(tid, 1);
    Col* cm = LOSS == kSoftmax ? cmax.data() + size_t(tid) * mp : nullptr;
    Col* cs = csum.data() + size_t(tid) * mp;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t i0 = b * bm, iv = std::min(bm, n - i0);
      std::fill(rm, rm + bm, Row(ninf));
      std::fill(rs, rs + bm, Row(0));
      for (int64_t j0 = 0; j0 < m; j0 += BN)
        tile(t, i0, iv, j0, std::min(BN, m - j0), S, xs, rm, rs, cm, cs, tmp);
      // The log-sum-exp in double: m exact, log(s) small, the sum exact to T's precision.
      for (int64_t r = 0; r < iv; ++r)
        row[i0 + r] = LOSS == kSoftmax ? double(rm[r]) + std::log(double(rs[r])) : double(rs[r]);
    }
  }
  if constexpr (LOSS == kSoftmax) {
    // Exact merge: c_j = M + log(sum_t s_t exp(m_t - M)), M = max_t m_t; a thread that saw
    // no rows (m_t = -inf, s_t = 0) adds nothing; a NaN anywhere makes c_j NaN.
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t j = 0; j < m; ++j) {
      double mx = ninf;
      for (int q = 0; q < nt; ++q) {
        const double c = cmax[size_t(q) * mp + j];
        if (c > mx || c != c) mx = c;
        if (mx != mx) break;
      }
      double s = 0;
      for (int q = 0; q < nt; ++q) {
        const double c = cmax[size_t(q) * mp + j];
        if (c != double(ninf)) s += csum[size_t(q) * mp + j] * std::exp(c - mx);
      }
      col[j] = mx + std::log(s);
    }
  } else {
    sum_columns(csum, nt, mp, m, col);
  }
}

// The backward (STATS = false) and the one-pass forward+backward (STATS = true).
template <typename T, int LOSS, bool STATS>
ParamGrads bwd_impl(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                    int64_t ldy, T scale, T bias, bool normalize, T eps, int64_t pos_offset,
                    const double* row_in, const double* col_in, const T* grad_row,
                    const T* grad_col, const T* grad_pos, T* dx, T* dy, double* row_out,
                    double* col_out, double* pos_out, int num_threads, bool bf16) {
  const Kernels<T> K = pick_kernels<T>();
  bf16 = take_bf16(bf16, K, x, y, n, m, d, ldx, ldy, num_threads);
  BwdTile<T> tile;
  if constexpr (STATS) tile = bf16 ? K.fwd_bwd_sigmoid_bf16 : K.fwd_bwd_sigmoid;
  else if constexpr (LOSS == kSoftmax) tile = bf16 ? K.bwd_softmax_bf16 : K.bwd_softmax;
  else tile = bf16 ? K.bwd_sigmoid_bf16 : K.bwd_sigmoid;
  const RowBlocks rb = row_blocks(n, num_threads, K.mr);
  const int64_t bm = rb.bm, nblk = rb.nblk;
  const int nt = rb.nt;
  const Prep<T> p = prepare(K, x, y, n, m, d, ldx, ldy, scale, normalize, eps,
                            std::max(1, num_threads), bf16);
  TileCtx<T> t = context(p, x, y, n, m, d, ldx, ldy, scale, bias, pos_offset);
  t.bm = bm;
  const int64_t mp = p.mpad, dp = p.dp;
  std::vector<T> gc(mp, T(0)), rhi, rlo, chi(mp, T(0)), clo(mp, T(0));
  if (LOSS == kSoftmax) {
    rhi.resize(n);
    rlo.resize(n);
    split(row_in, n, rhi.data(), rlo.data());
    split(col_in, m, chi.data(), clo.data());
  }
  std::copy(grad_col, grad_col + m, gc.begin());
  t.row_hi = rhi.data(); t.row_lo = rlo.data(); t.col_hi = chi.data(); t.col_lo = clo.data();
  t.grad_row = grad_row; t.grad_col = gc.data(); t.grad_pos = grad_pos;
  if (STATS) {
    std::fill(pos_out, pos_out + n, 0.0);
    t.pos = pos_out;
  }
  // One-pass statistics: row sums across column chunks, per-thread column sums.
  std::vector<double> rsum(STATS ? n : 0, 0.0), csum(STATS ? size_t(nt) * mp : 0, 0.0);
  // Columns per chunk: all of m unless the per-thread dY buffers would exceed kDyBudget.
  // FASTCLIP_CPU_DY_BUDGET (bytes) overrides the budget; the tests use it to cover chunks.
  const char* env_budget = std::getenv("FASTCLIP_CPU_DY_BUDGET");
  const int64_t budget = env_budget ? std::max<int64_t>(0, std::atoll(env_budget)) : kDyBudget;
  const int64_t per_col = int64_t(nt) * dp * int64_t(sizeof(T));
  const int64_t W = std::min(mp, std::max(BN, budget / per_col / BN * BN));
  // Rows of a thread's buffer: a chunk's columns rounded up to the register tile (the
  // micro-kernel writes whole MR-row slivers), not to BN: at m = 32 that is 36 rows, not 192.
  // Left uninitialised here: each thread zeroes its own part per chunk (first touch), and
  // the parts of threads the team lacks: OpenMP may run fewer threads than asked
  // (OMP_DYNAMIC on a busy machine, OMP_THREAD_LIMIT, a call from inside a parallel
  // region), and the fixed-order sum below reads all nt parts.
  const int64_t R = round_up(std::min(W, m), K.mr);
  std::unique_ptr<T[]> dyb(new T[size_t(nt) * R * dp]);
  std::vector<ParamGrads> gl(nt, ParamGrads{0.0, 0.0});
  // Part 3: the sliver copies of the fp32 products, or the bf16 products' workspace.
  const Scratch<T> sc(nt, {size_t(bm) * BN, size_t(bm) * dp, size_t(K.mr) * d,
                           size_t(bf16 ? bf16_workspace(bm, BN, K.nr) : (bm + BN) * K.nr),
                           size_t(BN)});
  for (int64_t c0 = 0; c0 < m; c0 += W) {
    const int64_t c1 = std::min(m, c0 + W);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();
      T* myb = dyb.get() + size_t(tid) * R * dp;
      for (int q = tid; q < nt; q += team)
        std::fill(dyb.get() + size_t(q) * R * dp, dyb.get() + size_t(q + 1) * R * dp, T(0));
      sc.zero(tid);
      T *S = sc.of(tid, 0), *dxa = sc.of(tid, 1), *xs = sc.of(tid, 2), *bs = sc.of(tid, 3),
        *tmp = sc.of(tid, 4);
      double* cs = STATS ? csum.data() + size_t(tid) * mp : nullptr;
      ParamGrads acc{0.0, 0.0};
#pragma omp for schedule(static)
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t i0 = b * bm, iv = std::min(bm, n - i0);
        std::fill(dxa, dxa + size_t(bm) * dp, T(0));
        double* rs = STATS ? rsum.data() + i0 : nullptr;
        for (int64_t j0 = c0; j0 < c1; j0 += BN) {
          const ParamGrads g = tile(t, i0, iv, j0, std::min(BN, c1 - j0), S, xs, dxa,
                                    myb + (j0 - c0) * dp, bs, rs, cs, tmp);
          acc.gu += g.gu;
          acc.g += g.g;
        }
        for (int64_t r = 0; r < iv; ++r) {
          T* o = dx + (i0 + r) * d;
          const T* a = dxa + r * dp;
          if (c0 == 0) std::copy(a, a + d, o);
          else for (int64_t k = 0; k < d; ++k) o[k] += a[k];
        }
      }
      gl[tid].gu += acc.gu;
      gl[tid].g += acc.g;
      // (implicit barrier) dy rows of this chunk: fixed-order sum of the thread buffers.
#pragma omp for schedule(static)
      for (int64_t j = c0; j < c1; ++j) {
        T* o = dy + j * d;
        const T* b0 = dyb.get() + (j - c0) * dp;
        std::copy(b0, b0 + d, o);
        for (int q = 1; q < nt; ++q) {
          const T* bq = dyb.get() + (size_t(q) * R + (j - c0)) * dp;
          for (int64_t k = 0; k < d; ++k) o[k] += bq[k];
        }
      }
    }
  }
  // dx holds P_i = rho_i dL/dx^_i. Through the normalisation x^ = rho x:
  //   dx_i = rho_i (dL/dx^_i - x^_i <x^_i, dL/dx^_i>) = P_i - (rho_i <x_i, P_i>) (rho_i x_i),
  // except where eps clamps the norm: there x^ = x / eps is linear and dx_i = P_i. Both
  // factors of the second term are of the size of the result and of x^: rho_i^2 <x_i, P_i>
  // rounded to fp32 overflowed for rho above ~1.8e19 (norms below ~5e-20 with a small eps:
  // an infinite gradient) and vanished below ~1e-19 (norms above ~1e19: the projection lost,
  // 24% off at 1e25), where the gradient itself is finite and exact in fp32.
  if (normalize) {
#pragma omp parallel num_threads(std::max(1, num_threads))
    {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const T* xi = x + i * ldx;
        if (row_norm(xi, d) < eps) continue;
        T* g = dx + i * d;
        const double r = p.rho[i];
        const T c = T(r * dot(xi, g, d)), rt = T(r);
        for (int64_t k = 0; k < d; ++k) g[k] -= c * (rt * xi[k]);
      }
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m; ++j) {
        const T* yj = y + j * ldy;
        if (row_norm(yj, d) < eps) continue;
        T* g = dy + j * d;
        const double s = p.sig[j];
        const T c = T(s * dot(yj, g, d)), st = T(s);
        for (int64_t k = 0; k < d; ++k) g[k] -= c * (st * yj[k]);
      }
    }
  }
  if constexpr (STATS) {
    for (int64_t i = 0; i < n; ++i) row_out[i] = rsum[i];
    sum_columns(csum, nt, mp, m, col_out);
  }
  ParamGrads out{0.0, 0.0};
  for (const ParamGrads& v : gl) {
    out.gu += v.gu;
    out.g += v.g;
  }
  return out;
}

}  // namespace

template <typename T>
void contrastive_loss_fwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m, int64_t d,
                          int64_t ldx, int64_t ldy, T scale, T bias, bool normalize, T eps,
                          int64_t pos_offset, double* row, double* col, double* pos,
                          int num_threads, bool bf16) {
  if (loss == LossKind::kSoftmax)
    fwd_impl<T, kSoftmax>(x, y, n, m, d, ldx, ldy, scale, T(0), normalize, eps, pos_offset, row,
                          col, pos, num_threads, bf16);
  else
    fwd_impl<T, kSigmoid>(x, y, n, m, d, ldx, ldy, scale, bias, normalize, eps, pos_offset, row,
                          col, pos, num_threads, bf16);
}

template <typename T>
ParamGrads contrastive_loss_bwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m,
                                int64_t d, int64_t ldx, int64_t ldy, T scale, T bias,
                                bool normalize, T eps, int64_t pos_offset, const double* row,
                                const double* col, const T* grad_row, const T* grad_col,
                                const T* grad_pos, T* dx, T* dy, int num_threads, bool bf16) {
  if (loss == LossKind::kSoftmax)
    return bwd_impl<T, kSoftmax, false>(x, y, n, m, d, ldx, ldy, scale, T(0), normalize, eps,
                                        pos_offset, row, col, grad_row, grad_col, grad_pos, dx,
                                        dy, nullptr, nullptr, nullptr, num_threads, bf16);
  return bwd_impl<T, kSigmoid, false>(x, y, n, m, d, ldx, ldy, scale, bias, normalize, eps,
                                      pos_offset, row, col, grad_row, grad_col, grad_pos, dx, dy,
                                      nullptr, nullptr, nullptr, num_threads, bf16);
}

template <typename T>
ParamGrads contrastive_loss_fwd_bwd(LossKind loss, const T* x, const T* y, int64_t n, int64_t m,
                                    int64_t d, int64_t ldx, int64_t ldy, T scale, T bias,
                                    bool normalize, T eps, int64_t pos_offset,
                                    const T* grad_row, const T* grad_col, const T* grad_pos,
                                    double* row, double* col, double* pos, T* dx, T* dy,
                                    int num_threads, bool bf16) {
  if (loss != LossKind::kSigmoid)
    fail("contrastive_loss_fwd_bwd: the softmax needs its merged statistics for the gradient; "
         "run the forward, then the backward");
  return bwd_impl<T, kSigmoid, true>(x, y, n, m, d, ldx, ldy, scale, bias, normalize, eps,
                                     pos_offset, nullptr, nullptr, grad_row, grad_col, grad_pos,
                                     dx, dy, row, col, pos, num_threads, bf16);
}

#define FASTCLIP_INSTANTIATE(T)                                                                \
  template void contrastive_loss_fwd<T>(LossKind, const T*, const T*, int64_t, int64_t,       \
                                        int64_t, int64_t, int64_t, T, T, bool, T, int64_t,     \
                                        double*, double*, double*, int, bool);                 \
  template ParamGrads contrastive_loss_bwd<T>(LossKind, const T*, const T*, int64_t, int64_t,  \
                                              int64_t, int64_t, int64_t, T, T, bool, T,        \
                                              int64_t, const double*, const double*, const T*, \
                                              const T*, const T*, T*, T*, int, bool);          \
  template ParamGrads contrastive_loss_fwd_bwd<T>(LossKind, const T*, const T*, int64_t,       \
                                                  int64_t, int64_t, int64_t, int64_t, T, T,    \
                                                  bool, T, int64_t, const T*, const T*,        \
                                                  const T*, double*, double*, double*, T*, T*, \
                                                  int, bool);
FASTCLIP_INSTANTIATE(float)
FASTCLIP_INSTANTIATE(double)

const char* cpu_isa() {
  switch (chosen_isa()) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace fastclip::cpu
