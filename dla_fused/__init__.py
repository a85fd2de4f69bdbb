"""dla_fused: Deep Layer Aggregation networks with fused aggregation-node and IDA-Up kernels.

    model = dla_fused.create_model("dla34")            # fused by default
    model = dla_fused.DLA34(num_classes=10)            # the same, as a class
    dla_fused.backend_info()                           # what runs where, and why
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _load_source_tree_kernels():
    """The Triton kernels live in the top-level folder kernels/ and are installed as
    dla_fused.kernels (setup.py's package_dir). A source checkout imported without that mapping
    (`setup.py develop`, which pip < 25.3 runs for `pip install -e .` when there is no
    pyproject.toml, or PYTHONPATH alone) does not see them; load them from ../kernels then, if that
    is this project's checkout (setup.py beside it)."""
    if _importlib_util.find_spec(__name__ + ".kernels") is not None:
        return
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    folder = _os.path.join(root, "kernels")
    init = _os.path.join(folder, "__init__.py")
    if not all(_os.path.isfile(f) for f in (init, _os.path.join(folder, "aggregation.py"),
                                              _os.path.join(root, "setup.py"))):
        return
    spec = _importlib_util.spec_from_file_location(__name__ + ".kernels", init,
                                                   submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_source_tree_kernels()

from . import backend, models, nn, ops  # noqa: E402
from .backend import backend_info, get_backend, set_backend  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, load_pretrained  # noqa: E402
from .fuse import fuse, is_fused, set_memory_efficient, set_prepack, unfuse  # noqa: E402
from .models import list_models, parameter_table  # noqa: E402
from . import train  # noqa: E402  (the trainer: dla_fused.train.train(TrainConfig(...)))

__version__ = "0.1.0"


def create_model(name: str, pretrained=None, num_classes=None, fused: bool = True, **kwargs):
    """Build model `name` (see `list_models()`), optionally loading the local checkpoint file
    `pretrained`. `fused=True` (default) routes aggregation nodes and IDA-Up steps through the
    fused ops; `fused=False` gives the plain-PyTorch reference. State dicts are identical."""
    model = models.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    return fuse(model) if fused else model


def _fused_class(base):
    def __init__(self, *args, fused: bool = True, **kwargs):
        base.__init__(self, *args, **kwargs)
        if fused:
            fuse(self)
    doc = f"{base.__doc__ or base.__name__}\n\n    fused=True (default) uses the fused ops; False gives the reference."
    return type(base.__name__, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


for _base in models.VARIANTS.values():
    globals()[_base.__name__] = _fused_class(_base)
del _base

__all__ = ["create_model", "list_models", "parameter_table", "fuse", "unfuse", "is_fused", "set_memory_efficient",
           "set_prepack", "set_backend",
           "get_backend", "backend_info", "load_checkpoint", "load_pretrained", "CheckpointError", "models", "ops", "nn",
           "backend"] + [cls.__name__ for cls in models.VARIANTS.values()]
