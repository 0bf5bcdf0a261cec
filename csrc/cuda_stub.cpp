// Built when CMake found no CUDA compiler (or FASTCLIP_CUDA=OFF): the cuda backend
// reports itself unavailable with the reason.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace fastclip {
void register_cuda(pybind11::module_& m) {
  m.attr("CUDA_BUILT") = false;
  m.def("cuda_status", []() {
    return std::make_pair(false, std::string(
        "fastclip was built without CUDA (no nvcc at build time); rebuild from source with "
        "nvcc on PATH and `pip install . -C cmake.define.FASTCLIP_CUDA=ON`"));
  });
}
}  // namespace fastclip
