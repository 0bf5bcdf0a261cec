// CUDA side of fastclip._C: device status and the contrastive-loss kernels, bound with
// raw device pointers (Python ints), sizes, row strides (elements), a loss code (LossKind:
// 0 softmax/clip, 1 sigmoid/siglip), a dtype code (0 float32, 1 float16, 2 bfloat16), the
// loss's parameters as a device pointer to fp32 [P] (no host sync) and the caller's stream
// (torch.cuda.current_stream().cuda_stream). Statistics and their upstream gradients are
// float64 pointers. Sizes and pointers are checked here (std::invalid_argument ->
// ValueError) before any CUDA call; CUDA failures become RuntimeError naming the call.
// Importing makes no CUDA call.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
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

int expected_params(LossKind k) { return k == LossKind::kSigmoid ? 2 : 1; }

void check_f32(const char* fn, const char* what, uintptr_t p) {
  if (!p) fail(fn, ": ", what, " is a null pointer");
  if (p % 4) fail(fn, ": ", what, " must be 4-byte aligned (float32), got address ", p);
}

void check_f64(const char* fn, const char* what, uintptr_t p) {
  if (!p) fail(fn, ": ", what, " is a null pointer");
  if (p % 8) fail(fn, ": ", what, " must be 8-byte aligned (float64), got address ", p);
}

void check_dims(const char* fn, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy) {
  check_sizes(fn, n, m, d, ldx, ldy);
  if (n > kMaxRows || m > kMaxRows || d > kMaxRows)
    fail(fn, ": n, m and d must be <= 2^30, got n=", n, " m=", m, " d=", d);
}

// Everything every entry point takes, checked in the order of the arguments.
struct Checked {
  LossKind loss;
  cuda::DType dtype;
};

Checked check_common(const char* fn, int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m,
                     int64_t d, int64_t ldx, int64_t ldy, int dtype, uintptr_t params,
                     int num_params, double eps) {
  const LossKind kind = check_loss(fn, loss);
  check_dims(fn, n, m, d, ldx, ldy);
  if (dtype < 0 || dtype > 2)
    fail(fn, ": dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", dtype);
  const uintptr_t elem = dtype == 0 ? 4 : 2;
  if (!x || !y) fail(fn, ": x and y must be non-null device pointers");
  if (x % elem || y % elem)
    fail(fn, ": x and y must be aligned to their element size (", elem, " bytes)");
  check_f32(fn, "params", params);
  const int want = expected_params(kind);
  if (num_params != want)
    fail(fn, ": the ", kind == LossKind::kSigmoid ? "sigmoid" : "softmax", " loss takes ", want,
         " parameter", want == 1 ? " (scale)" : "s (scale, bias)", ", got num_params=",
         num_params);
  if (!(eps > 0.0) || !std::isfinite(eps))
    fail(fn, ": eps must be finite and > 0, got ", eps);
  return {kind, static_cast<cuda::DType>(dtype)};
}

void check_grads_out(const char* fn, int dtype, uintptr_t dx, uintptr_t dy, uintptr_t dparams) {
  const uintptr_t elem = dtype == 0 ? 4 : 2;
  if (!dx || !dy || dx % elem || dy % elem)
    fail(fn, ": dx and dy must be non-null and aligned to their element size (", elem, " bytes)");
  check_f32(fn, "dparams", dparams);
}

void check_workspace(const char* fn, uintptr_t workspace, size_t workspace_bytes, size_t needed) {
  if (!workspace) fail(fn, ": workspace is a null pointer");
  if (workspace % 256) fail(fn, ": workspace must be 256-byte aligned");
  if (workspace_bytes < needed)
    fail(fn, ": workspace has ", workspace_bytes, " bytes, needs ", needed, " (see ", fn,
         "_workspace_bytes)");
}

size_t fwd_workspace_bytes(int64_t n, int64_t m, int64_t d) {
  check_dims("cuda_fwd_workspace_bytes", n, m, d, d, d);
  return cuda::fwd_plan(n, m, d).bytes;
}

size_t bwd_workspace_bytes(int64_t n, int64_t m, int64_t d) {
  check_dims("cuda_bwd_workspace_bytes", n, m, d, d, d);
  return cuda::grad_plan(n, m, d, false).bytes;
}

size_t fwd_bwd_workspace_bytes(int64_t n, int64_t m, int64_t d) {
  check_dims("cuda_fwd_bwd_workspace_bytes", n, m, d, d, d);
  return cuda::grad_plan(n, m, d, true).bytes;
}

template <typename P>
const P* cp(uintptr_t p) { return reinterpret_cast<const P*>(p); }
template <typename P>
P* mp(uintptr_t p) { return reinterpret_cast<P*>(p); }

void cuda_fwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx,
              int64_t ldy, int dtype, bool allow_tf32, uintptr_t params, int num_params,
              bool normalize, double eps, int64_t pos_offset, uintptr_t row, uintptr_t col,
              uintptr_t pos, uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const char* fn = "cuda_fwd";
  const Checked c = check_common(fn, loss, x, y, n, m, d, ldx, ldy, dtype, params, num_params, eps);
  pos_offset = clamp_offset(pos_offset, n, m);
  check_f64(fn, "row", row);
  check_f64(fn, "col", col);
  check_f64(fn, "pos", pos);
  check_workspace(fn, workspace, workspace_bytes, cuda::fwd_plan(n, m, d).bytes);
  py::gil_scoped_release nogil;
  cuda::contrastive_loss_fwd(c.loss, cp<void>(x), cp<void>(y), n, m, d, ldx, ldy, c.dtype,
                             allow_tf32, cp<float>(params), normalize, float(eps), pos_offset,
                             mp<double>(row), mp<double>(col), mp<double>(pos), mp<void>(workspace),
                             reinterpret_cast<cudaStream_t>(stream));
}

void cuda_bwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d, int64_t ldx,
              int64_t ldy, int dtype, bool allow_tf32, uintptr_t params, int num_params,
              bool normalize, double eps, int64_t pos_offset, uintptr_t row, uintptr_t col,
              uintptr_t grad_row, uintptr_t grad_col, uintptr_t grad_pos, uintptr_t dx,
              uintptr_t dy, uintptr_t dparams, uintptr_t workspace, size_t workspace_bytes,
              uintptr_t stream) {
  const char* fn = "cuda_bwd";
  const Checked c = check_common(fn, loss, x, y, n, m, d, ldx, ldy, dtype, params, num_params, eps);
  pos_offset = clamp_offset(pos_offset, n, m);
  check_f64(fn, "row", row);
  check_f64(fn, "col", col);
  check_f64(fn, "grad_row", grad_row);
  check_f64(fn, "grad_col", grad_col);
  check_f64(fn, "grad_pos", grad_pos);
  check_grads_out(fn, dtype, dx, dy, dparams);
  check_workspace(fn, workspace, workspace_bytes, cuda::grad_plan(n, m, d, false).bytes);
  py::gil_scoped_release nogil;
  cuda::contrastive_loss_bwd(c.loss, cp<void>(x), cp<void>(y), n, m, d, ldx, ldy, c.dtype,
                             allow_tf32, cp<float>(params), num_params, normalize, float(eps),
                             pos_offset, cp<double>(row), cp<double>(col), cp<double>(grad_row),
                             cp<double>(grad_col), cp<double>(grad_pos), mp<void>(dx), mp<void>(dy),
                             mp<float>(dparams), mp<void>(workspace),
                             reinterpret_cast<cudaStream_t>(stream));
}

void cuda_fwd_bwd(int loss, uintptr_t x, uintptr_t y, int64_t n, int64_t m, int64_t d,
                  int64_t ldx, int64_t ldy, int dtype, bool allow_tf32, uintptr_t params,
                  int num_params, bool normalize, double eps, int64_t pos_offset,
                  uintptr_t grad_row, uintptr_t grad_col, uintptr_t grad_pos, uintptr_t row,
                  uintptr_t col, uintptr_t pos, uintptr_t dx, uintptr_t dy, uintptr_t dparams,
                  uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const char* fn = "cuda_fwd_bwd";
  const Checked c = check_common(fn, loss, x, y, n, m, d, ldx, ldy, dtype, params, num_params, eps);
  pos_offset = clamp_offset(pos_offset, n, m);
  if (c.loss != LossKind::kSigmoid)
    fail(fn, ": only one-pass losses (code 1, sigmoid) run in one pass; the softmax (code 0) "
             "needs its merged statistics: run cuda_fwd, then cuda_bwd");
  check_f64(fn, "grad_row", grad_row);
  check_f64(fn, "grad_col", grad_col);
  check_f64(fn, "grad_pos", grad_pos);
  check_f64(fn, "row", row);
  check_f64(fn, "col", col);
  check_f64(fn, "pos", pos);
  check_grads_out(fn, dtype, dx, dy, dparams);
  check_workspace(fn, workspace, workspace_bytes, cuda::grad_plan(n, m, d, true).bytes);
  py::gil_scoped_release nogil;
  cuda::contrastive_loss_fwd_bwd(c.loss, cp<void>(x), cp<void>(y), n, m, d, ldx, ldy, c.dtype,
                                 allow_tf32, cp<float>(params), num_params, normalize,
                                 float(eps), pos_offset, cp<double>(grad_row),
                                 cp<double>(grad_col), cp<double>(grad_pos), mp<double>(row),
                                 mp<double>(col), mp<double>(pos), mp<void>(dx), mp<void>(dy),
                                 mp<float>(dparams), mp<void>(workspace),
                                 reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

void register_cuda(py::module_& m) {
  m.attr("CUDA_BUILT") = true;
  m.def("cuda_status", &cuda_status, "(ok, reason): can the CUDA kernels run here?");
  m.def("cuda_fwd_workspace_bytes", &fwd_workspace_bytes, py::arg("n"), py::arg("m"),
        py::arg("d"),
        "Bytes of device workspace cuda_fwd needs for x [n, d], y [m, d] (any loss).");
  m.def("cuda_bwd_workspace_bytes", &bwd_workspace_bytes, py::arg("n"), py::arg("m"),
        py::arg("d"),
        "Bytes of device workspace cuda_bwd needs for x [n, d], y [m, d] (any loss).");
  m.def("cuda_fwd_bwd_workspace_bytes", &fwd_bwd_workspace_bytes, py::arg("n"), py::arg("m"),
        py::arg("d"), "Bytes of device workspace cuda_fwd_bwd needs for x [n, d], y [m, d].");
  m.def("cuda_fwd", &cuda_fwd, py::arg("loss"), py::arg("x"), py::arg("y"), py::arg("n"),
        py::arg("m"), py::arg("d"), py::arg("ldx"), py::arg("ldy"), py::arg("dtype"),
        py::arg("allow_tf32"), py::arg("params"), py::arg("num_params"), py::arg("normalize"),
        py::arg("eps"), py::arg("pos_offset"), py::arg("row"), py::arg("col"), py::arg("pos"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        "Contrastive-loss block forward on the GPU (stream-ordered, asynchronous): writes the "
        "loss's statistics row [n], col [m] and pos [n] (float64). x [n, d] / y [m, d] with row "
        "strides ldx / ldy and unit inner stride; params: device pointer to num_params float32 "
        "(scale, and bias for the sigmoid).");
  m.def("cuda_bwd", &cuda_bwd, py::arg("loss"), py::arg("x"), py::arg("y"), py::arg("n"),
        py::arg("m"), py::arg("d"), py::arg("ldx"), py::arg("ldy"), py::arg("dtype"),
        py::arg("allow_tf32"), py::arg("params"), py::arg("num_params"), py::arg("normalize"),
        py::arg("eps"), py::arg("pos_offset"), py::arg("row"), py::arg("col"),
        py::arg("grad_row"), py::arg("grad_col"), py::arg("grad_pos"), py::arg("dx"),
        py::arg("dy"), py::arg("dparams"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"),
        "Contrastive-loss block backward on the GPU (asynchronous): from the statistics and "
        "their upstream gradients (float64), writes dx [n, d] and dy [m, d] (contiguous, input "
        "dtype) and dparams [num_params] (float32: d scale, d bias).");
  m.def("cuda_fwd_bwd", &cuda_fwd_bwd, py::arg("loss"), py::arg("x"), py::arg("y"),
        py::arg("n"), py::arg("m"), py::arg("d"), py::arg("ldx"), py::arg("ldy"),
        py::arg("dtype"), py::arg("allow_tf32"), py::arg("params"), py::arg("num_params"),
        py::arg("normalize"), py::arg("eps"), py::arg("pos_offset"), py::arg("grad_row"),
        py::arg("grad_col"), py::arg("grad_pos"), py::arg("row"), py::arg("col"),
        py::arg("pos"), py::arg("dx"), py::arg("dy"), py::arg("dparams"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"),
        "One-pass block forward and backward of a one-pass loss (sigmoid) on the GPU "
        "(asynchronous): the outputs of cuda_fwd and of cuda_bwd for the given upstream "
        "gradients, with one product per tile fewer.");
}

}  // namespace fastclip
