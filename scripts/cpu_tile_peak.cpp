// The peak of the CPU kernel's 6x64 register tile on one core, fp32 FMAs against bf16 pairs
// (vdpbf16ps), with every operand in L1: the ceiling the whole op's GFLOP/s are read against
// (benchmarks/results/cpu-kernel-tuning.md, "bf16 products"). The loops are the shape of
// micro() and micro_bf16() in csrc/contrastive_loss/cpu/contrastive_loss_cpu_kernels.inc.
//
//   g++ -O3 -o /tmp/cpu_tile_peak scripts/cpu_tile_peak.cpp && /tmp/cpu_tile_peak
//
// Needs an x86-64 CPU with AVX-512 and AVX512_BF16 (it checks and says so otherwise).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

constexpr int MR = 6, NRV = 4, L = 16, NR = NRV * L, K = 512;

__attribute__((noinline)) void tile_fp32(const float* A, const float* B, float* C) {
  __m512 c[MR][NRV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v) c[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 b[NRV];
    for (int v = 0; v < NRV; ++v) b[v] = _mm512_loadu_ps(B + k * NR + v * L);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * K + k]);
      for (int v = 0; v < NRV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v)
      _mm512_storeu_ps(C + r * NR + v * L, _mm512_add_ps(_mm512_loadu_ps(C + r * NR + v * L), c[r][v]));
}

__attribute__((noinline)) void tile_bf16(const uint32_t* A, const uint16_t* B, float* C) {
  __m512 c[MR][NRV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v) c[r][v] = _mm512_setzero_ps();
  for (int k = 0; k < K / 2; ++k) {           // pairs of K
    __m512i b[NRV];
    for (int v = 0; v < NRV; ++v) b[v] = _mm512_loadu_si512(B + k * 2 * NR + v * 2 * L);
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(int(A[r * (K / 2) + k]));
      for (int v = 0; v < NRV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NRV; ++v)
      _mm512_storeu_ps(C + r * NR + v * L, _mm512_add_ps(_mm512_loadu_ps(C + r * NR + v * L), c[r][v]));
}

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bf16")) {
    std::printf("this CPU has no AVX-512 with AVX512_BF16\n");
    return 1;
  }
  std::vector<float> A(MR * K, 0.5f), B(K * NR, 0.25f), C(MR * NR, 0.0f);
  std::vector<uint32_t> Ab(MR * K / 2, 0x3f003f00u);     // pairs of bf16 0.5
  std::vector<uint16_t> Bb(K * NR, 0x3e80);              // bf16 0.25
  const int reps = 200000;
  const double flop = 2.0 * MR * NR * K * reps;
  for (int round = 0; round < 3; ++round) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) tile_fp32(A.data(), B.data(), C.data());
    const double tf = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) tile_bf16(Ab.data(), Bb.data(), C.data());
    const double tb = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("6x64 tile, one core: fp32 FMA %.0f GFLOP/s, bf16 pairs %.0f GFLOP/s (%g)\n",
                flop / tf / 1e9, flop / tb / 1e9, double(C[0]));
  }
  return 0;
}
