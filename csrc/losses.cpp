// C++ CPU kernels of the fused losses: the CPU implementations of gist_fast::pair_loss / pair_loss_bwd, whose
// schemas, autograd formula and fake implementation live in gist_fast/ops/losses.py.
//
// Per row b of two logit sets a, b (B, C) with target t, σ_T = softmax(z / T), p = σ_T(a), q = σ_T(b):
//   GIST     rows = CE(a) + w_g CE(b) + w_kl (KL(p||q) + KL(q||p))        (a = z_cls, b = z_gist)
//   KL       rows = CE(a) + CE(b) + KL(q||p)                               (a = student, b = teacher)
//   MSE      rows = CE(a) + CE(b) + mean_c (a - b)^2
// and, when asked, d rows[b] / d a[b] and d rows[b] / d b[b]. Each row is read three times: its
// maxima, then the softmax sums (KL(p||q) = Σ e_p (u_p - u_q) / S_p - log S_p + log S_q needs no
// per-element log), then the gradients. fp32 math whatever the storage dtype; rows whose target is
// ignore_index are 0 with zero gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace gist_fast {
namespace {

using at::Tensor;

enum Mode : int { kGist = 0, kDistillKL = 1, kDistillMSE = 2 };

struct LossParams {
  float gist_weight;   // w_g (GIST only)
  float kl_weight;     // w_kl (GIST only)
  float inv_temp;      // 1 / T
  int64_t ignore_index;
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows with at most this many classes keep their four exps per logit (exp(u), exp(u / T) of both
// sets: 4 C floats, 256 KiB, L2-resident) from the sums pass for the gradient pass instead of
// recomputing them.
constexpr int64_t kCacheClasses = 16384;

// One row: returns the loss and, when ga is set, writes d loss / d a and d loss / d b into ga, gb.
// a, b: (C,) logits in T; t: the target (not ignore_index); cache: 4 C floats of scratch or null.
// Compiled for AVX-512, AVX2+FMA and the baseline ISA (the exps dominate), chosen at load time.
template <typename T, int MODE>
GIST_FAST_CLONES float loss_row(const T* __restrict a, const T* __restrict b, int64_t t, int64_t classes, LossParams prm,
                                T* __restrict ga, T* __restrict gb, float* __restrict cache) {
  const float inv_t = prm.inv_temp, n = static_cast<float>(classes);
  // Pass 1: row maxima (a NaN is skipped here and poisons the sums below).
  float ma = kNegInf, mb = kNegInf;
#pragma omp simd reduction(max : ma, mb)
  for (int64_t k = 0; k < classes; ++k) {
    const float fa = to_f32(a[k]), fb = to_f32(b[k]);
    ma = fa > ma ? fa : ma;
    mb = fb > mb ? fb : mb;
  }
  // Pass 2: S = Σ exp(z - m), S_T = Σ exp((z - m) / T), X = Σ e_T (u_T - u_T') (0 log 0 = 0).
  float sa = 0.f, sb = 0.f, sat = 0.f, sbt = 0.f, xa = 0.f, xb = 0.f, sq = 0.f;
  float *c_ea = cache, *c_eb = cache ? cache + classes : nullptr;
  float *c_eat = cache ? cache + 2 * classes : nullptr, *c_ebt = cache ? cache + 3 * classes : nullptr;
  if (MODE == kDistillMSE) {
#pragma omp simd reduction(+ : sa, sb, sq)
    for (int64_t k = 0; k < classes; ++k) {
      const float fa = to_f32(a[k]), fb = to_f32(b[k]);
      sa += vexp(fa - ma);
      sb += vexp(fb - mb);
      sq += (fa - fb) * (fa - fb);
    }
  } else if (cache) {
#pragma omp simd reduction(+ : sa, sb, sat, sbt, xa, xb)
    for (int64_t k = 0; k < classes; ++k) {
      const float ua = to_f32(a[k]) - ma, ub = to_f32(b[k]) - mb;
      const float uat = ua * inv_t, ubt = ub * inv_t;
      const float ea = vexp(ua), eb = vexp(ub), eat = vexp(uat), ebt = vexp(ubt);
      c_ea[k] = ea, c_eb[k] = eb, c_eat[k] = eat, c_ebt[k] = ebt;
      sa += ea;
      sb += eb;
      sat += eat;
      sbt += ebt;
      if (MODE == kGist) xa += uat == kNegInf ? 0.f : eat * (uat - ubt);
      xb += ubt == kNegInf ? 0.f : ebt * (ubt - uat);
    }
  } else {
#pragma omp simd reduction(+ : sa, sb, sat, sbt, xa, xb)
    for (int64_t k = 0; k < classes; ++k) {
      const float ua = to_f32(a[k]) - ma, ub = to_f32(b[k]) - mb;
      const float uat = ua * inv_t, ubt = ub * inv_t;
      const float eat = vexp(uat), ebt = vexp(ubt);
      sa += vexp(ua);
      sb += vexp(ub);
      sat += eat;
      sbt += ebt;
      if (MODE == kGist) xa += uat == kNegInf ? 0.f : eat * (uat - ubt);
      xb += ubt == kNegInf ? 0.f : ebt * (ubt - uat);
    }
  }
  const double lse_a = ma + std::log(static_cast<double>(sa)), lse_b = mb + std::log(static_cast<double>(sb));
  const double ce_a = lse_a - to_f32(a[t]), ce_b = lse_b - to_f32(b[t]);
  const double lsat = std::log(static_cast<double>(sat)), lsbt = std::log(static_cast<double>(sbt));
  const double kl_pq = xa / static_cast<double>(sat) - lsat + lsbt;  // KL(p||q), GIST only
  const double kl_qp = xb / static_cast<double>(sbt) - lsbt + lsat;  // KL(q||p)
  double loss;
  if (MODE == kGist)
    loss = ce_a + prm.gist_weight * ce_b + prm.kl_weight * (kl_pq + kl_qp);
  else if (MODE == kDistillKL)
    loss = ce_a + ce_b + kl_qp;
  else
    loss = ce_a + ce_b + sq / static_cast<double>(classes);
  if (!ga) return static_cast<float>(loss);
  // Pass 3: gradients.
  const float ra = 1.f / sa, rb = 1.f / sb, rat = 1.f / sat, rbt = 1.f / sbt;
  const float lpa0 = static_cast<float>(lsat), lpb0 = static_cast<float>(lsbt);
  const float klpq = static_cast<float>(kl_pq), klqp = static_cast<float>(kl_qp);
  const float gw = prm.gist_weight, kwt = prm.kl_weight * inv_t, two_n = 2.f / n;
  // d = softmax (the one-hot is subtracted below); p, q = the tempered softmaxes.
  auto grad = [&](int64_t k, float ua, float ub, float da, float db, float p, float q) __attribute__((always_inline)) {
    float out_a, out_b;
    if (MODE == kDistillMSE) {
      const float fa = to_f32(a[k]), fb = to_f32(b[k]);
      out_a = da + two_n * (fa - fb);
      out_b = db - two_n * (fa - fb);
    } else {
      const float uat = ua * inv_t, ubt = ub * inv_t;
      const float lp = uat - lpa0, lq = ubt - lpb0;
      if (MODE == kGist) {
        const float tp = uat == kNegInf ? 0.f : p * (lp - lq - klpq);
        const float tq = ubt == kNegInf ? 0.f : q * (lq - lp - klqp);
        out_a = da + kwt * (tp + (p - q));
        out_b = gw * db + kwt * (tq + (q - p));
      } else {  // KL(q||p): q = teacher (b), p = student (a)
        out_a = da + inv_t * (p - q);
        out_b = db + inv_t * (ubt == kNegInf ? 0.f : q * (lq - lp - klqp));
      }
    }
    ga[k] = from_f32<T>(out_a);
    gb[k] = from_f32<T>(out_b);
  };
  if (cache && MODE != kDistillMSE) {
#pragma omp simd
    for (int64_t k = 0; k < classes; ++k) {
      const float ua = to_f32(a[k]) - ma, ub = to_f32(b[k]) - mb;
      grad(k, ua, ub, c_ea[k] * ra, c_eb[k] * rb, c_eat[k] * rat, c_ebt[k] * rbt);
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < classes; ++k) {
      const float ua = to_f32(a[k]) - ma, ub = to_f32(b[k]) - mb;
      const float p = MODE == kDistillMSE ? 0.f : vexp(ua * inv_t) * rat;
      const float q = MODE == kDistillMSE ? 0.f : vexp(ub * inv_t) * rbt;
      grad(k, ua, ub, vexp(ua) * ra, vexp(ub) * rb, p, q);
    }
  }
  // - onehot(t): d CE / dz = softmax - onehot, weighted like its CE term.
  ga[t] = static_cast<T>(static_cast<float>(ga[t]) - 1.f);
  gb[t] = static_cast<T>(static_cast<float>(gb[t]) - (MODE == kGist ? gw : 1.f));
  return static_cast<float>(loss);
}

// a, b: (rows, C) logits; target: (rows,) int64, already validated; out_rows: (rows,) fp32;
// grad_a, grad_b: (rows, C) in T, or null when no gradient is wanted.
template <typename T, int MODE>
void pair_loss_rows(const T* a_all, const T* b_all, const int64_t* target, int64_t rows, int64_t classes,
                    LossParams prm, float* out_rows, T* grad_a, T* grad_b) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1));
  const bool use_cache = grad_a && MODE != kDistillMSE && classes <= kCacheClasses;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> cache(use_cache ? 4 * classes : 0);
    for (int64_t row = r0; row < r1; ++row) {
      T* ga = grad_a ? grad_a + row * classes : nullptr;
      T* gb = grad_b ? grad_b + row * classes : nullptr;
      const int64_t t = target[row];
      if (t == prm.ignore_index) {  // an ignored row: loss 0, gradients 0
        out_rows[row] = 0.f;
        if (ga) std::fill(ga, ga + classes, T(0)), std::fill(gb, gb + classes, T(0));
        continue;
      }
      out_rows[row] = loss_row<T, MODE>(a_all + row * classes, b_all + row * classes, t, classes, prm, ga, gb,
                                        use_cache ? cache.data() : nullptr);
    }
  });
}

void check_pair(const Tensor& a, const Tensor& b, const Tensor& target, int64_t ignore_index, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && target.device().is_cpu(), "gist_fast ", op,
              " (CPU): all inputs must be CPU tensors");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes(), "gist_fast ", op, " (CPU): both logit sets must be (batch, classes), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && is_supported_float(a.scalar_type()), "gist_fast ", op,
              " (CPU): logits must share one dtype among float32, bfloat16, float16, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == a.size(0), "gist_fast ", op, " (CPU): target must be (", a.size(0), ",), got ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "gist_fast ", op, " (CPU): target must be int64, got ", target.scalar_type());
  const int64_t classes = a.size(1);
  const int64_t* t = target.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < target.size(0); ++r)
    TORCH_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < classes), "gist_fast ", op, " (CPU): target label ", t[r],
                " at row ", r, " must lie in [0, ", classes, ") or equal ignore_index=", ignore_index);
}

template <int MODE>
std::tuple<Tensor, Tensor, Tensor> pair_loss(const Tensor& a_in, const Tensor& b_in, const Tensor& target_in, LossParams prm,
                                             bool compute_grad, const char* op) {
  const Tensor a = a_in.contiguous(), b = b_in.contiguous(), target = target_in.contiguous();
  check_pair(a, b, target, prm.ignore_index, op);
  const int64_t rows = a.size(0), classes = a.size(1);
  Tensor out_rows = at::empty({rows}, a.options().dtype(at::kFloat));
  Tensor grad_a = compute_grad ? at::empty(a.sizes(), a.options()) : at::empty({0}, a.options());
  Tensor grad_b = compute_grad ? at::empty(b.sizes(), b.options()) : at::empty({0}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "gist_fast_pair_loss", [&] {
    pair_loss_rows<scalar_t, MODE>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
                                   rows, classes, prm, out_rows.mutable_data_ptr<float>(),
                                   compute_grad ? grad_a.mutable_data_ptr<scalar_t>() : nullptr,
                                   compute_grad ? grad_b.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {out_rows, grad_a, grad_b};
}

// out[r, :] = g[r, :] * s[r]; g, out: (rows, C) in T; s: (rows,) fp32.
template <typename T>
void scale_rows_impl(const T* g, const float* s, T* out, int64_t rows, int64_t classes) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(classes, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float sc = s[r];
      const T* gr = g + r * classes;
      T* o = out + r * classes;
#pragma omp simd
      for (int64_t k = 0; k < classes; ++k) o[k] = static_cast<T>(static_cast<float>(gr[k]) * sc);
    }
  });
}

}  // namespace

// gist_fast::pair_loss: mode "gist", "kl" or "mse" (see the top of this file; w_b, w_kl weigh GIST's terms).
// Returns the loss (() fp32, or the (B,) fp32 rows for reduction "none"), d row / d a and d row / d b per row
// (a's dtype; (0,) unless compute_grad) and the count of rows not ignored (() fp32).
std::tuple<Tensor, Tensor, Tensor, Tensor> pair_loss_cpu(const Tensor& a, const Tensor& b, const Tensor& target,
                                                         c10::string_view mode, double w_b, double w_kl,
                                                         double temperature, int64_t ignore_index,
                                                         c10::string_view reduction, bool compute_grad) {
  TORCH_CHECK(temperature > 0, "gist_fast pair_loss (CPU): temperature must be > 0, got ", temperature);
  TORCH_CHECK(reduction == "none" || reduction == "mean" || reduction == "sum",
              "gist_fast pair_loss (CPU): reduction must be none, mean or sum, got ", reduction);
  const LossParams prm{static_cast<float>(w_b), static_cast<float>(w_kl), static_cast<float>(1.0 / temperature),
                       ignore_index};
  std::tuple<Tensor, Tensor, Tensor> rows_grads;
  if (mode == "gist")
    rows_grads = pair_loss<kGist>(a, b, target, prm, compute_grad, "gist_loss");
  else if (mode == "kl")
    rows_grads = pair_loss<kDistillKL>(a, b, target, prm, compute_grad, "distill_loss");
  else if (mode == "mse")
    rows_grads = pair_loss<kDistillMSE>(a, b, target, prm, compute_grad, "distill_loss");
  else
    TORCH_CHECK(false, "gist_fast pair_loss (CPU): mode must be gist, kl or mse, got ", mode);
  const auto& [rows, grad_a, grad_b] = rows_grads;
  const Tensor n_valid = target.ne(ignore_index).sum().to(at::kFloat);
  const Tensor loss = reduction == "none" ? rows : reduction == "sum" ? rows.sum() : rows.sum() / n_valid;
  return {loss, grad_a, grad_b, n_valid};
}

// gist_fast::pair_loss_bwd: the per-row gradients times the upstream gradient (() or (B,) for "none"),
// divided by n_valid for "mean"; fp32 products stored in the gradients' dtype.
std::tuple<Tensor, Tensor> pair_loss_bwd_cpu(const Tensor& upstream, const Tensor& grad_a_in, const Tensor& grad_b_in,
                                             const Tensor& n_valid, c10::string_view reduction) {
  if (grad_a_in.numel() == 0) return {at::empty_like(grad_a_in), at::empty_like(grad_b_in)};
  TORCH_CHECK(grad_a_in.dim() == 2 && grad_a_in.sizes() == grad_b_in.sizes() &&
                  grad_a_in.scalar_type() == grad_b_in.scalar_type() && is_supported_float(grad_a_in.scalar_type()),
              "gist_fast pair_loss_bwd (CPU): gradients must be two (B, C) tensors of one float dtype, got ",
              grad_a_in.sizes(), " and ", grad_b_in.sizes());
  Tensor row_scale = upstream.to(at::kFloat);
  if (reduction == "mean") row_scale = row_scale / n_valid;
  row_scale = row_scale.expand({grad_a_in.size(0)}).contiguous();
  const Tensor grad_a = grad_a_in.contiguous(), grad_b = grad_b_in.contiguous();
  Tensor out_a = at::empty(grad_a.sizes(), grad_a.options()), out_b = at::empty(grad_b.sizes(), grad_b.options());
  const int64_t rows = grad_a.size(0), classes = grad_a.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_a.scalar_type(), "gist_fast_pair_loss_bwd", [&] {
    const float* s = row_scale.const_data_ptr<float>();
    scale_rows_impl(grad_a.const_data_ptr<scalar_t>(), s, out_a.mutable_data_ptr<scalar_t>(), rows, classes);
    scale_rows_impl(grad_b.const_data_ptr<scalar_t>(), s, out_b.mutable_data_ptr<scalar_t>(), rows, classes);
  });
  return {out_a, out_b};
}

// The CPU kernels of the ops gist_fast/ops/losses.py defines (the dispatcher checks these signatures against
// that schema; gist_fast/ops/_backend.py says why they load first).
TORCH_LIBRARY_IMPL(gist_fast, CPU, m) {
  m.impl("pair_loss", &pair_loss_cpu);
  m.impl("pair_loss_bwd", &pair_loss_bwd_cpu);
}

}  // namespace gist_fast
