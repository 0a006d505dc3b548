"""VeloxSeg: lightweight 3-D medical segmentation (JLC convolutions + paired-window attention, SDKT).

>>> import veloxseg
>>> model = veloxseg.create_model("veloxseg_small")
"""

from typing import Any

from .adapt import AdaptationReport, adapt_state_dict
from .config import VeloxSegConfig
from .convert import load_reference
from .hub import VeloxSeg, push_to_hub, save_pretrained
from .model import VeloxSegOutput, gram_matrix
from .optimize import OptimizedVeloxSeg, optimize
from .registry import create_model, list_models
from .version import __version__

__all__ = [
    "AdaptationReport",
    "OptimizedVeloxSeg",
    "VeloxSeg",
    "VeloxSegConfig",
    "VeloxSegOutput",
    "adapt_state_dict",
    "create_model",
    "gram_matrix",
    "list_models",
    "load_reference",
    "optimize",
    "predict",
    "push_to_hub",
    "save_pretrained",
]


def __getattr__(name: str) -> Any:
    # Whole-scan inference needs MONAI and nibabel: imported on first use, so that building and
    # running the network needs torch and timm only.
    if name == "predict":
        from .predict import predict

        return predict
    raise AttributeError(f"module 'veloxseg' has no attribute {name!r}")
