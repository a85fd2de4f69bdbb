// Aggregation-node primitives on CPU: ../aggregation.h over the at::parallel_for driver.
#include <torch/library.h>

#include "../aggregation.h"
#include "loops.h"

namespace dla_fused {

using CpuAggregation = Aggregation<CpuLoops>;

TORCH_LIBRARY_IMPL(dla_fused, CPU, m) {
  m.impl("agg_conv", &CpuAggregation::conv);
  m.impl("agg_apply_", &CpuAggregation::apply_);
  m.impl("agg_apply", &CpuAggregation::apply);
  m.impl("agg_backward_reduce", &CpuAggregation::backward_reduce);
  m.impl("agg_backward_dz_", &CpuAggregation::backward_dz_);
  m.impl("agg_backward_dz", &CpuAggregation::backward_dz);
  m.impl("agg_backward_gemm", &CpuAggregation::backward_gemm);
  m.impl("agg_activation_grad", &CpuAggregation::activation_grad);
}

}  // namespace dla_fused
