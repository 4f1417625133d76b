// Helpers shared by the C++ CPU ops: row loads/stores in any float dtype (fp32 math) and an exp that
// the compiler vectorises. Plain loops over contiguous float buffers: -O3 vectorises them for the
// baseline x86-64 ISA, so the build runs on any x86-64 machine.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gist_fast {

// dtypes the ops accept for activations and logits (weights are converted to fp32 once).
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

template <typename T>
inline void load_row_t(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void add_row_t(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(src[i]);
}

template <typename T>
inline void store_row_t(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// dst[0:n] = float(row `row` of the contiguous 2-D tensor t); t's dtype is fp32, bf16 or fp16.
inline void load_row(const at::Tensor& t, int64_t row, float* dst, int64_t n) {
  switch (t.scalar_type()) {
    case at::kFloat: std::memcpy(dst, t.const_data_ptr<float>() + row * n, n * sizeof(float)); break;
    case at::kBFloat16: load_row_t(t.const_data_ptr<at::BFloat16>() + row * n, dst, n); break;
    case at::kHalf: load_row_t(t.const_data_ptr<at::Half>() + row * n, dst, n); break;
    default: TORCH_CHECK(false, "gist_fast: unsupported dtype ", t.scalar_type());
  }
}

// dst[0:n] += float(row `row` of t).
inline void add_row(const at::Tensor& t, int64_t row, float* dst, int64_t n) {
  switch (t.scalar_type()) {
    case at::kFloat: add_row_t(t.const_data_ptr<float>() + row * n, dst, n); break;
    case at::kBFloat16: add_row_t(t.const_data_ptr<at::BFloat16>() + row * n, dst, n); break;
    case at::kHalf: add_row_t(t.const_data_ptr<at::Half>() + row * n, dst, n); break;
    default: TORCH_CHECK(false, "gist_fast: unsupported dtype ", t.scalar_type());
  }
}

// row `row` of t = src[0:n], rounded once to t's dtype.
inline void store_row(const float* src, at::Tensor& t, int64_t row, int64_t n) {
  switch (t.scalar_type()) {
    case at::kFloat: std::memcpy(t.mutable_data_ptr<float>() + row * n, src, n * sizeof(float)); break;
    case at::kBFloat16: store_row_t(src, t.mutable_data_ptr<at::BFloat16>() + row * n, n); break;
    case at::kHalf: store_row_t(src, t.mutable_data_ptr<at::Half>() + row * n, n); break;
    default: TORCH_CHECK(false, "gist_fast: unsupported dtype ", t.scalar_type());
  }
}

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) in fp32, written so that loops calling it vectorise (needs -fno-trapping-math, see
// setup.py): Cephes expf, i.e. range reduction by ln 2, a degree-6 polynomial and 2^n built in the
// exponent bits; about 1.5 ulp on [-87, 88]. exp(-inf) = 0 (results below 2^-126 flush to 0),
// NaN stays NaN, x > 88.0 gives inf (the ops only call it on x <= 0).
inline float vexp(float x) {
  float xc = x > -100.0f ? x : -100.0f;  // NaN becomes -100 here and is restored at the end
  xc = xc < 100.0f ? xc : 100.0f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;  // biased exponent of 2^n, clamped: 0 -> 0.0, 255 -> inf
  e = e > 0 ? e : 0;
  e = e < 255 ? e : 255;
  const float result = p * bits_to_float(e << 23);
  const int32_t nan_bits = x != x ? 0x7fc00000 : 0;
  return bits_to_float(float_to_bits(result) | nan_bits);
}

}  // namespace gist_fast
