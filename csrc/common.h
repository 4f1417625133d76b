// Helpers shared by the C++ CPU ops: row loads/stores in any float dtype (fp32 math) and an exp that
// the compiler vectorises. Plain loops over contiguous float buffers: -O3 vectorises them for the
// baseline x86-64 ISA, so the build runs on any x86-64 machine; the hot row kernels are marked
// GIST_FAST_CLONES, which also compiles them for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4) and
// picks the best one for the running CPU when the library loads (GCC function multi-versioning).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GIST_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GIST_FAST_CLONES
#endif

namespace gist_fast {

// dtypes the ops accept for activations and logits (weights are converted to fp32 once).
inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

#define GIST_FAST_INLINE inline __attribute__((always_inline))

GIST_FAST_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

GIST_FAST_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// Scalar conversions usable inside the clones (c10's are not always inlined there): bf16 by its
// bits (round to nearest even, NaN kept), fp16 through _Float16.
GIST_FAST_INLINE float to_f32(float v) { return v; }
GIST_FAST_INLINE float to_f32(double v) { return static_cast<float>(v); }
GIST_FAST_INLINE float to_f32(at::BFloat16 v) { return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(v.x) << 16)); }
#if defined(__FLT16_MAX__)  // the compiler has _Float16 (GCC >= 12 / clang >= 15 on x86-64)
#define GIST_FAST_HAS_FLOAT16 1
using f16_t = _Float16;
#else
using f16_t = at::Half;
#endif
GIST_FAST_INLINE float to_f32(at::Half v) {
#if GIST_FAST_HAS_FLOAT16
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof h);
  return static_cast<float>(h);
#else
  return static_cast<float>(v);
#endif
}
template <typename T>
GIST_FAST_INLINE T from_f32(float v);
template <>
GIST_FAST_INLINE float from_f32<float>(float v) { return v; }
template <>
GIST_FAST_INLINE double from_f32<double>(float v) { return v; }
template <>
GIST_FAST_INLINE at::BFloat16 from_f32<at::BFloat16>(float v) {
  const uint32_t u = static_cast<uint32_t>(float_to_bits(v));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return at::BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded), at::BFloat16::from_bits());
}
template <>
GIST_FAST_INLINE at::Half from_f32<at::Half>(float v) {
#if GIST_FAST_HAS_FLOAT16
  const _Float16 h = static_cast<_Float16>(v);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return at::Half(bits, at::Half::from_bits());
#else
  return static_cast<at::Half>(v);
#endif
}

// Row conversions, written on the raw bits so that they vectorise: bf16 -> fp32 is a shift, fp32 ->
// bf16 rounds to nearest even (NaN stays a quiet NaN), as c10::BFloat16 does; fp16 goes through
// _Float16 (F16C instructions in the AVX2 / AVX-512 clones).
GIST_FAST_CLONES static void bf16_to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n, bool add) {
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(src[i]) << 16));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(src[i]) << 16));
  }
}

GIST_FAST_CLONES static void f32_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(float_to_bits(src[i]));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7fc0u : rounded);
  }
}

GIST_FAST_CLONES static void f16_to_f32(const f16_t* __restrict src, float* __restrict dst, int64_t n, bool add) {
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

GIST_FAST_CLONES static void f32_to_f16(const float* __restrict src, f16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<f16_t>(src[i]);
}

GIST_FAST_CLONES static void f32_add(const float* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

inline void load_row_t(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void load_row_t(const at::BFloat16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n, false);
}
inline void load_row_t(const at::Half* src, float* dst, int64_t n) {
  f16_to_f32(reinterpret_cast<const f16_t*>(src), dst, n, false);
}
inline void add_row_t(const float* src, float* dst, int64_t n) { f32_add(src, dst, n); }
inline void add_row_t(const at::BFloat16* src, float* dst, int64_t n) {
  bf16_to_f32(reinterpret_cast<const uint16_t*>(src), dst, n, true);
}
inline void add_row_t(const at::Half* src, float* dst, int64_t n) {
  f16_to_f32(reinterpret_cast<const f16_t*>(src), dst, n, true);
}
inline void store_row_t(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row_t(const float* src, at::BFloat16* dst, int64_t n) {
  f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}
inline void store_row_t(const float* src, at::Half* dst, int64_t n) {
  f32_to_f16(src, reinterpret_cast<f16_t*>(dst), n);
}

// A contiguous 2-D tensor's rows in fp32/bf16/fp16, read and written as fp32 rows; the data pointer
// and dtype are looked up once (not per row).
struct Rows {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t n = 0;  // row length

  Rows() = default;
  explicit Rows(const at::Tensor& t) : data(const_cast<void*>(t.const_data_ptr())), dtype(t.scalar_type()), n(t.size(-1)) {
    TORCH_CHECK(is_supported_float(dtype), "gist_fast: unsupported dtype ", dtype);
  }

  // Hint the cache to fetch row `row` (the row loops stream several tensors at once and stalled
  // on their loads without it).
  void prefetch(int64_t row) const {
    const size_t bytes = static_cast<size_t>(n) * c10::elementSize(dtype);
    const char* p = static_cast<const char*>(data) + row * bytes;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  }
  // dst[0:n] = float(row `row`).
  void load(int64_t row, float* dst) const {
    switch (dtype) {
      case at::kFloat: load_row_t(static_cast<const float*>(data) + row * n, dst, n); break;
      case at::kBFloat16: load_row_t(static_cast<const at::BFloat16*>(data) + row * n, dst, n); break;
      default: load_row_t(static_cast<const at::Half*>(data) + row * n, dst, n); break;
    }
  }
  // dst[0:n] += float(row `row`).
  void add(int64_t row, float* dst) const {
    switch (dtype) {
      case at::kFloat: add_row_t(static_cast<const float*>(data) + row * n, dst, n); break;
      case at::kBFloat16: add_row_t(static_cast<const at::BFloat16*>(data) + row * n, dst, n); break;
      default: add_row_t(static_cast<const at::Half*>(data) + row * n, dst, n); break;
    }
  }
  // row `row` = src[0:n], rounded once to the dtype.
  void store(const float* src, int64_t row) const {
    switch (dtype) {
      case at::kFloat: store_row_t(src, static_cast<float*>(data) + row * n, n); break;
      case at::kBFloat16: store_row_t(src, static_cast<at::BFloat16*>(data) + row * n, n); break;
      default: store_row_t(src, static_cast<at::Half*>(data) + row * n, n); break;
    }
  }
};

// exp(x) in fp32, written so that loops calling it vectorise (needs -fno-trapping-math, see
// setup.py): Cephes expf, i.e. range reduction by ln 2, a degree-6 polynomial and 2^n built in the
// exponent bits; about 1.5 ulp on [-87, 88]. exp(-inf) = 0 (results below 2^-126 flush to 0),
// NaN stays NaN, x > 88.0 gives inf (the ops only call it on x <= 0). Always inlined: GCC does
// not inline a plain function into the AVX2 / AVX-512 clones (different target arch).
GIST_FAST_INLINE float vexp(float x) {
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
