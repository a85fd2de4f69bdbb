// IDA-Up primitives on CPU: ../ida_up.h over the at::parallel_for driver.
#include <torch/library.h>

#include "../ida_up.h"
#include "loops.h"

namespace dla_fused {

using CpuIdaUp = IdaUp<CpuLoops>;

TORCH_LIBRARY_IMPL(dla_fused, CPU, m) {
  m.impl("ida_upsample", &CpuIdaUp::upsample);
  m.impl("ida_upsample_backward", &CpuIdaUp::upsample_backward);
}

}  // namespace dla_fused
