"""The segmentation head's initial weights times HEAD_SCALE (0.1 by default); accuracy.py otherwise.

    HEAD_SCALE=0.1 python acc_headinit.py --data /tmp/brain --models veloxseg_small_hr --steps 1600 --seed 0 1 2
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

scale = float(os.environ.get("HEAD_SCALE", "0.1"))
build_network = accuracy.build_network


def scaled_head_network(name, spec, config, *cases):
    model = build_network(name, spec, config, *cases)
    if hasattr(model, "decoder"):  # VeloxSeg; MONAI's networks are left alone
        with torch.no_grad():
            model.decoder.head.weight.mul_(scale)
    return model


accuracy.build_network = scaled_head_network
sys.argv[0] = str(Path(accuracy.__file__))
accuracy.main()
