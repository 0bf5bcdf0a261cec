// CUDA side of fastclip._C: device status and the contrastive-loss kernels, bound with
// raw device pointers (Python ints), sizes, row strides (elements), a dtype code
// (0 float32, 1 float16, 2 bfloat16), the scale as a device pointer to one fp32 (no
// host sync) and the caller's stream (torch.cuda.current_stream().cuda_stream).
// Sizes and pointers are checked here (std::invalid_argument -> ValueError) before any
// CUDA call; CUDA failures become RuntimeError naming the call. Importing makes no
// CUDA call.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "contrastive_loss/cuda/contrastive_loss_cuda.h"

namespace py = pybind11;

namespace fastclip {

// (ok, reason). With the static runtime the module imports without a driver; every runtime
// call then fails with cudaErrorInsufficientDriver (35), also when no driver is installed
// at all (measured: cudaDriverGetVersion reports 0 then), so the two cases are told apart
// here. CUDA 13.x code needs an NVIDIA driver of the 580 series or newer (CUDA's minor
// version compatibility); the same driver JIT-compiles the embedded compute_80 PTX for GPUs
// without a cubin. No CUDA context is created.
static std::pair<bool, std::string> cuda_status() {
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  const std::string needed = CUDART_VERSION >= 13000 && CUDART_VERSION < 14000
                                 ? std::string("NVIDIA driver 580 or newer")
                                 : "a driver for CUDA " + version(CUDART_VERSION) + " or newer";
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (driver == 0)
      return {false, "CUDA unavailable: no NVIDIA driver found (libcuda.so.1 is not installed or "
                     "did not load); fastclip's CUDA kernels need " + needed};
    if (err == cudaErrorInsufficientDriver)
      return {false, "CUDA unavailable: insufficient driver: the installed NVIDIA driver supports "
                     "CUDA " + version(driver) + ", fastclip's CUDA kernels were built with CUDA " +
                     version(CUDART_VERSION) + " and need " + needed};
    if (err == cudaErrorNoDevice)
      return {false, "CUDA unavailable: no CUDA device (NVIDIA driver for CUDA " + version(driver) +
                         " found)"};
    return {false, std::string("CUDA unavailable: cudaGetDeviceCount failed with ") +
                       cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")"};
  }
  if (count == 0) return {false, "CUDA unavailable: no CUDA device"};
  // The kernels use sm_80 instructions (mma.sync, cp.async): Ampere or newer.
  std::string older;
  for (int dev = 0; dev < count; ++dev) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (major >= 8) return {true, ""};
    older += (older.empty() ? "" : ", ") + std::string("sm_") + std::to_string(major * 10 + minor);
  }
  cudaGetLastError();
  return {false, "CUDA unavailable: no CUDA device of compute capability 8.0 or newer (found " +
                     older + "); fastclip's CUDA kernels need an Ampere or newer GPU"};
}

namespace {

// Kernels index rows and D with 32-bit ints (and grid.x counts row blocks).
constexpr int64_t kMaxRows = int64_t(1) << 30;

cuda::DType check_common(const char* fn, int64_t n, int64_t m, int64_t d, int64_t ldx,
                         int64_t ldy, int dtype, uintptr_t x, uintptr_t y, uintptr_t scale,
                         uintptr_t workspace, size_t workspace_bytes, size_t needed) {
  check_sizes(fn, n, m, d, ldx, ldy);
  if (n > kMaxRows || m > kMaxRows || d > kMaxRows)
    fail(fn, ": n, m and d must be <= 2^30, got n=", n, " m=", m, " d=", d);
  if (dtype < 0 || dtype > 2)
    fail(fn, ": dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", dtype);
  const uintptr_t elem = dtype == 0 ? 4 : 2;
  if (!x || !y || !scale || !workspace) fail(fn, ": null pointer (x, y, scale or workspace)");
  if (x % elem || y % elem)
    fail(fn, ": x and y must be aligned to their element size (", elem, " bytes)");
  if (scale % 4) fail(fn, ": scale must point to an aligned float32");
  if (workspace % 256) fail(fn, ": workspace must be 256-byte aligned");
  if (workspace_bytes < needed)
    fail(fn, ": workspace has ", workspace_bytes, " bytes, needs ", needed,
         " (see ", fn, "_workspace_bytes)");
  return static_cast<cuda::DType>(dtype);
}

void check_f32(const char* fn, const char* what, uintptr_t p) {
  if (!p) fail(fn, ": ", what, " is a null pointer");
  if (p % 4) fail(fn, ": ", what, " must be 4-byte aligned (float32)");
}

size_t fwd_workspace_bytes(int64_t n, int64_t m, int64_t d) {
  check_sizes("cuda_fwd_workspace_bytes", n, m, d, d, d);
  return cuda::fwd_plan(n, m, d).bytes;
}

size_t bwd_workspace_bytes(int64_t n, int64_t m, int64_t d) {
  check_sizes("cuda_bwd_workspace_bytes", n, m, d, d, d);
  return cuda::bwd_plan(n, m, d).bytes;
}

void cuda_fwd(uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy,
              int dtype, bool allow_tf32, uintptr_t scale, bool normalize, double eps,
              int64_t pos_offset, uintptr_t row_lse, uintptr_t col_lse, uintptr_t pos,
              uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const char* fn = "cuda_fwd";
  check_sizes(fn, n, m, d, ldx, ldy);
  const cuda::DType dt = check_common(fn, n, m, d, ldx, ldy, dtype, x, y, scale, workspace,
                                      workspace_bytes, cuda::fwd_plan(n, m, d).bytes);
  check_f32(fn, "row_lse", row_lse);
  check_f32(fn, "col_lse", col_lse);
  check_f32(fn, "pos", pos);
  py::gil_scoped_release nogil;
  cuda::contrastive_loss_fwd(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(y),
                             n, m, d, ldx, ldy, dt, allow_tf32,
                             reinterpret_cast<const float*>(scale), normalize, float(eps),
                             pos_offset, reinterpret_cast<float*>(row_lse),
                             reinterpret_cast<float*>(col_lse), reinterpret_cast<float*>(pos),
                             reinterpret_cast<void*>(workspace),
                             reinterpret_cast<cudaStream_t>(stream));
}

void cuda_bwd(uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy,
              int dtype, bool allow_tf32, uintptr_t scale, bool normalize, double eps,
              int64_t pos_offset, uintptr_t row_lse, uintptr_t col_lse, uintptr_t grad_row,
              uintptr_t grad_col, uintptr_t grad_pos, uintptr_t dx, uintptr_t dy,
              uintptr_t dscale, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const char* fn = "cuda_bwd";
  check_sizes(fn, n, m, d, ldx, ldy);
  const cuda::DType dt = check_common(fn, n, m, d, ldx, ldy, dtype, x, y, scale, workspace,
                                      workspace_bytes, cuda::bwd_plan(n, m, d).bytes);
  check_f32(fn, "row_lse", row_lse);
  check_f32(fn, "col_lse", col_lse);
  check_f32(fn, "grad_row", grad_row);
  check_f32(fn, "grad_col", grad_col);
  check_f32(fn, "grad_pos", grad_pos);
  check_f32(fn, "dscale", dscale);
  const uintptr_t elem = dtype == 0 ? 4 : 2;
  if (!dx || !dy || dx % elem || dy % elem)
    fail(fn, ": dx and dy must be non-null and aligned to their element size (", elem, " bytes)");
  py::gil_scoped_release nogil;
  cuda::contrastive_loss_bwd(
      reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(y), n, m, d, ldx, ldy, dt,
      allow_tf32, reinterpret_cast<const float*>(scale), normalize, float(eps), pos_offset,
      reinterpret_cast<const float*>(row_lse), reinterpret_cast<const float*>(col_lse),
      reinterpret_cast<const float*>(grad_row), reinterpret_cast<const float*>(grad_col),
      reinterpret_cast<const float*>(grad_pos), reinterpret_cast<void*>(dx),
      reinterpret_cast<void*>(dy), reinterpret_cast<float*>(dscale),
      reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

void register_cuda(py::module_& m) {
  m.attr("CUDA_BUILT") = true;
  m.def("cuda_status", &cuda_status, "(ok, reason): can the CUDA kernels run here?");
  m.def("cuda_fwd_workspace_bytes", &fwd_workspace_bytes, py::arg("n"), py::arg("m"),
        py::arg("d"), "Bytes of device workspace cuda_fwd needs for x [n, d], y [m, d].");
  m.def("cuda_bwd_workspace_bytes", &bwd_workspace_bytes, py::arg("n"), py::arg("m"),
        py::arg("d"), "Bytes of device workspace cuda_bwd needs for x [n, d], y [m, d].");
  m.def("cuda_fwd", &cuda_fwd, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("m"),
        py::arg("d"), py::arg("ldx"), py::arg("ldy"), py::arg("dtype"), py::arg("allow_tf32"),
        py::arg("scale"), py::arg("normalize"), py::arg("eps"), py::arg("pos_offset"),
        py::arg("row_lse"), py::arg("col_lse"), py::arg("pos"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "Contrastive-loss block forward on the GPU (stream-ordered, asynchronous): writes "
        "row_lse [n], col_lse [m], pos [n] (float32). x [n, d] / y [m, d] with row strides "
        "ldx / ldy and unit inner stride; scale: device pointer to one float32.");
  m.def("cuda_bwd", &cuda_bwd, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("m"),
        py::arg("d"), py::arg("ldx"), py::arg("ldy"), py::arg("dtype"), py::arg("allow_tf32"),
        py::arg("scale"), py::arg("normalize"), py::arg("eps"), py::arg("pos_offset"),
        py::arg("row_lse"), py::arg("col_lse"), py::arg("grad_row"), py::arg("grad_col"),
        py::arg("grad_pos"), py::arg("dx"), py::arg("dy"), py::arg("dscale"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "Contrastive-loss block backward on the GPU (asynchronous): writes dx [n, d] and "
        "dy [m, d] (contiguous, input dtype) and dscale (one float32).");
}

}  // namespace fastclip
