// Aggregation-node primitives on CUDA: ../aggregation.h over the CUDA kernel driver.
#include <torch/library.h>

#include "../aggregation.h"
#include "loops.cuh"

namespace dla_fused {

using CudaAggregation = Aggregation<CudaLoops>;

TORCH_LIBRARY_IMPL(dla_fused, CUDA, m) {
  m.impl("agg_conv", &CudaAggregation::conv);
  m.impl("agg_apply_", &CudaAggregation::apply_);
  m.impl("agg_apply", &CudaAggregation::apply);
  m.impl("agg_backward_reduce", &CudaAggregation::backward_reduce);
  m.impl("agg_backward_dz_", &CudaAggregation::backward_dz_);
  m.impl("agg_backward_dz", &CudaAggregation::backward_dz);
  m.impl("agg_backward_gemm", &CudaAggregation::backward_gemm);
  m.impl("agg_activation_grad", &CudaAggregation::activation_grad);
}

}  // namespace dla_fused
