// fastclip._C: the compiled kernels, bound with pybind11. No torch here (design.md §4):
// every function takes raw pointers (as Python ints), sizes, strides and, for CUDA,
// the caller's stream. The Python layer (src/fastclip/ops) validates first; these
// functions check sizes again and raise ValueError/RuntimeError, never crash.
#include <pybind11/pybind11.h>

#include "common.h"
#include "contrastive_loss/cpu/contrastive_loss_cpu.h"

namespace py = pybind11;

namespace fastclip {
void register_cuda(py::module_& m);  // cuda/binding.cu, or cuda_stub.cpp without CUDA
}

namespace {

template <typename T>
const T* cptr(uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void cpu_fwd(uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy,
             bool is_double, double scale, bool normalize, double eps, int64_t pos_offset,
             uintptr_t row_lse, uintptr_t col_lse, uintptr_t pos, int num_threads) {
  fastclip::check_sizes("cpu_fwd", n, m, d, ldx, ldy);
  if (!x || !y || !row_lse || !col_lse || !pos) fastclip::fail("cpu_fwd: null pointer");
  py::gil_scoped_release nogil;
  if (is_double)
    fastclip::cpu::contrastive_loss_fwd<double>(cptr<double>(x), cptr<double>(y), n, m, d, ldx,
        ldy, scale, normalize, eps, pos_offset, mptr<double>(row_lse), mptr<double>(col_lse),
        mptr<double>(pos), num_threads);
  else
    fastclip::cpu::contrastive_loss_fwd<float>(cptr<float>(x), cptr<float>(y), n, m, d, ldx,
        ldy, float(scale), normalize, float(eps), pos_offset, mptr<float>(row_lse),
        mptr<float>(col_lse), mptr<float>(pos), num_threads);
}

double cpu_bwd(uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy,
               bool is_double, double scale, bool normalize, double eps, int64_t pos_offset,
               uintptr_t row_lse, uintptr_t col_lse, uintptr_t grad_row, uintptr_t grad_col,
               uintptr_t grad_pos, uintptr_t dx, uintptr_t dy, int num_threads) {
  fastclip::check_sizes("cpu_bwd", n, m, d, ldx, ldy);
  if (!x || !y || !row_lse || !col_lse || !grad_row || !grad_col || !grad_pos || !dx || !dy)
    fastclip::fail("cpu_bwd: null pointer");
  py::gil_scoped_release nogil;
  if (is_double)
    return fastclip::cpu::contrastive_loss_bwd<double>(cptr<double>(x), cptr<double>(y), n, m,
        d, ldx, ldy, scale, normalize, eps, pos_offset, cptr<double>(row_lse),
        cptr<double>(col_lse), cptr<double>(grad_row), cptr<double>(grad_col),
        cptr<double>(grad_pos), mptr<double>(dx), mptr<double>(dy), num_threads);
  return fastclip::cpu::contrastive_loss_bwd<float>(cptr<float>(x), cptr<float>(y), n, m, d,
      ldx, ldy, float(scale), normalize, float(eps), pos_offset, cptr<float>(row_lse),
      cptr<float>(col_lse), cptr<float>(grad_row), cptr<float>(grad_col),
      cptr<float>(grad_pos), mptr<float>(dx), mptr<float>(dy), num_threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclip compiled kernels (raw pointers; see src/fastclip/ops/backends)";
  m.def("cpu_fwd", &cpu_fwd, "Contrastive-loss block forward on the CPU (see backends doc).");
  m.def("cpu_bwd", &cpu_bwd, "Contrastive-loss block backward on the CPU; returns dscale.");
  fastclip::register_cuda(m);
}
