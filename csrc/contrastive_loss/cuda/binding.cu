// CUDA side of fastclip._C: device status (kernels: issue 7).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace fastclip {

// (ok, reason). With the static runtime the module imports without a driver;
// cudaGetDeviceCount then fails (error 35, insufficient driver) and that becomes
// "CUDA unavailable", never a crash.
static std::pair<bool, std::string> cuda_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string("CUDA unavailable: cudaGetDeviceCount failed with ") +
                       cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")"};
  }
  if (count == 0) return {false, "CUDA unavailable: no CUDA device"};
  return {true, ""};
}

void register_cuda(pybind11::module_& m) {
  m.attr("CUDA_BUILT") = true;
  m.def("cuda_status", &cuda_status, "(ok, reason): can the CUDA kernels run here?");
}

}  // namespace fastclip
