// Shared helpers of the compiled extension: argument checks that raise Python errors.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastclip {

// Thrown for bad sizes/arguments; pybind11 turns std::invalid_argument into ValueError.
template <typename... Args>
[[noreturn]] inline void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::invalid_argument(os.str());
}

inline void check_sizes(const char* fn, int64_t n, int64_t m, int64_t d, int64_t ldx, int64_t ldy) {
  if (n < 1 || m < 1 || d < 1)
    fail(fn, ": expected n, m, d >= 1, got n=", n, " m=", m, " d=", d);
  if (ldx < d || ldy < d)
    fail(fn, ": row strides must be >= d=", d, ", got ldx=", ldx, " ldy=", ldy);
}

}  // namespace fastclip
