"""The fused ops as modules, for DLA and for any other network with the same patterns."""
from .ops.aggregation import AggregationNode
from .ops.ida_up import IDAUpStep
from .sync_bn import CrossProcessBatchNorm2d

__all__ = ["AggregationNode", "IDAUpStep", "CrossProcessBatchNorm2d"]
