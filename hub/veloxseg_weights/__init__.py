"""The published VeloxSeg tags' weights: a data-only distribution, ``veloxseg-weights``.

``pip install "veloxseg[weights]"`` installs it (the version veloxseg pins); in a checkout,
``pip install ./hub`` builds it from this folder. It holds one folder per tag under :data:`MODELS`,
``<variant>.<tag>/`` with config.json, model.safetensors, README.md and NOTICE (where the data's
licenses ask for one): the same files ``hub/publish.py`` pushes to the Hub repo ``veloxseg/<variant>.<tag>``.
The wheel's RECORD lists each file with its SHA-256, and veloxseg checks every file against the SHA-256
its registry records (``veloxseg.variants.PUBLISHED``) before loading it.
"""

from pathlib import Path

__version__ = "0.1.0"  # the version of veloxseg whose registry records these files' SHA-256

# In a checkout, a link to hub/ itself.
MODELS = Path(__file__).resolve().parent / "models"
