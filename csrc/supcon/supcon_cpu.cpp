// CPU epilogues for the shared tile loop, and the op's schema and CPU registration.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "fast_exp.h"
#include "supcon.h"

namespace metric_ds {
namespace {

// Per-row-range kernels. The bodies are always inlined into the wrappers below, which GCC clones for AVX-512,
// AVX2 and baseline x86-64 and picks at load time: one portable .so with wide SIMD where the CPU has it.
template <typename T>
__attribute__((always_inline)) inline void row_stats_rows(int64_t begin, int64_t end, const T* s, int64_t tj,
                                                          int64_t self_offset, const int32_t* lr, const int32_t* lc,
                                                          T* mx, T* sm, T* ps, T* pc) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t i = begin; i < end; ++i) {
    const T* row = s + i * tj;
    const int64_t self = i + self_offset;  // may lie outside the tile: then no entry is excluded
    const int32_t li = lr[i];
    T psum = 0, pcnt = 0, tmax = kNegInf;
#pragma omp simd reduction(+ : psum, pcnt) reduction(max : tmax)
    for (int64_t j = 0; j < tj; ++j) {
      const bool other = j != self;
      const T v = row[j];
      const bool match = other && lc[j] == li;
      psum += match ? v : T(0);
      pcnt += match ? T(1) : T(0);
      const T vm = other ? v : kNegInf;
      tmax = vm > tmax ? vm : tmax;
    }
    ps[i] += psum;
    pc[i] += pcnt;
    if (tmax == kNegInf) continue;  // no entry besides the anchor itself in this tile
    T tsum = 0;
#pragma omp simd reduction(+ : tsum)
    for (int64_t j = 0; j < tj; ++j) tsum += j != self ? fast_exp(row[j] - tmax) : T(0);
    // merge the tile's (max, sum) into the running online log-sum-exp
    const T old = mx[i];
    if (old == kNegInf) {
      mx[i] = tmax;
      sm[i] = tsum;
    } else {
      const T m = old > tmax ? old : tmax;
      sm[i] = sm[i] * fast_exp(old - m) + tsum * fast_exp(tmax - m);
      mx[i] = m;
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void grad_rows(int64_t begin, int64_t end, T* s, int64_t tj,
                                                     int64_t self_offset, const int32_t* lr, const int32_t* lc,
                                                     const T* lse_r, const T* coef_r, const T* invp_r,
                                                     const T* lse_c, const T* coef_c, const T* invp_c) {
  for (int64_t i = begin; i < end; ++i) {
    T* row = s + i * tj;
    const int32_t li = lr[i];
    const T lse_i = lse_r[i], coef_i = coef_r[i], invp_i = invp_r[i];
    if (lse_c != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) {
        const T v = row[j];
        const T pos = lc[j] == li ? T(1) : T(0);
        row[j] = coef_i * fast_exp(v - lse_i) + coef_c[j] * fast_exp(v - lse_c[j]) - pos * (invp_i + invp_c[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < tj; ++j) {
        const T pos = lc[j] == li ? T(1) : T(0);
        row[j] = coef_i * fast_exp(row[j] - lse_i) - pos * invp_i;
      }
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

MDS_SIMD_CLONES void row_stats_rows_f32(int64_t b, int64_t e, const float* s, int64_t tj, int64_t off,
                                        const int32_t* lr, const int32_t* lc, float* mx, float* sm, float* ps,
                                        float* pc) {
  row_stats_rows<float>(b, e, s, tj, off, lr, lc, mx, sm, ps, pc);
}

void row_stats_rows_f64(int64_t b, int64_t e, const double* s, int64_t tj, int64_t off, const int32_t* lr,
                        const int32_t* lc, double* mx, double* sm, double* ps, double* pc) {
  row_stats_rows<double>(b, e, s, tj, off, lr, lc, mx, sm, ps, pc);
}

MDS_SIMD_CLONES void grad_rows_f32(int64_t b, int64_t e, float* s, int64_t tj, int64_t off, const int32_t* lr,
                                   const int32_t* lc, const float* lse_r, const float* coef_r, const float* invp_r,
                                   const float* lse_c, const float* coef_c, const float* invp_c) {
  grad_rows<float>(b, e, s, tj, off, lr, lc, lse_r, coef_r, invp_r, lse_c, coef_c, invp_c);
}

void grad_rows_f64(int64_t b, int64_t e, double* s, int64_t tj, int64_t off, const int32_t* lr, const int32_t* lc,
                   const double* lse_r, const double* coef_r, const double* invp_r, const double* lse_c,
                   const double* coef_c, const double* invp_c) {
  grad_rows<double>(b, e, s, tj, off, lr, lc, lse_r, coef_r, invp_r, lse_c, coef_c, invp_c);
}

inline void row_stats_dispatch(int64_t b, int64_t e, const float* s, int64_t tj, int64_t off, const int32_t* lr,
                               const int32_t* lc, float* mx, float* sm, float* ps, float* pc) {
  row_stats_rows_f32(b, e, s, tj, off, lr, lc, mx, sm, ps, pc);
}
inline void row_stats_dispatch(int64_t b, int64_t e, const double* s, int64_t tj, int64_t off, const int32_t* lr,
                               const int32_t* lc, double* mx, double* sm, double* ps, double* pc) {
  row_stats_rows_f64(b, e, s, tj, off, lr, lc, mx, sm, ps, pc);
}
inline void grad_dispatch(int64_t b, int64_t e, float* s, int64_t tj, int64_t off, const int32_t* lr,
                          const int32_t* lc, const float* a, const float* c, const float* p, const float* ac,
                          const float* cc, const float* pc) {
  grad_rows_f32(b, e, s, tj, off, lr, lc, a, c, p, ac, cc, pc);
}
inline void grad_dispatch(int64_t b, int64_t e, double* s, int64_t tj, int64_t off, const int32_t* lr,
                          const int32_t* lc, const double* a, const double* c, const double* p, const double* ac,
                          const double* cc, const double* pc) {
  grad_rows_f64(b, e, s, tj, off, lr, lc, a, c, p, ac, cc, pc);
}

template <typename T>
void row_stats_cpu_impl(at::Tensor& tile, int64_t self_offset, const at::Tensor& labels_rows,
                        const at::Tensor& labels_cols, at::Tensor& run_max, at::Tensor& run_sum,
                        at::Tensor& pos_sum, at::Tensor& pos_cnt) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  const T* s = tile.data_ptr<T>();
  const int32_t* lr = labels_rows.data_ptr<int32_t>();
  const int32_t* lc = labels_cols.data_ptr<int32_t>();
  T* mx = run_max.data_ptr<T>();
  T* sm = run_sum.data_ptr<T>();
  T* ps = pos_sum.data_ptr<T>();
  T* pc = pos_cnt.data_ptr<T>();
  at::parallel_for(0, ti, 16, [&](int64_t begin, int64_t end) {
    row_stats_dispatch(begin, end, s, tj, self_offset, lr, lc, mx, sm, ps, pc);
  });
}

template <typename T>
void grad_tile_cpu_impl(at::Tensor& tile, int64_t self_offset, const at::Tensor& labels_rows,
                        const at::Tensor& labels_cols, const at::Tensor& lse_rows, const at::Tensor& coef_rows,
                        const at::Tensor& invp_rows, const at::Tensor* lse_cols, const at::Tensor* coef_cols,
                        const at::Tensor* invp_cols) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  T* s = tile.data_ptr<T>();
  const int32_t* lr = labels_rows.data_ptr<int32_t>();
  const int32_t* lc = labels_cols.data_ptr<int32_t>();
  const bool sym = lse_cols != nullptr;
  const T* lse_c = sym ? lse_cols->data_ptr<T>() : nullptr;
  const T* coef_c = sym ? coef_cols->data_ptr<T>() : nullptr;
  const T* invp_c = sym ? invp_cols->data_ptr<T>() : nullptr;
  const T* lse_r = lse_rows.data_ptr<T>();
  const T* coef_r = coef_rows.data_ptr<T>();
  const T* invp_r = invp_rows.data_ptr<T>();
  at::parallel_for(0, ti, 16, [&](int64_t begin, int64_t end) {
    grad_dispatch(begin, end, s, tj, self_offset, lr, lc, lse_r, coef_r, invp_r, lse_c, coef_c, invp_c);
  });
}

void row_stats_cpu(at::Tensor& tile, int64_t self_offset, const at::Tensor& labels_rows, const at::Tensor& labels_cols,
                   at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& pos_sum, at::Tensor& pos_cnt) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_row_stats_cpu", [&] {
    row_stats_cpu_impl<scalar_t>(tile, self_offset, labels_rows, labels_cols, run_max, run_sum, pos_sum, pos_cnt);
  });
}

void grad_tile_cpu(at::Tensor& tile, int64_t self_offset, const at::Tensor& labels_rows, const at::Tensor& labels_cols,
                   const at::Tensor& lse_rows, const at::Tensor& coef_rows, const at::Tensor& invp_rows,
                   const at::Tensor* lse_cols, const at::Tensor* coef_cols, const at::Tensor* invp_cols) {
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_grad_tile_cpu", [&] {
    grad_tile_cpu_impl<scalar_t>(tile, self_offset, labels_rows, labels_cols, lse_rows, coef_rows, invp_rows,
                                 lse_cols, coef_cols, invp_cols);
  });
}

const Epilogues kCpuEpilogues{&row_stats_cpu, &grad_tile_cpu};

void check_cpu(const at::Tensor& z) { TORCH_CHECK(z.device().is_cpu(), "z must be a CPU tensor here"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& z, const at::Tensor& labels,
                                                              double temperature, int64_t anchor_start,
                                                              int64_t anchor_count) {
  check_cpu(z);
  return supcon_forward_impl(z, labels, temperature, anchor_start, anchor_count, kCpuEpilogues, tile_size(1024));
}

at::Tensor supcon_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                          const at::Tensor& lse, const at::Tensor& num_pos, double temperature, int64_t anchor_start,
                          int64_t anchor_count) {
  check_cpu(z);
  return supcon_backward_impl(grad_rows, z, labels, lse, num_pos, temperature, anchor_start, anchor_count,
                              kCpuEpilogues, tile_size(1024));
}

}  // namespace

TORCH_LIBRARY(metric_ds, m) {
  m.def("supcon_fwd(Tensor z, Tensor labels, float temperature, int anchor_start, int anchor_count) "
        "-> (Tensor loss_rows, Tensor lse, Tensor num_pos)");
  m.def("supcon_bwd(Tensor grad_rows, Tensor z, Tensor labels, Tensor lse, Tensor num_pos, float temperature, "
        "int anchor_start, int anchor_count) -> Tensor");
}

TORCH_LIBRARY_IMPL(metric_ds, CPU, m) {
  m.impl("supcon_fwd", &supcon_fwd_cpu);
  m.impl("supcon_bwd", &supcon_bwd_cpu);
}

}  // namespace metric_ds
