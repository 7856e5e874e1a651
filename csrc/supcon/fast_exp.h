// A branch-free exp that compilers vectorise (Cephes' expf polynomial, ~2 ulp in the clamped range).
// std::exp is a libm call that blocks vectorisation of the epilogue loops; this keeps them SIMD at -O3.
#pragma once

#include <cstdint>
#include <cstring>

namespace metric_ds {

inline float fast_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float fx = x * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= (static_cast<float>(n) > fx);  // floor
  const float nf = static_cast<float>(n);
  x = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(pow2n));
  return y * pow2n;
}

inline double fast_exp(double x) { return __builtin_exp(x); }
inline float fast_exp(float x) { return fast_expf(x); }

}  // namespace metric_ds
