"""How far the two labellings of brain tissue agree on one scan: the MNI152 2009a T1 (brain-masked) labelled
from its probability maps (what the tissue tags trained on; thresholds 0.3-0.6) or from its tissue posteriors
(``prepare_brain_templates.py --labels posterior``), against the k-means clustering that scores Colin27
(benchmarks/brain_generalisation.py). Run from the repository root."""

import sys

import numpy as np
from nilearn import datasets

sys.path[:0] = ["benchmarks", "examples"]
from brain_generalisation import tissue_clusters  # noqa: E402
from prepare_brain_templates import tissue_labels, tissue_posteriors  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 3)


for mm in (1, 2):
    t1 = datasets.load_mni152_template(resolution=mm).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=mm).get_fdata() > 0
    maps = np.stack([datasets.load_mni152_gm_template(resolution=mm).get_fdata(),
                     datasets.load_mni152_wm_template(resolution=mm).get_fdata()])  # fmt: skip
    clusters = tissue_clusters(np.where(brain, t1, 0))
    labellings = {f"maps >= {t}": tissue_labels(maps, threshold=t) for t in (0.3, 0.4, 0.5, 0.6)}
    labellings["posteriors"] = tissue_labels(tissue_posteriors(t1.astype(np.float32), maps.astype(np.float32)))
    for name, labels in labellings.items():
        print(f"{mm} mm, {name} vs k-means: grey {dice(labels == 1, clusters == 1)}, white {dice(labels == 2, clusters == 2)}")
