// Fused Supervised Contrastive loss: shared declarations.
//
// The maths is documented once, in metric_ds/ops/reference.py. This op computes exactly that loss without
// materialising the (anchors x m) similarity matrix: one tile loop (supcon_loop.cpp), shared by CPU and CUDA,
// computes similarity tiles with ATen matmul (operands in z's own dtype, fp32 accumulation and output: tensor
// cores for bf16/fp16 on CUDA) and hands each tile to small device-specific epilogues
// (supcon_cpu.cpp, supcon_cuda.cu) that update per-row statistics (forward) or turn the tile into gradient
// weights (backward). When the anchors are the whole contrast set, S_IJ = S_JI^T lets one tile serve both
// row blocks, so forward + backward cost two B x B x d matmuls in total.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

// Everything declared here is internal to each library (hidden): the CPU and the CUDA library each link their own
// copy of the tile loop (supcon_loop.cpp) and both are loaded into one process with RTLD_GLOBAL, where an exported
// copy would also be called by the other library. tests/test_ops_build.py checks that neither exports it.
#pragma GCC visibility push(hidden)

namespace metric_ds {

// Per-device epilogues. Tiles hold raw dot products z_i . z_j in the accumulation type (fp32, fp64 for fp64
// inputs), contiguous, row-major; `scale` (1/temperature) turns them into logits as they are read. `self_offset`:
// row i's own column inside the tile is i + self_offset (none outside [0, tj)).
// Positives never reach the tiles: sum_{p in P(i)} S_ip = z_i . (class sum of y_i - z_i) / tau is computed from
// per-class sums in O(m d), and likewise the positive part of the gradient.
struct Epilogues {
  // Online log-sum-exp over j != self of the tile's rows: merge the tile's row max and sum of exp into
  // (run_max, run_sum).
  void (*row_stats)(const at::Tensor& tile, double scale, int64_t self_offset, at::Tensor& run_max,
                    at::Tensor& run_sum);
  // The same for the tile's columns (the symmetric case's S_JI = S_IJ^T, read in place; an off-diagonal tile,
  // so no self entries).
  void (*col_stats)(const at::Tensor& tile, double scale, at::Tensor& run_max, at::Tensor& run_sum);
  // In place: tile[i][j] = coef_i * exp(S_ij - lse_i), plus, when column statistics are given (the symmetric
  // case), coef_j * exp(S_ij - lse_j); self entries become 0. coef = upstream gradient, 0 for anchors without
  // positives.
  void (*grad_tile)(at::Tensor& tile, double scale, int64_t self_offset, const at::Tensor& lse_rows,
                    const at::Tensor& coef_rows, const at::Tensor* lse_cols, const at::Tensor* coef_cols);
};

// Tile width (rows and columns of a similarity tile); METRIC_DS_SUPCON_TILE overrides it.
int64_t tile_size(int64_t default_size);

// Forward: returns (per-anchor loss (n,), log-sum-exp (n,), positive count (n,)), all fp32.
// num_classes >= 0: labels are already in [0, num_classes) and no step waits for the device; -1: any int64 labels
// (remapped with unique(), a host-device synchronisation).
std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_forward_impl(
    const at::Tensor& z, const at::Tensor& labels, double temperature, int64_t anchor_start,
    int64_t anchor_count, int64_t num_classes, const Epilogues& ep, int64_t tile);

// Backward: gradient of sum_i grad_rows[i] * loss_i with respect to z, in z's dtype.
at::Tensor supcon_backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& labels,
                                const at::Tensor& lse, const at::Tensor& num_pos, double temperature,
                                int64_t anchor_start, int64_t anchor_count, int64_t num_classes,
                                const Epilogues& ep, int64_t tile);

// Argument checks shared by both devices (TORCH_CHECK with the argument's name).
void check_inputs(const at::Tensor& z, const at::Tensor& labels, double temperature, int64_t anchor_start,
                  int64_t anchor_count);

}  // namespace metric_ds

#pragma GCC visibility pop
