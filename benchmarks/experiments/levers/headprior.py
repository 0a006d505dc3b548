"""A class-prior bias on the segmentation head: accuracy.py with the head's initial weights times HEAD_SCALE
(default 1) and its bias set so that an untrained network predicts each class at its voxel frequency in the
training labels (log-frequency per class, as RetinaNet's prior init). With RECORD, --search-lr writes its
record there instead of learning_rates.json.

    HEAD_SCALE=0.1 RECORD=scores.json python headprior.py --search-lr --steps 600 --lr-grid 0.008 --seed 0 1 \
        --models veloxseg_small_hr --data /tmp/brain /tmp/veloxseg-accuracy-demo-1.0.0
    HEAD_SCALE=0.1 python headprior.py --data /tmp/brain --models veloxseg_small_hr --steps 1600 --seed 0 1 2
"""

import functools
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

scale = float(os.environ.get("HEAD_SCALE", "1"))
build_network = accuracy.build_network


@functools.cache
def class_frequencies(labels: tuple[Path, ...], n_classes: int) -> np.ndarray:
    counts = sum(np.bincount(np.asarray(nib.load(p).dataobj).astype(np.int64).ravel(), minlength=n_classes) for p in labels)
    return np.maximum(counts / counts.sum(), 1e-4)


def prior_head(name, spec, config, *cases):
    model = build_network(name, spec, config, *cases)
    if hasattr(model, "decoder"):
        n_classes = len(spec.labels)
        log_prior = torch.tensor(np.log(class_frequencies(tuple(c.label for c in spec.training), n_classes)))
        head = model.decoder.head
        with torch.no_grad():
            head.weight.mul_(scale)
            head.bias.copy_(log_prior.float().repeat_interleave(head.out_channels // n_classes))
    return model


accuracy.build_network = prior_head
if "RECORD" in os.environ:
    accuracy.search_learning_rates = functools.partial(
        accuracy.search_learning_rates, record_path=Path(os.environ["RECORD"])
    )
sys.argv[0] = str(Path(accuracy.__file__))
accuracy.main()
