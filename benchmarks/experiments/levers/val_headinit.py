"""The head init scale on validation splits: accuracy.py --search-lr with the segmentation head's initial
weights times HEAD_SCALE and the record written to RECORD instead of learning_rates.json.

    HEAD_SCALE=0.1 RECORD=scores.json python val_headinit.py --search-lr --steps 600 --lr-grid 0.008 --seed 0 1 \
        --models veloxseg_small_hr --data /tmp/brain /tmp/veloxseg-accuracy-demo-1.0.0
"""

import functools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

scale = float(os.environ.get("HEAD_SCALE", "1"))
build_network = accuracy.build_network


def scaled(name, spec, config, *cases):
    model = build_network(name, spec, config, *cases)
    if hasattr(model, "decoder"):
        with torch.no_grad():
            model.decoder.head.weight.mul_(scale)
    return model


accuracy.build_network = scaled
accuracy.search_learning_rates = functools.partial(
    accuracy.search_learning_rates, record_path=Path(os.environ["RECORD"])
)
sys.argv[0] = str(Path(accuracy.__file__))
accuracy.main()
