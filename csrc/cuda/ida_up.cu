// IDA-Up primitives on CUDA: ../ida_up.h over the CUDA kernel driver.
#include <torch/library.h>

#include "../ida_up.h"
#include "loops.cuh"

namespace dla_fused {

using CudaIdaUp = IdaUp<CudaLoops>;

TORCH_LIBRARY_IMPL(dla_fused, CUDA, m) {
  m.impl("ida_upsample", &CudaIdaUp::upsample);
  m.impl("ida_upsample_backward", &CudaIdaUp::upsample_backward);
}

}  // namespace dla_fused
