"""VeloxSeg: lightweight 3-D medical segmentation (JLC convolutions + paired-window attention, SDKT).

>>> import veloxseg
>>> model = veloxseg.create_model("veloxseg_small")
"""

from .config import VeloxSegConfig
from .convert import load_reference
from .model import VeloxSeg, VeloxSegOutput, gram_matrix
from .registry import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "VeloxSeg",
    "VeloxSegConfig",
    "VeloxSegOutput",
    "create_model",
    "gram_matrix",
    "list_models",
    "load_reference",
]
