// The tile loop shared by CPU and CUDA (see supcon.h). Only ATen ops and the epilogues: no device code here.
#include "supcon.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/version.h>

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

// The operand type of the gradient GEMMs (G z, G^T z). G's entries (upstream gradient times a softmax, 1e-8 and
// below in large batches) keep their range in bf16, which has fp32's exponent, but underflow fp16's: bf16 inputs
// get bf16 weights (tensor cores), every other dtype keeps the accumulation type.
at::ScalarType weight_type(const at::Tensor& z) {
  return z.scalar_type() == at::kBFloat16 ? at::kBFloat16 : accumulate_type(z);
}

// a @ b accumulated and returned in `acc`, reading a and b in their own dtype. On CUDA, bf16/fp16 operands go to
// cuBLAS as they are (tensor cores; mm's out_dtype gives fp32 accumulation and output). The CPU has no such GEMM:
// there the operands are upcast first, which computes the same products (exact in fp32) in the same loop.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MDS_MM_OUT_DTYPE 1  // aten::mm.dtype (torch >= 2.8)
#endif
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
#ifdef MDS_MM_OUT_DTYPE
  if (a.is_cuda()) return at::mm(a, b, acc);
#endif
  return at::mm(a.to(acc), b.to(acc));
}

// out += a @ b, with out in the accumulation type.
void add_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a, b);
  } else {
    out.add_(gemm(a, b, out.scalar_type()));
  }
}

// Labels as indices 0..k-1 for the per-class sums, and k. With num_classes >= 0 the caller promises labels in
// [0, num_classes): they are used as they are, with no host-device synchronisation (checked on CPU, where the
// check is free; on CUDA an out-of-range label is a device-side assert). Otherwise any int64 values are remapped
// with unique(), which waits for the device.
std::pair<at::Tensor, int64_t> dense_labels(const at::Tensor& labels, int64_t num_classes) {
  if (num_classes >= 0) {
    if (labels.device().is_cpu() && labels.numel() > 0) {
      const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < num_classes, "labels must lie in [0, num_classes = ", num_classes, "), got [",
                  lo, ", ", hi, "]");
    }
    return {labels.contiguous(), num_classes};
  }
  if (labels.numel() == 0) return {labels.contiguous(), 0};
  at::Tensor lab = std::get<1>(at::_unique(labels, /*sorted=*/true, /*return_inverse=*/true)).contiguous();
  const int64_t k = lab.max().item<int64_t>() + 1;
  return {lab, k};
}

bool is_symmetric(const at::Tensor& z, int64_t start, int64_t count) { return start == 0 && count == z.size(0); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_forward_impl(
    const at::Tensor& z, const at::Tensor& labels, double temperature, int64_t anchor_start,
    int64_t anchor_count, int64_t num_classes, const Epilogues& ep, int64_t tile) {
  // Called under torch.autocast, the tile matmuls below would run in bf16/fp16: the op accumulates in fp32.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(z, labels, temperature, anchor_start, anchor_count);
  const int64_t m = z.size(0), n = anchor_count;
  const at::ScalarType acc = accumulate_type(z);
  const double scale = 1.0 / temperature;  // applied by the epilogues: tiles are raw dot products
  const at::Tensor zc = z.contiguous();    // the GEMMs' operand, in z's own dtype
  const at::Tensor z32 = zc.to(acc);       // per-class sums, O(m d)
  const auto opts = z32.options();
  at::Tensor run_max = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({n}, opts);
  if (n > 0 && m > 1) {
    if (is_symmetric(z, anchor_start, anchor_count)) {
      for (int64_t i0 = 0; i0 < m; i0 += tile) {
        const int64_t ti = std::min(tile, m - i0);
        at::Tensor zi = zc.narrow(0, i0, ti);
        at::Tensor mi = run_max.narrow(0, i0, ti), si = run_sum.narrow(0, i0, ti);
        for (int64_t j0 = i0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor s = gemm(zi, zc.narrow(0, j0, tj).t(), acc);
          ep.row_stats(s, scale, i0 - j0, mi, si);
          if (j0 != i0) {  // S_JI = S_IJ^T: the same tile's columns are the column block's rows
            at::Tensor mj = run_max.narrow(0, j0, tj), sj = run_sum.narrow(0, j0, tj);
            ep.col_stats(s, scale, mj, sj);
          }
        }
      }
    } else {
      const at::Tensor za = zc.narrow(0, anchor_start, n);
      for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t ti = std::min(tile, n - i0);
        at::Tensor zi = za.narrow(0, i0, ti);
        at::Tensor mi = run_max.narrow(0, i0, ti), si = run_sum.narrow(0, i0, ti);
        for (int64_t j0 = 0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          ep.row_stats(gemm(zi, zc.narrow(0, j0, tj).t(), acc), scale, anchor_start + i0 - j0, mi, si);
        }
      }
    }
  }
  // Positives from per-class sums: sum_{p in P(i)} S_ip = z_i . (C[y_i] - z_i) / tau, |P(i)| = count[y_i] - 1.
  const auto [lab, k] = dense_labels(labels, num_classes);
  const at::Tensor class_sum = at::zeros({k, z.size(1)}, opts).index_add_(0, lab, z32);
  // index_add of ones rather than bincount, which reads the largest label back to the host.
  const at::Tensor class_cnt = at::zeros({k}, opts).index_add_(0, lab, at::ones({m}, opts));
  const at::Tensor la = lab.narrow(0, anchor_start, n);
  const at::Tensor za32 = z32.narrow(0, anchor_start, n);
  const at::Tensor pos_cnt = class_cnt.index_select(0, la) - 1;
  const at::Tensor pos_sum =
      (za32 * (class_sum.index_select(0, la) - za32)).sum(1) * (1.0 / temperature);
  // Rows with an empty contrast set (m == 1) have no log-sum-exp; 0 keeps backward finite (they are invalid).
  const at::Tensor lse = at::where(run_sum > 0, run_max + run_sum.log(), at::zeros_like(run_sum));
  const at::Tensor loss_rows = at::where(pos_cnt > 0, lse - pos_sum / pos_cnt.clamp_min(1), at::zeros_like(lse));
  return {loss_rows, lse, pos_cnt};
}

at::Tensor supcon_backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                                const at::Tensor& lse, const at::Tensor& num_pos, double temperature,
                                int64_t anchor_start, int64_t anchor_count, int64_t num_classes,
                                const Epilogues& ep, int64_t tile) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(z, labels, temperature, anchor_start, anchor_count);
  const int64_t m = z.size(0), n = anchor_count;
  TORCH_CHECK(grad_rows.numel() == n && lse.numel() == n && num_pos.numel() == n,
              "grad_rows, lse and num_pos must have anchor_count = ", n, " elements");
  const at::ScalarType acc = accumulate_type(z), wt = weight_type(z);
  const double scale = 1.0 / temperature;
  const at::Tensor zc = z.contiguous();                           // operand of the similarity GEMMs
  const at::Tensor z32 = zc.to(acc);                              // per-class sums, and the result's type
  const at::Tensor zw = wt == acc ? z32 : zc;                     // operand of the gradient GEMMs, beside G
  const at::Tensor lse32 = lse.to(acc).contiguous();
  const at::Tensor cnt = num_pos.to(acc);
  const at::Tensor coef = at::where(cnt > 0, grad_rows.to(acc), at::zeros_like(cnt)).contiguous();
  at::Tensor dz = at::zeros({m, z.size(1)}, z32.options());
  // Softmax part, G_ij = coef_i softmax_ij (j != i), in tiles: dz += G z + G^T z_anchor.
  if (n > 0 && m > 1) {
    if (is_symmetric(z, anchor_start, anchor_count)) {
      for (int64_t i0 = 0; i0 < m; i0 += tile) {
        const int64_t ti = std::min(tile, m - i0);
        at::Tensor zi = zc.narrow(0, i0, ti), zwi = zw.narrow(0, i0, ti);
        at::Tensor lse_i = lse32.narrow(0, i0, ti), coef_i = coef.narrow(0, i0, ti);
        at::Tensor dzi = dz.narrow(0, i0, ti);
        for (int64_t j0 = i0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor lse_j = lse32.narrow(0, j0, tj), coef_j = coef.narrow(0, j0, tj);
          at::Tensor h = gemm(zi, zc.narrow(0, j0, tj).t(), acc);
          // h = G_IJ + G_JI^T: one tile of S serves the gradient of both row blocks.
          ep.grad_tile(h, scale, i0 - j0, lse_i, coef_i, &lse_j, &coef_j);
          const at::Tensor hw = h.to(wt);
          add_gemm(dzi, hw, zw.narrow(0, j0, tj));
          if (j0 != i0) {
            at::Tensor dzj = dz.narrow(0, j0, tj);
            add_gemm(dzj, hw.t(), zwi);
          }
        }
      }
    } else {
      const at::Tensor za = zc.narrow(0, anchor_start, n), zwa = zw.narrow(0, anchor_start, n);
      for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t ti = std::min(tile, n - i0);
        at::Tensor zi = za.narrow(0, i0, ti), zwi = zwa.narrow(0, i0, ti);
        at::Tensor lse_i = lse32.narrow(0, i0, ti), coef_i = coef.narrow(0, i0, ti);
        at::Tensor dzi = dz.narrow(0, anchor_start + i0, ti);
        for (int64_t j0 = 0; j0 < m; j0 += tile) {
          const int64_t tj = std::min(tile, m - j0);
          at::Tensor g = gemm(zi, zc.narrow(0, j0, tj).t(), acc);
          ep.grad_tile(g, scale, anchor_start + i0 - j0, lse_i, coef_i, nullptr, nullptr);
          const at::Tensor gw = g.to(wt);
          at::Tensor dzj = dz.narrow(0, j0, tj);
          add_gemm(dzi, gw, zw.narrow(0, j0, tj));  // the anchors' own term: G z
          add_gemm(dzj, gw.t(), zwi);               // the contrast rows' term: G^T z_anchor
        }
      }
    }
  }
  // Positive part, -[j in P(i)] coef_i / |P(i)|, from per-class sums:
  //   anchors:       dz_i -= invp_i (C[y_i] - z_i)
  //   contrast rows: dz_j -= Q[y_j] - [j is an anchor] invp_j z_j, with Q[y] = sum of invp_i z_i over anchors.
  if (n > 0) {
    const auto [lab, k] = dense_labels(labels, num_classes);
    const at::Tensor la = lab.narrow(0, anchor_start, n);
    const at::Tensor za = z32.narrow(0, anchor_start, n);
    const at::Tensor invp = (coef / cnt.clamp_min(1)).unsqueeze(1);
    const at::Tensor class_sum = at::zeros({k, z.size(1)}, z32.options()).index_add_(0, lab, z32);
    const at::Tensor q = at::zeros({k, z.size(1)}, z32.options()).index_add_(0, la, invp * za);
    at::Tensor dza = dz.narrow(0, anchor_start, n);
    dza.sub_(invp * (class_sum.index_select(0, la) - za));
    dz.sub_(q.index_select(0, lab));
    dza.add_(invp * za);
  }
  return dz.mul_(1.0 / temperature).to(z.scalar_type());
}

}  // namespace metric_ds
