// Baseline CPU kernels (tiled, OpenMP); see contrastive_loss_cpu.h for the contract.
#include "contrastive_loss_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastclip::cpu {
namespace {

constexpr int64_t BM = 32, BN = 128;

template <typename T>
void inv_norms(const T* a, int64_t rows, int64_t d, int64_t ld, bool normalize, T eps, T* out) {
  for (int64_t i = 0; i < rows; ++i) {
    if (!normalize) { out[i] = T(1); continue; }
    T s = 0;
    for (int64_t k = 0; k < d; ++k) s += a[i * ld + k] * a[i * ld + k];
    out[i] = T(1) / std::max(std::sqrt(s), eps);
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  T s = 0;
  for (int64_t k = 0; k < d; ++k) s += a[k] * b[k];
  return s;
}

// Online log-sum-exp update; NaN propagates (a NaN v makes the sum NaN).
template <typename T>
inline void lse_push(T& mx, T& sum, T v) {
  if (v > mx) { sum = sum * std::exp(mx - v) + T(1); mx = v; }
  else sum += std::exp(v - mx);
}

}  // namespace

template <typename T>
void contrastive_loss_fwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                          int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                          T* row_lse, T* col_lse, T* pos, int num_threads) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<T> rho(n), sig(m);
  inv_norms(x, n, d, ldx, normalize, eps, rho.data());
  inv_norms(y, m, d, ldy, normalize, eps, sig.data());
  const int nt = std::max(1, num_threads);
  std::vector<T> cmax(size_t(nt) * m, ninf), csum(size_t(nt) * m, T(0));
  const int64_t nblk = (n + BM - 1) / BM;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < nblk; ++b) {
    const int tid = omp_get_thread_num();
    T* cm = cmax.data() + size_t(tid) * m;
    T* cs = csum.data() + size_t(tid) * m;
    const int64_t i0 = b * BM, i1 = std::min(n, i0 + BM);
    T rm[BM], rs[BM];
    for (int64_t i = i0; i < i1; ++i) { rm[i - i0] = ninf; rs[i - i0] = 0; }
    for (int64_t j0 = 0; j0 < m; j0 += BN) {
      const int64_t j1 = std::min(m, j0 + BN);
      for (int64_t i = i0; i < i1; ++i) {
        const T a = scale * rho[i];
        for (int64_t j = j0; j < j1; ++j) {
          const T v = a * sig[j] * dot(x + i * ldx, y + j * ldy, d);
          lse_push(rm[i - i0], rs[i - i0], v);
          lse_push(cm[j], cs[j], v);
        }
      }
    }
    for (int64_t i = i0; i < i1; ++i) {
      row_lse[i] = rm[i - i0] + std::log(rs[i - i0]);
      const int64_t j = i + pos_offset;
      pos[i] = (j >= 0 && j < m) ? scale * rho[i] * sig[j] * dot(x + i * ldx, y + j * ldy, d) : T(0);
    }
  }
#pragma omp parallel for num_threads(nt)
  for (int64_t j = 0; j < m; ++j) {
    T mx = ninf;
    for (int t = 0; t < nt; ++t) mx = std::max(mx, cmax[size_t(t) * m + j]);
    T s = 0;
    bool nan = false;
    for (int t = 0; t < nt; ++t) {
      const T c = cmax[size_t(t) * m + j];
      nan |= std::isnan(c) || std::isnan(csum[size_t(t) * m + j]);
      if (c != ninf) s += csum[size_t(t) * m + j] * std::exp(c - mx);
    }
    col_lse[j] = nan ? std::numeric_limits<T>::quiet_NaN() : mx + std::log(s);
  }
}

template <typename T>
T contrastive_loss_bwd(const T* x, const T* y, int64_t n, int64_t m, int64_t d, int64_t ldx,
                       int64_t ldy, T scale, bool normalize, T eps, int64_t pos_offset,
                       const T* row_lse, const T* col_lse, const T* grad_row,
                       const T* grad_col, const T* grad_pos, T* dx, T* dy, int num_threads) {
  std::vector<T> rho(n), sig(m);
  inv_norms(x, n, d, ldx, normalize, eps, rho.data());
  inv_norms(y, m, d, ldy, normalize, eps, sig.data());
  const int nt = std::max(1, num_threads);
  std::vector<T> dyh(size_t(nt) * m * d, T(0));   // per-thread d/dŷ
  std::vector<double> dsc(nt, 0.0);
  const int64_t nblk = (n + BM - 1) / BM;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < nblk; ++b) {
    const int tid = omp_get_thread_num();
    T* gy = dyh.data() + size_t(tid) * m * d;
    const int64_t i0 = b * BM, i1 = std::min(n, i0 + BM);
    for (int64_t i = i0; i < i1; ++i) {
      T* gx = dx + i * d;
      std::fill(gx, gx + d, T(0));
      const T a = scale * rho[i];
      for (int64_t j = 0; j < m; ++j) {
        const T l = a * sig[j] * dot(x + i * ldx, y + j * ldy, d);
        T g = grad_row[i] * std::exp(l - row_lse[i]) + grad_col[j] * std::exp(l - col_lse[j]);
        if (j == i + pos_offset) g += grad_pos[i];
        dsc[tid] += double(g) * double(l);
        const T gs = g * scale;
        const T cx = gs * sig[j], cy = gs * rho[i];
        for (int64_t k = 0; k < d; ++k) {
          gx[k] += cx * y[j * ldy + k];
          gy[j * d + k] += cy * x[i * ldx + k];
        }
      }
      if (normalize) {  // d/dx = rho (d/dx̂ - x̂ <x̂, d/dx̂>)
        T p = 0;
        for (int64_t k = 0; k < d; ++k) p += rho[i] * x[i * ldx + k] * gx[k];
        for (int64_t k = 0; k < d; ++k) gx[k] = rho[i] * (gx[k] - rho[i] * x[i * ldx + k] * p);
      }
    }
  }
#pragma omp parallel for num_threads(nt)
  for (int64_t j = 0; j < m; ++j) {
    T* out = dy + j * d;
    for (int64_t k = 0; k < d; ++k) {
      T s = 0;
      for (int t = 0; t < nt; ++t) s += dyh[(size_t(t) * m + j) * d + k];
      out[k] = s;
    }
    if (normalize) {
      T p = 0;
      for (int64_t k = 0; k < d; ++k) p += sig[j] * y[j * ldy + k] * out[k];
      for (int64_t k = 0; k < d; ++k) out[k] = sig[j] * (out[k] - sig[j] * y[j * ldy + k] * p);
    }
  }
  double s = 0;
  for (double v : dsc) s += v;
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
