// C++ CPU kernels of the fused adapter op: the CPU implementations of gist_fast::adapter_fwd / adapter_bwd,
// whose schemas, autograd formula and fake implementation live in gist_fast/ops/adapter.py:
//
//   out    = base + branch + scale * (GELU(x W_d^T + b_d) W_u^T + b_u)      base defaults to x
//   normed = LayerNorm(out)                                                (optional, e.g. norm2)
//
// Two paths, chosen by the rank r:
//  * r <= kInlineRank (8): everything is row-local, so each row is read once in its storage dtype and
//    run through the whole adapter in fp32 (the r projections as dot products, the exact GELU, the
//    residual adds, the LayerNorm) before one rounding store; the backward likewise reads x and G
//    once per row and accumulates the weight gradients in per-chunk fp32 buffers, summed in chunk
//    order at the end (deterministic for a given thread count). BLAS would run these K or N = r
//    GEMMs at memory speed and poorly (3 ms vs < 1 ms at D = 768, r = 4, 6336 rows).
//  * larger r: the rank-r GEMMs run over all rows at once (ATen BLAS, threaded) in the GEMM dtype:
//    bf16 stays bf16 (native avx512_bf16 GEMMs with fp32 accumulation, 4-6x faster than fp32 ones
//    on such CPUs, as the reference's own bf16 matmuls), fp16 and fp32 run in fp32; the up-projection
//    runs per row block into a block buffer followed by the fused residual / LayerNorm epilogue; the
//    backward computes db_u with dW_u in one GEMM ([a | 1]^T G) in the orientation BLAS runs fast.
// The backward recomputes the bottleneck (the autograd formula saves no (M, r) tensor).
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

// Rows per block of the fused row loops (epilogues, LayerNorm): ~256 KiB of fp32 rows at D = 768.
int64_t block_rows(int64_t dim) {
  return std::max<int64_t>(16, std::min<int64_t>(1024, (64 * 1024) / std::max<int64_t>(dim, 1)));
}

// Rows per block when each block runs a GEMM into a block buffer: 512 rows at D = 768.
int64_t gemm_block_rows(int64_t dim) {
  return std::max<int64_t>(64, std::min<int64_t>(2048, (384 * 1024) / std::max<int64_t>(dim, 1)));
}

// Ranks up to this are applied inline in the row loops (o += Σ_r c_r W[r, :]) instead of a GEMM
// with K or N = r, which BLAS runs at memory speed with poor efficiency (3 ms vs < 1 ms at r = 4).
constexpr int64_t kInlineRank = 8;

// Rows ahead that the row loops prefetch.
constexpr int64_t kPrefetchRows = 4;

// The dtype of the rank-r GEMMs: bf16 stays bf16 (native avx512_bf16 / AMX GEMMs with fp32
// accumulation, as the reference's own bf16 matmuls); fp16 and fp32 run in fp32 (CPUs without
// avx512_fp16 have no fast fp16 GEMM).
at::ScalarType gemm_dtype(at::ScalarType t) { return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// o[0:n] += Σ_{r < rank} c[r] * w[r * n : (r + 1) * n]; compiled for AVX-512, AVX2+FMA and the
// baseline ISA, chosen at load time.
GIST_FAST_CLONES void rank_update(float* __restrict o, const float* __restrict c, const float* __restrict w,
                                  int64_t rank, int64_t n) {
  for (int64_t r = 0; r < rank; ++r) {
    const float cr = c[r];
    const float* wr = w + r * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] += cr * wr[k];
  }
}

// out[r] = Σ_k v[k] w[r * n + k] for r < rank (the rank-r projections of one row).
GIST_FAST_CLONES void rank_dots(const float* __restrict v, const float* __restrict w, int64_t rank, int64_t n,
                                float* __restrict out) {
  for (int64_t r = 0; r < rank; ++r) {
    const float* wr = w + r * n;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) acc += v[k] * wr[k];
    out[r] = acc;
  }
}

// acc[r * n + k] += c[r] * v[k] for r < rank (rank-r outer-product accumulation of one row).
GIST_FAST_CLONES void outer_update(float* __restrict acc, const float* __restrict c, const float* __restrict v,
                                   int64_t rank, int64_t n) {
  for (int64_t r = 0; r < rank; ++r) {
    const float cr = c[r];
    float* ar = acc + r * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) ar[k] += cr * v[k];
  }
}

// Exact (erf) GELU and its derivative, fp32, as F.gelu(approximate="none").
inline float gelu_f(float h) { return 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f)); }
inline float gelu_grad_f(float h) {
  return 0.5f * (1.f + std::erf(h * 0.70710678118654752f)) + h * 0.39894228040143268f * std::exp(-0.5f * h * h);
}

// mean and 1/sqrt(var + eps) of v[0:n] in fp32 (two passes over a row that is in L1).
GIST_FAST_CLONES std::pair<float, float> row_stats(const float* v, int64_t n, double eps) {
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
    const std::optional<Tensor>& norm_weight, const std::optional<Tensor>& norm_bias, double eps,
    std::optional<at::ScalarType> /*dot_dtype: fp32 math, bf16 GEMMs for bf16 x, whatever autocast asks*/) {
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

  // The bottleneck h = x W_d^T + b_d and a = GELU(h), (M, R), in the GEMM dtype over all rows at
  // once (one BLAS call each, threaded by ATen).
  // For a small rank (inline path) the whole adapter runs row by row in fp32 instead: one pass over
  // x and branch, the R projections as dot products.
  const bool inline_up = rank <= kInlineRank;
  const at::ScalarType cdt = gemm_dtype(x.scalar_type());
  const Tensor xc = inline_up ? Tensor() : x.to(cdt);
  const Tensor a = inline_up ? Tensor() : at::gelu(at::addmm(b_down.to(cdt), xc, w_down.to(cdt).t()));
  const Tensor wd_f = inline_up ? w_down.to(at::kFloat).contiguous() : Tensor();  // (R, D)
  const Tensor bd_f = inline_up ? b_down.to(at::kFloat).contiguous() : Tensor();  // (R,)
  // The scale is folded into the up-projection: s W_u^T (R, D) fp32 for the inline path, s W_u in
  // the GEMM dtype otherwise; s b_u (D,) fp32.
  const Tensor wu_s = w_up.to(at::kFloat) * scale;                           // (D, R)
  const Tensor wut_f = inline_up ? wu_s.t().contiguous() : Tensor();         // (R, D)
  const Tensor wu_c = inline_up ? Tensor() : wu_s.to(cdt);                   // (D, R)
  const Tensor bu = (b_up.to(at::kFloat) * scale).contiguous();              // (D,)
  const Tensor nw = fused_norm ? norm_weight->to(at::kFloat).contiguous() : Tensor();
  const Tensor nb = fused_norm && norm_bias ? norm_bias->to(at::kFloat).contiguous() : Tensor();

  const auto opts = x.options().dtype(out_dtype);
  Tensor out = at::empty({rows, dim}, opts);
  Tensor normed = fused_norm ? at::empty({rows, dim}, opts) : at::empty({0}, opts);
  Tensor mean = at::empty({fused_norm ? rows : 0}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({fused_norm ? rows : 0}, x.options().dtype(at::kFloat));

  // Row blocks: o = s (a W_u^T + b_u) (+ base or x) (+ branch), one rounding store, then the LayerNorm.
  // (Blocks of the GEMM path are larger: oneDNN's bf16 GEMM pays a per-call cost, 85-row blocks
  // ran the up-projection 1.9x slower than 512-row ones.)
  const int64_t blk = inline_up ? block_rows(dim) : gemm_block_rows(dim);
  const int64_t num_blocks = (rows + blk - 1) / blk;
  const Tensor& residual = base ? *base : x;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    std::vector<float> obuf(dim);
    Tensor ot = inline_up ? Tensor() : at::empty({blk, dim}, xc.options());
    std::vector<float> xbuf(inline_up ? dim : 0);
    float hv[kInlineRank], av[kInlineRank];
    const Rows x_rows(x);
    const float* wd_p = inline_up ? wd_f.const_data_ptr<float>() : nullptr;
    const float* bd_p = inline_up ? bd_f.const_data_ptr<float>() : nullptr;
    const float* nw_p = fused_norm ? nw.const_data_ptr<float>() : nullptr;
    const float* nb_p = nb.defined() ? nb.const_data_ptr<float>() : nullptr;
    const float* bu_p = bu.const_data_ptr<float>();
    const float* wut_p = inline_up ? wut_f.const_data_ptr<float>() : nullptr;
    float* mean_p = fused_norm ? mean.mutable_data_ptr<float>() : nullptr;
    float* rstd_p = fused_norm ? rstd.mutable_data_ptr<float>() : nullptr;
    const Rows res_rows(residual), out_rows(out), o_rows = inline_up ? Rows() : Rows(ot);
    const Rows branch_rows = branch ? Rows(*branch) : Rows(), normed_rows = fused_norm ? Rows(normed) : Rows();
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = bi * blk, m = std::min(blk, rows - r0);
      if (!inline_up) {
        Tensor o_blk = ot.narrow(0, 0, m);
        at::mm_out(o_blk, a.narrow(0, r0, m), wu_c.t());
      }  // (m, D) in cdt
      for (int64_t i = 0; i < m; ++i) {
        float* o = obuf.data();
        if (i + kPrefetchRows < m) {
          if (inline_up || base) res_rows.prefetch(r0 + i + kPrefetchRows);
          if (inline_up && base) x_rows.prefetch(r0 + i + kPrefetchRows);
          if (branch) branch_rows.prefetch(r0 + i + kPrefetchRows);
        }
        if (inline_up) {
          float* xr = xbuf.data();
          x_rows.load(r0 + i, xr);
          rank_dots(xr, wd_p, rank, dim, hv);
          for (int64_t r = 0; r < rank; ++r) av[r] = gelu_f(hv[r] + bd_p[r]);
          std::memcpy(o, bu_p, dim * sizeof(float));
          rank_update(o, av, wut_p, rank, dim);
          if (base)
            res_rows.add(r0 + i, o);
          else
            add_row_t(xr, o, dim);
        } else {
          o_rows.load(i, o);
#pragma omp simd
          for (int64_t k = 0; k < dim; ++k) o[k] += bu_p[k];
          res_rows.add(r0 + i, o);
        }
        if (branch) branch_rows.add(r0 + i, o);
        out_rows.store(o, r0 + i);
        if (!fused_norm) continue;
        if (out_dtype != at::kFloat) out_rows.load(r0 + i, o);  // normalise the stored (rounded) out
        const auto [mu, rs] = row_stats(o, dim, eps);
        mean_p[r0 + i] = mu;
        rstd_p[r0 + i] = rs;
        if (nb_p) {
#pragma omp simd
          for (int64_t k = 0; k < dim; ++k) o[k] = (o[k] - mu) * rs * nw_p[k] + nb_p[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < dim; ++k) o[k] = (o[k] - mu) * rs * nw_p[k];
        }
        normed_rows.store(o, r0 + i);
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
    const std::optional<Tensor>& mean_in, const std::optional<Tensor>& rstd_in, bool x_is_base,
    std::optional<at::ScalarType> /*dot_dtype, as in the forward*/) {
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

  const at::ScalarType cdt = gemm_dtype(x.scalar_type());
  const int64_t blk = block_rows(dim);
  const int64_t num_blocks = (rows + blk - 1) / blk;

  // G = grad_out + LayerNorm backward of grad_normed, stored once in grad_out's dtype (it is also
  // the gradient of base / branch); d norm_weight, d norm_bias in per-block-range fp32 partials.
  Tensor grad_residual = fused_norm ? at::empty(grad_out.sizes(), grad_out.options()) : at::empty({0}, grad_out.options());
  Tensor g_nw = at::empty({0}, x.options().dtype(at::kFloat)), g_nb = at::empty({0}, x.options().dtype(at::kFloat));
  if (fused_norm) {
    const int64_t num_parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_blocks));
    Tensor part = at::zeros({num_parts, 2, dim}, x.options().dtype(at::kFloat));
    at::parallel_for(0, num_parts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> buf(3 * dim);
      float *g = buf.data(), *v = g + dim, *gn = v + dim;
      const float* w = nw.const_data_ptr<float>();
      const float *mean_p = mean.const_data_ptr<float>(), *rstd_p = rstd.const_data_ptr<float>();
      const Rows go_rows(grad_out), out_rows(out), gn_rows(grad_normed), gr_rows(grad_residual);
      for (int64_t p = p0; p < p1; ++p) {
        float* dnw = part.mutable_data_ptr<float>() + p * 2 * dim;
        float* dnb = dnw + dim;
        for (int64_t row = p * rows / num_parts; row < (p + 1) * rows / num_parts; ++row) {
          go_rows.load(row, g);
          out_rows.load(row, v);
          gn_rows.load(row, gn);
          const float mu = mean_p[row], rs = rstd_p[row];
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
          gr_rows.store(g, row);
        }
      }
    });
    const Tensor total = part.sum(0);
    g_nw = total[0].clone();
    g_nb = total[1].clone();
  }
  const Tensor& g_store = fused_norm ? grad_residual : grad_out;
  if (rank <= kInlineRank) {
    // Small rank: every step is row-local, so one pass over x and G does it all (fp32): h = x W_d^T + b_d,
    // a = GELU(h), ga = s G W_u, gh = ga GELU'(h); dW_u^T += a G^T, db_u += G, dW_d += gh x, db_d += gh
    // into per-chunk fp32 accumulators (summed in chunk order: deterministic for a thread count), and
    // grad_x = gh W_d (+ G).
    const Tensor wd_f = w_down.to(at::kFloat).contiguous(), bd_f = b_down.to(at::kFloat).contiguous();
    const Tensor wut_f = (w_up.to(at::kFloat) * scale).t().contiguous();     // (R, D) s W_u^T
    Tensor grad_x = at::empty(x.sizes(), x.options());
    const int64_t grain = std::max<int64_t>(64, blk);
    const int64_t num_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
    const int64_t acc_size = 2 * rank * dim + dim + rank;  // dW_u^T (R, D), dW_d (R, D), db_u (D), db_d (R)
    Tensor acc = at::zeros({num_chunks, acc_size}, x.options().dtype(at::kFloat));
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> buf(2 * dim);
      float *xr = buf.data(), *g = xr + dim;
      float hv[kInlineRank], av[kInlineRank], gav[kInlineRank], ghv[kInlineRank];
      const Rows x_rows(x), g_rows(g_store), gx_rows(grad_x);
      const float *wd_p = wd_f.const_data_ptr<float>(), *bd_p = bd_f.const_data_ptr<float>();
      const float* wut_p = wut_f.const_data_ptr<float>();
      for (int64_t c = c0; c < c1; ++c) {
        float* dwut = acc.mutable_data_ptr<float>() + c * acc_size;
        float* dwd = dwut + rank * dim;
        float* dbu = dwd + rank * dim;
        float* dbd = dbu + dim;
        for (int64_t row = c * rows / num_chunks; row < (c + 1) * rows / num_chunks; ++row) {
          if (row + kPrefetchRows < rows) x_rows.prefetch(row + kPrefetchRows), g_rows.prefetch(row + kPrefetchRows);
          x_rows.load(row, xr);
          g_rows.load(row, g);
          rank_dots(xr, wd_p, rank, dim, hv);
          rank_dots(g, wut_p, rank, dim, gav);
          for (int64_t r = 0; r < rank; ++r) {
            const float h = hv[r] + bd_p[r];
            av[r] = gelu_f(h);
            ghv[r] = gav[r] * gelu_grad_f(h);
            dbd[r] += ghv[r];
          }
          outer_update(dwut, av, g, rank, dim);
          add_row_t(g, dbu, dim);
          outer_update(dwd, ghv, xr, rank, dim);
          if (!x_is_base) std::fill(g, g + dim, 0.f);
          rank_update(g, ghv, wd_p, rank, dim);
          gx_rows.store(g, row);
        }
      }
    });
    const Tensor total = acc.sum(0);
    Tensor g_wu = (total.narrow(0, 0, rank * dim).view({rank, dim}).t() * scale).to(w_up.scalar_type()).contiguous();
    Tensor g_wd = total.narrow(0, rank * dim, rank * dim).view({rank, dim}).to(w_down.scalar_type(), false, true);
    Tensor g_bu = (total.narrow(0, 2 * rank * dim, dim) * scale).to(w_up.scalar_type());
    Tensor g_bd = total.narrow(0, 2 * rank * dim + dim, rank).to(b_down.scalar_type(), false, true);
    return {grad_x, grad_residual, g_wd, g_bd, g_wu, g_bu, g_nw, g_nb};
  }
  const Tensor gc = g_store.to(cdt);                                         // G (M, D) in the GEMM dtype
  const Tensor xc = x.to(cdt);

  // Recompute the bottleneck (as in the forward, bit for bit).
  const Tensor wd_c = w_down.to(cdt);                                        // (R, D)
  const Tensor h = at::addmm(b_down.to(cdt), xc, wd_c.t());                  // (M, R)
  // [a | 1]^T G: the rows 0..R-1 are (G^T a)^T = dW_u^T / s, the last row is Σ_rows G = db_u / s;
  // one pass over G for both (and this orientation, (R+1, M) x (M, D), is the fast one for BLAS).
  Tensor a1 = at::empty({rows, rank + 1}, h.options());
  a1.narrow(1, 0, rank).copy_(at::gelu(h));
  a1.select(1, rank).fill_(1);
  const Tensor dwu_b = at::mm(a1.t(), gc).to(at::kFloat);                    // (R + 1, D) fp32
  Tensor g_wu = (dwu_b.narrow(0, 0, rank).t() * scale).to(w_up.scalar_type()).contiguous();
  Tensor g_bu = (dwu_b.select(0, rank) * scale).to(w_up.scalar_type());
  // ga = s G W_u (M, R), gh = ga GELU'(h).
  const Tensor wut_c = (w_up.to(at::kFloat) * scale).t().contiguous().to(cdt);  // (R, D) s W_u^T
  const Tensor ga = at::mm(gc, wut_c.t());
  const Tensor gh = at::gelu_backward(ga, h);
  Tensor g_wd = at::mm(gh.t(), xc).to(w_down.scalar_type());                 // dW_d = gh^T x  (R, D)
  Tensor g_bd = gh.sum({0}, false, at::kFloat).to(b_down.scalar_type());
  // grad_x = gh W_d (+ G when x is the residual base).
  Tensor grad_x = at::empty(x.sizes(), x.options().dtype(cdt));
  if (x_is_base)
    at::addmm_out(grad_x, gc, gh, wd_c);
  else
    at::mm_out(grad_x, gh, wd_c);
  grad_x = grad_x.to(x.scalar_type());
  return {grad_x, grad_residual, g_wd, g_bd, g_wu, g_bu, g_nw, g_nb};
}

// The CPU kernels of the ops gist_fast/ops/adapter.py defines (the dispatcher checks these signatures
// against that schema; gist_fast/ops/_backend.py says why they load first).
TORCH_LIBRARY_IMPL(gist_fast, CPU, m) {
  m.impl("adapter_fwd", &adapter_fwd_cpu);
  m.impl("adapter_bwd", &adapter_bwd_cpu);
}

}  // namespace gist_fast
