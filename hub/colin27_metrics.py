"""The ``--metric`` flags of hub/make_tag.py for a tissue tag's numbers on Colin27, a T1 brain of another
source that no tag trains on, read from the held-out benchmarks' results:

    python hub/colin27_metrics.py veloxseg_small   # -> --metric colin27_dice_1mm 0.7490 ... --metric colin27_finetune_dice ...

* ``colin27_dice_<mm>mm``: mean grey / white matter Dice without fine-tuning at each resolution
  (``benchmarks/results/brain-generalisation.json``, from benchmarks/brain_generalisation.py);
* ``colin27_tta_dice_<mm>mm``: the same with test-time mirroring (``brain-generalisation-tta.json``, from
  its ``--tta``), when that file exists;
* ``colin27_finetune_dice`` / ``colin27_scratch_dice``: test Dice after fine-tuning the tag and after
  training from scratch, mean over seeds (``benchmarks/results/finetune-colin27-<variant>.json``, from
  benchmarks/finetune.py).
"""

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def colin27_metrics(variant: str, results: Path = RESULTS) -> dict[str, float]:
    """The Colin27 metrics of ``variant``'s tissue tag, by metric name."""
    metrics = {}
    for name, prefix in (("brain-generalisation", "colin27_dice_"), ("brain-generalisation-tta", "colin27_tta_dice_")):
        if name == "brain-generalisation" or (results / f"{name}.json").is_file():
            generalisation = json.loads((results / f"{name}.json").read_text())[variant]
            metrics |= {f"{prefix}{mm.replace('.', '_')}mm": dice["mean"] for mm, dice in generalisation.items()}
    rows = json.loads((results / f"finetune-colin27-{variant}.json").read_text())["rows"]
    for start, name in (("mni152_tissue", "colin27_finetune_dice"), ("scratch", "colin27_scratch_dice")):
        metrics[name] = statistics.mean(row["dice_mean"] for row in rows if row["start"] == start)
    return metrics


if __name__ == "__main__":
    flags = [f"--metric {name} {value:.4f}" for name, value in colin27_metrics(sys.argv[1]).items()]
    print(" ".join(flags))
