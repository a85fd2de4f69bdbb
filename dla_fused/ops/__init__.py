"""The fused ops, functional form: `aggregation_node` and `ida_up` (and their plain-PyTorch
references). Modules are in `dla_fused.nn`."""
from .aggregation import aggregation_node, aggregation_node_reference
from .ida_up import ida_up, ida_up_reference

__all__ = ["aggregation_node", "aggregation_node_reference", "ida_up", "ida_up_reference"]
