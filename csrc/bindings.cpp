// fastclip._C: the compiled kernels, bound with pybind11. Statistics (row, col, pos) are
// float64 pointers for every feature dtype; the rest follows the features (is_double);
// bf16: the float32 features hold bfloat16 values (an exact upcast), which lets the kernels
// use bf16 products where the CPU has them. No torch here (docs/design.md §4):
// every function takes raw pointers (as Python ints), sizes, strides and, for CUDA,
// the caller's stream. The Python layer (src/fastclip/ops) validates first; these
// functions check sizes again and raise ValueError/RuntimeError, never crash.
// Signatures: src/fastclip/_C.pyi.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <utility>

#include "common.h"
#include "contrastive_loss/cpu/contrastive_loss_cpu.h"

namespace py = pybind11;

namespace fastclip {
void register_cuda(py::module_& m);  // cuda/binding.cu, or cuda_stub.cpp without CUDA
}

namespace {

using fastclip::LossKind;
using fastclip::ParamGrads;

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

std::pair<double, double> as_pair(ParamGrads g) { return {g.gu, g.g}; }

void cpu_fwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx,
             int64_t ldy, bool is_double, double scale, double bias, bool normalize, double eps,
             int64_t pos_offset, uintptr_t row, uintptr_t col, uintptr_t pos, int num_threads,
             bool bf16) {
  const LossKind kind = fastclip::check_loss("cpu_fwd", loss);
  fastclip::check_sizes("cpu_fwd", n, m, d, ldx, ldy);
  pos_offset = fastclip::clamp_offset(pos_offset, n, m);
  if (!x || !y || !row || !col || !pos) fastclip::fail("cpu_fwd: null pointer");
  py::gil_scoped_release nogil;
  if (is_double)
    fastclip::cpu::contrastive_loss_fwd<double>(kind, cptr<double>(x), cptr<double>(y), n, m, d,
        ldx, ldy, scale, bias, normalize, eps, pos_offset, mptr<double>(row),
        mptr<double>(col), mptr<double>(pos), num_threads);
  else
    fastclip::cpu::contrastive_loss_fwd<float>(kind, cptr<float>(x), cptr<float>(y), n, m, d,
        ldx, ldy, float(scale), float(bias), normalize, float(eps), pos_offset,
        mptr<double>(row), mptr<double>(col), mptr<double>(pos), num_threads, bf16);
}

std::pair<double, double> cpu_bwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m,
                                  int64_t d, int64_t ldx, int64_t ldy, bool is_double,
                                  double scale, double bias, bool normalize, double eps,
                                  int64_t pos_offset, uintptr_t row, uintptr_t col,
                                  uintptr_t grad_row, uintptr_t grad_col, uintptr_t grad_pos,
                                  uintptr_t dx, uintptr_t dy, int num_threads, bool bf16) {
  const LossKind kind = fastclip::check_loss("cpu_bwd", loss);
  fastclip::check_sizes("cpu_bwd", n, m, d, ldx, ldy);
  pos_offset = fastclip::clamp_offset(pos_offset, n, m);
  if (!x || !y || !row || !col || !grad_row || !grad_col || !grad_pos || !dx || !dy)
    fastclip::fail("cpu_bwd: null pointer");
  py::gil_scoped_release nogil;
  if (is_double)
    return as_pair(fastclip::cpu::contrastive_loss_bwd<double>(kind, cptr<double>(x),
        cptr<double>(y), n, m, d, ldx, ldy, scale, bias, normalize, eps, pos_offset,
        cptr<double>(row), cptr<double>(col), cptr<double>(grad_row), cptr<double>(grad_col),
        cptr<double>(grad_pos), mptr<double>(dx), mptr<double>(dy), num_threads));
  return as_pair(fastclip::cpu::contrastive_loss_bwd<float>(kind, cptr<float>(x),
      cptr<float>(y), n, m, d, ldx, ldy, float(scale), float(bias), normalize, float(eps),
      pos_offset, cptr<double>(row), cptr<double>(col), cptr<float>(grad_row),
      cptr<float>(grad_col), cptr<float>(grad_pos), mptr<float>(dx), mptr<float>(dy),
      num_threads, bf16));
}

std::pair<double, double> cpu_fwd_bwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m,
                                      int64_t d, int64_t ldx, int64_t ldy, bool is_double,
                                      double scale, double bias, bool normalize, double eps,
                                      int64_t pos_offset, uintptr_t grad_row, uintptr_t grad_col,
                                      uintptr_t grad_pos, uintptr_t row, uintptr_t col,
                                      uintptr_t pos, uintptr_t dx, uintptr_t dy,
                                      int num_threads, bool bf16) {
  const LossKind kind = fastclip::check_loss("cpu_fwd_bwd", loss);
  fastclip::check_sizes("cpu_fwd_bwd", n, m, d, ldx, ldy);
  pos_offset = fastclip::clamp_offset(pos_offset, n, m);
  if (kind != LossKind::kSigmoid)
    fastclip::fail("cpu_fwd_bwd: only one-pass losses (code 1, sigmoid) run in one pass");
  if (!x || !y || !grad_row || !grad_col || !grad_pos || !row || !col || !pos || !dx || !dy)
    fastclip::fail("cpu_fwd_bwd: null pointer");
  py::gil_scoped_release nogil;
  if (is_double)
    return as_pair(fastclip::cpu::contrastive_loss_fwd_bwd<double>(kind, cptr<double>(x),
        cptr<double>(y), n, m, d, ldx, ldy, scale, bias, normalize, eps, pos_offset,
        cptr<double>(grad_row), cptr<double>(grad_col), cptr<double>(grad_pos),
        mptr<double>(row), mptr<double>(col), mptr<double>(pos), mptr<double>(dx),
        mptr<double>(dy), num_threads));
  return as_pair(fastclip::cpu::contrastive_loss_fwd_bwd<float>(kind, cptr<float>(x),
      cptr<float>(y), n, m, d, ldx, ldy, float(scale), float(bias), normalize, float(eps),
      pos_offset, cptr<float>(grad_row), cptr<float>(grad_col), cptr<float>(grad_pos),
      mptr<double>(row), mptr<double>(col), mptr<double>(pos), mptr<float>(dx), mptr<float>(dy),
      num_threads, bf16));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip compiled kernels (raw pointers; see src/fastclip/ops/backends)";
  m.def("cpu_fwd", &cpu_fwd, "Contrastive-loss block forward on the CPU (see backends doc).");
  m.def("cpu_bwd", &cpu_bwd,
        "Contrastive-loss block backward on the CPU; returns (dscale, dbias).");
  m.def("cpu_fwd_bwd", &cpu_fwd_bwd,
        "One-pass block forward and backward of a one-pass loss on the CPU; returns "
        "(dscale, dbias).");
  m.def("cpu_isa", &fastclip::cpu::cpu_isa,
        "The CPU kernels' instruction set: 'avx512bf16', 'avx512', 'avx2' or 'generic' "
        "(128-bit).");
  fastclip::register_cuda(m);
}
