"""The fused ops as modules, for DLA and for any other network with the same patterns."""
from .ops.aggregation import AggregationNode
from .ops.ida_up import IDAUpStep
from .sync_bn import CrossProcessBatchNorm2d, synchronize_batch_norm

# The drop-in for DLA's `Root(in_channels, out_channels, kernel_size, residual)`: same arguments,
# same parameter and buffer names (conv.weight, bn.*).
FusedRoot = AggregationNode

__all__ = ["AggregationNode", "FusedRoot", "IDAUpStep", "CrossProcessBatchNorm2d", "synchronize_batch_norm"]
