"""How far the two labellings of brain tissue agree on one scan: the MNI152 2009a T1 (brain-masked) labelled
from its probability maps (what the tissue tags trained on; thresholds 0.3-0.6) and by the k-means clustering
that scores Colin27 (benchmarks/brain_generalisation.py). Run from the repository root."""
import sys; sys.path.insert(0, "benchmarks"); sys.path.insert(0, "examples")
import numpy as np
from nilearn import datasets
from brain_generalisation import tissue_clusters
from prepare_brain_templates import tissue_labels
def dice(a, b): return 2 * (a & b).sum() / (a.sum() + b.sum())
for res in (1, 2):
    t1 = datasets.load_mni152_template(resolution=res).get_fdata()
    gm = datasets.load_mni152_gm_template(resolution=res).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=res).get_fdata()
    mask = datasets.load_mni152_brain_mask(resolution=res).get_fdata() > 0
    probs = np.stack([gm, wm])
    ref = tissue_labels(probs)  # 1 gm 2 wm
    km = tissue_clusters(np.where(mask, t1, 0))
    print(res, "mm: probmap vs kmeans  GM", round(dice(ref == 1, km == 1), 3), "WM", round(dice(ref == 2, km == 2), 3))
    for thr in (0.3, 0.4, 0.6):
        r2 = tissue_labels(probs, threshold=thr)
        print("   threshold", thr, "GM", round(dice(r2 == 1, km == 1), 3), "WM", round(dice(r2 == 2, km == 2), 3))
