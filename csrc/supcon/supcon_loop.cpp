// The tile loop shared by CPU and CUDA (see supcon.h). Only ATen ops and the epilogues: no device code here.
#include "supcon.h"

#include <cstdlib>
#include <limits>

namespace metric_ds {

int64_t tile_size(int64_t default_size) {
  if (const char* env = std::getenv("METRIC_DS_SUPCON_TILE")) {
    const int64_t t = std::atoll(env);
    if (t > 0) return t;
  }
  return default_size;
}

void check_inputs(const at::Tensor& z, const at::Tensor& labels, double temperature, int64_t anchor_start,
                  int64_t anchor_count) {
  TORCH_CHECK(z.dim() == 2, "z must be 2-D (m, d), got ", z.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "z must be floating point, got ", z.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), "labels must have shape (m,) = (", z.size(0),
              ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == z.device(), "labels must be on z's device");
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK(anchor_start >= 0 && anchor_count >= 0 && anchor_start + anchor_count <= z.size(0),
              "anchor slice [", anchor_start, ", ", anchor_start + anchor_count, ") must lie in [0, ", z.size(0),
              ")");
}

namespace {

// fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 (gradcheck).
at::ScalarType accumulate_type(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Labels as contiguous int32 (compared inside vectorised epilogue loops), remapped to 0..k-1 so that any int64
// label values survive the narrowing.
at::Tensor dense_labels(const at::Tensor& labels) {
  if (labels.numel() == 0) return labels.to(at::kInt).contiguous();
  at::Tensor inverse = std::get<1>(at::_unique(labels, /*sorted=*/true, /*return_inverse=*/true));
  return inverse.to(at::kInt).contiguous();
}

bool is_symmetric(const at::Tensor& z, int64_t start, int64_t count) { return start == 0 && count == z.size(0); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_forward_impl(
    const at::Tensor& z, const at::Tensor& labels, double temperature, int64_t anchor_start,
    int64_t anchor_count, const Epilogues& ep, int64_t tile) {
  check_inputs(z, labels, temperature, anchor_start, anchor_count);
  const int64_t m = z.size(0), n = anchor_count;
  const auto f32 = z.options().dtype(accumulate_type(z));
  const at::Tensor z32 = z.to(accumulate_type(z)).contiguous();
  const at::Tensor lab = dense_labels(labels);
  const double inv_t = 1.0 / temperature;
  at::Tensor run_max = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
  at::Tensor run_sum = at::zeros({n}, f32), pos_sum = at::zeros({n}, f32), pos_cnt = at::zeros({n}, f32);
  if (n > 0 && m > 0) {
    if (is_symmetric(z, anchor_start, anchor_count)) {
      for (int64_t i0 = 0; i0 < m; i0 += tile) {
        const int64_t ti = std::min(tile, m - i0);
        at::Tensor zi = z32.narrow(0, i0, ti), li = lab.narrow(0, i0, ti);
        at::Tensor mi = run_max.narrow(0, i0, ti), si = run_sum.narrow(0, i0, ti);
        at::Tensor pi = pos_sum.narrow(0, i0, ti), ci = pos_cnt.narrow(0, i0, ti);
        for (int64_t j0 = i0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor zj = z32.narrow(0, j0, tj), lj = lab.narrow(0, j0, tj);
          at::Tensor s = at::mm(zi, zj.t()).mul_(inv_t);
          if (j0 != i0) {  // the columns' rows see the transposed tile (no self entries off the diagonal)
            at::Tensor st = s.t().contiguous();
            at::Tensor mj = run_max.narrow(0, j0, tj), sj = run_sum.narrow(0, j0, tj);
            at::Tensor pj = pos_sum.narrow(0, j0, tj), cj = pos_cnt.narrow(0, j0, tj);
            ep.row_stats(st, std::numeric_limits<int64_t>::min() / 2, lj, li, mj, sj, pj, cj);
          }
          ep.row_stats(s, i0 - j0, li, lj, mi, si, pi, ci);
        }
      }
    } else {
      const at::Tensor za = z32.narrow(0, anchor_start, n);
      const at::Tensor la = lab.narrow(0, anchor_start, n);
      for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t ti = std::min(tile, n - i0);
        at::Tensor zi = za.narrow(0, i0, ti), li = la.narrow(0, i0, ti);
        at::Tensor mi = run_max.narrow(0, i0, ti), si = run_sum.narrow(0, i0, ti);
        at::Tensor pi = pos_sum.narrow(0, i0, ti), ci = pos_cnt.narrow(0, i0, ti);
        for (int64_t j0 = 0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor s = at::mm(zi, z32.narrow(0, j0, tj).t()).mul_(inv_t);
          ep.row_stats(s, anchor_start + i0 - j0, li, lab.narrow(0, j0, tj), mi, si, pi, ci);
        }
      }
    }
  }
  // Rows with an empty contrast set (m == 1) have no log-sum-exp; 0 keeps backward finite (they are invalid).
  at::Tensor has_terms = run_sum > 0;
  at::Tensor lse = at::where(has_terms, run_max + run_sum.log(), at::zeros_like(run_sum));
  at::Tensor valid = pos_cnt > 0;
  at::Tensor loss_rows = at::where(valid, lse - pos_sum / pos_cnt.clamp_min(1), at::zeros_like(lse));
  return {loss_rows, lse, pos_cnt};
}

at::Tensor supcon_backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                                const at::Tensor& lse, const at::Tensor& num_pos, double temperature,
                                int64_t anchor_start, int64_t anchor_count, const Epilogues& ep, int64_t tile) {
  check_inputs(z, labels, temperature, anchor_start, anchor_count);
  const int64_t m = z.size(0), n = anchor_count;
  TORCH_CHECK(grad_rows.numel() == n && lse.numel() == n && num_pos.numel() == n,
              "grad_rows, lse and num_pos must have anchor_count = ", n, " elements");
  const at::ScalarType acc = accumulate_type(z);
  const at::Tensor z32 = z.to(acc).contiguous();
  const at::Tensor lab = dense_labels(labels);
  const at::Tensor lse32 = lse.to(acc).contiguous();
  const at::Tensor cnt = num_pos.to(acc);
  const at::Tensor coef = at::where(cnt > 0, grad_rows.to(acc), at::zeros_like(cnt)).contiguous();
  const at::Tensor invp = (coef / cnt.clamp_min(1)).contiguous();
  const double inv_t = 1.0 / temperature;
  at::Tensor dz = at::zeros({m, z.size(1)}, z32.options());
  if (n > 0 && m > 0) {
    if (is_symmetric(z, anchor_start, anchor_count)) {
      for (int64_t i0 = 0; i0 < m; i0 += tile) {
        const int64_t ti = std::min(tile, m - i0);
        at::Tensor zi = z32.narrow(0, i0, ti), li = lab.narrow(0, i0, ti);
        at::Tensor lse_i = lse32.narrow(0, i0, ti), coef_i = coef.narrow(0, i0, ti), invp_i = invp.narrow(0, i0, ti);
        at::Tensor dzi = dz.narrow(0, i0, ti);
        for (int64_t j0 = i0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor zj = z32.narrow(0, j0, tj);
          at::Tensor lse_j = lse32.narrow(0, j0, tj), coef_j = coef.narrow(0, j0, tj), invp_j = invp.narrow(0, j0, tj);
          at::Tensor h = at::mm(zi, zj.t()).mul_(inv_t);
          // h = G_IJ + G_JI^T: one tile of S serves the gradient of both row blocks.
          ep.grad_tile(h, i0 - j0, li, lab.narrow(0, j0, tj), lse_i, coef_i, invp_i, &lse_j, &coef_j, &invp_j);
          dzi.addmm_(h, zj);
          if (j0 != i0) dz.narrow(0, j0, tj).addmm_(h.t(), zi);
        }
      }
    } else {
      const at::Tensor za = z32.narrow(0, anchor_start, n);
      const at::Tensor la = lab.narrow(0, anchor_start, n);
      for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t ti = std::min(tile, n - i0);
        at::Tensor zi = za.narrow(0, i0, ti), li = la.narrow(0, i0, ti);
        at::Tensor lse_i = lse32.narrow(0, i0, ti), coef_i = coef.narrow(0, i0, ti), invp_i = invp.narrow(0, i0, ti);
        at::Tensor dzi = dz.narrow(0, anchor_start + i0, ti);
        for (int64_t j0 = 0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor zj = z32.narrow(0, j0, tj);
          at::Tensor g = at::mm(zi, zj.t()).mul_(inv_t);
          ep.grad_tile(g, anchor_start + i0 - j0, li, lab.narrow(0, j0, tj), lse_i, coef_i, invp_i, nullptr,
                       nullptr, nullptr);
          dzi.addmm_(g, zj);                            // the anchors' own term: G z
          dz.narrow(0, j0, tj).addmm_(g.t(), zi);       // the contrast rows' term: G^T z_anchor
        }
      }
    }
  }
  return dz.mul_(inv_t).to(z.scalar_type());
}

}  // namespace metric_ds
