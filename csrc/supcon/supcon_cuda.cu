// CUDA epilogues for the shared tile loop (supcon_loop.cpp), and the op's CUDA registration.
//
// row_stats: one block per tile row; block-wide reductions (warp shuffles, then shared memory) of the row max and
// the sum of exp, merged into the running online log-sum-exp by thread 0.
// col_stats: one block per 32 columns; each of its 8 warps reads every 8th row (a warp reads 32 adjacent entries
// of a row), keeps an online log-sum-exp per column, and the 8 partial results are merged through shared memory.
// grad_tile: one thread per tile element (grid-stride), in place.
// Tiles hold dot products; `scale` (1/temperature, > 0) makes them logits as they are read.
// Only c10's CUDA headers are needed (no cuBLAS headers: the matmuls are ATen's, in the shared loop).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <limits>

#include "supcon.h"

namespace metric_ds {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return fmax(a, b); }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction with `op` (`identity` pads the lanes past the last warp); every thread gets the result.
// `scratch` holds kWarps values.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, T identity, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < kWarps ? scratch[lane] : identity;
  r = warp_reduce(r, op);
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

template <typename T>
__device__ T block_sum(T v, T* scratch) { return block_reduce(v, scratch, T(0), SumOp{}); }

template <typename T>
__device__ T block_max(T v, T* scratch) {
  return block_reduce(v, scratch, -std::numeric_limits<T>::infinity(), MaxOp{});
}

// Merge (tmax, tsum) into the running online log-sum-exp (run_max, run_sum); -inf maxima hold nothing.
template <typename T>
__device__ __forceinline__ void merge_lse(T tmax, T tsum, T& run_max, T& run_sum) {
  if (tmax == -std::numeric_limits<T>::infinity()) return;
  const T old = run_max;
  if (old == -std::numeric_limits<T>::infinity()) {
    run_max = tmax;
    run_sum = tsum;
  } else {
    const T m = fmax(old, tmax);
    run_sum = run_sum * dev_exp(old - m) + tsum * dev_exp(tmax - m);
    run_max = m;
  }
}

template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ tile, int64_t tj, T scale, int64_t self_offset,
                                 T* __restrict__ run_max, T* __restrict__ run_sum) {
  __shared__ T scratch[kWarps];
  const int64_t i = blockIdx.x;
  const T* row = tile + i * tj;
  const int64_t self = i + self_offset;
  T tmax = -std::numeric_limits<T>::infinity();
  for (int64_t j = threadIdx.x; j < tj; j += blockDim.x) {
    if (j != self) tmax = fmax(tmax, row[j]);
  }
  tmax = block_max(tmax, scratch);
  if (tmax == -std::numeric_limits<T>::infinity()) return;  // uniform across the block: no entry but self
  T tsum = 0;
  for (int64_t j = threadIdx.x; j < tj; j += blockDim.x) {
    if (j != self) tsum += dev_exp((row[j] - tmax) * scale);
  }
  tsum = block_sum(tsum, scratch);
  if (threadIdx.x == 0) merge_lse(tmax * scale, tsum, run_max[i], run_sum[i]);
}

constexpr int kColWidth = 32;                   // columns per block: one warp's worth of adjacent entries
constexpr int kColRows = kThreads / kColWidth;  // row strides per block

template <typename T>
__global__ void col_stats_kernel(const T* __restrict__ tile, int64_t ti, int64_t tj, T scale,
                                 T* __restrict__ run_max, T* __restrict__ run_sum) {
  __shared__ T part_max[kColRows][kColWidth];
  __shared__ T part_sum[kColRows][kColWidth];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColWidth + threadIdx.x;
  T m = -std::numeric_limits<T>::infinity(), acc = 0;
  if (j < tj) {
    for (int64_t i = threadIdx.y; i < ti; i += kColRows) {  // online log-sum-exp down the column
      const T v = tile[i * tj + j] * scale;
      if (v > m) {
        acc = acc * dev_exp(m - v) + T(1);  // exp(-inf) = 0 on the first entry
        m = v;
      } else {
        acc += dev_exp(v - m);
      }
    }
  }
  part_max[threadIdx.y][threadIdx.x] = m;
  part_sum[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < tj) {
    T cm = -std::numeric_limits<T>::infinity(), cs = 0;
    for (int r = 0; r < kColRows; ++r) merge_lse(part_max[r][threadIdx.x], part_sum[r][threadIdx.x], cm, cs);
    merge_lse(cm, cs, run_max[j], run_sum[j]);
  }
}

template <typename T>
__global__ void grad_tile_kernel(T* __restrict__ tile, int64_t ti, int64_t tj, T scale, int64_t self_offset,
                                 const T* __restrict__ lse_r, const T* __restrict__ coef_r,
                                 const T* __restrict__ lse_c, const T* __restrict__ coef_c) {
  const int64_t total = ti * tj;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / tj, j = idx - i * tj;
    if (j == i + self_offset) {
      tile[idx] = T(0);
      continue;
    }
    const T v = tile[idx] * scale;
    // coef == 0 (anchor without positives) contributes nothing, whatever its lse
    T h = coef_r[i] == T(0) ? T(0) : coef_r[i] * dev_exp(v - lse_r[i]);
    if (lse_c != nullptr && coef_c[j] != T(0)) h += coef_c[j] * dev_exp(v - lse_c[j]);
    tile[idx] = h;
  }
}

void row_stats_cuda(const at::Tensor& tile, double scale, int64_t self_offset, at::Tensor& run_max,
                    at::Tensor& run_sum) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  if (ti == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_row_stats_cuda", [&] {
    row_stats_kernel<scalar_t><<<static_cast<unsigned>(ti), kThreads, 0, stream>>>(
        tile.data_ptr<scalar_t>(), tj, static_cast<scalar_t>(scale), self_offset, run_max.data_ptr<scalar_t>(),
        run_sum.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void col_stats_cuda(const at::Tensor& tile, double scale, at::Tensor& run_max, at::Tensor& run_sum) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  if (ti == 0 || tj == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kColWidth, kColRows);
  const auto blocks = static_cast<unsigned>((tj + kColWidth - 1) / kColWidth);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_col_stats_cuda", [&] {
    col_stats_kernel<scalar_t><<<blocks, block, 0, stream>>>(tile.data_ptr<scalar_t>(), ti, tj,
                                                             static_cast<scalar_t>(scale),
                                                             run_max.data_ptr<scalar_t>(),
                                                             run_sum.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void grad_tile_cuda(at::Tensor& tile, double scale, int64_t self_offset, const at::Tensor& lse_rows,
                    const at::Tensor& coef_rows, const at::Tensor* lse_cols, const at::Tensor* coef_cols) {
  const int64_t ti = tile.size(0), tj = tile.size(1);
  if (ti == 0 || tj == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((ti * tj + kThreads - 1) / kThreads, 65535);
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "supcon_grad_tile_cuda", [&] {
    grad_tile_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        tile.data_ptr<scalar_t>(), ti, tj, static_cast<scalar_t>(scale), self_offset,
        lse_rows.data_ptr<scalar_t>(), coef_rows.data_ptr<scalar_t>(),
        lse_cols != nullptr ? lse_cols->data_ptr<scalar_t>() : nullptr,
        coef_cols != nullptr ? coef_cols->data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const Epilogues kCudaEpilogues{&row_stats_cuda, &col_stats_cuda, &grad_tile_cuda};

void check_cuda(const at::Tensor& z) { TORCH_CHECK(z.is_cuda(), "z must be a CUDA tensor here"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_fwd_cuda(const at::Tensor& z, const at::Tensor& labels,
                                                               double temperature, int64_t anchor_start,
                                                               int64_t anchor_count, int64_t num_classes) {
  check_cuda(z);
  const c10::cuda::CUDAGuard guard(z.device());
  return supcon_forward_impl(z, labels, temperature, anchor_start, anchor_count, num_classes, kCudaEpilogues,
                             tile_size(4096));
}

at::Tensor supcon_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                           const at::Tensor& lse, const at::Tensor& num_pos, double temperature,
                           int64_t anchor_start, int64_t anchor_count, int64_t num_classes) {
  check_cuda(z);
  const c10::cuda::CUDAGuard guard(z.device());
  return supcon_backward_impl(grad_rows, z, labels, lse, num_pos, temperature, anchor_start, anchor_count,
                              num_classes, kCudaEpilogues, tile_size(4096));
}

}  // namespace

TORCH_LIBRARY_IMPL(metric_ds, CUDA, m) {
  m.impl("supcon_fwd", &supcon_fwd_cuda);
  m.impl("supcon_bwd", &supcon_bwd_cuda);
}

}  // namespace metric_ds
