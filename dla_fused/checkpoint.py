"""Loading checkpoints from local files, with errors that say what is wrong with the file.

Accepted: a state_dict, or a dict holding it under 'state_dict' or 'model' (CenterNet, many
trainers), with or without DataParallel's 'module.' prefix, or a .safetensors file (timm's
downloads from the Hugging Face Hub; needs the safetensors package); original-layout DLA
checkpoints and timm's (which lack only the never-used `project` modules of levels > 1 tree nodes).
"""
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, Set

import torch
from torch import nn

from .models.dla import unused_projects

__all__ = ["CheckpointError", "PretrainedReport", "load_checkpoint", "load_pretrained", "read_state_dict"]

_LISTED = 10  # keys named in an error message before "... and N more"
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def _listing(items: Iterable[str], limit: int = _LISTED) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The state_dict stored in the local file `path` (weights_only loading, on CPU)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) > 9 and head[8:10] in (b'{"', b"{'", b"{ ") and int.from_bytes(head[:8], "little") > 1:
        obj = _read_safetensors(path)
    else:
        obj = _read_torch_file(path, head)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path!r} holds no state_dict (found {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path!r} is not a state_dict: entries that are not tensors: {_listing(not_tensors)}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _read_torch_file(path: str, head: bytes):
    """What torch.save wrote to `path` (whose first bytes are `head`), unwrapped from a
    'state_dict' or 'model' entry."""
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
    return obj


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """A .safetensors file (the Hugging Face Hub's format, timm's downloads): 8 bytes of header
    length, a JSON header, the tensors."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f"{path!r} is a safetensors file: install the safetensors package to read it "
                              "(pip install safetensors)") from e
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt safetensors file: {type(e).__name__}: {e}") from e


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


@dataclass
class PretrainedReport:
    """What `load_pretrained` did with each tensor."""
    kept: List[str] = field(default_factory=list)           # loaded from the file
    reinitialised: List[str] = field(default_factory=list)  # head tensors whose shape differs (left as built)
    not_in_file: List[str] = field(default_factory=list)    # model tensors the file lacks (left as built)
    unused: List[str] = field(default_factory=list)         # file tensors the model has no place for
    prefix: str = ""  # "base.": added to the file's keys; "-base.": only the file's base.* keys, prefix removed

    def summary(self) -> str:
        def modules(keys):  # tensors counted per top-level module
            counts: Dict[str, int] = {}
            for k in keys:
                top = k.split(".")[0]
                counts[top] = counts.get(top, 0) + 1
            return _listing([f"{m} ({n})" for m, n in sorted(counts.items())])
        where = {"": "", "base.": " (the file's keys under 'base.')",
                 "-base.": " (the file's 'base.' keys, as the backbone)"}[self.prefix]
        lines = [f"kept {len(self.kept)} tensors{where}"]
        if self.reinitialised:
            lines.append(f"re-initialised {len(self.reinitialised)} (head: another shape, or never trained): "
                         f"{_listing(self.reinitialised)}")
        if self.not_in_file:
            lines.append(f"initialised fresh {len(self.not_in_file)} (not in the file): {modules(self.not_in_file)}")
        if self.unused:
            lines.append(f"left out {len(self.unused)} of the file's tensors (no place in the model): "
                         f"{modules(self.unused)}")
        return "; ".join(lines)


def _renamed(key: str, prefix: str) -> str:
    """The model's name for the file's `key` under load_pretrained's prefix rule."""
    if prefix == "base.":
        return prefix + key
    if prefix == "-base.":
        return key[len("base."):] if key.startswith("base.") else "<not the backbone> " + key
    return key


def load_pretrained(model: nn.Module, path, head: Sequence[str] = ()) -> PretrainedReport:
    """Start `model` from the checkpoint at local file `path` for fine-tuning.

    Every tensor of the file whose name and shape match the model is loaded. The modules named in
    `head` (e.g. ("fc",)) may differ in shape (another number of classes): those tensors keep the
    model's own initialisation. A shape mismatch anywhere else is an error (another variant);
    tensors only the model has (a new decoder or head) keep their initialisation, tensors only
    the file has (another task's heads) are left out. A backbone checkpoint (original release or
    timm) loads into the `base` of a dense model, and a dense model's `base` into a classifier (its
    never-trained `base.fc` not as the head). The report says which tensors went where.
    Raises CheckpointError naming the file and what is wrong, before the model is changed.
    """
    state_dict = read_state_dict(path)
    path = os.fspath(path)
    expected = model.state_dict()
    name = type(model).__name__
    prefix, original = "", list(state_dict)
    if not set(state_dict) & set(expected):
        if isinstance(getattr(model, "base", None), nn.Module) and {"base." + k for k in state_dict} & set(expected):
            prefix = "base."  # a classifier's checkpoint for a dense model's backbone
            state_dict = {prefix + k: v for k, v in state_dict.items()}
        elif {k[len("base."):] for k in state_dict if k.startswith("base.")} & set(expected):
            prefix = "-base."  # a dense model's checkpoint for a classifier: its backbone
            state_dict = {k[len("base."):]: v for k, v in state_dict.items() if k.startswith("base.")}
    common = [k for k in expected if k in state_dict]
    if not common:
        raise CheckpointError(f"{path!r} shares no tensor names with {name}: is it a checkpoint of another "
                              f"network? (its keys: {_listing(list(state_dict))})")

    def in_head(key):
        return any(key == h or key.startswith(h + ".") for h in head)
    mismatched = [k for k in common if state_dict[k].shape != expected[k].shape]
    if prefix == "-base.":  # a dense model's backbone classifier was never trained: the head starts afresh
        mismatched += [k for k in common if in_head(k) and k not in mismatched]
    outside = [f"{k} (model {tuple(expected[k].shape)}, file {tuple(state_dict[k].shape)})"
               for k in mismatched if not in_head(k)]
    if outside:
        raise CheckpointError(f"{path!r} does not fit {name}: {len(outside)} shape mismatches outside the head "
                              f"({', '.join(head) or 'none'}): {_listing(outside)}; is it a checkpoint of "
                              "another variant?")
    optional = _optional_keys(model)
    report = PretrainedReport(
        kept=[k for k in common if k not in mismatched], reinitialised=mismatched,
        not_in_file=[k for k in expected if k not in state_dict and k not in optional],
        unused=[k for k in original if _renamed(k, prefix) not in expected], prefix=prefix)
    model.load_state_dict({k: state_dict[k] for k in report.kept}, strict=False)
    return report
