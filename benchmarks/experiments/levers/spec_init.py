"""accuracy.py with VeloxSeg's head at the spec's init (Kaiming weights, zero bias), the default recipe's
head init before the class prior: the control for the head-init runs on today's tree.

    python spec_init.py --data /tmp/data/colin27 --models veloxseg_small_hr --steps 1600 --seed 0
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

setup_config = accuracy.setup_config


def spec_init_config(*args, **kwargs):
    return dataclasses.replace(setup_config(*args, **kwargs), head_init_scale=1.0, head_class_prior=False)


accuracy.setup_config = spec_init_config
sys.argv[0] = str(Path(accuracy.__file__))
accuracy.main()
