"""dla_fused: Deep Layer Aggregation networks with fused aggregation-node and IDA-Up kernels."""
__version__ = "0.1.0"
