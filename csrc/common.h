// Shared definitions of the compiled extension: the loss ids and the argument checks that
// raise Python errors.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastclip {

// The epilogue of a loss (LossSpec.code in src/fastclip/ops/losses): what a tile of
// logits becomes. Every kernel family takes it as a template parameter.
enum class LossKind : int { kSoftmax = 0, kSigmoid = 1 };

// Gradients of the scalar parameters: (sum_ij G_ij u_ij, sum_ij G_ij) = (dscale, dbias).
struct ParamGrads {
  double gu;
  double g;
};

// Thrown for bad sizes/arguments; pybind11 turns std::invalid_argument into ValueError.
template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

inline LossKind check_loss(const char* fn, int loss) {
  if (loss != int(LossKind::kSoftmax) && loss != int(LossKind::kSigmoid))
    fail(fn, ": unknown loss code ", loss, " (0: softmax/clip, 1: sigmoid/siglip)");
  return LossKind(loss);
}

inline void check_sizes(const char* fn, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy) {
  if (n < 1 || m < 1 || d < 1)
    fail(fn, ": expected n, m, d >= 1, got n=", n, " m=", m, " d=", d);
  if (ldx < d || ldy < d)
    fail(fn, ": row strides must be >= d=", d, ", got ldx=", ldx, " ldy=", ldy);
}

// The positive of row i is column i + pos_offset; every offset outside [-n, m] means "no
// positive in this block", and the kernels form i + pos_offset - j0 in int64: clamped here,
// an offset near +-2^63 from a direct call cannot overflow (as clamped_offset does in
// src/fastclip/ops/contrastive_loss.py).
inline int64_t clamp_offset(int64_t pos_offset, int64_t n, int64_t m) {
  return pos_offset < -n ? -n : (pos_offset > m ? m : pos_offset);
}

}  // namespace fastclip
