"""Input checks shared by the fused ops: each raises before any output or running statistic
changes, with a message naming the argument and what was expected."""
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, dims: Optional[int] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        layout = {4: " (N, C, H, W)", 1: " (C,)"}.get(dims, "")
        raise ValueError(f"{name} must be {dims}-D{layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def factor(value) -> None:
    """An IDA-Up upsampling factor."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"factor must be an integer >= 1, got {value!r}")


def memory_efficient(value) -> None:
    """The keep-or-recompute switch of the aggregation node."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"memory_efficient must be True, False or None, got {value!r}")


def activation(name: str, t) -> None:
    tensor(name, t, dims=4)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def same_dtype_device(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         "all tensors of one call must be on the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                        "they must match (use torch.autocast for mixed precision)")


def vector(name: str, t, length: int, ref: Tensor) -> None:
    tensor(name, t, dims=1)
    if t.numel() != length:
        raise ValueError(f"{name} must have {length} elements (one per output channel), got {t.numel()}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {ref.device}")


def batch_norm_args(running_mean, running_var, num_batches_tracked, momentum, eps, channels: int,
                    ref: Tensor) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        vector("running_mean", running_mean, channels, ref)
        vector("running_var", running_var, channels, ref)
        if momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be positive, got {eps}")


def more_than_one_value(x: Tensor, what: str) -> None:
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {what} of size "
                         f"{tuple(x.shape)} (batch statistics need N*H*W > 1)")


def same_batch_and_size(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    ref = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:]:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(ref.shape)}: "
                             "batch size and spatial size (N, H, W) must match")


def autocast(t):
    """`t` in the autocast dtype of its device if it is a float32 tensor (what autocast itself
    casts), unchanged otherwise."""
    if t is None or t.dtype != torch.float32:
        return t
    return t.to(torch.get_autocast_dtype(t.device.type))
