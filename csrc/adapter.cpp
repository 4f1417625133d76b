// C++ CPU kernels of the fused adapter op (the autograd formula lives in gist_fast/ops/adapter.py):
//
//   out    = base + branch + scale * (GELU(x W_d^T + b_d) W_u^T + b_u)      base defaults to x
//   normed = LayerNorm(out)                                                (optional, e.g. norm2)
//
// Rows are processed in tiles small enough to stay in cache: each tile is read once in its storage
// dtype, converted to fp32, pushed through the two rank-r GEMMs (ATen BLAS on fp32 tiles) and the
// GELU, and the residual adds and the LayerNorm run on the result before one rounding store. The
// backward recomputes the rank-r bottleneck per tile and accumulates the weight gradients in
// per-chunk fp32 buffers that are summed at the end (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace gist_fast {
namespace {

using at::Tensor;

// Rows per tile: about 512 KiB of fp32 activations (170 rows at D = 768). Measured on a 2-core
// AVX-512 host at rows = 6336, D = 768: 16K-float tiles were 2-3x slower (the rank-r weight
// gradient GEMMs then run with K = 21 and re-stream their accumulators), 128K-512K were flat.
int64_t tile_rows(int64_t dim) {
  return std::max<int64_t>(16, std::min<int64_t>(1024, (128 * 1024) / std::max<int64_t>(dim, 1)));
}

Tensor fp32_view(float* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// The tiles of [0, num_tiles) handled by chunk c of num_chunks (contiguous, balanced).
std::pair<int64_t, int64_t> chunk_range(int64_t c, int64_t num_chunks, int64_t num_tiles) {
  return {c * num_tiles / num_chunks, (c + 1) * num_tiles / num_chunks};
}

// mean and 1/sqrt(var + eps) of v[0:n] in fp32 (two passes over a row that is in L1).
std::pair<float, float> row_stats(const float* v, int64_t n, double eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += v[k];
  const float mean = sum / static_cast<float>(n);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < n; ++k) sq += (v[k] - mean) * (v[k] - mean);
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + static_cast<float>(eps));
  return {mean, rstd};
}

void check_rows(const Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "gist_fast adapter (CPU): ", name, " must be a CPU tensor");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "gist_fast adapter (CPU): ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "gist_fast adapter (CPU): ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_weights(const Tensor& x, const Tensor& w_down, const Tensor& b_down, const Tensor& w_up) {
  TORCH_CHECK(x.dim() == 2, "gist_fast adapter (CPU): x must be (rows, D), got ", x.sizes());
  const int64_t dim = x.size(1), rank = w_down.size(0);
  TORCH_CHECK(w_down.dim() == 2 && w_down.size(1) == dim && b_down.sizes() == at::IntArrayRef{rank} &&
                  w_up.sizes() == at::IntArrayRef({dim, rank}),
              "gist_fast adapter (CPU): weights must be w_down (r, D), b_down (r,), w_up (D, r) for D = ", dim,
              "; got ", w_down.sizes(), ", ", b_down.sizes(), ", ", w_up.sizes());
}

}  // namespace

// Forward. x, base, branch: (M, D) in fp32/bf16/fp16 (dtypes may differ); w_down (R, D), b_down (R,),
// w_up (D, R), b_up (D,); norm_weight, norm_bias (D,) or absent. Returns out (M, D) in the promoted
// dtype of x/base/branch and, with a norm, normed (M, D) in that dtype and mean, rstd (M,) fp32
// (otherwise three empty (0,) tensors).
std::tuple<Tensor, Tensor, Tensor, Tensor> adapter_fwd_cpu(
    const Tensor& x_in, const Tensor& w_down, const Tensor& b_down, const Tensor& w_up, const Tensor& b_up,
    double scale, const std::optional<Tensor>& base_in, const std::optional<Tensor>& branch_in,
    const std::optional<Tensor>& norm_weight, const std::optional<Tensor>& norm_bias, double eps) {
  check_weights(x_in, w_down, b_down, w_up);
  const int64_t rows = x_in.size(0), dim = x_in.size(1), rank = w_down.size(0);
  check_rows(x_in, "x", x_in.sizes());
  TORCH_CHECK(b_up.sizes() == at::IntArrayRef{dim}, "gist_fast adapter (CPU): b_up must be (", dim, ",), got ", b_up.sizes());
  const Tensor x = x_in.contiguous();
  const std::optional<Tensor> base = base_in ? std::optional<Tensor>(base_in->contiguous()) : std::nullopt;
  const std::optional<Tensor> branch = branch_in ? std::optional<Tensor>(branch_in->contiguous()) : std::nullopt;
  at::ScalarType out_dtype = x.scalar_type();
  if (base) {
    check_rows(*base, "base", x.sizes());
    out_dtype = at::promote_types(out_dtype, base->scalar_type());
  }
  if (branch) {
    check_rows(*branch, "branch", x.sizes());
    out_dtype = at::promote_types(out_dtype, branch->scalar_type());
  }
  const bool fused_norm = norm_weight.has_value();
  TORCH_CHECK(!fused_norm || norm_weight->sizes() == at::IntArrayRef{dim},
              "gist_fast adapter (CPU): norm_weight must be (", dim, ",)");
  TORCH_CHECK(!norm_bias || norm_bias->sizes() == at::IntArrayRef{dim},
              "gist_fast adapter (CPU): norm_bias must be (", dim, ",)");

  // fp32 copies of the (small) weights; the scale is folded into the up-projection.
  const Tensor wd = w_down.to(at::kFloat).contiguous();                      // (R, D)
  const Tensor bd = b_down.to(at::kFloat).contiguous();                      // (R,)
  const Tensor wu_t = (w_up.to(at::kFloat) * scale).t();                     // (R, D) view of scale * w_up^T
  const Tensor bu = (b_up.to(at::kFloat) * scale).contiguous();              // (D,)
  const Tensor nw = fused_norm ? norm_weight->to(at::kFloat).contiguous() : Tensor();
  const Tensor nb = fused_norm && norm_bias ? norm_bias->to(at::kFloat).contiguous() : Tensor();

  const auto opts = x.options().dtype(out_dtype);
  Tensor out = at::empty({rows, dim}, opts);
  Tensor normed = fused_norm ? at::empty({rows, dim}, opts) : at::empty({0}, opts);
  Tensor mean = at::empty({fused_norm ? rows : 0}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({fused_norm ? rows : 0}, x.options().dtype(at::kFloat));

  const int64_t tile = tile_rows(dim);
  const int64_t num_tiles = (rows + tile - 1) / tile;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  const bool x_fp32 = x.scalar_type() == at::kFloat;
  const Tensor& residual = base ? *base : x;

  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    std::vector<float> xbuf(x_fp32 ? 0 : tile * dim), obuf(tile * dim), hbuf(tile * rank), abuf(tile * rank);
    const float* nw_p = fused_norm ? nw.const_data_ptr<float>() : nullptr;
    const float* nb_p = nb.defined() ? nb.const_data_ptr<float>() : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      const auto [t0, t1] = chunk_range(c, num_chunks, num_tiles);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile, m = std::min(tile, rows - r0);
        const float* xp = x_fp32 ? x.const_data_ptr<float>() + r0 * dim : xbuf.data();
        if (!x_fp32)
          for (int64_t i = 0; i < m; ++i) load_row(x, r0 + i, xbuf.data() + i * dim, dim);
        const Tensor xt = fp32_view(const_cast<float*>(xp), m, dim);
        Tensor ht = fp32_view(hbuf.data(), m, rank), at_ = fp32_view(abuf.data(), m, rank);
        at::addmm_out(ht, bd, xt, wd.t());                // h = x W_d^T + b_d          (m, R)
        at::gelu_out(at_, ht);                             // a = GELU(h)                (m, R)
        Tensor ot = fp32_view(obuf.data(), m, dim);
        at::addmm_out(ot, bu, at_, wu_t);                  // o = s (a W_u^T + b_u)      (m, D)
        for (int64_t i = 0; i < m; ++i) {
          float* o = obuf.data() + i * dim;
          if (!base && x_fp32) {
            const float* xr = xp + i * dim;
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o[k] += xr[k];
          } else if (!base) {
            const float* xr = xbuf.data() + i * dim;
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o[k] += xr[k];
          } else {
            add_row(residual, r0 + i, o, dim);
          }
          if (branch) add_row(*branch, r0 + i, o, dim);
          store_row(o, out, r0 + i, dim);
          if (!fused_norm) continue;
          if (out_dtype != at::kFloat) load_row(out, r0 + i, o, dim);  // normalise the stored (rounded) out
          const auto [mu, rs] = row_stats(o, dim, eps);
          mean.mutable_data_ptr<float>()[r0 + i] = mu;
          rstd.mutable_data_ptr<float>()[r0 + i] = rs;
          if (nb_p) {
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o[k] = (o[k] - mu) * rs * nw_p[k] + nb_p[k];
          } else {
#pragma omp simd
            for (int64_t k = 0; k < dim; ++k) o[k] = (o[k] - mu) * rs * nw_p[k];
          }
          store_row(o, normed, r0 + i, dim);
        }
      }
    }
  });
  return {out, normed, mean, rstd};
}

// Backward. grad_out (M, D); grad_normed (M, D) when a norm was fused, with out (M, D), norm_weight
// (D,), mean and rstd (M,) fp32 from the forward. Returns grad_x (x's dtype; + the residual gradient
// when x_is_base), grad_residual (the total gradient reaching out, grad_out's dtype, only with a
// norm), grad_w_down, grad_b_down, grad_w_up, grad_b_up (the weights' dtypes; grad_b_up in w_up's),
// grad_norm_weight, grad_norm_bias (fp32, or empty without a norm).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_bwd_cpu(
    const Tensor& grad_out_in, const std::optional<Tensor>& grad_normed_in, const Tensor& x_in,
    const Tensor& w_down, const Tensor& b_down, const Tensor& w_up, double scale,
    const std::optional<Tensor>& out_in, const std::optional<Tensor>& norm_weight,
    const std::optional<Tensor>& mean_in, const std::optional<Tensor>& rstd_in, bool x_is_base) {
  check_weights(x_in, w_down, b_down, w_up);
  const int64_t rows = x_in.size(0), dim = x_in.size(1), rank = w_down.size(0);
  check_rows(x_in, "x", x_in.sizes());
  check_rows(grad_out_in, "grad_out", x_in.sizes());
  const bool fused_norm = norm_weight.has_value();
  TORCH_CHECK(!fused_norm || (grad_normed_in && out_in && mean_in && rstd_in),
              "gist_fast adapter_bwd (CPU): a fused norm needs grad_normed, out, mean and rstd");
  const Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous();
  Tensor grad_normed, out, mean, rstd, nw;
  if (fused_norm) {
    check_rows(*grad_normed_in, "grad_normed", x.sizes());
    check_rows(*out_in, "out", x.sizes());
    TORCH_CHECK(norm_weight->sizes() == at::IntArrayRef{dim}, "gist_fast adapter_bwd (CPU): norm_weight must be (", dim, ",)");
    grad_normed = grad_normed_in->contiguous();
    out = out_in->contiguous();
    mean = mean_in->to(at::kFloat).contiguous();
    rstd = rstd_in->to(at::kFloat).contiguous();
    nw = norm_weight->to(at::kFloat).contiguous();
  }

  const Tensor wd = w_down.to(at::kFloat).contiguous();                      // (R, D)
  const Tensor bd = b_down.to(at::kFloat).contiguous();                      // (R,)
  const Tensor wu = (w_up.to(at::kFloat) * scale).contiguous();              // (D, R) scale * w_up

  Tensor grad_x = at::empty_like(x);
  Tensor grad_residual = fused_norm ? at::empty_like(grad_out) : at::empty({0}, grad_out.options());

  const int64_t tile = tile_rows(dim);
  const int64_t num_tiles = (rows + tile - 1) / tile;
  const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  // Per-chunk fp32 accumulators: dW_d (R, D), db_d (R), dW_u (D, R), db_u (D), dnorm_w (D), dnorm_b (D).
  const int64_t acc_size = 2 * rank * dim + rank + dim + (fused_norm ? 2 * dim : 0);
  std::vector<float> acc(num_chunks * acc_size, 0.f);
  const bool x_fp32 = x.scalar_type() == at::kFloat;
  const bool g_direct = !fused_norm && grad_out.scalar_type() == at::kFloat;  // use grad_out's memory as G

  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    std::vector<float> gbuf(g_direct ? 0 : tile * dim), xbuf(x_fp32 ? 0 : tile * dim);
    std::vector<float> hbuf(tile * rank), abuf(tile * rank), gabuf(tile * rank), ghbuf(tile * rank);
    std::vector<float> vrow(fused_norm ? 2 * dim : 0);
    for (int64_t c = c0; c < c1; ++c) {
      float* dwd = acc.data() + c * acc_size;
      float* dbd = dwd + rank * dim;
      float* dwu = dbd + rank;
      float* dbu = dwu + dim * rank;
      float* dnw = dbu + dim;
      float* dnb = dnw + dim;
      const Tensor dwd_t = fp32_view(dwd, rank, dim), dwu_t = fp32_view(dwu, dim, rank);
      const auto [t0, t1] = chunk_range(c, num_chunks, num_tiles);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile, m = std::min(tile, rows - r0);
        // G = grad_out + LayerNorm backward of grad_normed (fp32, (m, D)).
        float* gp = g_direct ? const_cast<float*>(grad_out.const_data_ptr<float>()) + r0 * dim : gbuf.data();
        for (int64_t i = 0; i < m && !g_direct; ++i) {
          float* g = gp + i * dim;
          load_row(grad_out, r0 + i, g, dim);
          if (!fused_norm) continue;
          float* v = vrow.data();
          float* gn = v + dim;
          load_row(out, r0 + i, v, dim);
          load_row(grad_normed, r0 + i, gn, dim);
          const float mu = mean.const_data_ptr<float>()[r0 + i], rs = rstd.const_data_ptr<float>()[r0 + i];
          const float* w = nw.const_data_ptr<float>();
          float c1s = 0.f, c2s = 0.f;
#pragma omp simd reduction(+ : c1s, c2s)
          for (int64_t k = 0; k < dim; ++k) {
            const float xhat = (v[k] - mu) * rs, gxhat = gn[k] * w[k];
            c1s += gxhat;
            c2s += gxhat * xhat;
            dnw[k] += gn[k] * xhat;
            dnb[k] += gn[k];
          }
          const float c1m = c1s / static_cast<float>(dim), c2m = c2s / static_cast<float>(dim);
#pragma omp simd
          for (int64_t k = 0; k < dim; ++k) {
            const float xhat = (v[k] - mu) * rs;
            g[k] += rs * (gn[k] * w[k] - c1m - xhat * c2m);
          }
          store_row(g, grad_residual, r0 + i, dim);
        }
        const Tensor gt = fp32_view(gp, m, dim);
        // Recompute the bottleneck.
        float* xp = x_fp32 ? const_cast<float*>(x.const_data_ptr<float>()) + r0 * dim : xbuf.data();
        if (!x_fp32)
          for (int64_t i = 0; i < m; ++i) load_row(x, r0 + i, xp + i * dim, dim);
        const Tensor xt = fp32_view(xp, m, dim);
        Tensor ht = fp32_view(hbuf.data(), m, rank), at_ = fp32_view(abuf.data(), m, rank);
        at::addmm_out(ht, bd, xt, wd.t());                 // h = x W_d^T + b_d
        at::gelu_out(at_, ht);                              // a = GELU(h)
        Tensor dwu_acc = dwu_t;
        dwu_acc.addmm_(gt.t(), at_, 1.0, scale);            // dW_u += s G^T a        (D, R)
        for (int64_t i = 0; i < m; ++i) {
          const float* g = gp + i * dim;
#pragma omp simd
          for (int64_t k = 0; k < dim; ++k) dbu[k] += g[k];
        }
        Tensor gat = fp32_view(gabuf.data(), m, rank), ght = fp32_view(ghbuf.data(), m, rank);
        at::mm_out(gat, gt, wu);                            // ga = s G W_u            (m, R)
        at::gelu_backward_out(ght, gat, ht);                // gh = ga GELU'(h)        (m, R)
        Tensor dwd_acc = dwd_t;
        dwd_acc.addmm_(ght.t(), xt);                        // dW_d += gh^T x          (R, D)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t r = 0; r < rank; ++r) dbd[r] += ghbuf[i * rank + r];
        // grad_x = gh W_d (+ G when x is the residual base), written over the x tile when x is not fp32.
        float* dest = x_fp32 ? grad_x.mutable_data_ptr<float>() + r0 * dim : xbuf.data();
        Tensor dt = fp32_view(dest, m, dim);
        if (x_is_base)
          at::addmm_out(dt, gt, ght, wd);
        else
          at::mm_out(dt, ght, wd);
        if (!x_fp32)
          for (int64_t i = 0; i < m; ++i) store_row(dest + i * dim, grad_x, r0 + i, dim);
      }
    }
  });

  // Sum the per-chunk accumulators (in chunk order) and cast to the parameters' dtypes.
  Tensor total = at::from_blob(acc.data(), {num_chunks, acc_size}, at::TensorOptions().dtype(at::kFloat)).sum(0);
  int64_t off = 0;
  auto take = [&](int64_t n) { Tensor v = total.narrow(0, off, n); off += n; return v; };
  auto own = [](const Tensor& t, at::ScalarType dtype) { return t.to(dtype, false, /*copy=*/true); };  // no aliasing
  Tensor g_wd = own(take(rank * dim).view({rank, dim}), w_down.scalar_type());
  Tensor g_bd = own(take(rank), b_down.scalar_type());
  Tensor g_wu = own(take(dim * rank).view({dim, rank}), w_up.scalar_type());
  Tensor g_bu = own(take(dim) * scale, w_up.scalar_type());
  Tensor g_nw = fused_norm ? own(take(dim), at::kFloat) : at::empty({0}, x.options().dtype(at::kFloat));
  Tensor g_nb = fused_norm ? own(take(dim), at::kFloat) : at::empty({0}, x.options().dtype(at::kFloat));
  return {grad_x, grad_residual, g_wd, g_bd, g_wu, g_bu, g_nw, g_nb};
}

TORCH_LIBRARY_FRAGMENT(gist_fast, m) {
  m.def("adapter_fwd_cpu(Tensor x, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, float scale, "
        "Tensor? base, Tensor? branch, Tensor? norm_weight, Tensor? norm_bias, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("adapter_bwd_cpu(Tensor grad_out, Tensor? grad_normed, Tensor x, Tensor w_down, Tensor b_down, "
        "Tensor w_up, float scale, Tensor? out, Tensor? norm_weight, Tensor? mean, Tensor? rstd, bool x_is_base) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gist_fast, CPU, m) {
  m.impl("adapter_fwd_cpu", &adapter_fwd_cpu);
  m.impl("adapter_bwd_cpu", &adapter_bwd_cpu);
}

}  // namespace gist_fast
