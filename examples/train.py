"""Train VeloxSeg with Accelerate: the example behind ``veloxseg train`` (:mod:`veloxseg.train`, where
the recipes, stages and ``accelerate launch`` use are described).

    python examples/train.py --output-dir runs/demo
    accelerate launch --multi_gpu --num_processes 2 examples/train.py --data DIR --output-dir runs/lesions

Its flags are the TrainConfig fields (:mod:`veloxseg.training`); ``--help`` lists them.
"""

import sys

from veloxseg.train import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/train.py"))
