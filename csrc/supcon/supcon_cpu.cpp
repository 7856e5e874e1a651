// CPU epilogues for the shared tile loop, and the op's schema and CPU registration.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "fast_exp.h"
#include "supcon.h"

namespace metric_ds {
namespace {

// Merge a tile's (max, sum of exp) of one row or column into the running online log-sum-exp.
template <typename T>
__attribute__((always_inline)) inline void merge_lse(T tmax, T tsum, T& run_max, T& run_sum) {
  const T old = run_max;
  if (old == -std::numeric_limits<T>::infinity()) {
    run_max = tmax;
    run_sum = tsum;
  } else {
    const T m = old > tmax ? old : tmax;
    run_sum = run_sum * fast_exp(old - m) + tsum * fast_exp(tmax - m);
    run_max = m;
  }
}

// Per-range kernels (rows; columns for col_stats). The bodies are always inlined into the wrappers below, which
// GCC clones for AVX-512, AVX2 and baseline x86-64 and picks at load time: one portable .so with wide SIMD where the
// CPU has it.
// Tiles hold dot products; logits are dot products times `scale` (> 0), so a row's largest logit is its largest
// dot product times scale.
template <typename T>
__attribute__((always_inline)) inline void row_stats_rows(int64_t begin, int64_t end, const T* s, int64_t tj,
                                                          T scale, int64_t self_offset, T* mx, T* sm) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = begin; i < end; ++i) {
    const T* row = s + i * tj;
    const int64_t self = i + self_offset;  // outside [0, tj): no entry of this row is excluded
    T tmax = kNegInf;
#pragma omp simd reduction(max : tmax)
    for (int64_t j = 0; j < tj; ++j) {
      const T v = j != self ? row[j] : kNegInf;
      tmax = v > tmax ? v : tmax;
    }
    if (tmax == kNegInf) continue;  // no entry besides the anchor itself in this tile
    T tsum = 0;
#pragma omp simd reduction(+ : tsum)
    for (int64_t j = 0; j < tj; ++j) {
      tsum += fast_exp((row[j] - tmax) * scale) * static_cast<T>(j != self);  // mask, no branch
    }
    merge_lse(tmax * scale, tsum, mx[i], sm[i]);
  }
}

// Columns [begin, end) of an off-diagonal tile (no self entries): two passes down the rows, each vectorised
// along the row, with per-column accumulators in `cmax`/`csum` (end - begin entries each).
template <typename T>
__attribute__((always_inline)) inline void col_stats_cols(int64_t begin, int64_t end, const T* s, int64_t ti,
                                                          int64_t tj, T scale, T* mx, T* sm, T* cmax, T* csum) {
  const int64_t w = end - begin;
  if (ti == 0) return;
  for (int64_t c = 0; c < w; ++c) {
    cmax[c] = -std::numeric_limits<T>::infinity();
    csum[c] = 0;
  }
  for (int64_t i = 0; i < ti; ++i) {
    const T* row = s + i * tj + begin;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) cmax[c] = row[c] > cmax[c] ? row[c] : cmax[c];
  }
  for (int64_t i = 0; i < ti; ++i) {
    const T* row = s + i * tj + begin;
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) csum[c] += fast_exp((row[c] - cmax[c]) * scale);
  }
  for (int64_t c = 0; c < w; ++c) merge_lse(cmax[c] * scale, csum[c], mx[begin + c], sm[begin + c]);
}

template <typename T>
__attribute__((always_inline)) inline void grad_rows(int64_t begin, int64_t end, T* s, int64_t tj, T scale,
                                                     int64_t self_offset, const T* lse_r, const T* coef_r,
                                                     const T* lse_c, const T* coef_c) {
  for (int64_t i = begin; i < end; ++i) {
    T* row = s + i * tj;
    const T lse_i = lse_r[i], coef_i = coef_r[i];
    if (lse_c != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) {
        const T v = row[j] * scale;
        row[j] = coef_i * fast_exp(v - lse_i) + coef_c[j] * fast_exp(v - lse_c[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) row[j] = coef_i * fast_exp(row[j] * scale - lse_i);
    }
    const int64_t self = i + self_offset;
    if (self >= 0 && self < tj) row[self] = 0;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MDS_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MDS_SIMD_CLONES
#endif

MDS_SIMD_CLONES void row_stats_f32(int64_t b, int64_t e, const float* s, int64_t tj, float scale, int64_t off,
                                   float* mx, float* sm) {
  row_stats_rows<float>(b, e, s, tj, scale, off, mx, sm);
}

void row_stats_f64(int64_t b, int64_t e, const double* s, int64_t tj, double scale, int64_t off, double* mx,
                   double* sm) {
  row_stats_rows<double>(b, e, s, tj, scale, off, mx, sm);
}

MDS_SIMD_CLONES void col_stats_f32(int64_t b, int64_t e, const float* s, int64_t ti, int64_t tj, float scale,
                                   float* mx, float* sm, float* cmax, float* csum) {
  col_stats_cols<float>(b, e, s, ti, tj, scale, mx, sm, cmax, csum);
}

void col_stats_f64(int64_t b, int64_t e, const double* s, int64_t ti, int64_t tj, double scale, double* mx,
                   double* sm, double* cmax, double* csum) {
  col_stats_cols<double>(b, e, s, ti, tj, scale, mx, sm, cmax, csum);
}

MDS_SIMD_CLONES void grad_f32(int64_t b, int64_t e, float* s, int64_t tj, float scale, int64_t off,
                              const float* lse_r, const float* coef_r, const float* lse_c, const float* coef_c) {
  grad_rows<float>(b, e, s, tj, scale, off, lse_r, coef_r, lse_c, coef_c);
}

void grad_f64(int64_t b, int64_t e, double* s, int64_t tj, double scale, int64_t off, const double* lse_r,
              const double* coef_r, const double* lse_c, const double* coef_c) {
  grad_rows<double>(b, e, s, tj, scale, off, lse_r, coef_r, lse_c, coef_c);
}

inline void row_stats_any(int64_t b, int64_t e, const float* s, int64_t tj, float sc, int64_t off, float* mx,
                          float* sm) {
  row_stats_f32(b, e, s, tj, sc, off, mx, sm);
}
inline void row_stats_any(int64_t b, int64_t e, const double* s, int64_t tj, double sc, int64_t off, double* mx,
                          double* sm) {
  row_stats_f64(b, e, s, tj, sc, off, mx, sm);
}
inline void col_stats_any(int64_t b, int64_t e, const float* s, int64_t ti, int64_t tj, float sc, float* mx,
                          float* sm, float* cm, float* cs) {
  col_stats_f32(b, e, s, ti, tj, sc, mx, sm, cm, cs);
}
inline void col_stats_any(int64_t b, int64_t e, const double* s, int64_t ti, int64_t tj, double sc, double* mx,
                          double* sm, double* cm, double* cs) {
  col_stats_f64(b, e, s, ti, tj, sc, mx, sm, cm, cs);
}
inline void grad_any(int64_t b, int64_t e, float* s, int64_t tj, float sc, int64_t off, const float* lr,
                     const float* cr, const float* lc, const float* cc) {
  grad_f32(b, e, s, tj, sc, off, lr, cr, lc, cc);
}
inline void grad_any(int64_t b, int64_t e, double* s, int64_t tj, double sc, int64_t off, const double* lr,
                     const double* cr, const double* lc, const double* cc) {
  grad_f64(b, e, s, tj, sc, off, lr, cr, lc, cc);
}

// Rows per parallel chunk: at least ATen's grain of 32768 elements, so that a small tile (a small batch, or the
// last tile of a row) runs on one thread instead of paying for a parallel region, whose barrier dominates below
// that size and costs scheduler time slices when the cores are shared.
constexpr int64_t kGrainElements = 32768;  // ATen's own (at::internal::GRAIN_SIZE)
int64_t row_grain(int64_t tj) { return std::max<int64_t>(16, kGrainElements / std::max<int64_t>(tj, 1)); }

void row_stats_cpu(const at::Tensor& tile, double scale, int64_t self_offset, at::Tensor& run_max,
                   at::Tensor& run_sum) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_row_stats_cpu", [&] {
    const scalar_t* s = tile.data_ptr<scalar_t>();
    scalar_t* mx = run_max.data_ptr<scalar_t>();
    scalar_t* sm = run_sum.data_ptr<scalar_t>();
    const auto sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, ti, row_grain(tj), [&](int64_t begin, int64_t end) {
      row_stats_any(begin, end, s, tj, sc, self_offset, mx, sm);
    });
  });
}

void col_stats_cpu(const at::Tensor& tile, double scale, at::Tensor& run_max, at::Tensor& run_sum) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_col_stats_cpu", [&] {
    const scalar_t* s = tile.data_ptr<scalar_t>();
    scalar_t* mx = run_max.data_ptr<scalar_t>();
    scalar_t* sm = run_sum.data_ptr<scalar_t>();
    const auto sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, tj, row_grain(ti), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(2 * (end - begin));  // per-column max and sum of exp
      col_stats_any(begin, end, s, ti, tj, sc, mx, sm, scratch.data(), scratch.data() + (end - begin));
    });
  });
}

void grad_tile_cpu(at::Tensor& tile, double scale, int64_t self_offset, const at::Tensor& lse_rows,
                   const at::Tensor& coef_rows, const at::Tensor* lse_cols, const at::Tensor* coef_cols) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_grad_tile_cpu", [&] {
    scalar_t* s = tile.data_ptr<scalar_t>();
    const scalar_t* lr = lse_rows.data_ptr<scalar_t>();
    const scalar_t* cr = coef_rows.data_ptr<scalar_t>();
    const scalar_t* lc = lse_cols != nullptr ? lse_cols->data_ptr<scalar_t>() : nullptr;
    const scalar_t* cc = coef_cols != nullptr ? coef_cols->data_ptr<scalar_t>() : nullptr;
    const auto sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, ti, row_grain(tj), [&](int64_t begin, int64_t end) {
      grad_any(begin, end, s, tj, sc, self_offset, lr, cr, lc, cc);
    });
  });
}

const Epilogues kCpuEpilogues{&row_stats_cpu, &col_stats_cpu, &grad_tile_cpu};

void check_cpu(const at::Tensor& z) { TORCH_CHECK(z.device().is_cpu(), "z must be a CPU tensor here"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& z, const at::Tensor& labels,
                                                              double temperature, int64_t anchor_start,
                                                              int64_t anchor_count, int64_t num_classes) {
  check_cpu(z);
  return supcon_forward_impl(z, labels, temperature, anchor_start, anchor_count, num_classes, kCpuEpilogues,
                             tile_size(1024));
}

at::Tensor supcon_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                          const at::Tensor& lse, const at::Tensor& num_pos, double temperature, int64_t anchor_start,
                          int64_t anchor_count, int64_t num_classes) {
  check_cpu(z);
  return supcon_backward_impl(grad_rows, z, labels, lse, num_pos, temperature, anchor_start, anchor_count,
                              num_classes, kCpuEpilogues, tile_size(1024));
}

}  // namespace

TORCH_LIBRARY(metric_ds, m) {
  // num_classes = -1: labels are any int64 values (remapped on the device, with a host sync); >= 0: labels
  // already lie in [0, num_classes) and nothing waits for the device.
  m.def("supcon_fwd(Tensor z, Tensor labels, float temperature, int anchor_start, int anchor_count, "
        "int num_classes=-1) -> (Tensor loss_rows, Tensor lse, Tensor num_pos)");
  m.def("supcon_bwd(Tensor grad_rows, Tensor z, Tensor labels, Tensor lse, Tensor num_pos, float temperature, "
        "int anchor_start, int anchor_count, int num_classes=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(metric_ds, CPU, m) {
  m.impl("supcon_fwd", &supcon_fwd_cpu);
  m.impl("supcon_bwd", &supcon_bwd_cpu);
}

}  // namespace metric_ds
