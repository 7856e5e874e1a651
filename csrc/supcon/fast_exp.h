// A branch-free exp that compilers vectorise (Cephes' expf polynomial, ~2 ulp), for the CPU epilogues.
// std::exp is a libm call that blocks vectorisation of the epilogue loops. The exponent is clamped in the
// integer domain: a float min/max clamp would not vectorise without -ffinite-math-only (and the epilogues use
// -inf). Valid for finite x <= 88 (the epilogues only pass x <= 0); x < -87.3 returns 0.
#pragma once

#include <bit>
#include <cstdint>

namespace metric_ds {

__attribute__((always_inline)) inline float fast_expf(float x) {
  const float fx = x * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= static_cast<int32_t>(static_cast<float>(n) > fx);  // floor
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  n = n < -127 ? -127 : n;  // 2^-127 -> bit pattern 0: underflow to exactly 0
  n = n > 127 ? 127 : n;
  return y * std::bit_cast<float>((n + 127) << 23);
}

__attribute__((always_inline)) inline double fast_exp(double x) { return __builtin_exp(x); }
__attribute__((always_inline)) inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace metric_ds
