"""Loading checkpoints from local files, with errors that say what is wrong with the file.

Accepted: a state_dict, or a dict holding it under 'state_dict' or 'model' (CenterNet, many
trainers), with or without DataParallel's 'module.' prefix; original-layout DLA checkpoints and
timm's (which lack only the never-used `project` modules of levels > 1 tree nodes).
"""
import os
import pickle
from typing import Dict, Iterable, Set

import torch
from torch import nn

from .models.dla import unused_projects

__all__ = ["CheckpointError", "load_checkpoint", "read_state_dict"]

_LISTED = 10  # keys named in an error message before "... and N more"
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The state_dict stored in the local file `path` (weights_only loading, on CPU)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        what = "an empty file" if not head else f"a file starting with {head[:24]!r}"
        if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml")):
            what = "an HTML/XML page (a failed download?)"
        raise CheckpointError(f"{path!r} is not a PyTorch checkpoint: it is {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(f"{path!r} holds objects other than tensors and containers, which "
                                  f"weights_only loading refuses: {str(e).splitlines()[0]}") from e
        raise CheckpointError(f"{path!r} is truncated or corrupt: {e}") from e
    except Exception as e:  # zip/stream/EOF errors all mean a damaged file
        raise CheckpointError(f"{path!r} is truncated or corrupt: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path!r} holds no state_dict (found {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path!r} is not a state_dict: entries that are not tensors: {_listing(not_tensors)}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _optional_keys(model: nn.Module) -> Set[str]:
    """Keys a file may lack: the never-used `project` modules (timm omits them) and BatchNorm's
    num_batches_tracked (absent from checkpoints saved before PyTorch 0.4.1; kept as they are)."""
    keys = {f"{name}.{k}" for name, m in unused_projects(model).items() for k in m.state_dict()}
    return keys | {k for k in model.state_dict() if k.endswith("num_batches_tracked")}


def load_checkpoint(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load the checkpoint at local file `path` into `model` and return the model.

    With `strict`, every key of the file must belong to the model and every key of the model must
    be in the file, except the optional ones (see `_optional_keys`). Shapes must always match.
    Raises CheckpointError (a RuntimeError) naming the file and what is wrong.
    """
    state_dict = read_state_dict(path)
    path = os.fspath(path)
    expected = model.state_dict()
    name = type(model).__name__
    if strict:
        optional = _optional_keys(model)
        missing = [k for k in expected if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            parts = [f"{len(missing)} missing keys: {_listing(missing)}" if missing else "",
                     f"{len(unexpected)} unexpected keys: {_listing(unexpected)}" if unexpected else ""]
            raise CheckpointError(f"{path!r} does not fit {name}: " + "; ".join(p for p in parts if p))
    mismatched = [f"{k} (model {tuple(expected[k].shape)}, file {tuple(v.shape)})"
                  for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise CheckpointError(f"{path!r} does not fit {name}: {len(mismatched)} shape mismatches: "
                              f"{_listing(mismatched)}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model
