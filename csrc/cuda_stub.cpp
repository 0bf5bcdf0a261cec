// Built when CMake compiled no CUDA kernels: the cuda backend reports itself unavailable
// with the reason, which says whether the build was asked to skip them or found no nvcc.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace fastclip {
void register_cuda(pybind11::module_& m) {
  m.attr("CUDA_BUILT") = false;
  m.def("cuda_status", []() {
#ifdef FASTCLIP_CUDA_OFF_REQUESTED
    const char* why = "FASTCLIP_CUDA=OFF at build time";
#else
    const char* why = "no nvcc at build time";
#endif
    return std::make_pair(false, std::string("fastclip was built without CUDA (") + why +
        "); rebuild from source with nvcc on PATH: "
        "`FASTCLIP_CUDA=ON pip install --no-binary fastclip-fused fastclip-fused`, "
        "or `FASTCLIP_CUDA=ON pip install .` in a checkout");
  });
}
}  // namespace fastclip
